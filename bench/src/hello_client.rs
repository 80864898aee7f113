//! Hello mode's client: send a pre-built ClientHello, classify the first record of the answer,
//! close.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use crate::hello::{read_reply, Reply};
use crate::net::{self, DeadlineStream};
use crate::outcome::{Failure, Outcome, Phase, Stop};

pub fn attempt(
    addr: SocketAddr,
    source: Option<IpAddr>,
    hello: &[u8],
    deadline: Instant,
) -> Outcome {
    run(addr, source, hello, deadline).into()
}

fn run(
    addr: SocketAddr,
    source: Option<IpAddr>,
    hello: &[u8],
    deadline: Instant,
) -> Result<(), Stop> {
    let stream =
        net::connect(addr, source, deadline).map_err(|e| Failure::from_io(Phase::Connect, e))?;
    let mut io = DeadlineStream::new(stream, deadline);
    io.write_all(hello).map_err(|e| Failure::from_io(Phase::Handshake, e))?;
    match read_reply(&mut io).map_err(Failure::Reply)? {
        Reply::ServerHello => Ok(()),
        Reply::Alert { description, .. } => Err(Stop::Alert(description)),
    }
    // Dropping the socket closes it. Whatever the server sent after the first record is left
    // unread, so the kernel answers with a reset: no TIME_WAIT on this side, no lingering.
}

//! TCP connections bounded by one deadline: connect (from a chosen local address if asked) and a
//! stream whose every read and write gives up when the deadline passes.

use std::io::{self, Read, Write};
use std::mem;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Connects to `addr` before `deadline`, with TCP_NODELAY set.
pub fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
    deadline: Instant,
) -> io::Result<TcpStream> {
    let remaining = remaining(deadline)?;
    let stream = match source {
        None => TcpStream::connect_timeout(&addr, remaining)?,
        Some(ip) => connect_from(ip, addr, deadline)?,
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn remaining(deadline: Instant) -> io::Result<Duration> {
    match deadline.checked_duration_since(Instant::now()) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed")),
    }
}

/// A stream whose reads and writes fail with `TimedOut` once `deadline` has passed.
pub struct DeadlineStream {
    stream: TcpStream,
    deadline: Instant,
}

impl DeadlineStream {
    pub fn new(stream: TcpStream, deadline: Instant) -> Self {
        DeadlineStream { stream, deadline }
    }

    fn timed<T>(
        &mut self,
        arm: fn(&TcpStream, Option<Duration>) -> io::Result<()>,
        op: impl FnOnce(&mut TcpStream) -> io::Result<T>,
    ) -> io::Result<T> {
        arm(&self.stream, Some(remaining(self.deadline)?))?;
        // A socket timeout shows as WouldBlock on Unix; one kind keeps classification simple.
        op(&mut self.stream).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock => io::Error::new(io::ErrorKind::TimedOut, "timed out"),
            _ => e,
        })
    }
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.timed(TcpStream::set_read_timeout, |s| s.read(buf))
    }
}

impl Write for DeadlineStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.timed(TcpStream::set_write_timeout, |s| s.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// std cannot bind before connecting, so this builds the socket by hand: bind the source address
/// with IP_BIND_ADDRESS_NO_PORT, then a non-blocking connect waited for with poll.
fn connect_from(source: IpAddr, addr: SocketAddr, deadline: Instant) -> io::Result<TcpStream> {
    let family = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe {
        libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0)
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns; OwnedFd closes it on every path.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };

    // Without this, bind picks the local port at once and cannot reuse ports that earlier
    // connections left in TIME_WAIT, so a long run from one source address would run out of
    // ports; with it, connect picks the port and may reuse them. Best effort: a kernel without
    // the option still works, only with fewer ports.
    let one: libc::c_int = 1;
    // SAFETY: the option value points at a live c_int of the size passed.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }

    with_sockaddr(SocketAddr::new(source, 0), |sa, len| {
        // SAFETY: `sa` points at a socket address of `len` bytes, valid for this call.
        check(unsafe { libc::bind(fd.as_raw_fd(), sa, len) })
    })?;
    let started = with_sockaddr(addr, |sa, len| {
        // SAFETY: as for bind.
        check(unsafe { libc::connect(fd.as_raw_fd(), sa, len) })
    });
    match started {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => wait_writable(&fd, deadline)?,
        Err(e) => return Err(e),
    }

    let stream = TcpStream::from(fd);
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    stream.set_nonblocking(false)?;
    Ok(stream)
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn with_sockaddr<T>(
    addr: SocketAddr,
    f: impl FnOnce(*const libc::sockaddr, libc::socklen_t) -> T,
) -> T {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_in is plain old data, for which all zero bytes is a valid value.
            let mut sa: libc::sockaddr_in = unsafe { mem::zeroed() };
            sa.sin_family = libc::AF_INET as libc::sa_family_t;
            sa.sin_port = a.port().to_be();
            sa.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            let len = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            f((&sa as *const libc::sockaddr_in).cast(), len)
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let mut sa: libc::sockaddr_in6 = unsafe { mem::zeroed() };
            sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sa.sin6_port = a.port().to_be();
            sa.sin6_addr.s6_addr = a.ip().octets();
            sa.sin6_flowinfo = a.flowinfo();
            sa.sin6_scope_id = a.scope_id();
            let len = mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            f((&sa as *const libc::sockaddr_in6).cast(), len)
        }
    }
}

fn wait_writable(fd: &OwnedFd, deadline: Instant) -> io::Result<()> {
    loop {
        let left = remaining(deadline)?;
        // Round up so that a wait of 0.3 ms is not a busy poll of 0 ms.
        let ms = left.as_micros().div_ceil(1000).min(libc::c_int::MAX as u128) as libc::c_int;
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
        // SAFETY: one valid pollfd, and its count of 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc > 0 {
            return Ok(());
        }
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn listener(ip: &str) -> TcpListener {
        TcpListener::bind((ip, 0)).expect("bind a loopback listener")
    }

    #[test]
    fn connects_with_and_without_source() {
        let server = listener("127.0.0.1");
        let addr = server.local_addr().expect("local addr");
        let cases: &[(Option<&str>, &str)] = &[
            (None, "127.0.0.1"),
            (Some("127.0.0.1"), "127.0.0.1"),
            (Some("127.0.0.2"), "127.0.0.2"),
        ];
        for (source, local) in cases {
            let deadline = Instant::now() + Duration::from_secs(5);
            let source = source.map(|s| s.parse().expect("ip"));
            let stream = connect(addr, source, deadline).expect("connect");
            assert!(stream.nodelay().expect("nodelay"));
            let (accepted, peer) = server.accept().expect("accept");
            assert_eq!(peer.ip().to_string(), *local);
            assert_eq!(stream.local_addr().expect("local").ip().to_string(), *local);
            drop(accepted);
        }
    }

    #[test]
    fn refused_is_an_error_with_and_without_source() {
        // A port that was just free: bind, note it, close.
        let addr = listener("127.0.0.1").local_addr().expect("local addr");
        for source in [None, Some("127.0.0.1".parse().expect("ip"))] {
            let deadline = Instant::now() + Duration::from_secs(5);
            let err = connect(addr, source, deadline).expect_err("nothing listens");
            assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{source:?}");
        }
    }

    #[test]
    fn read_times_out_at_deadline() {
        let server = listener("127.0.0.1");
        let addr = server.local_addr().expect("local addr");
        let deadline = Instant::now() + Duration::from_millis(150);
        let stream = connect(addr, None, deadline).expect("connect");
        let _held = server.accept().expect("accept");
        let mut timed = DeadlineStream::new(stream, deadline);
        let started = Instant::now();
        let err = timed.read(&mut [0u8; 1]).expect_err("nothing is sent");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(2));
        // Once past the deadline, nothing more is tried.
        let err = timed.write(b"x").expect_err("deadline passed");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}

//! Full mode: one real TLS client connection with rustls, a full handshake every time.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::ring as provider;
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::net::{self, DeadlineStream};
use crate::outcome::{Failure, Outcome, Phase, Stop};

/// Accepts every certificate and signature without looking at them.
///
/// This is a benchmark client that only ever talks to a server on loopback that the benchmark
/// itself started with a throw-away self-signed certificate: there is nothing to authenticate,
/// and checking would only add client CPU time to the numbers. Never use it for anything else.
#[derive(Debug)]
struct AcceptAnything {
    schemes: Vec<SignatureScheme>,
}

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        // Offer what a real client would, so that the server signs as it would for one.
        self.schemes.clone()
    }
}

/// TLS 1.3 (or 1.2), X25519 only, no resumption: every connection pays a full handshake.
pub fn client_config(tls12: bool) -> Result<Arc<ClientConfig>, rustls::Error> {
    let version = if tls12 { &rustls::version::TLS12 } else { &rustls::version::TLS13 };
    let mut crypto = provider::default_provider();
    crypto.kx_groups = vec![provider::kx_group::X25519];
    // rustls would offer the suites of every version; keep the hello to the one version asked.
    crypto.cipher_suites.retain(|suite| suite.version() == version);
    let schemes = crypto.signature_verification_algorithms.supported_schemes();
    let versions = [version];
    let mut config = ClientConfig::builder_with_provider(Arc::new(crypto))
        .with_protocol_versions(&versions)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything { schemes }))
        .with_no_client_auth();
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// Where and how to connect; the same for every attempt of a run.
pub struct Target {
    pub config: Arc<ClientConfig>,
    pub addr: SocketAddr,
    pub source: Option<IpAddr>,
    pub request: bool,
}

/// The prefix a --request answer must start with to count as completed.
const OK_STATUS: &[u8] = b"HTTP/1.1 200";
/// How much of an answer is kept: enough for its status line in an error message.
const HEAD_KEPT: usize = 64;

/// One connection for `name` (whose text is `host`), bounded by `deadline`.
pub fn attempt(
    target: &Target,
    name: ServerName<'static>,
    host: &str,
    deadline: Instant,
) -> Outcome {
    run(target, name, host, deadline).into()
}

fn run(
    target: &Target,
    name: ServerName<'static>,
    host: &str,
    deadline: Instant,
) -> Result<(), Stop> {
    let stream = net::connect(target.addr, target.source, deadline)
        .map_err(|e| Failure::from_io(Phase::Connect, e))?;
    let mut io = DeadlineStream::new(stream, deadline);
    let mut conn = ClientConnection::new(target.config.clone(), name).map_err(Failure::Tls)?;

    while conn.is_handshaking() {
        send(&mut conn, &mut io, Phase::Handshake)?;
        if receive(&mut conn, &mut io, Phase::Handshake)? == 0 {
            return Err(Failure::Eof(Phase::Handshake).into());
        }
    }
    // The client's Finished: without it the server has not finished its handshake.
    send(&mut conn, &mut io, Phase::Handshake)?;

    if target.request {
        request(&mut conn, &mut io, host)?;
    }
    Ok(())
}

fn request(conn: &mut ClientConnection, io: &mut DeadlineStream, host: &str) -> Result<(), Stop> {
    let text = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    conn.writer().write_all(text.as_bytes()).map_err(|e| Failure::Io(Phase::Request, e))?;
    send(conn, io, Phase::Request)?;

    let mut head = Vec::with_capacity(HEAD_KEPT);
    let mut buf = [0u8; 4096];
    loop {
        match conn.reader().read(&mut buf) {
            // The server's close_notify.
            Ok(0) => break,
            Ok(n) => {
                let keep = n.min(HEAD_KEPT - head.len());
                head.extend_from_slice(&buf[..keep]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Once the TCP stream ends, the reader answers Ok(0) or UnexpectedEof.
                receive(conn, io, Phase::Request)?;
            }
            // Closed without close_notify: the answer is still complete with Connection: close.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(Failure::Io(Phase::Request, e).into()),
        }
    }
    if head.starts_with(OK_STATUS) {
        Ok(())
    } else {
        let line = head.split(|b| *b == b'\r' || *b == b'\n').next().unwrap_or_default();
        Err(Failure::Http(String::from_utf8_lossy(line).into_owned()).into())
    }
}

/// Writes everything rustls has queued.
fn send(conn: &mut ClientConnection, io: &mut DeadlineStream, phase: Phase) -> Result<(), Stop> {
    while conn.wants_write() {
        match conn.write_tls(io) {
            Ok(0) => return Err(Failure::Eof(phase).into()),
            Ok(_) => {}
            Err(e) => return Err(Failure::from_io(phase, e).into()),
        }
    }
    Ok(())
}

/// Reads once from the socket and lets rustls process it; returns the bytes read (0 at EOF).
fn receive(
    conn: &mut ClientConnection,
    io: &mut DeadlineStream,
    phase: Phase,
) -> Result<usize, Stop> {
    let n = conn.read_tls(io).map_err(|e| Failure::from_io(phase, e))?;
    conn.process_new_packets().map_err(|e| match e {
        rustls::Error::AlertReceived(alert) => Stop::Alert(u8::from(alert)),
        other => Stop::Failed(Failure::Tls(other)),
    })?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::Acceptor;
    use rustls::{CipherSuite, NamedGroup};

    /// The ClientHello a config makes, as rustls' server side parses it.
    fn hello_of(config: Arc<ClientConfig>) -> (Option<String>, Vec<CipherSuite>, Vec<NamedGroup>) {
        let name = ServerName::try_from("a.example").expect("name");
        let mut conn = ClientConnection::new(config, name).expect("connection");
        let mut bytes = Vec::new();
        conn.write_tls(&mut bytes).expect("write_tls");
        let mut acceptor = Acceptor::default();
        acceptor.read_tls(&mut bytes.as_slice()).expect("read_tls");
        let accepted = match acceptor.accept() {
            Ok(Some(a)) => a,
            Ok(None) => panic!("incomplete hello"),
            Err((e, _)) => panic!("hello rejected: {e}"),
        };
        let ch = accepted.client_hello();
        (
            ch.server_name().map(str::to_owned),
            ch.cipher_suites().to_vec(),
            ch.named_groups().map(<[NamedGroup]>::to_vec).unwrap_or_default(),
        )
    }

    #[test]
    fn hellos_of_both_versions() {
        for tls12 in [false, true] {
            let (sni, suites, groups) = hello_of(client_config(tls12).expect("config"));
            assert_eq!(sni.as_deref(), Some("a.example"));
            assert_eq!(groups, [NamedGroup::X25519], "tls12={tls12}");
            // TLS 1.3 suites are 0x13xx; a TLS 1.2-only client offers none of them.
            let tls13_suites = suites.iter().filter(|s| u16::from(**s) >> 8 == 0x13).count();
            let real_suites = suites
                .iter()
                .filter(|s| **s != CipherSuite::TLS_EMPTY_RENEGOTIATION_INFO_SCSV)
                .count();
            if tls12 {
                assert_eq!(tls13_suites, 0, "{suites:?}");
                assert!(real_suites > 0, "{suites:?}");
            } else {
                assert_eq!(tls13_suites, real_suites, "{suites:?}");
            }
        }
    }
}

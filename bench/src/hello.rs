//! Hello mode's wire format: a hand-made TLS 1.3 ClientHello, and the reading of the first record
//! a server answers with. No TLS library: the point is a client that costs next to nothing.

use std::fmt;
use std::io::{self, Read};

use crate::rng::Rng;

/// The x25519 public key every hello offers. Fixed random bytes rather than a fresh key pair:
/// this client never completes a handshake, so it never needs the private half, and the server
/// still does its full key agreement against a point that is valid with overwhelming odds.
pub const X25519_KEY_SHARE: [u8; 32] = [
    0xa2, 0x7a, 0x55, 0x69, 0x5e, 0x03, 0x79, 0x92, 0xb6, 0x67, 0x51, 0x77, 0xd1, 0x00, 0x31, 0xf6,
    0x3c, 0x0e, 0xbc, 0xd1, 0x8e, 0x67, 0xa0, 0xf9, 0x0d, 0x11, 0x8f, 0x42, 0x58, 0x80, 0xb8, 0x63,
];

/// TLS 1.3 suites first, then the ECDHE AEAD suites of TLS 1.2, as a current client offers them.
pub const CIPHER_SUITES: [u16; 9] = [
    0x1301, // TLS_AES_128_GCM_SHA256
    0x1302, // TLS_AES_256_GCM_SHA384
    0x1303, // TLS_CHACHA20_POLY1305_SHA256
    0xc02b, // TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
    0xc02f, // TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
    0xc02c, // TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
    0xc030, // TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
    0xcca9, // TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
    0xcca8, // TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
];

pub const SIGNATURE_SCHEMES: [u16; 8] = [
    0x0403, // ecdsa_secp256r1_sha256
    0x0804, // rsa_pss_rsae_sha256
    0x0401, // rsa_pkcs1_sha256
    0x0503, // ecdsa_secp384r1_sha384
    0x0805, // rsa_pss_rsae_sha384
    0x0501, // rsa_pkcs1_sha384
    0x0806, // rsa_pss_rsae_sha512
    0x0601, // rsa_pkcs1_sha512
];

pub const GROUP_X25519: u16 = 0x001d;
pub const GROUP_SECP256R1: u16 = 0x0017;

const EXT_SERVER_NAME: u16 = 0;
const EXT_SUPPORTED_GROUPS: u16 = 10;
const EXT_EC_POINT_FORMATS: u16 = 11;
const EXT_SIGNATURE_ALGORITHMS: u16 = 13;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const EXT_KEY_SHARE: u16 = 51;

const RECORD_HANDSHAKE: u8 = 22;
const RECORD_ALERT: u8 = 21;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const HANDSHAKE_SERVER_HELLO: u8 = 2;

/// Longest name a hello carries: the limit of a DNS name, far below any length field's.
pub const MAX_NAME_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameTooLong(pub usize);

impl fmt::Display for NameTooLong {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "server name of {} bytes is longer than {MAX_NAME_LEN}", self.0)
    }
}

impl std::error::Error for NameTooLong {}

/// Appends big-endian fields, and length-prefixed blocks whose length is patched in afterwards.
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }

    /// A block preceded by its length in `width` bytes (1 to 3). Callers keep every block far
    /// below 2^8 / 2^16 bytes (names are at most MAX_NAME_LEN), so the length always fits.
    fn block(&mut self, width: usize, body: impl FnOnce(&mut Writer)) {
        let at = self.0.len();
        self.0.resize(at + width, 0);
        body(self);
        let len = (self.0.len() - at - width) as u32;
        let be = len.to_be_bytes();
        self.0[at..at + width].copy_from_slice(&be[4 - width..]);
    }

    fn extension(&mut self, kind: u16, body: impl FnOnce(&mut Writer)) {
        self.u16(kind);
        self.block(2, body);
    }
}

/// One TLS record holding a ClientHello for `name`, with a fresh client random and legacy
/// session id from `rng`.
pub fn client_hello(name: &str, rng: &mut Rng) -> Result<Vec<u8>, NameTooLong> {
    if name.len() > MAX_NAME_LEN {
        return Err(NameTooLong(name.len()));
    }
    let mut random = [0u8; 64];
    rng.fill(&mut random);
    let (client_random, session_id) = random.split_at(32);

    let mut w = Writer(Vec::with_capacity(256 + name.len()));
    w.u8(RECORD_HANDSHAKE);
    // Record version 1.0, as TLS 1.3 clients write it for middleboxes' sake (RFC 8446 5.1).
    w.u16(0x0301);
    w.block(2, |w| {
        w.u8(HANDSHAKE_CLIENT_HELLO);
        w.block(3, |w| {
            w.u16(0x0303);
            w.bytes(client_random);
            w.block(1, |w| w.bytes(session_id));
            w.block(2, |w| CIPHER_SUITES.iter().for_each(|s| w.u16(*s)));
            // One compression method: null.
            w.block(1, |w| w.u8(0));
            w.block(2, |w| {
                w.extension(EXT_SERVER_NAME, |w| {
                    w.block(2, |w| {
                        w.u8(0); // host_name
                        w.block(2, |w| w.bytes(name.as_bytes()));
                    })
                });
                w.extension(EXT_SUPPORTED_GROUPS, |w| {
                    w.block(2, |w| {
                        w.u16(GROUP_X25519);
                        w.u16(GROUP_SECP256R1);
                    })
                });
                // Only uncompressed points, for a server that falls back to TLS 1.2.
                w.extension(EXT_EC_POINT_FORMATS, |w| w.block(1, |w| w.u8(0)));
                w.extension(EXT_SIGNATURE_ALGORITHMS, |w| {
                    w.block(2, |w| SIGNATURE_SCHEMES.iter().for_each(|s| w.u16(*s)))
                });
                w.extension(EXT_SUPPORTED_VERSIONS, |w| {
                    w.block(1, |w| {
                        w.u16(0x0304);
                        w.u16(0x0303);
                    })
                });
                w.extension(EXT_KEY_SHARE, |w| {
                    w.block(2, |w| {
                        w.u16(GROUP_X25519);
                        w.block(2, |w| w.bytes(&X25519_KEY_SHARE));
                    })
                });
            });
        });
    });
    Ok(w.0)
}

/// What the first record of a server's answer says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// A handshake record starting with ServerHello (or HelloRetryRequest, which shares its
    /// type): the server accepted the name and went on.
    ServerHello,
    Alert {
        level: u8,
        description: u8,
    },
}

#[derive(Debug)]
pub enum ReplyError {
    /// The connection ended after `got` bytes of the record header and first message bytes.
    Eof {
        got: usize,
    },
    Io(io::Error),
    UnexpectedRecord(u8),
    UnexpectedHandshake(u8),
    BadAlertLength(u16),
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::Eof { got } => write!(f, "connection closed after {got} bytes of reply"),
            ReplyError::Io(e) => write!(f, "reading reply: {e}"),
            ReplyError::UnexpectedRecord(t) => write!(f, "reply is not TLS: record type {t}"),
            ReplyError::UnexpectedHandshake(t) => {
                write!(f, "reply starts with handshake message {t}, not ServerHello")
            }
            ReplyError::BadAlertLength(n) => write!(f, "alert record of {n} bytes, not 2"),
        }
    }
}

impl std::error::Error for ReplyError {}

/// Reads the first record header and just enough of its body to classify it; the rest is left
/// unread, as the connection is closed right after.
pub fn read_reply<R: Read>(r: &mut R) -> Result<Reply, ReplyError> {
    let mut header = [0u8; 5];
    read_full(r, &mut header, 0)?;
    let length = u16::from_be_bytes([header[3], header[4]]);
    match header[0] {
        RECORD_HANDSHAKE => {
            let mut kind = [0u8; 1];
            read_full(r, &mut kind, header.len())?;
            match kind[0] {
                HANDSHAKE_SERVER_HELLO => Ok(Reply::ServerHello),
                other => Err(ReplyError::UnexpectedHandshake(other)),
            }
        }
        RECORD_ALERT => {
            if length != 2 {
                return Err(ReplyError::BadAlertLength(length));
            }
            let mut alert = [0u8; 2];
            read_full(r, &mut alert, header.len())?;
            Ok(Reply::Alert { level: alert[0], description: alert[1] })
        }
        other => Err(ReplyError::UnexpectedRecord(other)),
    }
}

/// `read_exact`, telling how far the reply got before it ended.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8], before: usize) -> Result<(), ReplyError> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => return Err(ReplyError::Eof { got: before + filled }),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReplyError::Io(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::Acceptor;
    use rustls::{CipherSuite, NamedGroup, SignatureScheme};

    /// Hands the hello to rustls' server-side parser: a real TLS stack must accept it.
    fn parsed_by_rustls(
        hello: &[u8],
    ) -> (Option<String>, Vec<CipherSuite>, Vec<SignatureScheme>, Vec<NamedGroup>) {
        let mut acceptor = Acceptor::default();
        let mut input = hello;
        acceptor.read_tls(&mut input).expect("read_tls");
        let accepted = match acceptor.accept() {
            Ok(Some(a)) => a,
            Ok(None) => panic!("rustls wants more bytes"),
            Err((e, _)) => panic!("rustls rejected the hello: {e}"),
        };
        let ch = accepted.client_hello();
        (
            ch.server_name().map(str::to_owned),
            ch.cipher_suites().to_vec(),
            ch.signature_schemes().to_vec(),
            ch.named_groups().map(<[NamedGroup]>::to_vec).unwrap_or_default(),
        )
    }

    #[test]
    fn hellos_parse_with_the_right_fields() {
        let long =
            format!("{}.example", ["a".repeat(63), "b".repeat(63), "c".repeat(63)].join("."));
        for name in ["a.example", "refused.example", "x", long.as_str()] {
            let hello = client_hello(name, &mut Rng::from_seed(1)).expect("hello");
            assert_eq!(hello[0], 22);
            let record_len = usize::from(u16::from_be_bytes([hello[3], hello[4]]));
            assert_eq!(record_len, hello.len() - 5, "{name}");
            let handshake_len =
                usize::from(hello[6]) << 16 | usize::from(hello[7]) << 8 | usize::from(hello[8]);
            assert_eq!(handshake_len, hello.len() - 9, "{name}");

            let (sni, suites, schemes, groups) = parsed_by_rustls(&hello);
            assert_eq!(sni.as_deref(), Some(name));
            let suites: Vec<u16> = suites.into_iter().map(u16::from).collect();
            assert_eq!(suites, CIPHER_SUITES, "{name}");
            let schemes: Vec<u16> = schemes.into_iter().map(u16::from).collect();
            assert_eq!(schemes, SIGNATURE_SCHEMES, "{name}");
            let groups: Vec<u16> = groups.into_iter().map(u16::from).collect();
            assert_eq!(groups, [GROUP_X25519, GROUP_SECP256R1], "{name}");
        }
    }

    #[test]
    fn hello_carries_version_and_key_share() {
        let hello = client_hello("a.example", &mut Rng::from_seed(1)).expect("hello");
        let find = |needle: &[u8]| hello.windows(needle.len()).any(|w| w == needle);
        // supported_versions: 1.3 then 1.2.
        assert!(find(&[0x00, 0x2b, 0x00, 0x05, 0x04, 0x03, 0x04, 0x03, 0x03]));
        // key_share: one x25519 entry with the fixed key.
        let mut share = vec![0x00, 0x33, 0x00, 0x26, 0x00, 0x24, 0x00, 0x1d, 0x00, 0x20];
        share.extend_from_slice(&X25519_KEY_SHARE);
        assert!(find(&share));
    }

    #[test]
    fn randoms_differ_between_hellos() {
        let mut rng = Rng::from_seed(9);
        let a = client_hello("a.example", &mut rng).expect("hello");
        let b = client_hello("a.example", &mut rng).expect("hello");
        assert_eq!(a.len(), b.len());
        assert_ne!(a, b);
    }

    #[test]
    fn name_too_long() {
        let name = "a".repeat(MAX_NAME_LEN + 1);
        assert_eq!(client_hello(&name, &mut Rng::from_seed(1)), Err(NameTooLong(256)));
    }

    /// A reader that hands out its bytes a few at a time, as a socket may.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.0.len().min(buf.len()).min(self.1);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn replies() {
        type Want = fn(&Result<Reply, ReplyError>) -> bool;
        let cases: &[(&[u8], Want)] = &[
            (&[22, 3, 3, 0, 90, 2, 0, 0, 86], |r| matches!(r, Ok(Reply::ServerHello))),
            (&[21, 3, 3, 0, 2, 2, 112], |r| {
                matches!(r, Ok(Reply::Alert { level: 2, description: 112 }))
            }),
            (&[21, 3, 1, 0, 2, 2, 80, 99], |r| {
                matches!(r, Ok(Reply::Alert { level: 2, description: 80 }))
            }),
            (&[21, 3, 3, 0, 2, 1, 0], |r| {
                matches!(r, Ok(Reply::Alert { level: 1, description: 0 }))
            }),
            (&[], |r| matches!(r, Err(ReplyError::Eof { got: 0 }))),
            (&[22, 3, 3], |r| matches!(r, Err(ReplyError::Eof { got: 3 }))),
            (&[22, 3, 3, 0, 90], |r| matches!(r, Err(ReplyError::Eof { got: 5 }))),
            (&[21, 3, 3, 0, 2, 2], |r| matches!(r, Err(ReplyError::Eof { got: 6 }))),
            (&[21, 3, 3, 0, 3, 2, 112, 0], |r| matches!(r, Err(ReplyError::BadAlertLength(3)))),
            (&[22, 3, 3, 0, 4, 11, 0, 0, 0], |r| {
                matches!(r, Err(ReplyError::UnexpectedHandshake(11)))
            }),
            (b"HTTP/1.1 400 Bad Request\r\n", |r| {
                matches!(r, Err(ReplyError::UnexpectedRecord(72)))
            }),
            (&[23, 3, 3, 0, 1, 0], |r| matches!(r, Err(ReplyError::UnexpectedRecord(23)))),
        ];
        for (bytes, want) in cases {
            for step in [1, 2, 64] {
                let got = read_reply(&mut Trickle(bytes, step));
                assert!(want(&got), "{bytes:?} in steps of {step}: {got:?}");
            }
        }
    }

    #[test]
    fn reply_io_error() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::ConnectionReset))
            }
        }
        let got = read_reply(&mut Broken);
        assert!(
            matches!(&got, Err(ReplyError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset),
            "{got:?}"
        );
    }
}

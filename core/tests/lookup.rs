//! The lookup client against real loopback servers that behave well and badly.
//!
//! Every server accepts a bounded number of connections within a bounded time, and every
//! connection handler ends on its own (read and write timeouts, bounded loops), so the test
//! binary always exits.

use std::io::{Read, Write};
use std::mem::discriminant;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use sni_guard_core::answer::{Answer, LookupError};
use sni_guard_core::lookup::{
    Client, ClientError, ClientOptions, LookupUrl, MAX_IDLE, MAX_NAME_LEN,
};

/// The lookup budget used by every test.
const TIMEOUT: Duration = Duration::from_millis(300);
/// Upper bound on any check() call: the budget plus a generous margin for noisy machines.
const BOUND: Duration = Duration::from_millis(1500);
/// How long a server accepts connections at most.
const SERVER_LIFETIME: Duration = Duration::from_secs(10);
/// Socket timeouts on the server side, so no handler blocks forever.
const SERVER_IO_TIMEOUT: Duration = Duration::from_secs(3);
/// How long misbehaving handlers keep misbehaving at most.
const MISBEHAVE_FOR: Duration = Duration::from_secs(2);

const OK_JSON: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ttl\": 60}";
const OK_EMPTY: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

/// One accepted connection, as seen by a handler.
struct Conn {
    index: usize,
    stream: TcpStream,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Conn {
    /// Reads one request head and records it; `None` on end of stream, timeout or junk.
    fn read_head(&mut self) -> Option<String> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() > 64 * 1024 {
                return None;
            }
            match self.stream.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => return None,
            }
        }
        let head = String::from_utf8(head).ok()?;
        self.heads.lock().ok()?.push(head.clone());
        Some(head)
    }

    fn send(&mut self, data: &[u8]) -> bool {
        self.stream.write_all(data).is_ok()
    }

    /// Sends `chunk` every `every` until the client gives up or `MISBEHAVE_FOR` passes.
    fn repeat(&mut self, chunk: &[u8], every: Duration) {
        let end = Instant::now() + MISBEHAVE_FOR;
        while Instant::now() < end && self.send(chunk) {
            thread::sleep(every);
        }
    }

    /// Answers every request on this connection with `reply`.
    fn answer_all(&mut self, reply: &[u8]) {
        while self.read_head().is_some() {
            if !self.send(reply) {
                return;
            }
        }
    }
}

struct Server {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Starts a server on 127.0.0.1 that hands at most `max_conns` connections to `handler`,
    /// each on its own thread.
    fn start(max_conns: usize, handler: impl Fn(Conn) + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener.set_nonblocking(true).expect("nonblocking listener");
        let addr = listener.local_addr().expect("local addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler = Arc::new(handler);
        let thread = {
            let (accepted, heads, stop) = (accepted.clone(), heads.clone(), stop.clone());
            thread::spawn(move || {
                let end = Instant::now() + SERVER_LIFETIME;
                let mut workers = Vec::new();
                let mut index = 0;
                while index < max_conns && !stop.load(Ordering::SeqCst) && Instant::now() < end {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let ready = stream.set_nonblocking(false).is_ok()
                                && stream.set_read_timeout(Some(SERVER_IO_TIMEOUT)).is_ok()
                                && stream.set_write_timeout(Some(SERVER_IO_TIMEOUT)).is_ok();
                            assert!(ready, "server socket setup");
                            accepted.fetch_add(1, Ordering::SeqCst);
                            let conn = Conn { index, stream, heads: heads.clone() };
                            let handler = handler.clone();
                            workers.push(thread::spawn(move || handler(conn)));
                            index += 1;
                        }
                        Err(_) => thread::sleep(Duration::from_millis(2)),
                    }
                }
                drop(listener);
                for worker in workers {
                    let _ = worker.join();
                }
            })
        };
        Server { addr, accepted, heads, stop, thread: Some(thread) }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().map(|h| h.clone()).unwrap_or_default()
    }

    fn url(&self, path: &str) -> LookupUrl {
        let text = format!("http://{}{}", self.addr, path);
        LookupUrl::parse(&text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn client(&self, path: &str) -> Client {
        client_for(self.url(path), self.addr)
    }

    /// Stops accepting and waits for every handler; they all end by themselves.
    fn finish(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("server thread panicked");
        }
    }
}

fn options() -> ClientOptions {
    ClientOptions {
        trusted_ca_pem: None,
        max_body: 16 * 1024,
        user_agent: "sni_guard-test/1".into(),
    }
}

fn client_for(url: LookupUrl, addr: SocketAddr) -> Client {
    Client::new(url, vec![addr], options()).expect("client")
}

/// Runs one check and asserts it ended within the bound.
fn timed_check(client: &Client, name: &str) -> Result<Answer, LookupError> {
    let start = Instant::now();
    let result = client.check(name, TIMEOUT);
    let elapsed = start.elapsed();
    assert!(elapsed < BOUND, "check took {elapsed:?}, result {result:?}");
    result
}

fn same_kind(got: &Result<Answer, LookupError>, want: &Result<Answer, LookupError>) -> bool {
    match (got, want) {
        (Err(g), Err(w)) => discriminant(g) == discriminant(w),
        _ => got == want,
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

#[test]
fn client_is_send_and_sync() {
    fn shared<T: Send + Sync>() {}
    shared::<Client>();
}

#[test]
fn well_behaved_service_reuses_one_connection() {
    let server = Server::start(5, |mut conn| conn.answer_all(OK_JSON));
    let client = server.client("/path");
    let names = ["example.com", "a.example.com", "b.example.com", "c.example.com", "a b&c"];
    for name in names {
        assert_eq!(timed_check(&client, name), Ok(Answer::Registered { ttl: Some(60) }), "{name}");
    }
    assert_eq!(server.accepted(), 1, "five sequential checks share one connection");
    assert_eq!(client.url().path_and_query(), "/path");
    let heads = server.heads();
    assert_eq!(heads.len(), names.len());
    let first = &heads[0];
    assert_eq!(first.lines().next(), Some("GET /path?domain=example.com HTTP/1.1"));
    assert_eq!(heads[4].lines().next(), Some("GET /path?domain=a%20b%26c HTTP/1.1"));
    assert_eq!(header(first, "host"), Some(server.addr.to_string().as_str()));
    assert_eq!(header(first, "user-agent"), Some("sni_guard-test/1"));
    assert_eq!(header(first, "accept"), Some("application/json, */*;q=0.1"));
    assert_eq!(header(first, "accept-encoding"), None, "no compression is offered");
    drop(client);
    server.finish();
}

#[test]
fn concurrent_checks_share_the_client() {
    let server = Server::start(8, |mut conn| conn.answer_all(OK_JSON));
    let client = Arc::new(server.client("/"));
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let client = client.clone();
            thread::spawn(move || {
                (0..5)
                    .map(|i| client.check(&format!("n{t}-{i}.example"), TIMEOUT))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for worker in workers {
        for result in worker.join().expect("worker panicked") {
            assert_eq!(result, Ok(Answer::Registered { ttl: Some(60) }));
        }
    }
    assert_eq!(server.heads().len(), 20);
    assert!(server.accepted() <= 4, "at most one connection per thread: {}", server.accepted());
    drop(client);
    server.finish();
}

#[test]
fn no_dns_at_lookup_time_and_host_header_from_url() {
    let server = Server::start(1, |mut conn| conn.answer_all(OK_EMPTY));
    // A name under .invalid never resolves; the client must use the given address.
    let url = LookupUrl::parse(&format!("http://lookup.invalid:{}/ask", server.addr.port()))
        .expect("url");
    let client = client_for(url, server.addr);
    assert_eq!(timed_check(&client, "example.com"), Ok(Answer::Registered { ttl: None }));
    let heads = server.heads();
    let expected_host = format!("lookup.invalid:{}", server.addr.port());
    assert_eq!(header(&heads[0], "host"), Some(expected_host.as_str()));
    drop(client);
    server.finish();
}

/// Replies chosen by the request path: `/s/<case>`.
fn reply_for(path: &str) -> Vec<u8> {
    let case = path.trim_start_matches("/s/").split('?').next().unwrap_or("");
    let (status, extra, body): (&str, &str, &str) = match case {
        "200" => ("200 OK", "", ""),
        "204" => ("204 No Content", "", ""),
        "200json" => ("200 OK", "Content-Type: application/json\r\n", r#"{"ttl": 300}"#),
        "200json0" => {
            ("200 OK", "Content-Type: application/json; charset=utf-8\r\n", r#"{"ttl":0}"#)
        }
        "200text" => ("200 OK", "Content-Type: text/plain\r\n", "[not json"),
        "200bad" => ("200 OK", "Content-Type: application/json\r\n", "[]"),
        "200big" => ("200 OK", "Content-Type: application/json\r\n", r#"{"ttl": 604801}"#),
        "404" => ("404 Not Found", "", "no such name"),
        "404json" => {
            ("404 Not Found", "Content-Type: application/problem+json\r\n", r#"{"ttl":30}"#)
        }
        "403" => ("403 Forbidden", "", ""),
        "410" => ("410 Gone", "", ""),
        "301" => ("301 Moved Permanently", "Location: /s/200\r\n", ""),
        "302" => ("302 Found", "Location: /s/200\r\n", "moved"),
        "307" => ("307 Temporary Redirect", "Location: /s/200\r\n", ""),
        "400" => ("400 Bad Request", "", ""),
        "429" => ("429 Too Many Requests", "Retry-After: 1\r\n", ""),
        "500" => ("500 Internal Server Error", "", "oops"),
        "503" => ("503 Service Unavailable", "", ""),
        _ => ("418 I'm a teapot", "", ""),
    };
    let length = if status.starts_with("204") {
        String::new()
    } else {
        format!("Content-Length: {}\r\n", body.len())
    };
    format!("HTTP/1.1 {status}\r\n{extra}{length}\r\n{body}").into_bytes()
}

#[test]
fn statuses_and_bodies() {
    let server = Server::start(64, |mut conn| {
        while let Some(head) = conn.read_head() {
            let path = head.split(' ').nth(1).unwrap_or("").to_owned();
            if !conn.send(&reply_for(&path)) {
                return;
            }
        }
    });
    let cases: &[(&str, Result<Answer, LookupError>)] = &[
        ("200", Ok(Answer::Registered { ttl: None })),
        ("204", Ok(Answer::Registered { ttl: None })),
        ("200json", Ok(Answer::Registered { ttl: Some(300) })),
        ("200json0", Ok(Answer::Registered { ttl: Some(0) })),
        ("200text", Ok(Answer::Registered { ttl: None })),
        ("200bad", Err(LookupError::Malformed(String::new()))),
        ("200big", Err(LookupError::Malformed(String::new()))),
        ("404", Ok(Answer::NotRegistered { ttl: None })),
        ("404json", Ok(Answer::NotRegistered { ttl: Some(30) })),
        ("403", Ok(Answer::NotRegistered { ttl: None })),
        ("410", Ok(Answer::NotRegistered { ttl: None })),
        ("301", Err(LookupError::Redirect(301))),
        ("302", Err(LookupError::Redirect(302))),
        ("307", Err(LookupError::Redirect(307))),
        ("400", Err(LookupError::Status(400))),
        ("429", Err(LookupError::Status(429))),
        ("500", Err(LookupError::Status(500))),
        ("503", Err(LookupError::Status(503))),
    ];
    for (case, want) in cases {
        let client = server.client(&format!("/s/{case}"));
        let got = timed_check(&client, "example.com");
        assert!(same_kind(&got, want), "{case}: got {got:?}, want {want:?}");
    }
    // One request per case: no redirect was followed, no request was repeated.
    let heads = server.heads();
    assert_eq!(heads.len(), cases.len(), "{heads:?}");
    server.finish();
}

/// A server that reads one request and then sends `reply` and closes.
fn one_shot(reply: &'static [u8]) -> Server {
    Server::start(2, move |mut conn| {
        if conn.read_head().is_some() {
            conn.send(reply);
            let _ = conn.stream.shutdown(Shutdown::Write);
            // Wait for the client to close, so it never sees a reset instead of the reply.
            let _ = conn.stream.read(&mut [0u8; 1024]);
        }
    })
}

#[test]
fn broken_replies() {
    let cases: &[(&[u8], Result<Answer, LookupError>)] = &[
        (
            b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"ttl\": 5}",
            Ok(Answer::Registered { ttl: Some(5) }),
        ),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
            Ok(Answer::NotRegistered { ttl: None }),
        ),
        (b"", Err(LookupError::Closed)),
        (b"HTTP/1.1 200 OK\r\n", Err(LookupError::Closed)),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b", Err(LookupError::Closed)),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", Err(LookupError::Closed)),
        (b"garbage\r\n\r\n", Err(LookupError::Malformed(String::new()))),
        (b"HTTP/1.1 20 OK\r\n\r\n", Err(LookupError::Malformed(String::new()))),
        (b"HTTP/1.1 2000 OK\r\n\r\n", Err(LookupError::Malformed(String::new()))),
        (b"HTTP/1.1 OK\r\n\r\n", Err(LookupError::Malformed(String::new()))),
        (b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", Err(LookupError::Malformed(String::new()))),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            Err(LookupError::Malformed(String::new())),
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            Err(LookupError::Malformed(String::new())),
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            Err(LookupError::Malformed(String::new())),
        ),
        (b"\x00\x01\x02\xff\xfe\r\n\r\n", Err(LookupError::Malformed(String::new()))),
        (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n[]",
            Err(LookupError::Malformed(String::new())),
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n", Err(LookupError::TooLarge)),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 16385\r\n\r\n", Err(LookupError::TooLarge)),
    ];
    for (reply, want) in cases {
        let server = one_shot(reply);
        let client = server.client("/");
        let got = timed_check(&client, "example.com");
        let shown = String::from_utf8_lossy(reply);
        assert!(same_kind(&got, want), "{shown:?}: got {got:?}, want {want:?}");
        drop(client);
        server.finish();
    }
}

#[test]
fn body_of_exactly_max_body_is_accepted() {
    let mut reply = b"HTTP/1.1 200 OK\r\nContent-Length: 16384\r\n\r\n".to_vec();
    reply.resize(reply.len() + 16 * 1024, b'x');
    let reply: &'static [u8] = reply.leak();
    let server = one_shot(reply);
    let client = server.client("/");
    assert_eq!(timed_check(&client, "example.com"), Ok(Answer::Registered { ttl: None }));
    drop(client);
    server.finish();
}

#[test]
fn refused_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let url = LookupUrl::parse(&format!("http://{addr}/")).expect("url");
    let client = client_for(url, addr);
    assert_eq!(timed_check(&client, "example.com"), Err(LookupError::Refused));
}

#[test]
fn second_address_is_tried_after_a_refusal() {
    let dead = TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_addr = dead.local_addr().expect("addr");
    drop(dead);
    let server = Server::start(1, |mut conn| conn.answer_all(OK_EMPTY));
    let client =
        Client::new(server.url("/"), vec![dead_addr, server.addr], options()).expect("client");
    assert_eq!(timed_check(&client, "example.com"), Ok(Answer::Registered { ttl: None }));
    drop(client);
    server.finish();
}

/// Misbehaviour that must end in a timeout within the bound.
#[test]
fn slow_services_time_out_within_the_budget() {
    type Behaviour = fn(&mut Conn);
    let cases: &[(&str, Behaviour)] = &[
        ("accepts and never reads", |_| thread::sleep(Duration::from_secs(1))),
        ("reads and never answers", |conn| {
            conn.read_head();
            thread::sleep(Duration::from_secs(1));
        }),
        ("answers after the timeout", |conn| {
            conn.read_head();
            thread::sleep(Duration::from_millis(600));
            conn.send(OK_EMPTY);
        }),
        ("trickles the status line", |conn| {
            conn.read_head();
            for &b in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" {
                if !conn.send(&[b]) {
                    return;
                }
                thread::sleep(Duration::from_millis(40));
            }
        }),
        ("trickles headers forever", |conn| {
            conn.read_head();
            conn.send(b"HTTP/1.1 200 OK\r\nX-Slow: ");
            conn.repeat(b"a", Duration::from_millis(30));
        }),
        ("trickles the body", |conn| {
            conn.read_head();
            conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n");
            conn.repeat(b"x", Duration::from_millis(30));
        }),
        ("stops mid-body and keeps the connection open", |conn| {
            conn.read_head();
            conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf");
            thread::sleep(Duration::from_secs(1));
        }),
    ];
    for (what, behaviour) in cases {
        let behaviour = *behaviour;
        let server = Server::start(2, move |mut conn| behaviour(&mut conn));
        let client = server.client("/");
        let start = Instant::now();
        let got = timed_check(&client, "example.com");
        let elapsed = start.elapsed();
        assert_eq!(got, Err(LookupError::Timeout), "{what}");
        assert!(elapsed >= TIMEOUT, "{what}: gave up early, after {elapsed:?}");
        assert_eq!(server.accepted(), 1, "{what}: a timed-out lookup is not retried");
        drop(client);
        server.finish();
    }
}

#[test]
fn zero_timeout_fails_at_once() {
    let server = Server::start(1, |mut conn| conn.answer_all(OK_EMPTY));
    let client = server.client("/");
    let start = Instant::now();
    assert_eq!(client.check("example.com", Duration::ZERO), Err(LookupError::Timeout));
    assert!(start.elapsed() < BOUND);
    drop(client);
    server.finish();
}

/// Replies that never end or are too large must stop at the size limits.
#[test]
fn oversized_replies() {
    type Behaviour = fn(&mut Conn);
    let cases: &[(&str, Behaviour, Result<Answer, LookupError>)] = &[
        (
            "endless close-delimited body",
            |conn| {
                conn.read_head();
                conn.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
                conn.repeat(&[b'x'; 4096], Duration::from_millis(1));
            },
            Err(LookupError::TooLarge),
        ),
        (
            "endless chunked body",
            |conn| {
                conn.read_head();
                conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
                let mut chunk = b"1000\r\n".to_vec();
                chunk.resize(chunk.len() + 0x1000, b'x');
                chunk.extend_from_slice(b"\r\n");
                conn.repeat(&chunk, Duration::from_millis(1));
            },
            Err(LookupError::TooLarge),
        ),
        (
            "header block over the limit",
            |conn| {
                conn.read_head();
                let mut reply = b"HTTP/1.1 200 OK\r\nX-Pad: ".to_vec();
                reply.resize(reply.len() + 10 * 1024, b'a');
                reply.extend_from_slice(b"\r\nContent-Length: 0\r\n\r\n");
                conn.send(&reply);
            },
            Err(LookupError::TooLarge),
        ),
        (
            "endless header line",
            |conn| {
                conn.read_head();
                conn.send(b"HTTP/1.1 200 OK\r\nX-Pad: ");
                conn.repeat(&[b'a'; 1024], Duration::from_millis(1));
            },
            Err(LookupError::TooLarge),
        ),
        (
            "too many header lines",
            |conn| {
                conn.read_head();
                conn.send(b"HTTP/1.1 200 OK\r\n");
                conn.repeat(b"X-A: b\r\n", Duration::from_millis(0));
            },
            Err(LookupError::Malformed(String::new())),
        ),
    ];
    for (what, behaviour, want) in cases {
        let behaviour = *behaviour;
        let server = Server::start(2, move |mut conn| behaviour(&mut conn));
        let client = server.client("/");
        let got = timed_check(&client, "example.com");
        assert!(same_kind(&got, want), "{what}: got {got:?}, want {want:?}");
        drop(client);
        server.finish();
    }
}

#[test]
fn idle_connection_closed_by_the_service_is_not_an_error() {
    let server = Server::start(2, |mut conn| {
        if conn.index == 0 {
            // A keep-alive timeout: answer once, then close while the client is idle.
            if conn.read_head().is_some() {
                conn.send(OK_EMPTY);
            }
            thread::sleep(Duration::from_millis(50));
        } else {
            conn.answer_all(OK_EMPTY);
        }
    });
    let client = server.client("/");
    assert_eq!(timed_check(&client, "one.example"), Ok(Answer::Registered { ttl: None }));
    thread::sleep(Duration::from_millis(250));
    assert_eq!(timed_check(&client, "two.example"), Ok(Answer::Registered { ttl: None }));
    assert_eq!(server.accepted(), 2);
    drop(client);
    server.finish();
}

/// The race a probe cannot see: the service closes the reused connection just as the request
/// arrives. The request is repeated once on a fresh connection.
/// A reply followed at once by more bytes - here a whole second reply, "smuggled" after a 204
/// that by definition has no body - must not answer the next lookup, for another name.
#[test]
fn bytes_after_a_reply_never_answer_the_next_lookup() {
    const SMUGGLED: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    let replies: [&'static [u8]; 2] = [
        b"HTTP/1.1 204 No Content\r\nContent-Length: 39\r\n\r\n",
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    ];

    for first in replies {
        let server = Server::start(4, move |mut conn| {
            while let Some(head) = conn.read_head() {
                let sent = if head.contains("domain=first.example") {
                    conn.send(&[first, SMUGGLED].concat())
                } else {
                    conn.send(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                };
                if !sent {
                    return;
                }
            }
        });
        let client = server.client("/check");

        client.check("first.example", TIMEOUT).expect("first lookup answered");
        assert_eq!(
            client.check("victim.example", TIMEOUT),
            Ok(Answer::NotRegistered { ttl: None }),
            "the bytes after {:?} answered another name",
            String::from_utf8_lossy(first)
        );
        server.finish();
    }
}

#[test]
fn reused_connection_dying_before_any_reply_byte_is_retried() {
    type Behaviour = fn(&mut Conn);
    let cases: &[(&str, Behaviour)] = &[
        ("reads the request, then closes", |conn| {
            conn.read_head();
        }),
        ("resets with the request unread", |conn| {
            // Closing with unread data makes the kernel send a reset.
            let _ = conn.stream.peek(&mut [0u8; 1]);
        }),
    ];
    for (what, on_second_request) in cases {
        let on_second_request = *on_second_request;
        let server = Server::start(2, move |mut conn| {
            if conn.index == 0 {
                if conn.read_head().is_some() {
                    conn.send(OK_EMPTY);
                }
                on_second_request(&mut conn);
            } else {
                conn.answer_all(OK_JSON);
            }
        });
        let client = server.client("/");
        assert_eq!(timed_check(&client, "one.example"), Ok(Answer::Registered { ttl: None }));
        let got = timed_check(&client, "two.example");
        assert_eq!(got, Ok(Answer::Registered { ttl: Some(60) }), "{what}");
        assert_eq!(server.accepted(), 2, "{what}");
        let retried = server.heads().iter().filter(|h| h.contains("domain=two.example")).count();
        let expected = if what.starts_with("reads") { 2 } else { 1 };
        assert_eq!(retried, expected, "{what}: requests for the second name that were read");
        drop(client);
        server.finish();
    }
}

#[test]
fn no_retry_once_the_reply_has_begun() {
    let server = Server::start(2, |mut conn| {
        if conn.index == 0 {
            if conn.read_head().is_some() {
                conn.send(OK_EMPTY);
            }
            if conn.read_head().is_some() {
                conn.send(b"HTTP/1.1 200 OK\r\nContent-Le");
            }
        } else {
            conn.answer_all(OK_EMPTY);
        }
    });
    let client = server.client("/");
    assert_eq!(timed_check(&client, "one.example"), Ok(Answer::Registered { ttl: None }));
    assert_eq!(timed_check(&client, "two.example"), Err(LookupError::Closed));
    assert_eq!(server.accepted(), 1, "the half reply was not retried");
    drop(client);
    server.finish();
}

#[test]
fn no_retry_on_a_fresh_connection() {
    let server = Server::start(2, |mut conn| {
        if conn.index == 0 {
            conn.read_head();
        } else {
            conn.answer_all(OK_EMPTY);
        }
    });
    let client = server.client("/");
    assert_eq!(timed_check(&client, "example.com"), Err(LookupError::Closed));
    assert_eq!(server.accepted(), 1);
    drop(client);
    server.finish();
}

#[test]
fn connections_idle_longer_than_max_idle_are_not_reused() {
    let server = Server::start(3, |mut conn| conn.answer_all(OK_EMPTY));
    let client = server.client("/");
    assert_eq!(timed_check(&client, "one.example"), Ok(Answer::Registered { ttl: None }));
    assert_eq!(timed_check(&client, "two.example"), Ok(Answer::Registered { ttl: None }));
    assert_eq!(server.accepted(), 1, "reused while fresh");
    thread::sleep(MAX_IDLE + Duration::from_millis(300));
    assert_eq!(timed_check(&client, "three.example"), Ok(Answer::Registered { ttl: None }));
    assert_eq!(server.accepted(), 2, "a new connection after the idle limit");
    drop(client);
    server.finish();
}

fn https_client(server: &Server) -> Client {
    let url = LookupUrl::parse(&format!("https://{}/", server.addr)).expect("url");
    client_for(url, server.addr)
}

#[test]
fn https_handshake_is_bounded_by_the_budget() {
    type Behaviour = fn(&mut Conn);
    let cases: &[(&str, Behaviour)] = &[
        ("never answers the client hello", |conn| {
            let _ = conn.stream.read(&mut [0u8; 4096]);
            thread::sleep(Duration::from_secs(1));
        }),
        ("trickles a tls record", |conn| {
            let _ = conn.stream.read(&mut [0u8; 4096]);
            conn.send(b"\x16\x03\x03\x40\x00");
            conn.repeat(b"\x00", Duration::from_millis(30));
        }),
    ];
    for (what, behaviour) in cases {
        let behaviour = *behaviour;
        let server = Server::start(2, move |mut conn| behaviour(&mut conn));
        let client = https_client(&server);
        assert_eq!(timed_check(&client, "example.com"), Err(LookupError::Timeout), "{what}");
        drop(client);
        server.finish();
    }
}

#[test]
fn https_to_a_plain_http_service_is_a_tls_error() {
    let server = Server::start(2, |mut conn| {
        let _ = conn.stream.read(&mut [0u8; 4096]);
        conn.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
    });
    let client = https_client(&server);
    let got = timed_check(&client, "example.com");
    assert!(matches!(got, Err(LookupError::Tls(_))), "{got:?}");
    drop(client);
    server.finish();
}

/// A throwaway self-signed CA certificate made for these tests.
const TEST_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBkDCCATWgAwIBAgIUT5ucDP8Yh/9i251AfLtdsj8XvckwCgYIKoZIzj0EAwIw
HDEaMBgGA1UEAwwRc25pX2d1YXJkIHRlc3QgQ0EwIBcNMjYxMjA0MTU0MTEwWhgP
MjEyNjExMTAxNTQxMTBaMBwxGjAYBgNVBAMMEXNuaV9ndWFyZCB0ZXN0IENBMFkw
EwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEvntsLgkiNFPpWQwXSAOHlSQ3eCa3FMxv
eB+vJ3XFJyLw4voNTpKhitsh+fkrXSTUPEICP796BQWTDBMT5hflkqNTMFEwHQYD
VR0OBBYEFBvCmvnRDfTGFCgox01su//Zho0CMB8GA1UdIwQYMBaAFBvCmvnRDfTG
FCgox01su//Zho0CMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSQAwRgIh
AJuKxFQMevDMxgTi9IRnRMlMMJfXhXkOCYJH7mdsU+n6AiEAmwLEyvdESuiffI1P
53akC5L9sXMYopV1y4QKTeMcSCM=
-----END CERTIFICATE-----
";

#[test]
fn trusted_ca_pem_parsing() {
    let two = format!("{TEST_CA}{TEST_CA}");
    let with_text = format!("# private CA\n{TEST_CA}\ntrailing words\n");
    let not_base64 = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
    let unterminated = "-----BEGIN CERTIFICATE-----\nMAA=\n";
    let not_der = "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n";
    let second_not_der = format!("{TEST_CA}{not_der}");
    let key = "-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----\n";
    let cert_and_key = format!("{TEST_CA}{key}");
    let cases: Vec<(&str, &[u8], Result<(), ClientError>)> = vec![
        ("one certificate", TEST_CA.as_bytes(), Ok(())),
        ("two certificates", two.as_bytes(), Ok(())),
        ("text around", with_text.as_bytes(), Ok(())),
        ("empty", b"", Err(ClientError::NoCertificate)),
        ("plain text", b"hello\n", Err(ClientError::NoCertificate)),
        ("binary", b"\x30\x82\x01\x00\xff", Err(ClientError::NoCertificate)),
        ("bad base64", not_base64.as_bytes(), Err(ClientError::Pem(String::new()))),
        ("no end line", unterminated.as_bytes(), Err(ClientError::Pem(String::new()))),
        ("not der", not_der.as_bytes(), Err(ClientError::BadCertificate(1))),
        ("second not der", second_not_der.as_bytes(), Err(ClientError::BadCertificate(2))),
        ("private key", key.as_bytes(), Err(ClientError::PemPrivateKey)),
        ("certificate and key", cert_and_key.as_bytes(), Err(ClientError::PemPrivateKey)),
    ];
    let addr: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    for (what, pem, want) in cases {
        let url = LookupUrl::parse("https://ask.example/").expect("url");
        let opts = ClientOptions { trusted_ca_pem: Some(pem.to_vec()), ..options() };
        let got = Client::new(url, vec![addr], opts).map(|_| ());
        let matches = match (&got, &want) {
            (Err(ClientError::Pem(_)), Err(ClientError::Pem(_))) => true,
            _ => got == want,
        };
        assert!(matches, "{what}: got {got:?}, want {want:?}");
    }
}

#[test]
fn client_configuration_errors() {
    let addr: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let http = || LookupUrl::parse("http://ask.example/").expect("url");
    let cases: Vec<(&str, Result<(), ClientError>)> = vec![
        ("fine", Client::new(http(), vec![addr], options()).map(|_| ())),
        ("no addresses", Client::new(http(), vec![], options()).map(|_| ())),
        (
            "user agent with a line break",
            Client::new(
                http(),
                vec![addr],
                ClientOptions { user_agent: "a\r\nX: y".into(), ..options() },
            )
            .map(|_| ()),
        ),
        (
            "empty user agent",
            Client::new(
                http(),
                vec![addr],
                ClientOptions { user_agent: String::new(), ..options() },
            )
            .map(|_| ()),
        ),
        (
            "https to an ipv6 literal",
            Client::new(LookupUrl::parse("https://[::1]/").expect("url"), vec![addr], options())
                .map(|_| ()),
        ),
        (
            "http to an ipv6 literal",
            Client::new(LookupUrl::parse("http://[::1]/").expect("url"), vec![addr], options())
                .map(|_| ()),
        ),
    ];
    let wants = [
        Ok(()),
        Err(ClientError::NoAddress),
        Err(ClientError::UserAgent),
        Ok(()),
        Err(ClientError::HttpsIpv6Literal),
        Ok(()),
    ];
    for ((what, got), want) in cases.into_iter().zip(wants) {
        assert_eq!(got, want, "{what}");
    }
}

#[test]
fn empty_user_agent_sends_no_header() {
    let server = Server::start(1, |mut conn| conn.answer_all(OK_EMPTY));
    let opts = ClientOptions { user_agent: String::new(), ..options() };
    let client = Client::new(server.url("/"), vec![server.addr], opts).expect("client");
    assert_eq!(timed_check(&client, "example.com"), Ok(Answer::Registered { ttl: None }));
    assert_eq!(header(&server.heads()[0], "user-agent"), None);
    drop(client);
    server.finish();
}

#[test]
fn localhost_resolves_to_loopback() {
    let url = LookupUrl::parse("http://localhost:8080/").expect("url");
    let addrs = url.resolve().expect("localhost resolves");
    assert!(!addrs.is_empty());
    for addr in addrs {
        assert!(addr.ip().is_loopback(), "{addr}");
        assert_eq!(addr.port(), 8080);
    }
}

#[test]
fn name_length_limit() {
    let server = Server::start(2, |mut conn| conn.answer_all(OK_EMPTY));
    let client = server.client("/");
    let longest = "%".repeat(MAX_NAME_LEN);
    assert_eq!(timed_check(&client, &longest), Ok(Answer::Registered { ttl: None }));
    let encoded = "%25".repeat(MAX_NAME_LEN);
    assert!(server.heads()[0].starts_with(&format!("GET /?domain={encoded} HTTP/1.1\r\n")));
    let too_long = "a".repeat(MAX_NAME_LEN + 1);
    assert!(matches!(timed_check(&client, &too_long), Err(LookupError::Internal(_))));
    assert_eq!(server.heads().len(), 1, "a name that is too long is never sent");
    drop(client);
    server.finish();
}

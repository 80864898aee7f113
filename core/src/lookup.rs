//! The HTTP client that asks the lookup service about one name.
//!
//! nginx cannot pause a TLS handshake, so a lookup runs inside the ClientHello callback and
//! blocks the worker. Everything here is therefore about bounding that cost:
//!
//! * the whole exchange (connect, TLS, request, status line, headers, body) shares one
//!   deadline that is checked before every socket operation, because ureq's own timeouts do not
//!   bound a slow trickle of bytes once the deadline has passed (it then waits up to one second
//!   per read) nor a trickling TLS peer;
//! * addresses are resolved once, at configuration time; no DNS query ever runs in a lookup;
//! * connections are kept alive, but never idle longer than [`MAX_IDLE`], and a request that
//!   dies on a reused connection before any reply byte is retried once on a fresh connection
//!   within the same deadline, because ureq itself never retries;
//! * the reply's header block and body are size-bounded.
//!
//! The per-call deadline reaches the socket layer through a thread-local: ureq runs a request
//! entirely on the calling thread, and its transport interface carries only relative timeouts
//! that ureq computes once per TLS read, not per socket read.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ureq::http::{header, HeaderValue, Uri};
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};
use ureq::unversioned::resolver::{ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, LazyBuffers, NextTimeout, RustlsConnector, Transport,
};
use ureq::{Agent, Body};

use crate::answer::{classify, Answer, LookupError};
use crate::panics;
use crate::query;

/// Default limit of a reply body.
pub const DEFAULT_MAX_BODY: usize = 16 * 1024;

/// Limit of a reply's status line plus header block.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;

/// Longest accepted lookup URL; keeps every request within the output buffer.
pub const MAX_URL_LEN: usize = 2048;

/// Longest name [`Client::check`] sends; a DNS name has at most 253 characters.
pub const MAX_NAME_LEN: usize = 255;

/// Longest a pooled connection may stay idle before it is thrown away rather than reused.
///
/// Below the shortest keep-alive timeouts servers commonly use (gunicorn 2 s, Apache httpd and
/// Node.js 5 s), so the service rarely closes a connection just as it is being reused.
pub const MAX_IDLE: Duration = Duration::from_millis(1500);

/// ureq keeps at most this many addresses from a resolver.
const MAX_ADDRS: usize = 16;

/// Socket buffer sizes; the input buffer must exceed [`MAX_HEADER_BYTES`] for ureq to report
/// an oversized header block as such.
const INPUT_BUFFER: usize = 16 * 1024;
const OUTPUT_BUFFER: usize = 8 * 1024;

const ACCEPT: &str = "application/json, */*;q=0.1";

/// Why a lookup URL was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlError {
    /// Longer than [`MAX_URL_LEN`].
    TooLong,
    /// Whitespace, control or non-ASCII characters.
    BadChar,
    /// No `scheme://`.
    NoScheme,
    /// A scheme other than http and https.
    Scheme(String),
    /// Nothing between `//` and the path.
    EmptyHost,
    /// `user@host` or `user:password@host`.
    UserInfo,
    /// A `#fragment`.
    Fragment,
    /// A port that is empty, not decimal, 0 or above 65535.
    BadPort,
    /// A host name with characters or dots out of place.
    BadHost,
    /// Digits and dots that are not a dotted-quad IPv4 address.
    BadIpv4,
    /// Colons in the host without brackets.
    UnbracketedIpv6,
    /// Brackets without a valid IPv6 address inside.
    BadIpv6,
    /// A character not allowed in a path or query.
    BadPath,
    /// A `domain` parameter in the query, which the module adds itself.
    DomainParameter,
    /// A query parameter whose name is not ASCII.
    NonAsciiParameter,
    /// More query parameters than parsers may read before the module's own.
    TooManyParameters,
    /// The host name did not resolve.
    Resolve(String),
    /// The host name resolved to no address.
    NoAddress,
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrlError::TooLong => write!(f, "url longer than {MAX_URL_LEN} bytes"),
            UrlError::BadChar => f.write_str("url contains whitespace, control or non-ascii bytes"),
            UrlError::NoScheme => f.write_str("url has no scheme, expected http:// or https://"),
            UrlError::Scheme(s) => write!(f, "unsupported url scheme \"{s}\""),
            UrlError::EmptyHost => f.write_str("url has no host"),
            UrlError::UserInfo => f.write_str("user info in url is not allowed"),
            UrlError::Fragment => f.write_str("fragment in url is not allowed"),
            UrlError::BadPort => f.write_str("bad port in url"),
            UrlError::BadHost => f.write_str("bad host name in url"),
            UrlError::BadIpv4 => f.write_str("bad ipv4 address in url"),
            UrlError::UnbracketedIpv6 => f.write_str("ipv6 address in url must be in brackets"),
            UrlError::BadIpv6 => f.write_str("bad ipv6 address in url"),
            UrlError::BadPath => f.write_str("bad character in url path or query"),
            UrlError::DomainParameter => {
                f.write_str("the module adds the \"domain\" parameter itself")
            }
            UrlError::NonAsciiParameter => f.write_str(
                "a query parameter name outside ASCII, which a service may read as \"domain\"",
            ),
            UrlError::TooManyParameters => {
                write!(f, "more than {} query parameters", query::MAX_QUERY_PARAMETERS)
            }
            UrlError::Resolve(m) => write!(f, "cannot resolve url host: {m}"),
            UrlError::NoAddress => f.write_str("url host resolved to no address"),
        }
    }
}

impl std::error::Error for UrlError {}

/// The scheme of a lookup URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// A validated lookup service URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupUrl {
    original: String,
    scheme: Scheme,
    /// Lowercase; an IPv6 literal keeps its brackets.
    host: String,
    ip: Option<IpAddr>,
    port: u16,
    path_and_query: String,
}

impl LookupUrl {
    /// Parses and validates `s`; see [`UrlError`] for what is refused.
    pub fn parse(s: &str) -> Result<LookupUrl, UrlError> {
        if s.len() > MAX_URL_LEN {
            return Err(UrlError::TooLong);
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(UrlError::BadChar);
        }
        if s.contains('#') {
            return Err(UrlError::Fragment);
        }
        let (scheme_text, rest) = s.split_once("://").ok_or(UrlError::NoScheme)?;
        let scheme = match scheme_text.to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            "" => return Err(UrlError::NoScheme),
            _ => return Err(UrlError::Scheme(scheme_text.to_owned())),
        };
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        if authority.contains('@') {
            return Err(UrlError::UserInfo);
        }
        let (host, ip, port_text) = split_authority(authority)?;
        let port = match port_text {
            None => scheme.default_port(),
            Some(text) => parse_port(text)?,
        };
        let path_and_query = match tail.as_bytes().first() {
            None => "/".to_owned(),
            Some(b'?') => format!("/{tail}"),
            Some(_) => tail.to_owned(),
        };
        if !valid_path_and_query(&path_and_query) {
            return Err(UrlError::BadPath);
        }
        if let Some((_, q)) = path_and_query.split_once('?') {
            if query::has_domain_parameter(q) {
                return Err(UrlError::DomainParameter);
            }
            if query::has_non_ascii_parameter(q) {
                return Err(UrlError::NonAsciiParameter);
            }
            if query::parameter_count(q) > query::MAX_QUERY_PARAMETERS {
                return Err(UrlError::TooManyParameters);
            }
        }
        Ok(LookupUrl {
            original: s.to_owned(),
            scheme,
            host: host.to_ascii_lowercase(),
            ip,
            port,
            path_and_query,
        })
    }

    /// The URL to request for `name`: the query gains `domain=<name percent-encoded>`.
    pub fn request_url(&self, name: &str) -> String {
        // The query starts at the first '?'; a later one is part of it.
        let separator = match self.path_and_query.find('?') {
            None => "?",
            Some(i) if i + 1 == self.path_and_query.len() => "",
            Some(_) if self.path_and_query.ends_with('&') => "",
            Some(_) => "&",
        };
        format!(
            "{}://{}{}{}domain={}",
            self.scheme.as_str(),
            self.authority(),
            self.path_and_query,
            separator,
            percent_encode(name)
        )
    }

    /// Resolves the host with the system resolver. Meant for configuration time only.
    pub fn resolve(&self) -> Result<Vec<SocketAddr>, UrlError> {
        if let Some(ip) = self.ip {
            return Ok(vec![SocketAddr::new(ip, self.port)]);
        }
        let addrs: Vec<SocketAddr> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| UrlError::Resolve(format!("{}: {e}", self.host)))?
            .collect();
        if addrs.is_empty() {
            return Err(UrlError::NoAddress);
        }
        Ok(addrs)
    }

    /// The URL as it was configured.
    pub fn as_str(&self) -> &str {
        &self.original
    }

    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The host in lowercase, an IPv6 literal with its brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port, explicit or the scheme's default.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The path and the configured query, `/` at least.
    pub fn path_and_query(&self) -> &str {
        &self.path_and_query
    }

    /// `host` or `host:port` when the port is not the scheme's default; also the Host header.
    fn authority(&self) -> String {
        if self.port == self.scheme.default_port() {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for LookupUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.original)
    }
}

/// Splits `host[:port]` into the host text, its IP address when it is a literal, and the port.
fn split_authority(authority: &str) -> Result<(&str, Option<IpAddr>, Option<&str>), UrlError> {
    if authority.is_empty() {
        return Err(UrlError::EmptyHost);
    }
    if let Some(after) = authority.strip_prefix('[') {
        let (inside, rest) = after.split_once(']').ok_or(UrlError::BadIpv6)?;
        let ip: Ipv6Addr = inside.parse().map_err(|_| UrlError::BadIpv6)?;
        let port = match rest {
            "" => None,
            _ => Some(rest.strip_prefix(':').ok_or(UrlError::BadPort)?),
        };
        let host = &authority[..inside.len() + 2];
        return Ok((host, Some(IpAddr::V6(ip)), port));
    }
    let (host, port) = match authority.split_once(':') {
        None => (authority, None),
        Some((_, after)) if after.contains(':') => return Err(UrlError::UnbracketedIpv6),
        Some((host, port)) => (host, Some(port)),
    };
    if host.is_empty() {
        return Err(UrlError::EmptyHost);
    }
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let ip: Ipv4Addr = host.parse().map_err(|_| UrlError::BadIpv4)?;
        return Ok((host, Some(IpAddr::V4(ip)), port));
    }
    let chars_ok = host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    let dots_ok = !host.starts_with('.') && !host.contains("..");
    if !chars_ok || !dots_ok || host.len() > 254 {
        return Err(UrlError::BadHost);
    }
    Ok((host, None, port))
}

fn parse_port(text: &str) -> Result<u16, UrlError> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(UrlError::BadPort);
    }
    match text.parse::<u32>() {
        Ok(port @ 1..=65535) => u16::try_from(port).map_err(|_| UrlError::BadPort),
        _ => Err(UrlError::BadPort),
    }
}

/// RFC 3986 path and query characters: unreserved, sub-delims, `:@/?` and `%XX`.
fn valid_path_and_query(s: &str) -> bool {
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3);
            if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                return false;
            }
            i += 3;
            continue;
        }
        if !(is_unreserved(b) || b"!$&'()*+,;=:@/?".contains(&b)) {
            return false;
        }
        i += 1;
    }
    true
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

/// Percent-encodes every byte but the unreserved characters.
pub fn percent_encode(s: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if is_unreserved(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
    out
}

/// Settings of a [`Client`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// PEM certificates that replace the bundled web PKI roots for https.
    pub trusted_ca_pem: Option<Vec<u8>>,
    /// Largest reply body accepted, in bytes.
    pub max_body: usize,
    /// The User-Agent header; empty sends none.
    pub user_agent: String,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            trusted_ca_pem: None,
            max_body: DEFAULT_MAX_BODY,
            user_agent: concat!("sni_guard/", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }
}

/// Why a [`Client`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// No address to connect to.
    NoAddress,
    /// ureq derives the TLS server name from the URL host text, which for an IPv6 literal
    /// includes the brackets and is refused, so https to an IPv6 literal cannot work.
    HttpsIpv6Literal,
    /// The User-Agent is not a valid header value.
    UserAgent,
    /// The request URL is not one ureq accepts.
    Url(String),
    /// The trusted CA file is not valid PEM.
    Pem(String),
    /// The trusted CA file holds a private key; most likely the wrong file.
    PemPrivateKey,
    /// The trusted CA file holds no certificate.
    NoCertificate,
    /// A PEM certificate block whose content is not a DER structure (1-based position).
    BadCertificate(usize),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::NoAddress => f.write_str("no address for the lookup service"),
            ClientError::HttpsIpv6Literal => {
                f.write_str("https to an ipv6 address literal is not supported, use a host name")
            }
            ClientError::UserAgent => f.write_str("user agent is not a valid header value"),
            ClientError::Url(m) => write!(f, "url not usable: {m}"),
            ClientError::Pem(m) => write!(f, "bad pem: {m}"),
            ClientError::PemPrivateKey => {
                f.write_str("trusted certificate file contains a private key")
            }
            ClientError::NoCertificate => f.write_str("no certificate in trusted certificate file"),
            ClientError::BadCertificate(n) => write!(f, "certificate {n} is not valid der"),
        }
    }
}

impl std::error::Error for ClientError {}

/// The lookup client: one per lookup service, shared by all threads that look names up.
#[derive(Debug)]
pub struct Client {
    agent: Agent,
    url: LookupUrl,
    max_body: usize,
}

impl Client {
    /// Builds a client that connects only to `addrs` (resolved at configuration time).
    pub fn new(
        url: LookupUrl,
        mut addrs: Vec<SocketAddr>,
        opts: ClientOptions,
    ) -> Result<Client, ClientError> {
        if addrs.is_empty() {
            return Err(ClientError::NoAddress);
        }
        addrs.truncate(MAX_ADDRS);
        if url.scheme == Scheme::Https && matches!(url.ip, Some(IpAddr::V6(_))) {
            return Err(ClientError::HttpsIpv6Literal);
        }
        // ureq unwraps the configured User-Agent when it builds each request.
        if HeaderValue::from_str(&opts.user_agent).is_err() {
            return Err(ClientError::UserAgent);
        }
        // Every byte of a name may be percent-encoded into three.
        let longest_name = "x".repeat(MAX_NAME_LEN * 3);
        Uri::try_from(url.request_url(&longest_name))
            .map_err(|e| ClientError::Url(e.to_string()))?;

        let mut tls = TlsConfig::builder();
        if let Some(pem) = &opts.trusted_ca_pem {
            tls = tls.root_certs(RootCerts::Specific(Arc::new(parse_ca_pem(pem)?)));
        }
        let config = Agent::config_builder()
            .tls_config(tls.build())
            .proxy(None)
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(opts.user_agent.as_str())
            .accept(ACCEPT)
            .accept_encoding("")
            .max_response_header_size(MAX_HEADER_BYTES)
            .input_buffer_size(INPUT_BUFFER)
            .output_buffer_size(OUTPUT_BUFFER)
            .max_idle_connections(MAX_ADDRS)
            .max_idle_connections_per_host(MAX_ADDRS)
            .build();
        let connector = SocketConnector
            .chain(RustlsConnector::default())
            .chain(TrackConnector { max_idle: MAX_IDLE });
        let agent = Agent::with_parts(config, connector, FixedResolver { addrs });
        Ok(Client { agent, url, max_body: opts.max_body })
    }

    /// The lookup service URL this client asks.
    pub fn url(&self) -> &LookupUrl {
        &self.url
    }

    /// Asks the service about `name`; the whole exchange ends within `timeout`.
    ///
    /// Names longer than [`MAX_NAME_LEN`] are refused without a request: no DNS name is that
    /// long, and the request must fit ureq's output buffer.
    pub fn check(&self, name: &str, timeout: Duration) -> Result<Answer, LookupError> {
        if name.len() > MAX_NAME_LEN {
            return Err(LookupError::Internal("name too long for a lookup".into()));
        }
        let start = Instant::now();
        // An absurd timeout only needs to be long, not exact.
        let deadline = start
            .checked_add(timeout)
            .or_else(|| start.checked_add(Duration::from_secs(86_400)))
            .unwrap_or(start);
        let url = self.url.request_url(name);
        let _scope = call::Scope::enter(deadline);
        match self.attempt(&url, false) {
            Err(failure) if failure.retry && Instant::now() < deadline => {
                self.attempt(&url, true).map_err(|f| f.error)
            }
            result => result.map_err(|f| f.error),
        }
    }

    fn attempt(&self, url: &str, fresh: bool) -> Result<Answer, Failure> {
        call::start_attempt();
        let result = panics::catch(|| self.exchange(url, fresh)).unwrap_or_else(|panic| {
            Err(LookupError::Internal(format!("http client panicked: {panic}")).into())
        });
        result.map_err(|mut failure| {
            // Only a request that died on a reused connection before any reply byte arrived
            // can be a connection the service closed while idle; anything else is an answer.
            failure.retry = failure.retry && !fresh && !call::connected() && !call::received();
            failure
        })
    }

    fn exchange(&self, url: &str, fresh: bool) -> Result<Answer, Failure> {
        let request = self.agent.get(url);
        let response = if fresh {
            // Any pooled connection is at least zero seconds old, so none is used.
            request.config().max_idle_age(Duration::ZERO).build().call()
        } else {
            request.call()
        };
        let mut response = response.map_err(|e| self.failure(e))?;
        let status = response.status().as_u16();
        // The status alone may already be an error; its body is not worth waiting for.
        classify(status, None, b"")?;
        // ureq frames the body by the first of several Content-Length headers; a reply that
        // disagrees with itself about its length is not trusted to mean what it says.
        let mut lengths = response.headers().get_all(header::CONTENT_LENGTH).iter();
        if let Some(first) = lengths.next() {
            if lengths.any(|other| other != first) {
                return Err(LookupError::Malformed("conflicting content-length".into()).into());
            }
        }
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = self.read_body(response.body_mut())?;
        Ok(classify(status, content_type.as_deref(), &body)?)
    }

    fn read_body(&self, body: &mut Body) -> Result<Vec<u8>, Failure> {
        let max = self.max_body;
        if body.content_length().is_some_and(|len| len > max as u64) {
            return Err(LookupError::TooLarge.into());
        }
        let mut data = Vec::new();
        body.as_reader()
            .take((max as u64).saturating_add(1))
            .read_to_end(&mut data)
            .map_err(|e| self.failure(ureq::Error::from(e)))?;
        if data.len() > max {
            return Err(LookupError::TooLarge.into());
        }
        Ok(data)
    }

    fn failure(&self, err: ureq::Error) -> Failure {
        let https = self.url.scheme == Scheme::Https;
        let error = match err {
            ureq::Error::Timeout(_) => LookupError::Timeout,
            ureq::Error::Io(e) => return io_failure(&e, https),
            ureq::Error::Protocol(e) => LookupError::Malformed(e.to_string()),
            ureq::Error::LargeResponseHeader(..) | ureq::Error::BodyExceedsLimit(_) => {
                LookupError::TooLarge
            }
            ureq::Error::Rustls(e) => LookupError::Tls(e.to_string()),
            ureq::Error::Tls(m) => LookupError::Tls(m.to_owned()),
            ureq::Error::Pem(e) => LookupError::Tls(format!("{e:?}")),
            ureq::Error::TlsRequired => LookupError::Tls("connection is not tls".into()),
            ureq::Error::StatusCode(code) => LookupError::Status(code),
            ureq::Error::BodyStalled => LookupError::Malformed("body stalled".into()),
            ureq::Error::Other(e) => match e.downcast::<ConnectFailure>() {
                Ok(connect) => LookupError::Connect(connect.0.to_string()),
                Err(other) => LookupError::Internal(other.to_string()),
            },
            other => LookupError::Internal(other.to_string()),
        };
        error.into()
    }
}

/// A failed attempt, and whether its error is the kind a dead idle connection produces.
struct Failure {
    error: LookupError,
    retry: bool,
}

impl From<LookupError> for Failure {
    fn from(error: LookupError) -> Self {
        Failure { error, retry: false }
    }
}

fn io_failure(e: &io::Error, https: bool) -> Failure {
    use io::ErrorKind as K;
    let (error, retry) = match e.kind() {
        K::TimedOut | K::WouldBlock => (LookupError::Timeout, false),
        K::ConnectionRefused => (LookupError::Refused, false),
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => (LookupError::Reset, true),
        K::UnexpectedEof => (LookupError::Closed, true),
        // rustls reports handshake and record failures as invalid data.
        K::InvalidData if https => (LookupError::Tls(e.to_string()), false),
        _ => (LookupError::Io(e.to_string()), false),
    };
    Failure { error, retry }
}

/// PEM certificates for the root store; anything unusable is an error, not silently skipped.
fn parse_ca_pem(pem: &[u8]) -> Result<Vec<Certificate<'static>>, ClientError> {
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(pem) {
        match item {
            Ok(PemItem::Certificate(cert)) => {
                if !is_der_sequence(cert.der()) {
                    return Err(ClientError::BadCertificate(certs.len() + 1));
                }
                certs.push(cert);
            }
            Ok(PemItem::PrivateKey(_)) => return Err(ClientError::PemPrivateKey),
            Ok(_) => {}
            Err(e) => return Err(ClientError::Pem(e.to_string())),
        }
    }
    if certs.is_empty() {
        return Err(ClientError::NoCertificate);
    }
    Ok(certs)
}

/// Whether `der` is exactly one DER SEQUENCE, as every X.509 certificate is. rustls would
/// silently drop a root it cannot parse, leaving an operator with a CA that never matches.
fn is_der_sequence(der: &[u8]) -> bool {
    let (Some(&0x30), Some(&first)) = (der.first(), der.get(1)) else {
        return false;
    };
    let (header, len) = if first < 0x80 {
        (2, usize::from(first))
    } else {
        let n = usize::from(first & 0x7f);
        let Some(len_bytes) = der.get(2..2 + n) else {
            return false;
        };
        if n == 0 || n > 4 {
            return false;
        }
        (2 + n, len_bytes.iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b)))
    };
    header + len == der.len()
}

/// Hands ureq the addresses resolved at configuration time, whatever the URL says.
#[derive(Debug)]
struct FixedResolver {
    addrs: Vec<SocketAddr>,
}

impl Resolver for FixedResolver {
    fn resolve(
        &self,
        _uri: &Uri,
        _config: &ureq::config::Config,
        _timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let mut out = self.empty();
        for addr in self.addrs.iter().take(MAX_ADDRS) {
            out.push(*addr);
        }
        if out.is_empty() {
            return Err(ureq::Error::HostNotFound);
        }
        Ok(out)
    }
}

/// A connect failure other than refusal or timeout, kept apart so it maps to
/// [`LookupError::Connect`].
#[derive(Debug)]
struct ConnectFailure(io::Error);

impl fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ConnectFailure {}

/// Opens TCP connections under the call deadline.
#[derive(Debug)]
struct SocketConnector;

impl Connector<()> for SocketConnector {
    type Out = Socket;

    fn connect(
        &self,
        details: &ConnectionDetails,
        _chained: Option<()>,
    ) -> Result<Option<Socket>, ureq::Error> {
        call::mark_connected();
        let stream = connect_any(&details.addrs, details.timeout)?;
        // Requests are one small write; Nagle would only delay it.
        stream.set_nodelay(true)?;
        Ok(Some(Socket { stream, buffers: LazyBuffers::new(INPUT_BUFFER, OUTPUT_BUFFER) }))
    }
}

fn connect_any(addrs: &[SocketAddr], fallback: NextTimeout) -> Result<TcpStream, ureq::Error> {
    let mut last_error = None;
    for (i, addr) in addrs.iter().enumerate() {
        let budget = remaining(fallback)?;
        // Each address but the last gets half of what is left, so an unreachable first
        // address cannot starve the others.
        let budget = match budget {
            Some(left) if i + 1 < addrs.len() => Some(left / 2),
            other => other,
        };
        let attempt = match budget {
            Some(wait) => TcpStream::connect_timeout(addr, wait.max(Duration::from_millis(1))),
            None => TcpStream::connect(addr),
        };
        match attempt {
            Ok(stream) => return Ok(stream),
            Err(e) => last_error = Some(e),
        }
    }
    Err(match last_error {
        None => ureq::Error::HostNotFound,
        Some(e) if is_timeout(&e) => ureq::Error::Timeout(ureq::Timeout::Connect),
        Some(e) if e.kind() == io::ErrorKind::ConnectionRefused => ureq::Error::Io(e),
        Some(e) => ureq::Error::Other(Box::new(ConnectFailure(e))),
    })
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock)
}

/// Time left before the call deadline, `Err` once it has passed. Outside a call (never, in
/// practice) ureq's own timeout applies.
fn remaining(fallback: NextTimeout) -> Result<Option<Duration>, ureq::Error> {
    match call::deadline() {
        Some(deadline) => {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                Err(ureq::Error::Timeout(ureq::Timeout::Global))
            } else {
                Ok(Some(left))
            }
        }
        None => Ok(fallback.not_zero().map(|d| *d)),
    }
}

/// A TCP connection whose every read and write waits at most until the call deadline.
#[derive(Debug)]
struct Socket {
    stream: TcpStream,
    buffers: LazyBuffers,
}

impl Transport for Socket {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        let mut sent = 0;
        while sent < amount {
            self.stream.set_write_timeout(remaining(timeout)?)?;
            let Some(pending) = self.buffers.output().get(sent..amount) else {
                return Err(ureq::Error::Io(io::ErrorKind::InvalidInput.into()));
            };
            match self.stream.write(pending) {
                Ok(0) => return Err(ureq::Error::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => sent += n,
                // Signals (nginx uses several) interrupt blocking calls; the deadline still holds.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(ureq::Error::Timeout(timeout.reason)),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        loop {
            self.stream.set_read_timeout(remaining(timeout)?)?;
            match self.stream.read(self.buffers.input_append_buf()) {
                Ok(n) => {
                    self.buffers.input_appended(n);
                    return Ok(n > 0);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(ureq::Error::Timeout(timeout.reason)),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// An idle connection is usable only if the peer has neither closed it nor sent anything.
    fn is_open(&mut self) -> bool {
        if self.stream.set_nonblocking(true).is_err() {
            return false;
        }
        let mut byte = [0u8; 1];
        let idle =
            matches!(self.stream.peek(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        self.stream.set_nonblocking(false).is_ok() && idle
    }
}

/// Wraps the top of the connector chain (TLS or plain) to see reply bytes and idle time.
#[derive(Debug)]
struct TrackConnector {
    max_idle: Duration,
}

impl<In: Transport> Connector<In> for TrackConnector {
    type Out = Tracked<In>;

    fn connect(
        &self,
        _details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Tracked<In>>, ureq::Error> {
        Ok(chained.map(|inner| Tracked {
            inner,
            last_used: Instant::now(),
            max_idle: self.max_idle,
        }))
    }
}

#[derive(Debug)]
struct Tracked<T> {
    inner: T,
    last_used: Instant,
    max_idle: Duration,
}

impl<T: Transport> Transport for Tracked<T> {
    fn buffers(&mut self) -> &mut dyn Buffers {
        self.inner.buffers()
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        self.inner.transmit_output(amount, timeout)?;
        self.last_used = Instant::now();
        Ok(())
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        let progress = self.inner.await_input(timeout)?;
        if progress {
            call::mark_received();
            self.last_used = Instant::now();
        }
        Ok(progress)
    }

    fn is_open(&mut self) -> bool {
        // Bytes left over after the last reply (a 204 or a HEAD reply with a body, a second
        // reply sent early) would be read as the reply to the next request, for another name:
        // such a connection is not reused. ureq 3.2's own max_idle_age never expires anything
        // (it measures an age of zero), hence the idle check here.
        self.inner.buffers().input().is_empty()
            && self.last_used.elapsed() < self.max_idle
            && self.inner.is_open()
    }

    fn is_tls(&self) -> bool {
        self.inner.is_tls()
    }
}

/// What the socket layer needs to know about the lookup running on this thread.
mod call {
    use std::cell::Cell;
    use std::time::Instant;

    thread_local! {
        static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
        static CONNECTED: Cell<bool> = const { Cell::new(false) };
        static RECEIVED: Cell<bool> = const { Cell::new(false) };
    }

    /// Sets the deadline for the current thread until dropped.
    pub(super) struct Scope {
        previous: Option<Instant>,
    }

    impl Scope {
        pub(super) fn enter(deadline: Instant) -> Scope {
            Scope { previous: DEADLINE.with(|d| d.replace(Some(deadline))) }
        }
    }

    impl Drop for Scope {
        fn drop(&mut self) {
            DEADLINE.with(|d| d.set(self.previous));
        }
    }

    pub(super) fn deadline() -> Option<Instant> {
        DEADLINE.with(Cell::get)
    }

    pub(super) fn start_attempt() {
        CONNECTED.with(|c| c.set(false));
        RECEIVED.with(|r| r.set(false));
    }

    pub(super) fn mark_connected() {
        CONNECTED.with(|c| c.set(true));
    }

    pub(super) fn connected() -> bool {
        CONNECTED.with(Cell::get)
    }

    pub(super) fn mark_received() {
        RECEIVED.with(|r| r.set(true));
    }

    pub(super) fn received() -> bool {
        RECEIVED.with(Cell::get)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_urls() {
        // (input, scheme, host, port, path_and_query)
        let cases: &[(&str, Scheme, &str, u16, &str)] = &[
            ("http://example.com", Scheme::Http, "example.com", 80, "/"),
            ("http://example.com/", Scheme::Http, "example.com", 80, "/"),
            ("HTTP://Example.COM/Ask", Scheme::Http, "example.com", 80, "/Ask"),
            ("https://example.com", Scheme::Https, "example.com", 443, "/"),
            ("https://example.com:8443/a/b", Scheme::Https, "example.com", 8443, "/a/b"),
            ("http://example.com?x=1", Scheme::Http, "example.com", 80, "/?x=1"),
            (
                "http://example.com/ask?token=a%2Fb&x",
                Scheme::Http,
                "example.com",
                80,
                "/ask?token=a%2Fb&x",
            ),
            ("http://127.0.0.1:9000/check", Scheme::Http, "127.0.0.1", 9000, "/check"),
            ("http://[::1]:9000/check", Scheme::Http, "[::1]", 9000, "/check"),
            ("http://[2001:DB8::1]/", Scheme::Http, "[2001:db8::1]", 80, "/"),
            ("http://localhost:1", Scheme::Http, "localhost", 1, "/"),
            ("http://localhost:65535", Scheme::Http, "localhost", 65535, "/"),
            ("http://ask_svc.internal:080/", Scheme::Http, "ask_svc.internal", 80, "/"),
            ("http://a-b.example./x", Scheme::Http, "a-b.example.", 80, "/x"),
            ("http://h/p;v=1/~u/!$'()*+,=:@", Scheme::Http, "h", 80, "/p;v=1/~u/!$'()*+,=:@"),
        ];
        for (input, scheme, host, port, pq) in cases {
            let url = LookupUrl::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(url.scheme(), *scheme, "{input}");
            assert_eq!(url.host(), *host, "{input}");
            assert_eq!(url.port(), *port, "{input}");
            assert_eq!(url.path_and_query(), *pq, "{input}");
            assert_eq!(url.as_str(), *input, "{input}");
            assert_eq!(url.to_string(), *input, "{input}");
        }
    }

    #[test]
    fn bad_urls() {
        let long = format!("http://example.com/{}", "a".repeat(MAX_URL_LEN));
        let many_parameters = format!("http://example.com/c?{}", "a&".repeat(101));
        let cases: &[(&str, UrlError)] = &[
            ("", UrlError::NoScheme),
            ("example.com", UrlError::NoScheme),
            ("//example.com/", UrlError::NoScheme),
            ("://example.com/", UrlError::NoScheme),
            ("ftp://example.com/", UrlError::Scheme("ftp".into())),
            ("httpx://example.com/", UrlError::Scheme("httpx".into())),
            ("unix:///run/ask.sock", UrlError::Scheme("unix".into())),
            ("http://", UrlError::EmptyHost),
            ("http:///path", UrlError::EmptyHost),
            ("http://:80/", UrlError::EmptyHost),
            ("http://?x", UrlError::EmptyHost),
            ("http://user@example.com/", UrlError::UserInfo),
            ("http://user:pw@example.com/", UrlError::UserInfo),
            ("http://@example.com/", UrlError::UserInfo),
            ("http://example.com/#frag", UrlError::Fragment),
            ("http://example.com#", UrlError::Fragment),
            ("http://exa mple.com/", UrlError::BadChar),
            ("http://example.com/a b", UrlError::BadChar),
            (" http://example.com/", UrlError::BadChar),
            ("http://example.com/\t", UrlError::BadChar),
            ("http://example.com/\r\nX: y", UrlError::BadChar),
            ("http://example.com/\0", UrlError::BadChar),
            ("http://example.com/\x7f", UrlError::BadChar),
            ("http://bücher.example/", UrlError::BadChar),
            ("http://example.com:0/", UrlError::BadPort),
            ("http://example.com:65536/", UrlError::BadPort),
            ("http://example.com:99999999999/", UrlError::BadPort),
            ("http://example.com:/", UrlError::BadPort),
            ("http://example.com:8o/", UrlError::BadPort),
            ("http://example.com:-1/", UrlError::BadPort),
            ("http://example.com:+80/", UrlError::BadPort),
            ("http://[::1]x/", UrlError::BadPort),
            ("http://[::1]:/", UrlError::BadPort),
            ("http://::1/", UrlError::UnbracketedIpv6),
            ("http://2001:db8::1:80/", UrlError::UnbracketedIpv6),
            ("http://[::1/", UrlError::BadIpv6),
            ("http://[]/", UrlError::BadIpv6),
            ("http://[example.com]/", UrlError::BadIpv6),
            ("http://[fe80::1%25eth0]/", UrlError::BadIpv6),
            ("http://256.1.1.1/", UrlError::BadIpv4),
            ("http://1.2.3/", UrlError::BadIpv4),
            ("http://1.2.3.4.5/", UrlError::BadIpv4),
            ("http://.example.com/", UrlError::BadHost),
            ("http://a..b/", UrlError::BadHost),
            ("http://exa!mple.com/", UrlError::BadHost),
            ("http://exa%41mple.com/", UrlError::BadHost),
            ("http://example.com/<script>", UrlError::BadPath),
            ("http://example.com/a\"b", UrlError::BadPath),
            ("http://example.com/a{b}", UrlError::BadPath),
            ("http://example.com/a|b", UrlError::BadPath),
            ("http://example.com/a\\b", UrlError::BadPath),
            ("http://example.com/%", UrlError::BadPath),
            ("http://example.com/%4", UrlError::BadPath),
            ("http://example.com/%zz", UrlError::BadPath),
            ("http://example.com/c?domain=a.example", UrlError::DomainParameter),
            ("http://example.com/c?k=v;%64omain=a.example", UrlError::DomainParameter),
            ("http://example.com/c?DOMA%C4%B0N=a.example", UrlError::NonAsciiParameter),
            (many_parameters.as_str(), UrlError::TooManyParameters),
            (long.as_str(), UrlError::TooLong),
        ];
        for (input, want) in cases {
            assert_eq!(LookupUrl::parse(input).as_ref(), Err(want), "{input:?}");
        }
    }

    #[test]
    fn request_urls() {
        let cases: &[(&str, &str, &str)] = &[
            ("http://ask.local", "example.com", "http://ask.local/?domain=example.com"),
            ("http://ask.local/check", "a.b", "http://ask.local/check?domain=a.b"),
            ("http://ask.local/check?k=v", "a.b", "http://ask.local/check?k=v&domain=a.b"),
            ("http://ask.local/check?", "a.b", "http://ask.local/check?domain=a.b"),
            ("http://ask.local/check?k=v&", "a.b", "http://ask.local/check?k=v&domain=a.b"),
            ("http://ask.local/check?k=v?", "a.b", "http://ask.local/check?k=v?&domain=a.b"),
            ("http://ask.local/check??", "a.b", "http://ask.local/check??&domain=a.b"),
            ("http://ask.local?k=v", "a.b", "http://ask.local/?k=v&domain=a.b"),
            ("http://ask.local:80/c", "a.b", "http://ask.local/c?domain=a.b"),
            ("https://ask.local:443/c", "a.b", "https://ask.local/c?domain=a.b"),
            ("https://ask.local:80/c", "a.b", "https://ask.local:80/c?domain=a.b"),
            ("http://[::1]:8080/c", "a.b", "http://[::1]:8080/c?domain=a.b"),
            ("http://h/", "A-Z_a~z.0-9", "http://h/?domain=A-Z_a~z.0-9"),
            ("http://h/", "a b&c=d?e/f#g", "http://h/?domain=a%20b%26c%3Dd%3Fe%2Ff%23g"),
            ("http://h/", "%41+", "http://h/?domain=%2541%2B"),
            ("http://h/", "bücher.de", "http://h/?domain=b%C3%BCcher.de"),
            ("http://h/", "\r\n\0\u{7f}", "http://h/?domain=%0D%0A%00%7F"),
            ("http://h/", "", "http://h/?domain="),
        ];
        for (base, name, want) in cases {
            let url = LookupUrl::parse(base).unwrap_or_else(|e| panic!("{base}: {e}"));
            assert_eq!(url.request_url(name), *want, "{base} {name:?}");
        }
    }

    #[test]
    fn resolve_literals_without_dns() {
        let cases: &[(&str, &str)] = &[
            ("http://127.0.0.1:9000/", "127.0.0.1:9000"),
            ("https://10.1.2.3/", "10.1.2.3:443"),
            ("http://[::1]/", "[::1]:80"),
        ];
        for (input, want) in cases {
            let url = LookupUrl::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            let want: SocketAddr = want.parse().unwrap_or_else(|e| panic!("{want}: {e}"));
            assert_eq!(url.resolve(), Ok(vec![want]), "{input}");
        }
    }

    #[test]
    fn der_sequence_check() {
        let cases: &[(&[u8], bool)] = &[
            (&[0x30, 0x00], true),
            (&[0x30, 0x02, 1, 2], true),
            (&[0x30, 0x81, 0x01, 9], true),
            (&[0x30, 0x82, 0x00, 0x01, 9], true),
            (&[0x30, 0x02, 1], false),
            (&[0x30, 0x01, 1, 2], false),
            (&[0x31, 0x00], false),
            (&[0x30], false),
            (&[], false),
            (&[0x30, 0x80], false),
            (&[0x30, 0x85, 0, 0, 0, 0, 1, 9], false),
            (&[0x30, 0x82, 0x01], false),
        ];
        for (der, want) in cases {
            assert_eq!(is_der_sequence(der), *want, "{der:?}");
        }
    }
}

//! A minimal blocking HTTPS GET, for Patroni hosts with
//! `verify_hostname: false` (a rustls configuration of our own, which
//! ureq cannot take). Runs in an updater thread, never in the event loop.
//!
//! HTTP/1.0 with `Connection: close`: the answer is the bytes up to the
//! end of the stream (or `Content-Length`), which is how Patroni's REST API
//! answers anyway; no chunked encoding, no keep-alive, no redirects.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;

/// Why a fetch failed, by kind (the updater counts polls by it).
#[derive(Debug)]
pub enum FetchError {
    Tls(rustls::Error),
    /// No connection, or it broke or closed before a whole answer.
    Connect(String),
    /// No whole answer in time.
    Timeout(String),
    /// An answer that is not HTTP/1.x, or too large.
    Answer(String),
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Tls(e) => write!(f, "{e}"),
            FetchError::Connect(s) | FetchError::Timeout(s) | FetchError::Answer(s) => {
                f.write_str(s)
            }
        }
    }
}

fn other(s: impl Into<String>) -> FetchError {
    FetchError::Connect(s.into())
}

fn bad(s: impl Into<String>) -> FetchError {
    FetchError::Answer(s.into())
}

fn timed_out(s: impl Into<String>) -> FetchError {
    FetchError::Timeout(s.into())
}

/// A socket read or write that ran out of time (`SO_RCVTIMEO` says
/// `WouldBlock`).
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn from_io(e: io::Error, doing: &str) -> FetchError {
    match crate::tls::rustls_error(&e) {
        Some(t) => FetchError::Tls(t.clone()),
        None if is_timeout(&e) => timed_out(format!("{doing}: timed out")),
        None => other(format!("{doing}: {e}")),
    }
}

/// `https://host[:port][/base]` split into host (brackets removed), port,
/// the authority for the Host header, and the base path.
fn split_url(url: &str) -> Result<(String, u16, String, String), FetchError> {
    let rest = url
        .get(..8)
        .filter(|s| s.eq_ignore_ascii_case("https://"))
        .map(|_| &url[8..])
        .ok_or_else(|| other(format!("{url}: not an https URL")))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, tail) = v6
            .split_once(']')
            .ok_or_else(|| other(format!("{url}: bad IPv6 address")))?;
        (h, tail.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => p
            .parse()
            .map_err(|_| other(format!("{url}: bad port {p:?}")))?,
        None => 443,
    };
    Ok((
        host.to_string(),
        port,
        authority.to_string(),
        path.to_string(),
    ))
}

/// GETs `url` (base URL plus `path`), within `timeout` overall. Returns
/// the status and at most `limit` bytes of body.
pub fn get(
    config: Arc<ClientConfig>,
    base: &str,
    path: &str,
    authorization: Option<&str>,
    timeout: Duration,
    limit: u64,
) -> Result<(u16, Vec<u8>), FetchError> {
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| timed_out("timed out"))
    };
    let (host, port, authority, base_path) = split_url(base)?;
    let addrs: Vec<_> = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| other(format!("resolving {host}: {e}")))?
        .collect();
    let mut sock = None;
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, left()?) {
            Ok(s) => {
                sock = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let sock = sock.ok_or_else(|| match last {
        Some(e) => from_io(e, "connect"),
        None => other(format!("{host} resolves to no address")),
    })?;
    let _ = sock.set_nodelay(true);
    let name = ServerName::try_from(host.clone())
        .map_err(|_| other(format!("{host:?} is not a valid server name")))?;
    let conn = ClientConnection::new(config, name).map_err(FetchError::Tls)?;
    let mut tls = StreamOwned::new(conn, sock);

    let mut req = format!(
        "GET {base_path}{path} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: patroni-proxy/{}\r\nAccept: application/json\r\nConnection: close\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(a) = authorization {
        req.push_str("Authorization: ");
        req.push_str(a);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    tls.sock
        .set_write_timeout(Some(left()?))
        .map_err(|e| from_io(e, "socket"))?;
    tls.sock
        .set_read_timeout(Some(left()?))
        .map_err(|e| from_io(e, "socket"))?;
    tls.write_all(req.as_bytes())
        .and_then(|_| tls.flush())
        .map_err(|e| from_io(e, "sending the request"))?;

    let cap = limit.saturating_add(MAX_HEAD as u64);
    let mut data = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        tls.sock
            .set_read_timeout(Some(left()?))
            .map_err(|e| from_io(e, "socket"))?;
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                data.extend_from_slice(&buf[..n]);
                if data.len() as u64 > cap {
                    return Err(bad(format!("answer larger than {limit} bytes")));
                }
                if let Some(done) = complete(&data)? {
                    data.truncate(done);
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A server that closes without close_notify: the bytes so far
            // are the answer, checked against Content-Length below.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(from_io(e, "reading the answer")),
        }
    }
    parse(&data, limit)
}

/// With a complete head that has a Content-Length, the length of the
/// whole answer once it is all there.
fn complete(data: &[u8]) -> Result<Option<usize>, FetchError> {
    let Some(end) = find_head_end(data) else {
        if data.len() > MAX_HEAD {
            return Err(bad("answer head too large"));
        }
        return Ok(None);
    };
    let (_, len) = head(&data[..end])?;
    Ok(len.map(|l| end + l).filter(|total| data.len() >= *total))
}

fn find_head_end(data: &[u8]) -> Option<usize> {
    data.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}

/// Status and Content-Length of a head.
fn head(h: &[u8]) -> Result<(u16, Option<usize>), FetchError> {
    let text = std::str::from_utf8(h).map_err(|_| bad("answer head is not text"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.split(' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(bad(format!("not an HTTP answer: {status_line:?}")));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let mut len = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            len = Some(
                v.parse()
                    .map_err(|_| bad(format!("bad Content-Length {v:?}")))?,
            );
        } else if k.eq_ignore_ascii_case("transfer-encoding") && !v.eq_ignore_ascii_case("identity")
        {
            return Err(bad(format!("unsupported Transfer-Encoding {v:?}")));
        }
    }
    Ok((status, len))
}

fn parse(data: &[u8], limit: u64) -> Result<(u16, Vec<u8>), FetchError> {
    let end = find_head_end(data).ok_or_else(|| {
        if data.is_empty() {
            other("connection closed without an answer")
        } else {
            other("answer cut short in its head")
        }
    })?;
    let (status, len) = head(&data[..end])?;
    let body = &data[end..];
    if let Some(l) = len {
        if body.len() < l {
            return Err(other(format!(
                "answer cut short: {} of {l} body bytes",
                body.len()
            )));
        }
    }
    if body.len() as u64 > limit {
        return Err(bad(format!("answer larger than {limit} bytes")));
    }
    Ok((status, body.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_parts() {
        let (h, p, a, b) = split_url("https://10.0.0.1:8008").unwrap();
        assert_eq!(
            (h.as_str(), p, a.as_str(), b.as_str()),
            ("10.0.0.1", 8008, "10.0.0.1:8008", "")
        );
        let (h, p, _, b) = split_url("HTTPS://[::1]:8443/api").unwrap();
        assert_eq!((h.as_str(), p, b.as_str()), ("::1", 8443, "/api"));
        let (h, p, _, _) = split_url("https://patroni.example").unwrap();
        assert_eq!((h.as_str(), p), ("patroni.example", 443));
        assert!(split_url("http://x").is_err());
    }

    #[test]
    fn answers_parse_with_and_without_length() {
        let a = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{}";
        assert_eq!(parse(a, 100).unwrap(), (200, b"{}".to_vec()));
        let a = b"HTTP/1.1 503 x\r\nContent-Length: 2\r\n\r\nab";
        assert_eq!(complete(a).unwrap(), Some(a.len()));
        assert_eq!(parse(a, 100).unwrap().0, 503);
        let short = b"HTTP/1.1 200 x\r\nContent-Length: 5\r\n\r\nab";
        assert_eq!(complete(short).unwrap(), None);
        assert!(parse(short, 100).is_err());
        let chunked = b"HTTP/1.1 200 x\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(parse(chunked, 100).is_err());
        assert!(parse(b"SSH-2.0\r\n\r\n", 100).is_err());
    }

    #[test]
    fn failures_carry_their_kind() {
        #[derive(Debug, PartialEq)]
        enum Kind {
            Connect,
            Timeout,
            Answer,
        }
        let kind = |r: Result<(u16, Vec<u8>), FetchError>| match r {
            Err(FetchError::Connect(_)) => Kind::Connect,
            Err(FetchError::Timeout(_)) => Kind::Timeout,
            Err(FetchError::Answer(_)) => Kind::Answer,
            other => panic!("{other:?}"),
        };
        let io = |k| Err(from_io(io::Error::new(k, "x"), "reading the answer"));
        assert_eq!(kind(io(io::ErrorKind::WouldBlock)), Kind::Timeout);
        assert_eq!(kind(io(io::ErrorKind::TimedOut)), Kind::Timeout);
        assert_eq!(kind(io(io::ErrorKind::ConnectionReset)), Kind::Connect);
        assert_eq!(kind(parse(b"", 100)), Kind::Connect, "closed");
        let short = b"HTTP/1.1 200 x\r\nContent-Length: 5\r\n\r\nab";
        assert_eq!(kind(parse(short, 100)), Kind::Connect, "cut short");
        assert_eq!(kind(parse(b"SSH-2.0\r\n\r\n", 100)), Kind::Answer);
        let big = b"HTTP/1.0 200 OK\r\n\r\n0123456789";
        assert_eq!(kind(parse(big, 4)), Kind::Answer, "too large");
        let chunked = b"HTTP/1.1 200 x\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(kind(parse(chunked, 100)), Kind::Answer);
    }
}

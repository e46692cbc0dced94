//! The admin HTTP interface: request parsing and response rendering.
//!
//! PURE: bytes in, a [`Parse`] out; a [`Response`] in, bytes out. The
//! connection state machine that reads and writes these bytes lives in
//! `proxy::admin`, under the same edge-triggered rules as sessions. A
//! [`Request`] keeps its path and query string; each listener matches the
//! path against its own route table ([`parse_request_with`]).
//!
//! Scope, on purpose small: one request per connection, answered with
//! `Connection: close`; HTTP/1.0 and 1.1; GET and HEAD; the request head is
//! capped at [`MAX_REQUEST_BYTES`] (413 beyond), and a request that is not
//! complete within the idle timeout gets 408 (decided by the caller).

/// Largest request head accepted.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// What the admin interface answers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /`: liveness, always `200 OK`.
    Root,
    /// `GET /update_clusters`: poll every cluster now, answer when done.
    UpdateClusters,
    /// `GET /clusters`: JSON status of clusters, members and ports.
    Clusters,
    /// `GET /metrics`: Prometheus text format.
    Metrics,
    /// `GET /health`: 200 only when every cluster is fresh and every port
    /// has a routable member.
    Health,
    /// A Patroni-compatible check (`/<cluster>/<member>/<endpoint>` or
    /// `/<endpoint>`): the health listener's catch-all, [`CATCH_ALL`].
    Check,
}

/// The path of a route-table entry that takes every path not matched
/// exactly; a table with one also accepts `OPTIONS` (HAProxy's default
/// check method), answered as `HEAD`.
pub const CATCH_ALL: &str = "*";

impl Route {
    /// Every admin route with its path, for the man page drift test and 404s.
    pub const ALL: [(&'static str, Route); 5] = [
        ("/", Route::Root),
        ("/update_clusters", Route::UpdateClusters),
        ("/clusters", Route::Clusters),
        ("/metrics", Route::Metrics),
        ("/health", Route::Health),
    ];

    /// The health listener's routes: read-only, plus the checks.
    pub const HEALTH: [(&'static str, Route); 4] = [
        ("/", Route::Root),
        ("/metrics", Route::Metrics),
        ("/health", Route::Health),
        (CATCH_ALL, Route::Check),
    ];
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `HEAD`, or `OPTIONS` on a table with a catch-all.
    pub head_only: bool,
    /// The method as sent (`GET`, `HEAD`, `OPTIONS`).
    pub method: &'static str,
    pub route: Route,
    /// The path as sent, without the query string (`/clusters`).
    pub path: String,
    /// The query string without the `?` (`lag=16MB&tag_x=y`); empty when
    /// there is none. Percent-escapes are left as sent.
    pub query: String,
}

impl Request {
    /// The query's `key=value` pairs in order; a pair without `=` has an
    /// empty value.
    pub fn params(&self) -> impl Iterator<Item = (&str, &str)> {
        self.query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| p.split_once('=').unwrap_or((p, "")))
    }

    /// The first value of query parameter `key`.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params().find(|(k, _)| *k == key).map(|(_, v)| v)
    }
}

/// The outcome of looking at the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// Need more bytes.
    Incomplete,
    Ok(Request),
    /// Answer this and close.
    Reject(Response),
}

/// Parses a request head from `buf` (everything read so far) against the
/// admin routes, [`Route::ALL`].
pub fn parse_request(buf: &[u8]) -> Parse {
    parse_request_with(buf, &Route::ALL)
}

/// Parses a request head from `buf` against a route table: each listener
/// serves its own table, and a path not in it gets 404.
pub fn parse_request_with(buf: &[u8], routes: &[(&str, Route)]) -> Parse {
    let Some(end) = find_head_end(buf) else {
        return if buf.len() >= MAX_REQUEST_BYTES {
            Parse::Reject(Response::text(413, "request too large\n"))
        } else {
            Parse::Incomplete
        };
    };
    if end > MAX_REQUEST_BYTES {
        return Parse::Reject(Response::text(413, "request too large\n"));
    }
    let Ok(head) = std::str::from_utf8(&buf[..end]) else {
        return bad("request is not UTF-8");
    };
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return bad("malformed request line");
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return bad("unsupported HTTP version");
    }
    for line in lines.filter(|l| !l.is_empty()) {
        if !line.contains(':') || line.starts_with([' ', '\t']) {
            return bad("malformed header");
        }
    }
    let catch_all = routes.iter().find(|(p, _)| *p == CATCH_ALL);
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        "OPTIONS" if catch_all.is_some() => true,
        // The Patroni callback's hint: `POST /update_clusters`, no body.
        "POST" if target.split(['?', '#']).next() == Some("/update_clusters") => {
            let has_body = head.lines().any(|l| {
                let (k, v) = l.split_once(':').unwrap_or((l, ""));
                (k.eq_ignore_ascii_case("content-length") && v.trim() != "0")
                    || k.eq_ignore_ascii_case("transfer-encoding")
            });
            if has_body {
                return bad("POST /update_clusters takes no body");
            }
            false
        }
        _ => {
            return Parse::Reject(Response::text(405, "only GET and HEAD are supported\n").allow())
        }
    };
    let target = target.split_once('#').map_or(target, |(t, _)| t);
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match routes.iter().find(|(p, _)| *p == path).or(catch_all) {
        Some((_, route)) => Parse::Ok(Request {
            head_only,
            method: match method {
                "GET" => "GET",
                "HEAD" => "HEAD",
                _ => "OPTIONS",
            },
            route: *route,
            path: path.to_string(),
            query: query.to_string(),
        }),
        None => Parse::Reject(Response::text(404, "not found\n").head_only(head_only)),
    }
}

fn bad(why: &str) -> Parse {
    Parse::Reject(Response::text(400, &format!("bad request: {why}\n")))
}

/// Index just past the blank line that ends the head (CRLF or bare LF).
fn find_head_end(buf: &[u8]) -> Option<usize> {
    (0..buf.len()).find_map(|i| {
        if buf[i..].starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if buf[i..].starts_with(b"\n\n") {
            Some(i + 2)
        } else {
            None
        }
    })
}

/// A response to render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    head_only: bool,
    allow: bool,
}

impl Response {
    pub fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
            head_only: false,
            allow: false,
        }
    }

    pub fn json(status: u16, body: Vec<u8>) -> Response {
        Response {
            status,
            content_type: "application/json",
            body,
            head_only: false,
            allow: false,
        }
    }

    /// Prometheus text format.
    pub fn metrics(body: Vec<u8>) -> Response {
        Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body,
            head_only: false,
            allow: false,
        }
    }

    /// Render only the head (for HEAD requests).
    pub fn head_only(mut self, yes: bool) -> Response {
        self.head_only = yes;
        self
    }

    fn allow(mut self) -> Response {
        self.allow = true;
        self
    }

    /// The bytes to send.
    pub fn render(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        if self.allow {
            out.push_str("Allow: GET, HEAD\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(req: &str) -> Request {
        match parse_request(req.as_bytes()) {
            Parse::Ok(r) => r,
            other => panic!("{req:?}: {other:?}"),
        }
    }

    fn status(req: &[u8]) -> u16 {
        match parse_request(req) {
            Parse::Reject(r) => r.status,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn routes() {
        assert_eq!(ok("GET / HTTP/1.1\r\nHost: x\r\n\r\n").route, Route::Root);
        assert_eq!(
            ok("GET /update_clusters HTTP/1.0\r\n\r\n").route,
            Route::UpdateClusters
        );
        assert_eq!(
            ok("GET /clusters?pretty=1 HTTP/1.1\r\n\r\n").route,
            Route::Clusters
        );
        assert!(ok("HEAD / HTTP/1.1\n\n").head_only);
    }

    #[test]
    fn keeps_path_and_query() {
        let r = ok("GET /clusters?lag=16MB&tag_dc=west&x HTTP/1.1\r\n\r\n");
        assert_eq!(r.path, "/clusters");
        assert_eq!(r.query, "lag=16MB&tag_dc=west&x");
        assert_eq!(r.param("lag"), Some("16MB"));
        assert_eq!(r.param("tag_dc"), Some("west"));
        assert_eq!(r.param("x"), Some(""));
        assert_eq!(r.param("nope"), None);
        let r = ok("GET /#frag HTTP/1.1\r\n\r\n");
        assert_eq!((r.path.as_str(), r.query.as_str()), ("/", ""));
        assert_eq!(ok("GET /?a=1#f HTTP/1.1\r\n\r\n").query, "a=1");
    }

    #[test]
    fn each_table_has_its_own_routes() {
        let table = [("/health", Route::Root)];
        let r = parse_request_with(b"GET /health?lag=1 HTTP/1.1\r\n\r\n", &table);
        assert!(matches!(
            r,
            Parse::Ok(Request {
                route: Route::Root,
                ..
            })
        ));
        let r = parse_request_with(b"GET /clusters HTTP/1.1\r\n\r\n", &table);
        assert!(matches!(r, Parse::Reject(resp) if resp.status == 404));
    }

    #[test]
    fn the_health_table_catches_every_path_and_options() {
        let parse = |req: &str| match parse_request_with(req.as_bytes(), &Route::HEALTH) {
            Parse::Ok(r) => (r.route, r.method, r.head_only, r.path, r.query),
            other => panic!("{req:?}: {other:?}"),
        };
        assert_eq!(parse("GET /health HTTP/1.0\r\n\r\n").0, Route::Health);
        assert_eq!(parse("GET /metrics HTTP/1.0\r\n\r\n").0, Route::Metrics);
        assert_eq!(
            parse("OPTIONS /main/node1/replica?lag=1MB HTTP/1.0\r\n\r\n"),
            (
                Route::Check,
                "OPTIONS",
                true,
                "/main/node1/replica".to_string(),
                "lag=1MB".to_string()
            )
        );
        assert_eq!(parse("HEAD /replica HTTP/1.1\r\n\r\n").1, "HEAD");
        // The admin table has no catch-all: OPTIONS is 405 there.
        assert_eq!(status(b"OPTIONS / HTTP/1.1\r\n\r\n"), 405);
        assert!(matches!(
            parse_request_with(b"POST /x HTTP/1.1\r\n\r\n", &Route::HEALTH),
            Parse::Reject(r) if r.status == 405
        ));
    }

    #[test]
    fn partial_input_waits_for_more() {
        assert_eq!(parse_request(b""), Parse::Incomplete);
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            Parse::Incomplete
        );
    }

    #[test]
    fn rejects() {
        assert_eq!(status(b"GET /nope HTTP/1.1\r\n\r\n"), 404);
        assert_eq!(status(b"POST / HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(status(b"POST /clusters HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(
            status(b"POST /update_clusters HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"),
            400
        );
        let r = ok("POST /update_clusters HTTP/1.0\r\nContent-Length: 0\r\n\r\n");
        assert_eq!((r.route, r.head_only), (Route::UpdateClusters, false));
        assert_eq!(
            ok("POST /update_clusters HTTP/1.1\r\n\r\n").route,
            Route::UpdateClusters
        );
        assert_eq!(status(b"GET / HTTP/2.0\r\n\r\n"), 400);
        assert_eq!(status(b"GET /\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1 extra\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n"), 400);
        assert_eq!(status(b"\x16\x03\x01\x02\x00\r\n\r\n"), 400);
        assert_eq!(status(&vec![b'a'; MAX_REQUEST_BYTES]), 413);
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.extend(vec![b'a'; MAX_REQUEST_BYTES]);
        big.extend(b"\r\n\r\n");
        assert_eq!(status(&big), 413);
    }

    #[test]
    fn renders_with_length_and_close() {
        let r = Response::text(200, "OK").render();
        let s = String::from_utf8(r).unwrap();
        assert!(s.starts_with("HTTP/1.1 200 OK\r\n"), "{s}");
        assert!(s.contains("Content-Length: 2\r\n"));
        assert!(s.contains("Connection: close\r\n"));
        assert!(s.ends_with("\r\n\r\nOK"));
        let head = String::from_utf8(Response::text(200, "OK").head_only(true).render()).unwrap();
        assert!(head.ends_with("\r\n\r\n") && head.contains("Content-Length: 2"));
        let r = match parse_request(b"DELETE / HTTP/1.1\r\n\r\n") {
            Parse::Reject(r) => String::from_utf8(r.render()).unwrap(),
            _ => unreachable!(),
        };
        assert!(r.contains("Allow: GET, HEAD"));
    }
}

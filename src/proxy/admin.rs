//! The admin interface: its listener, its HTTP connections and the dispatch
//! of its routes (the pure request parser and responses are `crate::admin`).
//!
//! The connection machinery is not admin-specific: a [`Front`] is one HTTP
//! listener with its connections and its own route table, and an
//! [`HttpConn`] reads one request head, waits for the answer (which may take
//! a Patroni poll for `/update_clusters`), writes the response and closes.
//! Its socket is behind [`Io`]: plain, or TLS (`admin.tls`, rustls driven
//! by the loop's events, see `crate::tls_server`). Same edge-triggered
//! rules as sessions: read and write until `WouldBlock`, never assume an
//! event means progress. Who may call which route is the listener's
//! `allow` (read routes / action routes, `crate::access`).

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use slab::Slab;

use super::sys;
use super::timer::Timer;
use super::{token, Proxy};
use crate::access::{Allow, RouteClass};
use crate::admin::{self, Parse, Request, Response, Route};
use crate::logging::debug;
use crate::tls_server::{ServerTlsHandle, TlsStream};

/// Admin connections must send their request within this.
pub const ADMIN_IDLE: Duration = Duration::from_secs(5);
/// Most admin connections at once. When all are taken, a new connection
/// takes the place of the oldest one still reading its request (idle ones
/// first), so slow or idle clients cannot keep `GET /` out; the rest wait in
/// the backlog only while every connection is being answered.
pub const MAX_ADMIN_CONNS: usize = 64;
/// Connections accepted per loop turn; more are taken on the next turn.
pub const ACCEPT_BATCH: usize = 256;
/// A failed accept (EMFILE and the like) pauses accepting this long at
/// first, doubling per failure in a row up to [`ACCEPT_PAUSE_MAX`].
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(100);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// The class of a route: action routes change something.
pub fn route_class(route: Route) -> RouteClass {
    match route {
        Route::UpdateClusters => RouteClass::Action,
        Route::Root | Route::Clusters | Route::Metrics | Route::Health | Route::Check => {
            RouteClass::Read
        }
    }
}

/// The socket of an HTTP connection.
pub enum Io {
    Plain(TcpStream),
    Tls(TcpStream, Box<TlsStream>),
}

impl Io {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Io::Plain(s) => s.read(buf),
            Io::Tls(s, t) => t.read(s, buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Io::Plain(s) => s.write(buf),
            Io::Tls(s, t) => t.write(s, buf),
        }
    }

    /// True when everything written is on the wire (TLS may hold
    /// encrypted bytes the socket did not take yet).
    fn flushed(&mut self) -> io::Result<bool> {
        match self {
            Io::Plain(_) => Ok(true),
            Io::Tls(s, t) => t.flush(s),
        }
    }

    fn is_handshaking(&self) -> bool {
        matches!(self, Io::Tls(_, t) if t.is_handshaking())
    }

    fn shutdown(&mut self) {
        match self {
            Io::Plain(s) => {
                let _ = s.shutdown(Shutdown::Write);
            }
            Io::Tls(s, t) => {
                t.close(s);
                let _ = s.shutdown(Shutdown::Write);
            }
        }
    }

    fn register(&mut self, registry: &Registry, tok: Token) -> io::Result<()> {
        match self {
            Io::Plain(s) | Io::Tls(s, _) => {
                registry.register(s, tok, Interest::READABLE | Interest::WRITABLE)
            }
        }
    }

    fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Io::Plain(s) | Io::Tls(s, _) => s.local_addr().ok(),
        }
    }

    fn deregister(&mut self, registry: &Registry) {
        match self {
            Io::Plain(s) | Io::Tls(s, _) => {
                let _ = registry.deregister(s);
            }
        }
    }
}

pub enum State {
    /// Reading the request head.
    Reading,
    /// Waiting for the polls of `/update_clusters` (request id, clusters
    /// still to answer, failures so far).
    Refreshing {
        request: u64,
        pending: Vec<String>,
        failures: Vec<String>,
        head_only: bool,
    },
    /// Writing the response.
    Writing,
    /// Done or failed: reap it.
    Closed,
}

/// One HTTP connection.
pub struct HttpConn {
    pub id: u64,
    /// The client's address, for `allow`.
    pub peer: IpAddr,
    io: Io,
    pub state: State,
    /// Idle deadline while reading, poll deadline while refreshing.
    pub deadline: Instant,
    routes: &'static [(&'static str, Route)],
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    readable: bool,
    writable: bool,
}

/// What the loop must do after an event.
pub enum Step {
    Nothing,
    /// A complete request to route.
    Route(Request),
    Close,
}

impl HttpConn {
    pub fn new(
        id: u64,
        peer: IpAddr,
        io: Io,
        deadline: Instant,
        routes: &'static [(&'static str, Route)],
    ) -> HttpConn {
        HttpConn {
            id,
            peer,
            io,
            state: State::Reading,
            deadline,
            routes,
            input: Vec::new(),
            output: Vec::new(),
            written: 0,
            readable: false,
            writable: false,
        }
    }

    pub fn on_event(&mut self, ev: &Event) -> Step {
        let hint = ev.is_error() || ev.is_read_closed() || ev.is_write_closed();
        self.readable |= ev.is_readable() || hint;
        self.writable |= ev.is_writable() || hint;
        self.advance()
    }

    /// Reads or writes as far as possible.
    pub fn advance(&mut self) -> Step {
        match self.state {
            State::Reading => self.read(),
            State::Writing => self.write(),
            // Bytes after the head are ignored; a peer that closed is noticed
            // when we write.
            State::Refreshing { .. } | State::Closed => Step::Nothing,
        }
    }

    fn read(&mut self) -> Step {
        let mut chunk = [0u8; 2048];
        while self.readable {
            match self.io.read(&mut chunk) {
                Ok(0) => return Step::Close, // closed before a full request
                Ok(n) => {
                    let take = n.min(
                        admin::MAX_REQUEST_BYTES + 1
                            - self.input.len().min(admin::MAX_REQUEST_BYTES),
                    );
                    self.input.extend_from_slice(&chunk[..take]);
                    match admin::parse_request_with(&self.input, self.routes) {
                        Parse::Incomplete => continue,
                        Parse::Ok(req) => return Step::Route(req),
                        Parse::Reject(resp) => {
                            self.respond(&resp);
                            return self.write();
                        }
                    }
                }
                Err(e) => match sys::classify(&e) {
                    sys::IoError::WouldBlock => self.readable = false,
                    sys::IoError::Interrupted => {}
                    sys::IoError::Failed => {
                        if matches!(self.io, Io::Tls(..)) {
                            debug!("admin connection from {}: TLS: {e}", self.peer);
                        }
                        return Step::Close;
                    }
                },
            }
        }
        Step::Nothing
    }

    /// The address this connection reached (for `/<endpoint>` checks).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.io.local_addr()
    }

    pub fn is_writing(&self) -> bool {
        matches!(self.state, State::Writing)
    }

    /// Still in the TLS handshake.
    pub fn is_handshaking(&self) -> bool {
        self.io.is_handshaking()
    }

    /// Queues `resp` for writing (the caller then calls [`Self::advance`]).
    pub fn respond(&mut self, resp: &Response) {
        self.output = resp.render();
        self.written = 0;
        self.state = State::Writing;
    }

    fn write(&mut self) -> Step {
        while self.writable && self.written < self.output.len() {
            match self.io.write(&self.output[self.written..]) {
                Ok(0) => return Step::Close,
                Ok(n) => self.written += n,
                Err(e) => match sys::classify(&e) {
                    sys::IoError::WouldBlock => self.writable = false,
                    sys::IoError::Interrupted => {}
                    sys::IoError::Failed => return Step::Close,
                },
            }
        }
        if self.written == self.output.len() {
            match self.io.flushed() {
                Ok(true) => {}
                Ok(false) => {
                    self.writable = false;
                    return Step::Nothing;
                }
                Err(_) => return Step::Close,
            }
            // All sent: FIN, then close at reap.
            self.io.shutdown();
            return Step::Close;
        }
        Step::Nothing
    }
}

/// One HTTP listener, its connections and its route table. A second
/// listener (a health port with a read-only table) is another `Front` with
/// its own token range (`token.rs`) and timer kind (`timer.rs`); a TLS
/// listener wraps its accepted sockets in another [`Io`] variant.
pub struct Front {
    listener: TcpListener,
    pub addr: SocketAddr,
    listener_token: Token,
    conn_token: fn(usize) -> Token,
    routes: &'static [(&'static str, Route)],
    /// HTTPS: accepted sockets are wrapped in TLS with this.
    tls: Option<ServerTlsHandle>,
    /// Who may call which class of routes.
    pub allow: Allow,
    /// The kernel said there are connections to accept.
    pub accept_ready: bool,
    pub conns: Slab<HttpConn>,
    closed: Vec<usize>,
    next_id: u64,
    /// Accepting is paused until then after a failed accept.
    pub paused_until: Option<Instant>,
    backoff: Duration,
    /// Connections closed to make room for newer ones.
    pub evicted: u64,
}

/// The outcome of one accept attempt.
pub enum Accepted {
    /// A new connection `(key, id, deadline)`.
    Conn(usize, u64, Instant),
    /// Nothing more now (backlog empty, or every connection busy).
    Done,
    /// The accept failed; retry after this.
    Paused(Duration),
}

impl Front {
    /// Registers `listener` under `listener_token`; connection `k` gets
    /// `conn_token(k)`.
    pub fn new(
        mut listener: TcpListener,
        addr: SocketAddr,
        registry: &Registry,
        listener_token: Token,
        conn_token: fn(usize) -> Token,
        routes: &'static [(&'static str, Route)],
    ) -> io::Result<Front> {
        registry.register(&mut listener, listener_token, Interest::READABLE)?;
        Ok(Front {
            listener,
            addr,
            listener_token,
            conn_token,
            routes,
            tls: None,
            allow: Allow::default(),
            accept_ready: false,
            conns: Slab::new(),
            closed: Vec::new(),
            next_id: 1,
            paused_until: None,
            backoff: ACCEPT_PAUSE_MIN,
            evicted: 0,
        })
    }

    /// Sets HTTPS and the access rules (at start-up and on reload; open
    /// connections keep what they started with).
    pub fn configure(&mut self, tls: Option<ServerTlsHandle>, allow: Allow) {
        self.tls = tls;
        self.allow = allow;
    }

    /// Swaps in a new listening socket (reload moved the address).
    pub fn rebind(&mut self, mut sock: TcpListener, addr: SocketAddr, registry: &Registry) {
        let _ = registry.deregister(&mut self.listener);
        if let Err(e) = registry.register(&mut sock, self.listener_token, Interest::READABLE) {
            log::error!("registering the new listener on {addr}: {e}");
        }
        self.listener = sock;
        self.addr = addr;
        self.accept_ready = false;
    }

    /// Accepts one connection if the kernel has one, making room by closing
    /// the oldest connection still reading (idle ones first) when every
    /// slot is taken. The new connection gets an idle deadline.
    pub fn accept_one(&mut self, registry: &Registry, now: Instant) -> Accepted {
        if !self.accept_ready || self.paused_until.is_some_and(|t| now < t) {
            return Accepted::Done;
        }
        self.paused_until = None;
        if self.conns.len() >= MAX_ADMIN_CONNS && !self.evict_one(registry) {
            return Accepted::Done; // every one is being answered
        }
        loop {
            match self.listener.accept() {
                Ok((sock, peer)) => {
                    self.backoff = ACCEPT_PAUSE_MIN;
                    let entry = self.conns.vacant_entry();
                    let key = entry.key();
                    let mut io = match &self.tls {
                        None => Io::Plain(sock),
                        Some(t) => match TlsStream::new(t.0.clone()) {
                            Ok(stream) => Io::Tls(sock, Box::new(stream)),
                            Err(e) => {
                                warn!("admin: cannot start TLS for {peer}: {e}");
                                continue;
                            }
                        },
                    };
                    if io.register(registry, (self.conn_token)(key)).is_err() {
                        continue;
                    }
                    let id = self.next_id;
                    self.next_id += 1;
                    let deadline = now + ADMIN_IDLE;
                    let mut conn = HttpConn::new(id, peer.ip(), io, deadline, self.routes);
                    // The request is usually there already: read at once.
                    conn.readable = true;
                    entry.insert(conn);
                    return Accepted::Conn(key, id, deadline);
                }
                Err(e) => match sys::accept_error(&e) {
                    sys::AcceptError::WouldBlock => {
                        self.accept_ready = false;
                        self.backoff = ACCEPT_PAUSE_MIN;
                        return Accepted::Done;
                    }
                    sys::AcceptError::Retry => {}
                    sys::AcceptError::Pause => {
                        let wait = self.backoff;
                        if wait == ACCEPT_PAUSE_MIN {
                            warn!(
                                "admin accept failed: {e}; pausing admin accepts (connections={})",
                                self.conns.len()
                            );
                        }
                        self.backoff = (wait * 2).min(ACCEPT_PAUSE_MAX);
                        self.paused_until = Some(now + wait);
                        return Accepted::Paused(wait);
                    }
                },
            }
        }
    }

    /// Closes the oldest connection that is still reading its request,
    /// preferring one that sent nothing. False when there is none.
    fn evict_one(&mut self, registry: &Registry) -> bool {
        let victim = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.state, State::Reading))
            .min_by_key(|(_, c)| (!c.input.is_empty(), c.id))
            .map(|(k, _)| k);
        let Some(key) = victim else {
            return false;
        };
        let mut c = self.conns.remove(key);
        c.io.deregister(registry);
        self.evicted += 1;
        if self.evicted.is_power_of_two() {
            warn!(
                "admin connections all taken; closed the oldest unfinished one ({} so far)",
                self.evicted
            );
        }
        true
    }

    /// Stops listening and drops every connection (a reload removed or
    /// moved the listener).
    pub fn shutdown(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.listener);
        for (_, mut c) in std::mem::take(&mut self.conns) {
            c.io.deregister(registry);
        }
        self.closed.clear();
    }

    /// Marks a connection closed; it is removed at [`Self::reap`].
    pub fn close(&mut self, key: usize) {
        if let Some(c) = self.conns.get_mut(key) {
            if !matches!(c.state, State::Closed) {
                c.state = State::Closed;
                self.closed.push(key);
            }
        }
    }

    /// Removes the connections closed since the last reap; returns how
    /// many of them never finished their TLS handshake (refused, broken or
    /// timed out), for the handshake-failure counter.
    pub fn reap(&mut self, registry: &Registry) -> u64 {
        let mut unfinished = 0;
        for key in self.closed.drain(..) {
            if let Some(mut c) = self.conns.try_remove(key) {
                unfinished += u64::from(c.is_handshaking());
                c.io.deregister(registry);
            }
        }
        unfinished
    }
}

/// The admin interface: a [`Front`] with the admin routes, and the ids of
/// `/update_clusters` requests.
pub struct Admin {
    pub front: Front,
    next_request_id: u64,
}

impl Admin {
    pub fn new(listener: TcpListener, addr: SocketAddr, registry: &Registry) -> io::Result<Admin> {
        let front = Front::new(
            listener,
            addr,
            registry,
            token::ADMIN_LISTENER,
            token::admin,
            &Route::ALL,
        )?;
        info!("admin interface listening on {addr}");
        Ok(Admin {
            front,
            next_request_id: 1,
        })
    }
}

impl Proxy {
    /// Accepts admin connections and reads each at once, so a `GET /`
    /// whose bytes came with the connection is answered before newer
    /// connections can push it out.
    pub(super) fn accept_admin(&mut self) {
        let now = self.now;
        for _ in 0..ACCEPT_BATCH {
            match self.admin.front.accept_one(self.poll.registry(), now) {
                Accepted::Conn(key, id, deadline) => {
                    self.timers.add(deadline, Timer::Admin(key, id));
                    self.admin_event(key, None);
                }
                Accepted::Done => return,
                Accepted::Paused(wait) => {
                    self.timers.add(now + wait, Timer::AdminAcceptResume);
                    return;
                }
            }
        }
        // The batch ended with connections left: poll again at once.
        self.accept.more = true;
    }

    pub(super) fn admin_event(&mut self, key: usize, ev: Option<&Event>) {
        let Some(a) = self.admin.front.conns.get_mut(key) else {
            return;
        };
        let step = match ev {
            Some(ev) => a.on_event(ev),
            None => a.advance(),
        };
        match step {
            Step::Nothing => {}
            Step::Close => self.admin.front.close(key),
            Step::Route(req) => self.admin_route(key, req),
        }
    }

    fn admin_respond(&mut self, key: usize, resp: Response) {
        if let Some(a) = self.admin.front.conns.get_mut(key) {
            a.respond(&resp);
            self.admin_event(key, None);
        }
    }

    fn admin_route(&mut self, key: usize, req: Request) {
        let Some(peer) = self.admin.front.conns.get(key).map(|a| a.peer) else {
            return;
        };
        let class = route_class(req.route);
        if !self.admin.front.allow.allows(class, peer) {
            info!(
                "admin: {:?} route refused to {peer} (admin.allow)",
                req.route
            );
            let resp = Response::text(403, "forbidden by admin.allow\n");
            return self.admin_respond(key, resp.head_only(req.head_only));
        }
        let resp = match req.route {
            Route::Root => Response::text(200, "OK"),
            Route::Clusters => Response::json(200, self.status_json()),
            Route::Metrics => Response::metrics(self.metrics_text()),
            Route::Health => self.health_summary(),
            // Not in the admin table.
            Route::Check => Response::text(404, "not found\n"),
            Route::UpdateClusters => {
                if self.clusters.is_empty() {
                    Response::text(200, "no clusters configured\n")
                } else {
                    return self.start_refresh(key, req.head_only);
                }
            }
        };
        self.admin_respond(key, resp.head_only(req.head_only));
    }

    fn start_refresh(&mut self, key: usize, head_only: bool) {
        let request = self.admin.next_request_id;
        self.admin.next_request_id += 1;
        let mut pending = Vec::new();
        let mut failures = Vec::new();
        let mut hosts = 1;
        for (name, c) in self.clusters.iter() {
            hosts = hosts.max(c.updater.settings.hosts.len() as u32);
            if c.updater.refresh(request) {
                pending.push(name.clone());
            } else {
                failures.push(format!("{name}: updater not running"));
            }
        }
        // Each host may take api_timeout; the poll may already be under way.
        let wait = self.config.api_timeout * (hosts * 2) + Duration::from_secs(1);
        let Some(a) = self.admin.front.conns.get_mut(key) else {
            return;
        };
        a.deadline = Instant::now() + wait;
        self.timers.add(a.deadline, Timer::Admin(key, a.id));
        a.state = State::Refreshing {
            request,
            pending,
            failures,
            head_only,
        };
        self.finish_refresh_if_done(key);
    }

    /// Records the poll answering `requests` for `cluster`.
    pub(super) fn answer_refreshes(
        &mut self,
        cluster: &str,
        requests: &[u64],
        failure: Option<&str>,
    ) {
        if requests.is_empty() {
            return;
        }
        let mut touched = Vec::new();
        for (key, a) in self.admin.front.conns.iter_mut() {
            if let State::Refreshing {
                request,
                pending,
                failures,
                ..
            } = &mut a.state
            {
                if requests.contains(request) {
                    pending.retain(|c| c != cluster);
                    if let Some(e) = failure {
                        failures.push(format!("{cluster}: {e}"));
                    }
                    touched.push(key);
                }
            }
        }
        for key in touched {
            self.finish_refresh_if_done(key);
        }
    }

    fn finish_refresh_if_done(&mut self, key: usize) {
        let Some(a) = self.admin.front.conns.get(key) else {
            return;
        };
        let State::Refreshing {
            pending,
            failures,
            head_only,
            ..
        } = &a.state
        else {
            return;
        };
        if !pending.is_empty() {
            return;
        }
        let resp = if failures.is_empty() {
            Response::text(
                200,
                &format!("updated {} cluster(s)\n", self.clusters.len()),
            )
        } else {
            Response::text(503, &format!("update failed for {}\n", failures.join("\n")))
        };
        let head_only = *head_only;
        self.admin_respond(key, resp.head_only(head_only));
    }

    pub(super) fn admin_deadline(&mut self, key: usize, id: u64, now: Instant) {
        let Some(a) = self.admin.front.conns.get(key) else {
            return;
        };
        if a.id != id || a.deadline > now {
            return;
        }
        let resp = match &a.state {
            // A TLS client that never finished its handshake gets no answer.
            State::Reading if a.is_handshaking() => return self.admin.front.close(key),
            State::Reading => Response::text(408, "request timeout\n"),
            State::Refreshing {
                pending, head_only, ..
            } => Response::text(
                503,
                &format!("timed out waiting for: {}\n", pending.join(", ")),
            )
            .head_only(*head_only),
            // A client that does not read its response: give up on it.
            State::Writing => return self.admin.front.close(key),
            State::Closed => return,
        };
        // Give the writer one more idle period.
        if let Some(a) = self.admin.front.conns.get_mut(key) {
            a.deadline = now + ADMIN_IDLE;
            self.timers.add(a.deadline, Timer::Admin(key, id));
        }
        self.admin_respond(key, resp);
    }
}

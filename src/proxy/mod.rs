//! The event loop: one `mio::Poll` that owns every listener, every session
//! (client/backend pair), the admin socket, the signal pipe and the waker
//! of the updater threads.
//!
//! Each turn of [`Proxy::run`]:
//! 1. poll, with a timeout from the earliest timer (zero while work is
//!    queued); `Interrupted` is retried;
//! 2. dispatch the batch: session and admin events are handled at once;
//!    listener, waker and signal events only set flags;
//! 3. then, in this fixed order: the run queue (sessions that hit their
//!    byte budget), topology updates, signals (reload, drain), expired
//!    timers, reaping closed sessions, and accepting new clients.
//!
//! Accepting and reaping happen after the batch because `slab` reuses the
//! most recently freed key first: a stale event still in the batch for a
//! closed session must never reach a new session that took its key (mio
//! #219; PgBouncer's "just freed" list; Sōzu's accept queue).
//!
//! Nothing here blocks: DNS and HTTP happen in the updater threads; the only
//! file read is the config on SIGHUP.

mod admin_conn;
mod buffer;
mod listener;
mod session;
pub mod sockopt;
mod timer;
mod token;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, info, log, warn, Level};
use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Waker};
use serde_json::{json, Value};
use slab::Slab;

use crate::admin::{Request, Response, Route};
use crate::config::{self, ClusterConfig, Config, PortConfig};
use crate::error::{Error, Result};
use crate::notify;
use crate::signals::{Action, Signals};
use crate::topology::{self, Topology};
use crate::updater::{self, Update};

use admin_conn::{AdminConn, State as AdminState, Step};
use buffer::Pool;
use listener::{Listener, Target};
use session::{Connect, Endpoint, Phase, Pumped, Session};
use timer::{Timer, Timers};
use token::Side;

/// Bytes moved per direction per pump before other sessions get a turn.
const PUMP_BUDGET: usize = 256 * 1024;
/// Connections accepted per listener per loop turn.
const ACCEPT_BATCH: usize = 256;
/// How long a half-closed session may wait for the other direction.
const FIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Admin connections must send their request within this.
const ADMIN_IDLE: Duration = Duration::from_secs(5);
/// Most admin connections at once.
const MAX_ADMIN: usize = 64;
/// Free buffers the pool keeps.
const POOL_KEEP: usize = 64;
const HOUSEKEEPING: Duration = Duration::from_secs(1);
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(100);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);
const STALE_REMINDER: Duration = Duration::from_secs(60);
/// How long a client waits before its refused start-up is retried.
const STARTUP_RETRY: Duration = Duration::from_millis(250);
/// How long a client waits before connecting again when every routable
/// member failed to connect.
const CONNECT_RETRY: Duration = Duration::from_millis(250);

/// What the loop knows of one cluster.
struct ClusterState {
    updater: updater::Handle,
    topology: Option<Topology>,
    last_success: Option<Instant>,
    last_host: Option<String>,
    last_error: Option<String>,
    /// Beyond `topology_ttl` without a successful poll: refuse new clients.
    stale: bool,
    stale_logged: Option<Instant>,
}

pub struct Proxy {
    poll: Poll,
    waker: Arc<Waker>,
    config: Config,
    config_path: PathBuf,
    verbosity: u8,
    updates_tx: Sender<Update>,
    updates_rx: Receiver<Update>,
    signals: Signals,
    admin_listener: TcpListener,
    admin_accept_ready: bool,
    admins: Slab<AdminConn>,
    listeners: Slab<Listener>,
    sessions: Slab<Session>,
    clusters: BTreeMap<String, ClusterState>,
    pool: Pool,
    timers: Timers,
    run_queue: Vec<usize>,
    closed_sessions: Vec<usize>,
    closed_admins: Vec<usize>,
    next_id: u64,
    next_updater_id: u64,
    next_request_id: u64,
    accept_paused: bool,
    accept_backoff: Duration,
    /// A listener still had connections when its batch ended.
    accept_more: bool,
    at_capacity: bool,
    drain_deadline: Option<Instant>,
    exit_now: bool,
    reload_requested: bool,
    refresh_requested: bool,
}

impl Proxy {
    /// Binds every socket and starts the updaters. Any bind failure is fatal.
    pub fn new(config: Config, config_path: PathBuf, verbosity: u8) -> Result<Proxy> {
        let poll = Poll::new().map_err(|e| Error::io("creating the poll", e))?;
        let waker = Arc::new(
            Waker::new(poll.registry(), token::WAKER)
                .map_err(|e| Error::io("creating the waker", e))?,
        );
        let mut signals =
            Signals::install().map_err(|e| Error::io("installing signal handlers", e))?;
        poll.registry()
            .register(signals.source(), token::SIGNALS, Interest::READABLE)
            .map_err(|e| Error::io("registering the signal pipe", e))?;
        let mut admin_listener = bind(config.listen_address, config.listen_backlog)?;
        poll.registry()
            .register(
                &mut admin_listener,
                token::ADMIN_LISTENER,
                Interest::READABLE,
            )
            .map_err(|e| Error::io("registering the admin listener", e))?;
        info!("admin interface listening on {}", config.listen_address);

        let (updates_tx, updates_rx) = mpsc::channel();
        let mut proxy = Proxy {
            poll,
            waker,
            pool: {
                let mut pool = Pool::new(config.buffer_size, POOL_KEEP);
                pool.set_splice(config.splice);
                pool
            },
            config: config.clone(),
            config_path,
            verbosity,
            updates_tx,
            updates_rx,
            signals,
            admin_listener,
            admin_accept_ready: false,
            admins: Slab::new(),
            listeners: Slab::new(),
            sessions: Slab::new(),
            clusters: BTreeMap::new(),
            timers: Timers::default(),
            run_queue: Vec::new(),
            closed_sessions: Vec::new(),
            closed_admins: Vec::new(),
            next_id: 1,
            next_updater_id: 1,
            next_request_id: 1,
            accept_paused: false,
            accept_backoff: ACCEPT_PAUSE_MIN,
            accept_more: false,
            at_capacity: false,
            drain_deadline: None,
            exit_now: false,
            reload_requested: false,
            refresh_requested: false,
        };
        for (cluster, port) in config.ports() {
            let socket = bind(port.listen, config.listen_backlog)?;
            proxy.add_listener(socket, cluster, port)?;
        }
        for cluster in &config.clusters {
            proxy.start_cluster(cluster)?;
        }
        proxy.check_fd_limit();
        proxy
            .timers
            .add(Instant::now() + HOUSEKEEPING, Timer::Housekeeping);
        Ok(proxy)
    }

    /// Runs until a drain completes or an exit signal; `Err` only when the
    /// poll itself fails.
    pub fn run(&mut self) -> Result<()> {
        let mut events = Events::with_capacity(1024);
        notify::notify(&format!(
            "READY=1\nSTATUS=serving {} ports of {} clusters",
            self.listeners.len(),
            self.clusters.len()
        ));
        loop {
            let now = Instant::now();
            let timeout = if !self.run_queue.is_empty() || self.accept_more {
                Some(Duration::ZERO)
            } else {
                self.timers.next_timeout(now)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue; // a signal landed during epoll_wait
                }
                return Err(Error::io("polling", e));
            }
            let mut woken = false;
            let mut signalled = false;
            for ev in events.iter() {
                match token::decode(ev.token()) {
                    Some(token::Target::Session(key, side)) => self.session_event(key, side, ev),
                    Some(token::Target::Admin(key)) => self.admin_event(key, Some(ev)),
                    Some(token::Target::Listener(key)) => {
                        if let Some(l) = self.listeners.get_mut(key) {
                            l.accept_ready = true;
                        }
                    }
                    Some(token::Target::AdminListener) => self.admin_accept_ready = true,
                    Some(token::Target::Waker) => woken = true,
                    Some(token::Target::Signals) => signalled = true,
                    // Sporadic events happen (mio docs); nothing to do.
                    None => {}
                }
            }
            self.run_queued();
            if woken {
                self.drain_updates();
            }
            if signalled {
                self.handle_signals();
            }
            if self.exit_now {
                info!("exiting now; {} sessions dropped", self.live_sessions());
                return Ok(());
            }
            self.fire_timers();
            self.reap();
            self.compact_timers();
            if let Some(deadline) = self.drain_deadline {
                let left = self.live_sessions();
                if left == 0 {
                    info!("drained: all sessions finished; exiting");
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    info!(
                        "shutdown_timeout reached; closing {left} remaining sessions and exiting"
                    );
                    return Ok(());
                }
            }
            self.accept_clients();
            self.accept_admin();
        }
    }

    fn live_sessions(&self) -> usize {
        self.sessions.len() - self.closed_sessions.len()
    }

    // ---- sessions ---------------------------------------------------------

    fn session_event(&mut self, key: usize, side: Side, ev: &Event) {
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        if s.phase == Phase::Closed {
            return; // stale event for a session closed earlier in this batch
        }
        s.mark(side, ev);
        if side == Side::Backend && s.phase == Phase::Connecting {
            match s.check_connect() {
                Connect::Pending => return,
                Connect::Failed(e) => return self.connect_failed(key, &e.to_string()),
                Connect::Done => {
                    s.phase = Phase::Streaming;
                    s.deadline = None;
                    debug!(
                        "session={} backend={} connected",
                        s.id,
                        describe_target(&s.target)
                    );
                }
            }
        }
        self.pump(key);
    }

    fn pump(&mut self, key: usize) {
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        if s.phase == Phase::Closed {
            return;
        }
        let pumped = s.pump(&mut self.pool, PUMP_BUDGET);
        log::trace!(
            "session={} phase={:?} pumped={pumped:?} client=(r{} w{} eof{} shut{}) backend={:?}",
            s.id,
            s.phase,
            s.client.readable,
            s.client.writable,
            s.client.read_eof,
            s.client.write_shut,
            s.backend
                .as_ref()
                .map(|b| (b.readable, b.writable, b.read_eof, b.write_shut))
        );
        match pumped {
            Pumped::Idle => {
                if s.phase == Phase::Waiting && s.client.read_eof && s.to_backend.is_empty() {
                    self.close_session(
                        key,
                        "client left while waiting for a backend",
                        Level::Debug,
                    );
                }
            }
            Pumped::Budget => {
                if !s.queued {
                    s.queued = true;
                    self.run_queue.push(key);
                }
            }
            Pumped::HalfClosed => {
                if s.deadline.is_none() {
                    let at = Instant::now() + FIN_TIMEOUT;
                    s.deadline = Some(at);
                    self.timers.add(at, Timer::Session(key, s.id));
                }
            }
            Pumped::Finished => self.close_session(key, "finished", Level::Debug),
            Pumped::Refused(why) => self.retry_refused(key, &why, STARTUP_RETRY, false),
            // The backend failed while the start-up was still held back:
            // the client has seen nothing of it, so try another connect.
            Pumped::Failed(Side::Backend, e) if s.startup.is_some() => {
                let why = format!("backend error during the start-up: {e}");
                self.retry_refused(key, &why, STARTUP_RETRY, false);
            }
            Pumped::Failed(side, e) => {
                let level = match e.kind() {
                    io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::NotConnected => Level::Debug,
                    _ => Level::Info,
                };
                let side = if side == Side::Client {
                    "client"
                } else {
                    "backend"
                };
                self.close_session(key, &format!("{side} error: {e}"), level);
            }
        }
    }

    fn run_queued(&mut self) {
        let queue = std::mem::take(&mut self.run_queue);
        for key in queue {
            if let Some(s) = self.sessions.get_mut(key) {
                s.queued = false;
                self.pump(key);
            }
        }
    }

    fn close_session(&mut self, key: usize, reason: &str, level: Level) {
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        if s.phase == Phase::Closed {
            return;
        }
        let label = self
            .listeners
            .get(s.listener)
            .map_or("?", |l| l.label.as_str());
        log!(
            level,
            "session={} port={} client={} backend={} closed reason={:?} bytes_up={} bytes_down={}",
            s.id,
            label,
            s.client_addr,
            describe_target(&s.target),
            reason,
            s.bytes_up,
            s.bytes_down
        );
        if let Some(t) = s.target.take() {
            if let Some(l) = self.listeners.get_mut(s.listener) {
                l.release(&t);
            }
        }
        s.close(self.poll.registry(), &mut self.pool);
        self.closed_sessions.push(key);
    }

    /// Sends a session to a backend, or makes it wait for one, or refuses it.
    fn route(&mut self, key: usize) {
        let now = Instant::now();
        let connect_timeout = self.config.connect_timeout;
        let keepalive = self.config.tcp_keepalive;
        let Proxy {
            sessions,
            listeners,
            clusters,
            poll,
            timers,
            ..
        } = self;
        let Some(s) = sessions.get_mut(key) else {
            return;
        };
        s.retry_pending = false;
        let Some(l) = listeners.get_mut(s.listener) else {
            return self.close_session(key, "port removed", Level::Debug);
        };
        if clusters.get(&l.cluster).is_some_and(|c| c.stale) {
            let label = l.label.clone();
            return self.close_session(
                key,
                &format!(
                    "topology of {label} is stale (Patroni API unreachable beyond topology_ttl)"
                ),
                Level::Info,
            );
        }
        while let Some(target) = l.pick(&s.tried) {
            match open_backend(target.1, keepalive.as_ref()) {
                Ok(sock) => {
                    let mut ep = Endpoint::new(sock);
                    let tok = token::session(key, Side::Backend);
                    if let Err(e) = poll.registry().register(
                        &mut ep.sock,
                        tok,
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        l.release(&target);
                        warn!("session={} registering backend socket: {e}", s.id);
                        s.tried.push(target.1);
                        continue;
                    }
                    s.backend = Some(ep);
                    s.target = Some(target);
                    s.phase = Phase::Connecting;
                    // On loopback and fast networks the handshake is often
                    // over (or refused) by now: check at once instead of
                    // waiting a loop turn for the event, so the client's
                    // buffered startup packet leaves without delay.
                    match s.check_connect() {
                        Connect::Done => {
                            s.phase = Phase::Streaming;
                            // A held client's wait deadline no longer applies.
                            s.deadline = None;
                            if let Some(b) = s.backend.as_mut() {
                                b.writable = true;
                            }
                            debug!(
                                "session={} backend={} connected",
                                s.id,
                                describe_target(&s.target)
                            );
                            return self.pump(key);
                        }
                        Connect::Failed(e) => return self.connect_failed(key, &e.to_string()),
                        Connect::Pending => {
                            let at = now + connect_timeout;
                            s.deadline = Some(at);
                            timers.add(at, Timer::Session(key, s.id));
                            return;
                        }
                    }
                }
                Err(e) => {
                    log_connect_failure(s, &l.label, &target, &e);
                    l.release(&target);
                    s.tried.push(target.1);
                }
            }
        }
        if !s.tried.is_empty() {
            // Every routable member refused or timed out. During a failover
            // the old leader's port refuses before Patroni shows the new
            // leader, so hold the client and try again shortly, within
            // backend_wait_timeout (PgBouncer's server_login_retry).
            let since = *s.waiting_since.get_or_insert(now);
            let retry_at = now + CONNECT_RETRY;
            if retry_at > since + l.wait {
                return self.close_session(
                    key,
                    "every routable member failed to connect",
                    Level::Info,
                );
            }
            debug!(
                "session={} port={} every routable member failed; retrying in {} ms",
                s.id,
                l.label,
                CONNECT_RETRY.as_millis()
            );
            s.tried.clear();
            s.phase = Phase::Waiting;
            s.retry_pending = true;
            s.deadline = Some(retry_at);
            timers.add(retry_at, Timer::Session(key, s.id));
            return;
        }
        if l.wait.is_zero() {
            return self.close_session(key, "no routable member", Level::Info);
        }
        let at = *s.waiting_since.get_or_insert(now) + l.wait;
        if at <= now {
            return self.close_session(
                key,
                "no routable member within backend_wait_timeout",
                Level::Info,
            );
        }
        s.phase = Phase::Waiting;
        if s.deadline != Some(at) {
            s.deadline = Some(at);
            timers.add(at, Timer::Session(key, s.id));
        }
        debug!(
            "session={} port={} waiting for a routable member",
            s.id, l.label
        );
    }

    /// The backend refused the connection start-up with SQLSTATE 57P03: a
    /// demoted leader shutting down, or a member starting up. Hold the client
    /// for a moment (within `backend_wait_timeout`), then route it again and
    /// replay its start-up; by then the topology usually names the new
    /// leader. The client sees nothing of the refused attempt.
    /// `evicted`: the member lost its role (rather than refused); without a
    /// retry such a session is closed, not relayed.
    fn retry_refused(&mut self, key: usize, why: &str, delay: Duration, evicted: bool) {
        let now = Instant::now();
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        let member = describe_target(&s.target);
        let (label, wait) = self
            .listeners
            .get(s.listener)
            .map_or(("?".to_string(), Duration::ZERO), |l| {
                (l.label.clone(), l.wait)
            });
        let at = now + delay;
        let in_time = at <= s.waiting_since.unwrap_or(now) + wait;
        if !in_time || !s.prepare_replay(self.poll.registry(), &mut self.pool) {
            if evicted {
                return self.close_session(key, why, Level::Debug);
            }
            // No retry: the client gets the refusal as the server sent it.
            info!("session={} port={label} backend={member} refused the start-up ({why}); relaying it", s.id);
            s.relay_startup(&mut self.pool);
            return self.pump(key);
        }
        if let (Some(t), Some(l)) = (s.target.take(), self.listeners.get_mut(s.listener)) {
            l.release(&t);
        }
        info!(
            "session={} port={label} backend={member} refused the start-up ({why}); retrying in {} ms",
            s.id,
            delay.as_millis()
        );
        s.waiting_since.get_or_insert(now);
        s.phase = Phase::Waiting;
        s.retry_pending = true;
        s.deadline = Some(at);
        self.timers.add(at, Timer::Session(key, s.id));
    }

    /// The connect to the session's backend failed: try the next member.
    fn connect_failed(&mut self, key: usize, why: &str) {
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        s.drop_backend(self.poll.registry());
        if let Some(t) = s.target.take() {
            let l = self.listeners.get_mut(s.listener);
            log_connect_failure(
                s,
                l.as_ref().map_or("?", |l| l.label.as_str()),
                &t,
                &format_args!("{why}; trying the next member"),
            );
            s.tried.push(t.1);
            if let Some(l) = l {
                l.release(&t);
            }
        }
        s.phase = Phase::Waiting;
        s.deadline = None;
        self.route(key);
    }

    fn reap(&mut self) {
        for key in self.closed_sessions.drain(..) {
            // Dropping the session closes its sockets.
            self.sessions.try_remove(key);
        }
        for key in self.closed_admins.drain(..) {
            if let Some(mut a) = self.admins.try_remove(key) {
                let _ = self.poll.registry().deregister(&mut a.sock);
            }
        }
        if self.at_capacity && self.sessions.len() < self.config.max_connections {
            self.at_capacity = false;
            info!("below max_connections again; accepting");
        }
    }

    // ---- accepting --------------------------------------------------------

    fn accept_clients(&mut self) {
        self.accept_more = false;
        if self.accept_paused || self.drain_deadline.is_some() {
            return;
        }
        for lk in 0..self.listeners.capacity() {
            let mut accepted = 0;
            while let Some(l) = self.listeners.get_mut(lk).filter(|l| l.accept_ready) {
                if self.sessions.len() >= self.config.max_connections {
                    if !self.at_capacity {
                        self.at_capacity = true;
                        warn!(
                            "max_connections={} reached; new clients wait in the backlog",
                            self.config.max_connections
                        );
                    }
                    return;
                }
                if accepted == ACCEPT_BATCH {
                    self.accept_more = true;
                    break;
                }
                match l.socket.accept() {
                    Ok((sock, peer)) => {
                        accepted += 1;
                        self.accept_backoff = ACCEPT_PAUSE_MIN;
                        self.new_session(lk, sock, peer);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => l.accept_ready = false,
                    Err(e) if accept_retry(&e) => {}
                    Err(e) => return self.pause_accepting(&e),
                }
            }
        }
    }

    /// Out of file descriptors (or another accept failure): the pending
    /// connection stays in the backlog and, edge-triggered, no new event
    /// will come for it, so retry on a timer.
    fn pause_accepting(&mut self, e: &io::Error) {
        let backoff = self.accept_backoff;
        if backoff == ACCEPT_PAUSE_MIN {
            error!(
                "accept failed: {e}; pausing accepts (sessions={})",
                self.sessions.len()
            );
        }
        self.accept_paused = true;
        self.accept_backoff = (backoff * 2).min(ACCEPT_PAUSE_MAX);
        self.timers
            .add(Instant::now() + backoff, Timer::AcceptResume);
    }

    fn new_session(&mut self, lk: usize, sock: TcpStream, peer: SocketAddr) {
        let _ = sock.set_nodelay(true);
        if let Some(ka) = &self.config.tcp_keepalive {
            let _ = sockopt::set_keepalive(&sock, ka);
        }
        let id = self.next_id;
        self.next_id += 1;
        let entry = self.sessions.vacant_entry();
        let key = entry.key();
        let mut s = Session::new(id, lk, sock, peer, self.config.startup_replay);
        let tok = token::session(key, Side::Client);
        if let Err(e) = self.poll.registry().register(
            &mut s.client.sock,
            tok,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            warn!("registering client {peer}: {e}");
            return;
        }
        entry.insert(s);
        self.route(key);
    }

    // ---- timers -----------------------------------------------------------

    fn fire_timers(&mut self) {
        let now = Instant::now();
        for t in self.timers.expired(now) {
            match t {
                Timer::Session(key, id) => self.session_deadline(key, id, now),
                Timer::Admin(key, id) => self.admin_deadline(key, id),
                Timer::AcceptResume => self.accept_paused = false,
                Timer::Housekeeping => {
                    self.housekeeping(now);
                    self.timers.add(now + HOUSEKEEPING, Timer::Housekeeping);
                }
                Timer::Drain => {} // checked after reaping
            }
        }
    }

    /// Drops timer entries whose owner is gone or has moved its deadline,
    /// once they outnumber the live sessions (see `timer`'s module docs).
    fn compact_timers(&mut self) {
        let live = self.sessions.len() + self.admins.len();
        if self.timers.len() <= 2 * live + 64 {
            return;
        }
        let (sessions, admins) = (&self.sessions, &self.admins);
        self.timers.retain(|at, t| match t {
            Timer::Session(key, id) => sessions
                .get(key)
                .is_some_and(|s| s.id == id && s.deadline == Some(at)),
            Timer::Admin(key, id) => admins
                .get(key)
                .is_some_and(|a| a.id == id && a.deadline == at),
            Timer::AcceptResume | Timer::Housekeeping | Timer::Drain => true,
        });
    }

    fn session_deadline(&mut self, key: usize, id: u64, now: Instant) {
        let Some(s) = self.sessions.get(key) else {
            return;
        };
        if s.id != id || s.deadline.is_none_or(|d| d > now) {
            return; // cancelled or moved: lazy timer cancellation
        }
        match s.phase {
            // The pause after a refused start-up is over: route again.
            Phase::Waiting if s.retry_pending => self.route(key),
            Phase::Waiting => self.close_session(
                key,
                "no routable member within backend_wait_timeout",
                Level::Info,
            ),
            Phase::Connecting => self.connect_failed(key, "connect timeout"),
            Phase::Streaming => self.close_session(key, "half-closed for too long", Level::Debug),
            Phase::Closed => {}
        }
    }

    fn housekeeping(&mut self, now: Instant) {
        let ttl = self.config.topology_ttl;
        let mut went_stale = Vec::new();
        for (name, c) in &mut self.clusters {
            if c.updater.is_dead() {
                error!("cluster={name} updater thread died; restarting it");
                let settings = c.updater.settings.clone();
                let id = self.next_updater_id;
                self.next_updater_id += 1;
                let wake = waker_fn(&self.waker);
                match updater::Handle::spawn(id, name, settings, self.updates_tx.clone(), wake) {
                    Ok(h) => c.updater = h,
                    Err(e) => error!("cluster={name} cannot restart its updater: {e}"),
                }
            }
            let (Some(ttl), Some(last)) = (ttl, c.last_success) else {
                continue;
            };
            let age = now.duration_since(last);
            if age <= ttl {
                continue;
            }
            if !c.stale {
                c.stale = true;
                c.stale_logged = Some(now);
                warn!(
                    "cluster={name} no successful Patroni poll for {:.0}s (topology_ttl); refusing new clients, keeping open sessions",
                    age.as_secs_f64()
                );
                went_stale.push(name.clone());
            } else if c
                .stale_logged
                .is_some_and(|t| now.duration_since(t) >= STALE_REMINDER)
            {
                c.stale_logged = Some(now);
                warn!(
                    "cluster={name} topology still stale ({:.0}s since the last successful poll)",
                    age.as_secs_f64()
                );
            }
        }
        for name in went_stale {
            let waiting: Vec<usize> = self
                .sessions
                .iter()
                .filter(|(_, s)| s.phase == Phase::Waiting)
                .filter(|(_, s)| {
                    self.listeners
                        .get(s.listener)
                        .is_some_and(|l| l.cluster == name)
                })
                .map(|(k, _)| k)
                .collect();
            for key in waiting {
                self.close_session(key, "topology stale", Level::Info);
            }
        }
    }

    // ---- topology ---------------------------------------------------------

    fn drain_updates(&mut self) {
        // Wake-ups coalesce: take everything that is there.
        while let Ok(u) = self.updates_rx.try_recv() {
            self.apply_update(u);
        }
    }

    fn apply_update(&mut self, u: Update) {
        let failure = u.outcome.as_ref().err().cloned();
        self.apply_outcome(&u.cluster, u.updater, u.outcome);
        // Answer `/update_clusters` only once the new topology is in effect.
        self.answer_refreshes(&u.cluster, &u.requests, failure.as_deref());
    }

    fn apply_outcome(
        &mut self,
        cluster: &str,
        updater: u64,
        outcome: std::result::Result<updater::Polled, String>,
    ) {
        let Some(c) = self.clusters.get_mut(cluster) else {
            return;
        };
        if c.updater.id != updater {
            return; // from an updater a reload replaced
        }
        match outcome {
            Err(e) => c.last_error = Some(e),
            Ok(polled) => {
                c.last_success = Some(Instant::now());
                c.last_host = Some(polled.host);
                c.last_error = None;
                if c.stale {
                    c.stale = false;
                    info!(
                        "cluster={} topology fresh again; accepting new clients",
                        cluster
                    );
                }
                if let Some(topo) = polled.topology {
                    for change in topology::diff(c.topology.as_ref(), &topo) {
                        match change {
                            topology::Change::SplitBrain { .. } => {
                                error!("cluster={} {change}", cluster)
                            }
                            _ => info!("cluster={} {change}", cluster),
                        }
                    }
                    if topo.paused && !c.topology.as_ref().is_some_and(|t| t.paused) {
                        info!("cluster={} is in maintenance mode (pause)", cluster);
                    }
                    c.topology = Some(topo);
                    self.refresh_listeners(cluster);
                }
            }
        }
    }

    fn refresh_listeners(&mut self, cluster: &str) {
        for lk in 0..self.listeners.capacity() {
            if self.listeners.get(lk).is_some_and(|l| l.cluster == cluster) {
                self.refresh_listener(lk);
            }
        }
    }

    /// Recomputes a port's backends from its cluster's topology; closes the
    /// sessions on members that lost what the port requires; routes waiting
    /// clients when a member became available.
    fn refresh_listener(&mut self, lk: usize) {
        let Some(l) = self.listeners.get_mut(lk) else {
            return;
        };
        let topo = self
            .clusters
            .get(&l.cluster)
            .and_then(|c| c.topology.as_ref());
        let routable = topo
            .map(|t| topology::routable(t, &l.filter))
            .unwrap_or_default();
        let mut evicted: Vec<(Target, String)> = Vec::new();
        for b in &l.backends {
            if !routable.iter().any(|r| b.is(r)) {
                let reason = match topo.and_then(|t| t.member(&b.member).map(|m| (t, m))) {
                    None => "removed from the cluster".to_string(),
                    Some((t, m)) => match topology::eligibility(t, m, &l.filter) {
                        Err(x) => x.to_string(),
                        Ok(addr) => format!("address changed to {addr}"),
                    },
                };
                evicted.push(((b.member.clone(), b.addr), reason));
            }
        }
        for r in &routable {
            match l.backends.iter().find(|b| b.is(r)) {
                None => info!(
                    "port={} member={} addr={} routable{}",
                    l.label,
                    r.member,
                    r.addr,
                    if r.draining { " but draining" } else { "" }
                ),
                Some(b) if b.draining != r.draining => info!(
                    "port={} member={} {}",
                    l.label,
                    r.member,
                    if r.draining {
                        "draining: a leader without timeline (Patroni is demoting or restarting it); new clients wait"
                    } else {
                        "no longer draining; taking new clients"
                    }
                ),
                Some(_) => {}
            }
        }
        l.set_backends(&routable);
        let has_backends = l.has_open_backend();
        let label = l.label.clone();

        let mut close = Vec::new();
        let mut reroute = Vec::new();
        let mut replay = Vec::new();
        let mut start = Vec::new();
        for (k, s) in self.sessions.iter().filter(|(_, s)| s.listener == lk) {
            match s.phase {
                Phase::Streaming | Phase::Connecting => {
                    let Some(t) = &s.target else { continue };
                    if let Some((_, why)) = evicted.iter().find(|(e, _)| e == t) {
                        if s.phase == Phase::Connecting {
                            reroute.push(k);
                        } else if s.startup.is_some() {
                            // Nothing but the start-up happened yet: replay
                            // it elsewhere instead of failing the client.
                            replay.push((k, why.clone()));
                        } else {
                            close.push((k, why.clone()));
                        }
                    }
                }
                Phase::Waiting if has_backends => start.push(k),
                _ => {}
            }
        }
        for ((member, addr), why) in &evicted {
            let n = close
                .iter()
                .filter(|(k, _)| {
                    self.sessions[*k]
                        .target
                        .as_ref()
                        .is_some_and(|t| *t.0 == **member)
                })
                .count();
            info!("port={label} member={member} addr={addr} no longer routable ({why}); closing {n} sessions");
        }
        for (k, why) in close {
            self.close_session(
                k,
                &format!("member no longer routable: {why}"),
                Level::Debug,
            );
        }
        for (k, why) in replay {
            self.retry_refused(
                k,
                &format!("member no longer routable: {why}"),
                Duration::ZERO,
                true,
            );
        }
        for k in reroute {
            if let Some(s) = self.sessions.get_mut(k) {
                s.drop_backend(self.poll.registry());
                s.target = None; // its backend is gone from the list: nothing to release
                s.phase = Phase::Waiting;
                self.route(k);
            }
        }
        for k in start {
            self.route(k);
        }
    }

    // ---- clusters and listeners --------------------------------------------

    fn start_cluster(&mut self, cluster: &ClusterConfig) -> Result<()> {
        let settings = updater::Settings::new(&self.config, cluster);
        let id = self.next_updater_id;
        self.next_updater_id += 1;
        let handle = updater::Handle::spawn(
            id,
            &cluster.name,
            settings,
            self.updates_tx.clone(),
            waker_fn(&self.waker),
        )
        .map_err(|e| {
            Error::io(
                format!("starting the updater of cluster {}", cluster.name),
                e,
            )
        })?;
        match self.clusters.get_mut(&cluster.name) {
            Some(c) => std::mem::replace(&mut c.updater, handle).stop(),
            None => {
                self.clusters.insert(
                    cluster.name.clone(),
                    ClusterState {
                        updater: handle,
                        topology: None,
                        last_success: None,
                        last_host: None,
                        last_error: None,
                        stale: false,
                        stale_logged: None,
                    },
                );
            }
        }
        Ok(())
    }

    fn add_listener(
        &mut self,
        mut socket: TcpListener,
        cluster: &ClusterConfig,
        port: &PortConfig,
    ) -> Result<()> {
        let entry = self.listeners.vacant_entry();
        if entry.key() >= token::MAX_LISTENERS {
            return Err(Error::io(
                "adding a listener",
                io::Error::other("too many listeners"),
            ));
        }
        self.poll
            .registry()
            .register(
                &mut socket,
                token::listener(entry.key()),
                Interest::READABLE,
            )
            .map_err(|e| Error::io(format!("registering listener {}", port.listen), e))?;
        let l = Listener::new(socket, cluster, port);
        info!(
            "port={} listening on {} roles={:?}",
            l.label, l.addr, port.roles
        );
        let lk = entry.key();
        entry.insert(l);
        self.refresh_listener(lk);
        Ok(())
    }

    /// Closes every session of listener `lk`.
    fn close_listener_sessions(&mut self, lk: usize, why: &str) {
        let keys: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.listener == lk)
            .map(|(k, _)| k)
            .collect();
        for k in keys {
            self.close_session(k, why, Level::Debug);
        }
    }

    fn remove_listener(&mut self, lk: usize, why: &str) {
        self.close_listener_sessions(lk, why);
        if let Some(mut l) = self.listeners.try_remove(lk) {
            let _ = self.poll.registry().deregister(&mut l.socket);
            info!("port={} on {} closed: {why}", l.label, l.addr);
        }
    }

    fn check_fd_limit(&self) {
        let wanted = self.config.max_connections as u64 * 2
            + self.listeners.len() as u64
            + MAX_ADMIN as u64
            + 64;
        match sockopt::raise_nofile_limit(wanted) {
            Ok((soft, _)) if soft < wanted => warn!(
                "open files limit is {soft}, below the {wanted} that max_connections={} needs; \
                 accepting pauses when it runs out",
                self.config.max_connections
            ),
            Ok((soft, _)) => debug!("open files limit {soft}"),
            Err(e) => warn!("cannot read the open files limit: {e}"),
        }
    }

    // ---- signals, reload, drain ---------------------------------------------

    fn handle_signals(&mut self) {
        for action in self.signals.pending() {
            match action {
                Action::Reload => self.reload_requested = true,
                Action::Refresh => self.refresh_requested = true,
                Action::Drain => self.start_drain(),
                Action::Exit => {
                    info!("SIGQUIT: exiting at once");
                    self.exit_now = true;
                }
            }
        }
        if std::mem::take(&mut self.reload_requested) {
            self.reload();
        }
        if std::mem::take(&mut self.refresh_requested) {
            info!("SIGUSR1: polling every cluster now");
            for c in self.clusters.values() {
                c.updater.refresh(0);
            }
        }
    }

    fn start_drain(&mut self) {
        if self.drain_deadline.is_some() {
            info!("second stop signal while draining: exiting at once");
            self.exit_now = true;
            return;
        }
        let at = Instant::now() + self.config.shutdown_timeout;
        self.drain_deadline = Some(at);
        notify::notify("STOPPING=1\nSTATUS=draining open sessions");
        self.timers.add(at, Timer::Drain);
        for lk in 0..self.listeners.capacity() {
            if let Some(mut l) = self.listeners.try_remove(lk) {
                let _ = self.poll.registry().deregister(&mut l.socket);
            }
        }
        let waiting: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.phase != Phase::Streaming)
            .map(|(k, _)| k)
            .collect();
        for k in waiting {
            self.close_session(k, "shutting down", Level::Debug);
        }
        info!(
            "stop signal: no longer accepting; waiting up to {:.0}s for {} sessions to finish",
            self.config.shutdown_timeout.as_secs_f64(),
            self.live_sessions()
        );
    }

    /// Re-reads the config file and applies all of it, or nothing: every new
    /// socket is bound before anything changes, and a file that does not
    /// validate leaves the running configuration in place.
    fn reload(&mut self) {
        if self.drain_deadline.is_some() {
            warn!("SIGHUP ignored while shutting down");
            return;
        }
        info!("SIGHUP: reloading {}", self.config_path.display());
        notify::notify("RELOADING=1\nSTATUS=reloading the configuration");
        match self.try_reload() {
            Ok(()) => notify::notify(&format!(
                "READY=1\nSTATUS=reloaded; serving {} ports of {} clusters",
                self.listeners.len(),
                self.clusters.len()
            )),
            Err(e) => {
                error!("reload failed; keeping the running configuration: {e}");
                let first = e.lines().next().unwrap_or_default().to_string();
                notify::notify(&format!(
                    "READY=1\nSTATUS=reload failed, previous configuration kept: {first}"
                ));
            }
        }
    }

    fn try_reload(&mut self) -> std::result::Result<(), String> {
        let new = match config::load(&self.config_path) {
            Ok(c) => c,
            Err(e) => return Err(e.to_string()),
        };
        let mut fresh: HashMap<SocketAddr, TcpListener> = HashMap::new();
        for (_, port) in new.ports() {
            if self.listeners.iter().any(|(_, l)| l.addr == port.listen) {
                continue;
            }
            match bind(port.listen, new.listen_backlog) {
                Ok(s) => {
                    fresh.insert(port.listen, s);
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        let admin = if new.listen_address != self.config.listen_address {
            match bind(new.listen_address, new.listen_backlog) {
                Ok(s) => Some(s),
                Err(e) => return Err(e.to_string()),
            }
        } else {
            None
        };

        // Commit.
        log::set_max_level(config::raise_level(new.log_level, self.verbosity));
        for w in new.warnings() {
            warn!("{w}");
        }
        self.pool.resize(new.buffer_size);
        self.pool.set_splice(new.splice);
        if let Some(mut sock) = admin {
            let reg = self.poll.registry();
            let _ = reg.deregister(&mut self.admin_listener);
            if let Err(e) = reg.register(&mut sock, token::ADMIN_LISTENER, Interest::READABLE) {
                error!("registering the new admin listener: {e}");
            }
            self.admin_listener = sock;
            self.admin_accept_ready = false;
            info!("admin interface moved to {}", new.listen_address);
        }
        let old = std::mem::replace(&mut self.config, new.clone());
        for name in old.clusters.iter().map(|c| &c.name) {
            if !new.clusters.iter().any(|c| &c.name == name) {
                if let Some(c) = self.clusters.remove(name) {
                    c.updater.stop();
                    info!("cluster={name} removed");
                }
            }
        }
        for cluster in &new.clusters {
            let wanted = updater::Settings::new(&new, cluster);
            let restart = self
                .clusters
                .get(&cluster.name)
                .is_none_or(|c| c.updater.settings != wanted);
            if restart {
                if let Err(e) = self.start_cluster(cluster) {
                    error!("{e}");
                }
            }
        }
        for lk in 0..self.listeners.capacity() {
            let Some(l) = self.listeners.get(lk) else {
                continue;
            };
            let addr = l.addr;
            match new.ports().find(|(_, p)| p.listen == addr) {
                None => self.remove_listener(lk, "removed by reload"),
                Some((c, p)) => {
                    if l.cluster != c.name {
                        self.close_listener_sessions(lk, "port moved to another cluster");
                    }
                    self.listeners[lk].configure(c, p);
                }
            }
        }
        for (c, p) in new.ports() {
            if let Some(sock) = fresh.remove(&p.listen) {
                if let Err(e) = self.add_listener(sock, c, p) {
                    error!("{e}");
                }
            }
        }
        for lk in 0..self.listeners.capacity() {
            self.refresh_listener(lk);
        }
        info!(
            "configuration reloaded: {} clusters, {} ports",
            self.clusters.len(),
            self.listeners.len()
        );
        Ok(())
    }

    // ---- admin --------------------------------------------------------------

    fn accept_admin(&mut self) {
        while self.admin_accept_ready {
            if self.admins.len() >= MAX_ADMIN {
                return; // leave the rest in the backlog until one finishes
            }
            match self.admin_listener.accept() {
                Ok((mut sock, _)) => {
                    let entry = self.admins.vacant_entry();
                    let key = entry.key();
                    let tok = token::admin(key);
                    if self
                        .poll
                        .registry()
                        .register(&mut sock, tok, Interest::READABLE | Interest::WRITABLE)
                        .is_err()
                    {
                        continue;
                    }
                    let id = self.next_id;
                    self.next_id += 1;
                    let deadline = Instant::now() + ADMIN_IDLE;
                    entry.insert(AdminConn::new(id, sock, deadline));
                    self.timers.add(deadline, Timer::Admin(key, id));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.admin_accept_ready = false,
                Err(e) if accept_retry(&e) => {}
                Err(e) => {
                    warn!("admin accept failed: {e}");
                    return; // retried on the next loop turn
                }
            }
        }
    }

    fn admin_event(&mut self, key: usize, ev: Option<&Event>) {
        let Some(a) = self.admins.get_mut(key) else {
            return;
        };
        let step = match ev {
            Some(ev) => a.on_event(ev),
            None => a.advance(),
        };
        match step {
            Step::Nothing => {}
            Step::Close => self.close_admin(key),
            Step::Route(req) => self.admin_route(key, req),
        }
    }

    fn close_admin(&mut self, key: usize) {
        if let Some(a) = self.admins.get_mut(key) {
            if !matches!(a.state, AdminState::Closed) {
                a.state = AdminState::Closed;
                self.closed_admins.push(key);
            }
        }
    }

    fn admin_respond(&mut self, key: usize, resp: Response) {
        if let Some(a) = self.admins.get_mut(key) {
            a.respond(&resp);
            self.admin_event(key, None);
        }
    }

    fn admin_route(&mut self, key: usize, req: Request) {
        let resp = match req.route {
            Route::Root => Response::text(200, "OK"),
            Route::Clusters => Response::json(200, self.status_json()),
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
        let request = self.next_request_id;
        self.next_request_id += 1;
        let mut pending = Vec::new();
        let mut failures = Vec::new();
        let mut hosts = 1;
        for (name, c) in &self.clusters {
            hosts = hosts.max(c.updater.settings.hosts.len() as u32);
            if c.updater.refresh(request) {
                pending.push(name.clone());
            } else {
                failures.push(format!("{name}: updater not running"));
            }
        }
        // Each host may take api_timeout; the poll may already be under way.
        let wait = self.config.api_timeout * (hosts * 2) + Duration::from_secs(1);
        let Some(a) = self.admins.get_mut(key) else {
            return;
        };
        a.deadline = Instant::now() + wait;
        self.timers.add(a.deadline, Timer::Admin(key, a.id));
        a.state = AdminState::Refreshing {
            request,
            pending,
            failures,
            head_only,
        };
        self.finish_refresh_if_done(key);
    }

    /// Records the poll answering `requests` for `cluster`.
    fn answer_refreshes(&mut self, cluster: &str, requests: &[u64], failure: Option<&str>) {
        if requests.is_empty() {
            return;
        }
        let mut touched = Vec::new();
        for (key, a) in self.admins.iter_mut() {
            if let AdminState::Refreshing {
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
        let Some(a) = self.admins.get(key) else {
            return;
        };
        let AdminState::Refreshing {
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

    fn admin_deadline(&mut self, key: usize, id: u64) {
        let Some(a) = self.admins.get(key) else {
            return;
        };
        if a.id != id || a.deadline > Instant::now() {
            return;
        }
        let resp = match &a.state {
            AdminState::Reading => Response::text(408, "request timeout\n"),
            AdminState::Refreshing {
                pending, head_only, ..
            } => Response::text(
                503,
                &format!("timed out waiting for: {}\n", pending.join(", ")),
            )
            .head_only(*head_only),
            // A client that does not read its response: give up on it.
            AdminState::Writing => return self.close_admin(key),
            AdminState::Closed => return,
        };
        // Give the writer one more idle period.
        if let Some(a) = self.admins.get_mut(key) {
            a.deadline = Instant::now() + ADMIN_IDLE;
            self.timers.add(a.deadline, Timer::Admin(key, id));
        }
        self.admin_respond(key, resp);
    }

    /// `GET /clusters`: clusters, members, ports and their backends.
    fn status_json(&self) -> Vec<u8> {
        let now = Instant::now();
        let mut per_listener: HashMap<usize, (usize, usize)> = HashMap::new();
        for (_, s) in self
            .sessions
            .iter()
            .filter(|(_, s)| s.phase != Phase::Closed)
        {
            let e = per_listener.entry(s.listener).or_default();
            e.0 += 1;
            if s.phase == Phase::Waiting {
                e.1 += 1;
            }
        }
        let mut clusters = serde_json::Map::new();
        for (name, c) in &self.clusters {
            let listeners: Vec<(usize, &Listener)> = self
                .listeners
                .iter()
                .filter(|(_, l)| &l.cluster == name)
                .collect();
            let members: Vec<Value> = c
                .topology
                .iter()
                .flat_map(|t| t.members.iter().map(move |m| (t, m)))
                .map(|(t, m)| {
                    let mut ports = serde_json::Map::new();
                    for (_, l) in &listeners {
                        let v = match topology::eligibility(t, m, &l.filter) {
                            Ok(addr) => json!({"routable": true, "addr": addr.to_string()}),
                            Err(x) => json!({"routable": false, "reason": x.to_string()}),
                        };
                        ports.insert(port_name(l).to_string(), v);
                    }
                    json!({
                        "name": m.name, "role": m.role.as_str(), "state": m.state,
                        "host": m.host, "port": m.port, "timeline": m.timeline,
                        "lag": m.lag, "replay_lag": m.replay_lag, "noloadbalance": m.noloadbalance,
                        "ports": ports,
                    })
                })
                .collect();
            let mut ports = serde_json::Map::new();
            for (lk, l) in &listeners {
                let (sessions, waiting) = per_listener.get(lk).copied().unwrap_or_default();
                let backends: Vec<Value> = l
                    .backends
                    .iter()
                    .map(|b| {
                        json!({"member": &*b.member, "addr": b.addr.to_string(), "active": b.active, "draining": b.draining})
                    })
                    .collect();
                ports.insert(
                    port_name(l).to_string(),
                    json!({
                        "listen": l.addr.to_string(),
                        "roles": l.filter.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
                        "host_port": l.filter.host_port,
                        "max_lag_in_bytes": l.filter.max_lag_in_bytes,
                        "backends": backends,
                        "sessions": sessions,
                        "waiting": waiting,
                    }),
                );
            }
            let status = match (c.last_success, c.stale) {
                (None, _) => "no topology yet",
                (Some(_), true) => "stale",
                (Some(_), false) => "ok",
            };
            clusters.insert(
                name.clone(),
                json!({
                    "status": status,
                    "api_host": c.last_host,
                    "last_success_secs_ago": c.last_success.map(|t| now.duration_since(t).as_secs_f64()),
                    "last_error": c.last_error,
                    "tls_failures": updater::tls_failures(name),
                    "scope": c.topology.as_ref().and_then(|t| t.scope.clone()),
                    "paused": c.topology.as_ref().is_some_and(|t| t.paused),
                    "leader": c.topology.as_ref().and_then(|t| t.leader()).map(|m| m.name.clone()),
                    "members": members,
                    "ports": ports,
                }),
            );
        }
        let doc = json!({
            "clusters": clusters,
            "sessions": self.live_sessions(),
            "buffers_in_use": self.pool.in_use(),
            "buffers_free": self.pool.free(),
            "pipes_in_use": self.pool.pipes_in_use(),
            "draining": self.drain_deadline.is_some(),
        });
        let mut out = serde_json::to_vec_pretty(&doc).unwrap_or_default();
        out.push(b'\n');
        out
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for (_, c) in std::mem::take(&mut self.clusters) {
            c.updater.stop();
        }
    }
}

/// An accept error after which the next accept may well succeed: a signal,
/// or a client that gave up while queued. Anything else (EMFILE, ENFILE,
/// ENOBUFS, ENOMEM) leaves the connection in the backlog.
fn accept_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
    )
}

/// A failed connect: a warning for a session's first failure, debug for the
/// retries that repeat it while the client is held.
fn log_connect_failure(s: &Session, label: &str, target: &Target, why: &dyn std::fmt::Display) {
    let level = if s.waiting_since.is_some() {
        Level::Debug
    } else {
        Level::Warn
    };
    log!(
        level,
        "session={} port={label} member={} addr={} connect failed: {why}",
        s.id,
        target.0,
        target.1
    );
}

fn port_name(l: &Listener) -> &str {
    l.label.split_once(':').map_or(l.label.as_str(), |(_, p)| p)
}

fn describe_target(t: &Option<Target>) -> String {
    t.as_ref()
        .map_or_else(|| "-".to_string(), |(m, a)| format!("{m}@{a}"))
}

fn waker_fn(waker: &Arc<Waker>) -> updater::Wake {
    let waker = Arc::clone(waker);
    Arc::new(move || {
        if let Err(e) = waker.wake() {
            error!("waking the event loop: {e}");
        }
    })
}

fn bind(addr: SocketAddr, backlog: u32) -> Result<TcpListener> {
    let std = sockopt::bind_listener(addr, backlog).map_err(|(step, source)| Error::Bind {
        addr,
        step,
        source,
    })?;
    Ok(TcpListener::from_std(std))
}

fn open_backend(addr: SocketAddr, keepalive: Option<&config::Keepalive>) -> io::Result<TcpStream> {
    let sock = TcpStream::connect(addr)?;
    sock.set_nodelay(true)?;
    if let Some(ka) = keepalive {
        sockopt::set_keepalive(&sock, ka)?;
    }
    Ok(sock)
}

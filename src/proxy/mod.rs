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

mod admin;
mod buffer;
mod clusters;
mod control;
mod lifecycle;
mod listener;
mod ports;
mod session;
mod status;
mod sys;
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

use crate::admin::Route;
use crate::config::{self, ClusterConfig, Config, PortConfig};
use crate::error::{Error, Result};
use crate::notify;
use crate::signals::{Action, Signals};
use crate::topology::{self, Topology};
use crate::updater::{self, Update};

use admin::{AdminConn, State as AdminState};
use buffer::Pool;
use listener::{Listener, Target};
use ports::{accept_retry, bind};
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
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for (_, c) in std::mem::take(&mut self.clusters) {
            c.updater.stop();
        }
    }
}

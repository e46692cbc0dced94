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
//! Where each concern lives: `lifecycle.rs` carries out what a session's
//! transitions (`session.rs`) decide; `ports.rs` accepts and refreshes
//! ports; `clusters.rs` owns the updaters and topologies; `control.rs`
//! reloads and drains; `admin.rs` serves the admin interface; `status.rs`
//! renders read-only views of it all, and `stats.rs` holds the counters;
//! `warm.rs` keeps the pre-connected backend sockets (`preconnect`), refilled
//! at the end of a turn for the same reason as accepting (below).
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
mod health;
mod lifecycle;
mod listener;
mod ports;
mod relay;
mod scrape;
mod session;
mod startup;
mod stats;
mod status;
mod sys;
mod timer;
mod token;
mod warm;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::info;
use mio::{Events, Interest, Poll, Waker};
use slab::Slab;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::notify;
use crate::signals::Signals;

use admin::Admin;
use buffer::Pool;
use clusters::Clusters;
use health::Health;
use listener::Listener;
use ports::{bind, Accept};
use session::Session;
use stats::ProxyStats;
use timer::{Timer, Timers};
use warm::Warm;

/// Free buffers the pool keeps.
const POOL_KEEP: usize = 64;
/// How often the housekeeping runs (staleness, dead updaters).
const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// The event loop and everything it owns. Each room of `proxy/` adds the
/// methods of its concern (`impl Proxy` in lifecycle.rs, ports.rs,
/// clusters.rs, control.rs, admin.rs, status.rs) and owns its own state
/// where it can (`Clusters`, `Admin`, `Accept`).
pub struct Proxy {
    poll: Poll,
    config: Config,
    config_path: PathBuf,
    verbosity: u8,
    signals: Signals,
    admin: Admin,
    /// `health.listen` and `health.agent_listen`.
    health: Health,
    listeners: Slab<Listener>,
    accept: Accept,
    sessions: Slab<Session>,
    /// Pre-connected backend sockets of the ports with `preconnect`.
    warm: Warm,
    /// The pooled sockets the last `check_fd_limit` counted.
    warm_budgeted: usize,
    clusters: Clusters,
    reload: control::Reload,
    pool: Pool,
    timers: Timers,
    run_queue: Vec<usize>,
    closed_sessions: Vec<usize>,
    next_id: u64,
    /// The soft open-files limit (see `ports::check_fd_limit`).
    fd_limit: u64,
    stats: ProxyStats,
    /// `process_open_fds` for `/metrics`, never listed in the loop.
    open_fds: crate::metrics::OpenFds,
    drain_deadline: Option<Instant>,
    exit_now: bool,
    /// The loop's clock: read before each poll and again when it returns,
    /// and used for everything the turn does (deadlines, ages, backoffs).
    /// A turn takes microseconds, far below any timeout; one read per turn
    /// instead of one per session step (RESULTS.md §16).
    now: Instant,
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
        let admin_listener = bind(config.listen_address, config.listen_backlog)?;
        let mut admin = Admin::new(admin_listener, config.listen_address, poll.registry())
            .map_err(|e| Error::io("registering the admin listener", e))?;
        let health = Health::new(&config.health, config.listen_backlog, poll.registry())?;
        admin
            .front
            .configure(config.admin_tls_config.clone(), config.admin_allow.clone());
        if config.admin_tls_config.is_some() {
            info!(
                "admin interface on {} serves HTTPS only",
                config.listen_address
            );
        }

        let mut pool = Pool::new(config.buffer_size, POOL_KEEP);
        pool.set_splice(config.splice);
        let mut proxy = Proxy {
            poll,
            pool,
            config: config.clone(),
            config_path,
            verbosity,
            signals,
            admin,
            health,
            listeners: Slab::new(),
            accept: Accept::new(),
            sessions: Slab::new(),
            warm: Warm::default(),
            warm_budgeted: 0,
            reload: control::Reload::new(Arc::clone(&waker)),
            clusters: Clusters::new(waker),
            timers: Timers::default(),
            run_queue: Vec::new(),
            closed_sessions: Vec::new(),
            next_id: 1,
            fd_limit: u64::MAX,
            stats: ProxyStats::default(),
            open_fds: crate::metrics::OpenFds::new(),
            drain_deadline: None,
            exit_now: false,
            now: Instant::now(),
        };
        for (cluster, port) in config.ports() {
            let socket = bind(port.listen, config.listen_backlog)?;
            proxy.add_listener(socket, cluster, port)?;
        }
        for cluster in &config.clusters {
            proxy.clusters.start(&config, cluster)?;
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
            self.now = Instant::now();
            let timeout = if !self.run_queue.is_empty() || self.accept.more {
                Some(Duration::ZERO)
            } else {
                self.timers.next_timeout(self.now)
            };
            let polled = self.poll.poll(&mut events, timeout);
            self.now = Instant::now();
            if let Err(e) = polled {
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
                    Some(token::Target::AdminListener) => self.admin.front.accept_ready = true,
                    Some(token::Target::Health(key)) => self.health_event(key, Some(ev)),
                    Some(token::Target::Agent(key)) => self.agent_event(key, Some(ev)),
                    Some(token::Target::Warm(key)) => self.warm_event(key, ev),
                    Some(token::Target::HealthListener) => {
                        if let Some(f) = self.health.front.as_mut() {
                            f.accept_ready = true;
                        }
                    }
                    Some(token::Target::AgentListener) => {
                        if let Some(a) = self.health.agent.as_mut() {
                            a.accept_ready = true;
                        }
                    }
                    Some(token::Target::Waker) => woken = true,
                    Some(token::Target::Signals) => signalled = true,
                    // Sporadic events happen (mio docs); nothing to do.
                    None => {}
                }
            }
            self.run_queued();
            if woken {
                self.drain_updates();
                self.finish_reload();
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
                if self.now >= deadline {
                    info!(
                        "shutdown_timeout reached; closing {left} remaining sessions and exiting"
                    );
                    return Ok(());
                }
            }
            self.accept_clients();
            self.accept_admin();
            self.accept_health();
            self.refill_warm();
        }
    }

    fn live_sessions(&self) -> usize {
        self.sessions.len() - self.closed_sessions.len()
    }

    fn reap(&mut self) {
        let reaped = !self.closed_sessions.is_empty();
        for key in self.closed_sessions.drain(..) {
            // Dropping the session closes its sockets.
            self.sessions.try_remove(key);
        }
        if reaped {
            self.budget_pipes();
        }
        self.stats.tls_handshake_failures[0] += self.admin.front.reap(self.poll.registry());
        self.reap_health();
        self.accept
            .check_capacity(self.sessions.len(), self.config.max_connections);
    }

    // ---- timers -----------------------------------------------------------

    fn fire_timers(&mut self) {
        let now = self.now;
        for t in self.timers.expired(now) {
            match t {
                Timer::Session(key, id) => self.session_deadline(key, id, now),
                Timer::Admin(key, id) => self.admin_deadline(key, id, now),
                Timer::Health(key, id) => self.health_deadline(key, id, now),
                Timer::Agent(key, id) => self.agent_deadline(key, id, now),
                Timer::AcceptResume => self.accept.paused = false,
                Timer::AdminAcceptResume => self.admin.front.paused_until = None,
                Timer::HealthAcceptResume => {} // accept_health runs every turn
                Timer::Housekeeping => {
                    self.housekeeping(now);
                    // Ages and backoffs move on; staleness may have changed.
                    self.warm.dirty = true;
                    self.timers.add(now + HOUSEKEEPING, Timer::Housekeeping);
                }
                Timer::Drain => {} // checked after reaping
                Timer::LagGrace(lk) => self.lag_deadline(lk, now),
            }
        }
    }

    /// Drops timer entries whose owner is gone or has moved its deadline,
    /// once they outnumber the live sessions (see `timer`'s module docs).
    fn compact_timers(&mut self) {
        let live = self.sessions.len() + self.admin.front.conns.len() + self.health.conns();
        if self.timers.len() <= 2 * live + 64 {
            return;
        }
        let (sessions, admins, listeners) =
            (&self.sessions, &self.admin.front.conns, &self.listeners);
        let checks = self.health.front.as_ref().map(|f| &f.conns);
        let agents = self.health.agent.as_ref().map(|a| &a.conns);
        self.timers.retain(|at, t| match t {
            Timer::Session(key, id) => sessions
                .get(key)
                .is_some_and(|s| s.id == id && s.phase.deadline() == Some(at)),
            Timer::Admin(key, id) => admins
                .get(key)
                .is_some_and(|a| a.id == id && a.deadline == at),
            Timer::Health(key, id) => checks
                .and_then(|c| c.get(key))
                .is_some_and(|c| c.id == id && c.deadline == at),
            Timer::Agent(key, id) => agents
                .and_then(|c| c.get(key))
                .is_some_and(|c| c.id == id && c.deadline == at),
            Timer::LagGrace(lk) => listeners.get(lk).is_some_and(|l| l.lag_timer == Some(at)),
            Timer::AcceptResume
            | Timer::AdminAcceptResume
            | Timer::HealthAcceptResume
            | Timer::Housekeeping
            | Timer::Drain => true,
        });
    }
}

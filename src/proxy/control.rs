//! Control: what the signals ask for. Reload (bind everything new first,
//! then commit all of it, or keep the running configuration), drain
//! (SIGTERM: stop accepting, let sessions finish within `shutdown_timeout`),
//! refresh (SIGUSR1) and exit (SIGQUIT, or a second stop signal).
//!
//! The file is read and parsed off the loop, by a short-lived thread per
//! reload ([`Reload`]): a large or hostile file costs no session a stall.
//! The loop applies the parsed result when the thread wakes it; SIGHUPs
//! that arrive meanwhile ask for one more reload after it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use log::{error, info, warn, Level};
use mio::net::TcpListener;
use mio::Waker;

use super::ports::{bind, log_preconnect, set_accepted_options};
use super::session::Close;
use super::stats::CloseReason;
use super::timer::Timer;
use super::Proxy;
use crate::config::{self, Config};
use crate::error::Result;
use crate::notify;
use crate::signals::Action;

/// A reload under way: the thread parsing the file and what it sends back.
pub struct Reload {
    tx: Sender<Result<Config>>,
    rx: Receiver<Result<Config>>,
    waker: Arc<Waker>,
    in_flight: bool,
    /// A SIGHUP arrived while the file was being parsed.
    again: bool,
}

impl Reload {
    pub fn new(waker: Arc<Waker>) -> Reload {
        let (tx, rx) = channel();
        Reload {
            tx,
            rx,
            waker,
            in_flight: false,
            again: false,
        }
    }
}

impl Proxy {
    pub(super) fn handle_signals(&mut self) {
        // Several signals may have arrived since the last turn: a reload or a
        // refresh asked for twice is done once, after the others.
        let (mut reload, mut refresh) = (false, false);
        for action in self.signals.pending() {
            match action {
                Action::Reload => reload = true,
                Action::Refresh => refresh = true,
                Action::Drain => self.start_drain(),
                Action::Exit => {
                    info!("SIGQUIT: exiting at once");
                    self.exit_now = true;
                }
            }
        }
        if reload {
            self.reload();
        }
        if refresh {
            info!("SIGUSR1: polling every cluster now");
            for (_, c) in self.clusters.iter() {
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
        self.warm.close_all();
        let waiting: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(_, s)| !s.is_streaming())
            .map(|(k, _)| k)
            .collect();
        for k in waiting {
            let close = Close::new(CloseReason::Shutdown, "shutting down", Level::Debug);
            self.close_session(k, close);
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
        if self.reload.in_flight {
            self.reload.again = true;
            return;
        }
        info!("SIGHUP: reloading {}", self.config_path.display());
        notify::notify("RELOADING=1\nSTATUS=reloading the configuration");
        let (path, tx, waker) = (
            self.config_path.clone(),
            self.reload.tx.clone(),
            Arc::clone(&self.reload.waker),
        );
        let spawned = std::thread::Builder::new()
            .name("config-load".into())
            .spawn(move || {
                let _ = tx.send(config::load(&path));
                let _ = waker.wake();
            });
        match spawned {
            Ok(_) => self.reload.in_flight = true,
            Err(e) => {
                // No thread: parse here rather than not at all.
                warn!("cannot start the config-load thread ({e}); parsing in the loop");
                let parsed = config::load(&self.config_path);
                self.apply_reload(parsed);
            }
        }
    }

    /// Applies a parsed file when its thread has sent it (after a wake-up).
    pub(super) fn finish_reload(&mut self) {
        let Ok(parsed) = self.reload.rx.try_recv() else {
            return;
        };
        self.reload.in_flight = false;
        if self.drain_deadline.is_some() {
            return;
        }
        self.apply_reload(parsed);
        if std::mem::take(&mut self.reload.again) {
            self.reload();
        }
    }

    fn apply_reload(&mut self, parsed: Result<Config>) {
        match parsed.and_then(|new| self.try_reload(new)) {
            Ok(()) => notify::notify(&format!(
                "READY=1\nSTATUS=reloaded; serving {} ports of {} clusters",
                self.listeners.len(),
                self.clusters.len()
            )),
            Err(e) => {
                error!("reload failed; keeping the running configuration: {e}");
                let e = e.to_string();
                let first = e.lines().next().unwrap_or_default();
                notify::notify(&format!(
                    "READY=1\nSTATUS=reload failed, previous configuration kept: {first}"
                ));
            }
        }
    }

    fn try_reload(&mut self, new: Config) -> Result<()> {
        let mut fresh: HashMap<SocketAddr, TcpListener> = HashMap::new();
        let bound: HashSet<SocketAddr> = self.listeners.iter().map(|(_, l)| l.addr).collect();
        for (_, port) in new.ports() {
            if bound.contains(&port.listen) {
                continue;
            }
            fresh.insert(port.listen, bind(port.listen, new.listen_backlog)?);
        }
        let admin = if new.listen_address != self.config.listen_address {
            Some(bind(new.listen_address, new.listen_backlog)?)
        } else {
            None
        };
        let health = self.health_bind_changes(&new)?;

        // Commit.
        log::set_max_level(config::raise_level(new.log_level, self.verbosity));
        for w in new.warnings() {
            warn!("{w}");
        }
        self.pool.resize(new.buffer_size);
        self.pool.set_splice(new.splice);
        self.admin
            .front
            .configure(new.admin_tls_config.clone(), new.admin_allow.clone());
        if let Some(sock) = admin {
            self.admin
                .front
                .rebind(sock, new.listen_address, self.poll.registry());
            info!("admin interface moved to {}", new.listen_address);
        }
        self.health_apply(health, &new.health);
        self.config = new.clone();
        self.clusters.reconcile(&new);
        let by_addr: HashMap<SocketAddr, _> = new.ports().map(|cp| (cp.1.listen, cp)).collect();
        for lk in 0..self.listeners.capacity() {
            let Some(l) = self.listeners.get(lk) else {
                continue;
            };
            let addr = l.addr;
            let was = (l.preconnect, l.preconnect_max_age);
            match by_addr.get(&addr).copied() {
                None => self.remove_listener(lk, "removed by reload"),
                Some((c, p)) => {
                    if l.cluster != c.name {
                        self.close_listener_sessions(lk, "port moved to another cluster");
                    }
                    self.listeners[lk].configure(c, p);
                    if was != (p.preconnect, p.preconnect_max_age) {
                        log_preconnect(&self.listeners[lk]);
                    }
                    let ka = self.config.tcp_keepalive.as_ref();
                    set_accepted_options(&self.listeners[lk].socket, addr, ka);
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
        self.check_fd_limit();
        info!(
            "configuration reloaded: {} clusters, {} ports",
            self.clusters.len(),
            self.listeners.len()
        );
        Ok(())
    }
}

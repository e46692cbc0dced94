//! Control: what the signals ask for. Reload (bind everything new first,
//! then commit all of it, or keep the running configuration), drain
//! (SIGTERM: stop accepting, let sessions finish within `shutdown_timeout`),
//! refresh (SIGUSR1) and exit (SIGQUIT, or a second stop signal).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use log::{error, info, warn, Level};
use mio::net::TcpListener;

use super::ports::bind;
use super::session::Close;
use super::stats::CloseReason;
use super::timer::Timer;
use super::Proxy;
use crate::config;
use crate::error::Result;
use crate::notify;
use crate::signals::Action;

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
                let e = e.to_string();
                let first = e.lines().next().unwrap_or_default();
                notify::notify(&format!(
                    "READY=1\nSTATUS=reload failed, previous configuration kept: {first}"
                ));
            }
        }
    }

    fn try_reload(&mut self) -> Result<()> {
        let new = config::load(&self.config_path)?;
        let mut fresh: HashMap<SocketAddr, TcpListener> = HashMap::new();
        for (_, port) in new.ports() {
            if self.listeners.iter().any(|(_, l)| l.addr == port.listen) {
                continue;
            }
            fresh.insert(port.listen, bind(port.listen, new.listen_backlog)?);
        }
        let admin = if new.listen_address != self.config.listen_address {
            Some(bind(new.listen_address, new.listen_backlog)?)
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
        self.admin
            .front
            .configure(new.admin_tls_config.clone(), new.admin_allow.clone());
        if let Some(sock) = admin {
            self.admin
                .front
                .rebind(sock, new.listen_address, self.poll.registry());
            info!("admin interface moved to {}", new.listen_address);
        }
        self.config = new.clone();
        self.clusters.reconcile(&new);
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
        self.check_fd_limit();
        info!(
            "configuration reloaded: {} clusters, {} ports",
            self.clusters.len(),
            self.listeners.len()
        );
        Ok(())
    }
}

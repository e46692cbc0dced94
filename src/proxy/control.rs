//! Signals: reload (bind everything new first, then commit) and drain.

use super::*;

impl Proxy {
    // ---- signals, reload, drain ---------------------------------------------

    pub(super) fn handle_signals(&mut self) {
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

    pub(super) fn start_drain(&mut self) {
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
    pub(super) fn reload(&mut self) {
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

    pub(super) fn try_reload(&mut self) -> std::result::Result<(), String> {
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
            let (hosts, interval, api_timeout) = new.updater_settings(cluster);
            let wanted = updater::Settings {
                hosts,
                interval,
                api_timeout,
            };
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
}

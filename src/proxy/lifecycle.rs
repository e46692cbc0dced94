//! The loop's side of a session's life: route it to a backend, connect,
//! hold and retry, close. The session's own bytes move in `session`; the
//! registry, timers and listener counters are touched here.

use super::*;

impl Proxy {
    // ---- sessions ---------------------------------------------------------

    pub(super) fn session_event(&mut self, key: usize, side: Side, ev: &Event) {
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
                    if let (Some(l), Some(t)) = (self.listeners.get_mut(s.listener), &s.target) {
                        if let Some(m) = l.backends.member_stats(t) {
                            m.connects += 1;
                        }
                    }
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

    pub(super) fn pump(&mut self, key: usize) {
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        if s.phase == Phase::Closed {
            return;
        }
        let pumped = s.pump(&mut self.pool, PUMP_BUDGET);
        // Bytes count for the member the session is on (what the client
        // sent while waiting counts for the first one).
        if let (Some(l), Some(t)) = (self.listeners.get_mut(s.listener), &s.target) {
            if let Some(m) = l.backends.member_stats(t) {
                m.bytes_up += s.bytes_up - s.counted.0;
                m.bytes_down += s.bytes_down - s.counted.1;
                s.counted = (s.bytes_up, s.bytes_down);
            }
        }
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
                        CloseReason::ClientLeft,
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
            Pumped::HalfClosed(by) => {
                s.fin_by.get_or_insert(by);
                if s.deadline.is_none() {
                    let at = Instant::now() + FIN_TIMEOUT;
                    s.deadline = Some(at);
                    self.timers.add(at, Timer::Session(key, s.id));
                }
            }
            Pumped::Finished => {
                let reason = match s.fin_by {
                    Some(Side::Backend) => CloseReason::Server,
                    _ => CloseReason::Client,
                };
                self.close_session(key, reason, "finished", Level::Debug)
            }
            Pumped::Refused(why) => self.retry_refused(key, &why, STARTUP_RETRY, None),
            // The backend failed while the start-up was still held back:
            // the client has seen nothing of it, so try another connect.
            Pumped::Failed(Side::Backend, e) if s.startup.is_some() => {
                let why = format!("backend error during the start-up: {e}");
                self.retry_refused(key, &why, STARTUP_RETRY, None);
            }
            Pumped::Failed(side, e) => {
                let level = sys::close_level(&e);
                let (reason, side) = if side == Side::Client {
                    (CloseReason::ClientError, "client")
                } else {
                    (CloseReason::ServerError, "backend")
                };
                self.close_session(key, reason, &format!("{side} error: {e}"), level);
            }
        }
    }

    pub(super) fn run_queued(&mut self) {
        let queue = std::mem::take(&mut self.run_queue);
        for key in queue {
            if let Some(s) = self.sessions.get_mut(key) {
                s.queued = false;
                self.pump(key);
            }
        }
    }

    /// Closes the clients waiting on a cluster whose topology went stale.
    pub(super) fn close_waiting_of(&mut self, cluster: &str) {
        let waiting: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.phase == Phase::Waiting)
            .filter(|(_, s)| {
                self.listeners
                    .get(s.listener)
                    .is_some_and(|l| l.cluster == cluster)
            })
            .map(|(k, _)| k)
            .collect();
        for key in waiting {
            self.close_session(key, CloseReason::Stale, "topology stale", Level::Info);
        }
    }

    pub(super) fn close_session(
        &mut self,
        key: usize,
        reason: CloseReason,
        detail: &str,
        level: Level,
    ) {
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        if s.phase == Phase::Closed {
            return;
        }
        let l = self.listeners.get_mut(s.listener);
        let label = l.as_ref().map_or("?", |l| l.label.as_str());
        log!(
            level,
            "session={} port={} client={} backend={} closed reason={:?} bytes_up={} bytes_down={}",
            s.id,
            label,
            s.client_addr,
            describe_target(&s.target),
            detail,
            s.bytes_up,
            s.bytes_down
        );
        if let Some(l) = l {
            if s.phase == Phase::Streaming && !s.retry_pending {
                l.stats.closed.add(reason);
            } else {
                l.stats.refused.add(reason);
            }
            if let Some(t) = s.target.take() {
                l.backends.release(&t);
            }
        }
        s.close(self.poll.registry(), &mut self.pool);
        self.closed_sessions.push(key);
    }

    /// Sends a session to a backend, or makes it wait for one, or refuses it.
    pub(super) fn route(&mut self, key: usize) {
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
            return self.close_session(key, CloseReason::PortClosed, "port removed", Level::Debug);
        };
        if clusters.is_stale(&l.cluster) {
            let label = l.label.clone();
            return self.close_session(
                key,
                CloseReason::Stale,
                &format!(
                    "topology of {label} is stale (Patroni API unreachable beyond topology_ttl)"
                ),
                Level::Info,
            );
        }
        while let Some(target) = l.backends.pick(&s.tried) {
            match open_backend(target.addr, keepalive.as_ref()) {
                Ok(sock) => {
                    let mut ep = Endpoint::new(sock);
                    let tok = token::session(key, Side::Backend);
                    if let Err(e) = poll.registry().register(
                        &mut ep.sock,
                        tok,
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        l.backends.release(&target);
                        warn!("session={} registering backend socket: {e}", s.id);
                        s.tried.push(target.addr);
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
                            if let Some(m) =
                                s.target.as_ref().and_then(|t| l.backends.member_stats(t))
                            {
                                m.connects += 1;
                            }
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
                    if let Some(m) = l.backends.member_stats(&target) {
                        m.connect_failures += 1;
                    }
                    l.backends.release(&target);
                    s.tried.push(target.addr);
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
                    CloseReason::ConnectFailed,
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
            return self.close_session(
                key,
                CloseReason::NoMember,
                "no routable member",
                Level::Info,
            );
        }
        let at = *s.waiting_since.get_or_insert(now) + l.wait;
        if at <= now {
            return self.close_session(
                key,
                CloseReason::NoMember,
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
    pub(super) fn retry_refused(
        &mut self,
        key: usize,
        why: &str,
        delay: Duration,
        evicted: Option<CloseReason>,
    ) {
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
            if let Some(reason) = evicted {
                return self.close_session(key, reason, why, Level::Debug);
            }
            // No retry: the client gets the refusal as the server sent it.
            info!("session={} port={label} backend={member} refused the start-up ({why}); relaying it", s.id);
            s.relay_startup(&mut self.pool);
            return self.pump(key);
        }
        if let (Some(t), Some(l)) = (s.target.take(), self.listeners.get_mut(s.listener)) {
            l.backends.release(&t);
        }
        self.stats.startup_retries += 1;
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
    pub(super) fn connect_failed(&mut self, key: usize, why: &str) {
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
            s.tried.push(t.addr);
            if let Some(l) = l {
                if let Some(m) = l.backends.member_stats(&t) {
                    m.connect_failures += 1;
                }
                l.backends.release(&t);
            }
        }
        s.phase = Phase::Waiting;
        s.deadline = None;
        self.route(key);
    }

    pub(super) fn session_deadline(&mut self, key: usize, id: u64, now: Instant) {
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
                CloseReason::NoMember,
                "no routable member within backend_wait_timeout",
                Level::Info,
            ),
            Phase::Connecting => self.connect_failed(key, "connect timeout"),
            Phase::Streaming => self.close_session(
                key,
                CloseReason::FinTimeout,
                "half-closed for too long",
                Level::Debug,
            ),
            Phase::Closed => {}
        }
    }
}

/// A failed connect: a warning for a session's first failure, debug for the
/// retries that repeat it while the client is held.
pub(super) fn log_connect_failure(
    s: &Session,
    label: &str,
    target: &Target,
    why: &dyn std::fmt::Display,
) {
    let level = if s.waiting_since.is_some() {
        Level::Debug
    } else {
        Level::Warn
    };
    log!(
        level,
        "session={} port={label} member={} addr={} connect failed: {why}",
        s.id,
        target.member,
        target.addr
    );
}

pub(super) fn describe_target(t: &Option<Target>) -> String {
    t.as_ref()
        .map_or_else(|| "-".to_string(), |t| t.to_string())
}

pub(super) fn open_backend(
    addr: SocketAddr,
    keepalive: Option<&config::Keepalive>,
) -> io::Result<TcpStream> {
    let sock = TcpStream::connect(addr)?;
    sock.set_nodelay(true)?;
    if let Some(ka) = keepalive {
        sys::set_keepalive(&sock, ka)?;
    }
    Ok(sock)
}

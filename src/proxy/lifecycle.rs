//! The loop's side of a session's life: carry out the [`Verdict`]s of the
//! session's transitions. Route it to a backend, connect, hold and retry,
//! close. The decisions are the session's (`session.rs`); what happens here
//! is what only the loop can do: open and register sockets, arm timers, keep
//! the ports' least-connections and statistics counters, and log.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{info, warn, Level};
use mio::event::Event;
use mio::net::TcpStream;
use mio::Interest;

use super::listener::Target;
use super::relay::Endpoint;
use super::session::{Close, Connect, Session, Verdict};
use super::stats::CloseReason;
use super::timer::Timer;
use super::token::{self, Side};
use super::{sys, Proxy};
use crate::config;
use crate::logging::{debug, log, trace};

/// Bytes moved per direction per pump before other sessions get a turn.
const PUMP_BUDGET: usize = 256 * 1024;
/// How long a client waits before its refused start-up is retried.
const STARTUP_RETRY: Duration = Duration::from_millis(250);
/// How long a client waits before connecting again when every routable
/// member failed to connect.
const CONNECT_RETRY: Duration = Duration::from_millis(250);

impl Proxy {
    /// A readiness event on one of the session's sockets.
    pub(super) fn session_event(&mut self, key: usize, side: Side, ev: &Event) {
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        if s.is_closed() {
            return; // stale event for a session closed earlier in this batch
        }
        s.mark(side, ev);
        if side == Side::Backend && s.is_connecting() {
            match s.check_connect() {
                Connect::Pending => return,
                Connect::Failed(e) => return self.next_member(key, &e.to_string()),
                Connect::Done => self.connected(key, false),
            }
        }
        self.pump(key);
    }

    /// Moves the session's bytes and carries out what that means.
    pub(super) fn pump(&mut self, key: usize) {
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        if s.is_closed() {
            return;
        }
        let pumped = s.pump(&mut self.pool, PUMP_BUDGET);
        trace!(
            "session={} phase={:?} pumped={pumped:?} client=(r{} w{} eof{} shut{}) backend={:?}",
            s.id,
            s.phase,
            s.pair.client.readable,
            s.pair.client.writable,
            s.pair.client.read_eof,
            s.pair.client.write_shut,
            s.pair
                .backend
                .as_ref()
                .map(|b| (b.readable, b.writable, b.read_eof, b.write_shut))
        );
        // Bytes count for the member the session is on (what the client
        // sent while waiting counts for the first one).
        if let (Some(l), Some(t)) = (self.listeners.get_mut(s.listener), &s.target) {
            if let Some(m) = l.backends.member_stats(t) {
                m.bytes_up += s.pair.bytes_up - s.counted.0;
                m.bytes_down += s.pair.bytes_down - s.counted.1;
                s.counted = (s.pair.bytes_up, s.pair.bytes_down);
            }
        }
        let v = s.on_pumped(pumped, self.now);
        self.apply(key, v);
    }

    /// Carries out what a transition of session `key` asks for.
    pub(super) fn apply(&mut self, key: usize, v: Verdict) {
        match v {
            Verdict::Nothing => {}
            Verdict::Arm(at) => self.arm(key, at),
            Verdict::Queue => {
                if let Some(s) = self.sessions.get_mut(key) {
                    if !s.queued {
                        s.queued = true;
                        self.run_queue.push(key);
                    }
                }
            }
            Verdict::Route => self.route(key),
            Verdict::NextMember(why) => self.next_member(key, &why),
            Verdict::Retry(why) => self.retry_startup(key, &why),
            Verdict::Replay(close) => self.replay_evicted(key, close),
            Verdict::Reroute => self.reroute(key),
            Verdict::Close(close) => self.close_session(key, close),
        }
    }

    /// Arms the timer of session `key` for its deadline `at`.
    fn arm(&mut self, key: usize, at: Instant) {
        if let Some(s) = self.sessions.get(key) {
            self.timers.add(at, Timer::Session(key, s.id));
        }
    }

    /// A timer of session `key` (instance `id`) fired.
    pub(super) fn session_deadline(&mut self, key: usize, id: u64, now: Instant) {
        let Some(s) = self.sessions.get_mut(key).filter(|s| s.id == id) else {
            return; // a session that took a reused key: not its timer
        };
        let v = s.on_deadline(now);
        self.apply(key, v);
    }

    /// Runs the sessions that hit their byte budget in the last turn.
    pub(super) fn run_queued(&mut self) {
        let queue = std::mem::take(&mut self.run_queue);
        for key in queue {
            if let Some(s) = self.sessions.get_mut(key) {
                s.queued = false;
                self.pump(key);
            }
        }
    }

    /// Sends a session to a backend, or makes it wait for one, or refuses it.
    pub(super) fn route(&mut self, key: usize) {
        let now = self.now;
        let connect_timeout = self.config.connect_timeout;
        let keepalive = self.config.tcp_keepalive;
        let user_timeout = self.config.tcp_user_timeout;
        let Proxy {
            sessions,
            listeners,
            clusters,
            poll,
            warm,
            ..
        } = self;
        let Some(s) = sessions.get_mut(key) else {
            return;
        };
        let Some(l) = listeners.get_mut(s.listener) else {
            let close = Close::new(CloseReason::PortClosed, "port removed", Level::Debug);
            return self.close_session(key, close);
        };
        if clusters.is_stale(&l.cluster) {
            let detail = format!(
                "topology of {} is stale (Patroni API unreachable beyond topology_ttl)",
                l.label
            );
            let close = Close::new(CloseReason::Stale, detail, Level::Info);
            return self.close_session(key, close);
        }
        while let Some(target) = l.backends.pick(&s.tried) {
            // A pre-connected socket, when the port keeps them: the
            // server's fork is done already.
            let pooled = (l.preconnect > 0 && !s.pool_failed)
                .then(|| warm.take(s.listener, target.addr, l.preconnect_max_age, now))
                .flatten();
            if l.preconnect > 0 {
                match pooled {
                    Some(_) => l.stats.preconnect_hits += 1,
                    None => l.stats.preconnect_misses += 1,
                }
            }
            s.pooled = pooled.is_some();
            let opened = match pooled {
                Some(sock) => Ok(sock),
                None => open_backend(target.addr, keepalive.as_ref(), user_timeout),
            };
            match opened {
                Ok(sock) => {
                    let mut ep = Endpoint::new(sock);
                    let tok = token::session(key, Side::Backend);
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    let registered = if s.pooled {
                        poll.registry().reregister(&mut ep.sock, tok, interest)
                    } else {
                        poll.registry().register(&mut ep.sock, tok, interest)
                    };
                    if let Err(e) = registered {
                        l.backends.release(&target);
                        warn!("session={} registering backend socket: {e}", s.id);
                        s.tried.push(target.addr);
                        continue;
                    }
                    s.pair.backend = Some(ep);
                    let armed = s.connecting(target, now + connect_timeout);
                    // On loopback and fast networks the handshake is often
                    // over (or refused) by now: check at once instead of
                    // waiting a loop turn for the event, so the client's
                    // buffered startup packet leaves without delay.
                    return match s.check_connect() {
                        Connect::Done => {
                            self.connected(key, true);
                            self.pump(key)
                        }
                        Connect::Failed(e) => self.next_member(key, &e.to_string()),
                        Connect::Pending => self.apply(key, armed),
                    };
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
        let (lk, cap) = (
            s.listener,
            l.max_waiting.filter(|_| s.waited_since.is_none()),
        );
        if let Some(max) = cap {
            // A client that would start waiting: is there room?
            let held = sessions
                .iter()
                .filter(|(k, o)| *k != key && o.listener == lk && o.is_held())
                .count();
            if held >= max {
                let detail = format!("{held} clients already held on {} (max_waiting)", l.label);
                let close = Close::new(CloseReason::TooManyWaiting, detail, Level::Info);
                return self.close_session(key, close);
            }
        }
        let Some(s) = sessions.get_mut(key) else {
            return;
        };
        let v = if s.tried.is_empty() {
            let v = s.wait_for_member(now, l.wait);
            if !matches!(v, Verdict::Close(_)) {
                debug!(
                    "session={} port={} waiting for a routable member",
                    s.id, l.label
                );
            }
            v
        } else {
            let v = s.hold(now, CONNECT_RETRY, l.wait);
            if matches!(v, Verdict::Arm(_)) {
                debug!(
                    "session={} port={} every routable member failed; retrying in {} ms",
                    s.id,
                    l.label,
                    CONNECT_RETRY.as_millis()
                );
            }
            v
        };
        self.apply(key, v);
    }

    /// The connect of session `key` is done (`at_once`: found done right
    /// after `connect`).
    fn connected(&mut self, key: usize, at_once: bool) {
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        if let (Some(l), Some(t)) = (self.listeners.get_mut(s.listener), &s.target) {
            if let Some(m) = l.backends.member_stats(t) {
                m.connects += 1;
            }
            // A held client's wait ends with its first backend.
            if let Some(since) = s.waited_since {
                if s.pair.bytes_up + s.pair.bytes_down == 0 {
                    l.stats.held_wait.observe(since.elapsed().as_secs_f64());
                }
            }
        }
        let v = s.connected(at_once);
        debug!(
            "session={} backend={} connected",
            s.id,
            describe_target(&s.target)
        );
        self.apply(key, v);
    }

    /// The connect to the session's backend failed: try the next member.
    fn next_member(&mut self, key: usize, why: &str) {
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        s.pair.drop_backend(self.poll.registry());
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
        self.route(key);
    }

    /// Its member stopped being routable while the session connected: drop
    /// the connect and route again. Its backend is gone from the port's
    /// list; the release lets its member's counters go.
    fn reroute(&mut self, key: usize) {
        if let Some(s) = self.sessions.get_mut(key) {
            s.pair.drop_backend(self.poll.registry());
            if let (Some(t), Some(l)) = (s.target.take(), self.listeners.get_mut(s.listener)) {
                l.backends.release(&t);
            }
            self.route(key);
        }
    }

    /// The backend refused the connection start-up with SQLSTATE 57P0x: a
    /// demoted leader shutting down, or a member starting up. Hold the client
    /// for a moment (within `backend_wait_timeout`), then route it again and
    /// replay its start-up; by then the topology usually names the new
    /// leader. The client sees nothing of the refused attempt. When no retry
    /// is possible, the client gets the refusal as the server sent it.
    ///
    /// A pre-connected socket that fails before any answer is the pool's
    /// fault, not the server's: the start-up is replayed at once, on a fresh
    /// connect.
    fn retry_startup(&mut self, key: usize, why: &str) {
        let mut delay = STARTUP_RETRY;
        if let Some(s) = self.sessions.get_mut(key).filter(|s| s.pooled) {
            s.pool_failed = true;
            delay = Duration::ZERO;
        }
        if !self.hold_for_replay(key, why, delay) {
            let Some(s) = self.sessions.get_mut(key) else {
                return;
            };
            let label = self.listeners.get(s.listener).map_or("?", |l| &l.label);
            info!(
                "session={} port={label} backend={} refused the start-up ({why}); relaying it",
                s.id,
                describe_target(&s.target)
            );
            s.upgrade(&mut self.pool);
            self.pump(key);
        }
    }

    /// Its member stopped being routable during the start-up: replay the
    /// start-up elsewhere at once, or close the session.
    fn replay_evicted(&mut self, key: usize, close: Close) {
        if !self.hold_for_replay(key, &close.detail, Duration::ZERO) {
            self.close_session(key, close);
        }
    }

    /// Holds session `key` for `delay` and queues its start-up for a replay
    /// on the next backend. False when it may not or cannot be replayed.
    fn hold_for_replay(&mut self, key: usize, why: &str, delay: Duration) -> bool {
        let now = self.now;
        let Some(s) = self.sessions.get_mut(key) else {
            return true;
        };
        let l = self.listeners.get_mut(s.listener);
        let wait = l.as_ref().map_or(Duration::ZERO, |l| l.wait);
        let member = describe_target(&s.target);
        let at = now + delay;
        if !s.may_retry(now, delay, wait)
            || !s.replay(now, at, self.poll.registry(), &mut self.pool)
        {
            return false;
        }
        let label = l.as_ref().map_or("?".to_string(), |l| l.label.clone());
        if let (Some(t), Some(l)) = (s.target.take(), l) {
            l.backends.release(&t);
        }
        info!(
            "session={} port={label} backend={member} refused the start-up ({why}); retrying in {} ms",
            s.id,
            delay.as_millis()
        );
        self.stats.startup_retries += 1;
        self.arm(key, at);
        true
    }

    /// Closes the clients waiting on a cluster whose topology went stale.
    pub(super) fn close_waiting_of(&mut self, cluster: &str) {
        let waiting: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.is_held())
            .filter(|(_, s)| {
                self.listeners
                    .get(s.listener)
                    .is_some_and(|l| l.cluster == cluster)
            })
            .map(|(k, _)| k)
            .collect();
        for key in waiting {
            let close = Close::new(CloseReason::Stale, "topology stale", Level::Info);
            self.close_session(key, close);
        }
    }

    /// Closes session `key`: one log line, the counters, its sockets and
    /// buffers. The slab entry goes at the reap step.
    pub(super) fn close_session(&mut self, key: usize, close: Close) {
        let Some(s) = self.sessions.get_mut(key) else {
            return;
        };
        if s.is_closed() {
            return;
        }
        let l = self.listeners.get_mut(s.listener);
        log!(
            close.level,
            "session={} port={} client={} backend={} closed reason={:?} bytes_up={} bytes_down={}",
            s.id,
            l.as_ref().map_or("?", |l| l.label.as_str()),
            s.client_addr,
            describe_target(&s.target),
            close.detail,
            s.pair.bytes_up,
            s.pair.bytes_down
        );
        if let Some(l) = l {
            if s.is_streaming() {
                l.stats.closed.add(close.reason);
                if let Some(m) = s.target.as_ref().and_then(|t| l.backends.member_stats(t)) {
                    m.closed.add(close.reason);
                }
            } else {
                l.stats.refused.add(close.reason);
            }
            if let Some(t) = s.target.take() {
                l.backends.release(&t);
            }
        }
        s.close(&mut self.pool);
        self.closed_sessions.push(key);
    }
}

/// A failed connect: a warning for a session's first failure, debug for the
/// retries that repeat it while the client is held.
fn log_connect_failure(s: &Session, label: &str, target: &Target, why: &dyn std::fmt::Display) {
    let level = if s.waited_since.is_some() {
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

fn describe_target(t: &Option<Target>) -> String {
    t.as_ref()
        .map_or_else(|| "-".to_string(), |t| t.to_string())
}

/// A non-blocking connect to a backend with the sockets options every
/// backend socket gets (sessions' and pre-connected ones).
pub(super) fn open_backend(
    addr: SocketAddr,
    keepalive: Option<&config::Keepalive>,
    user_timeout: Option<Duration>,
) -> io::Result<TcpStream> {
    let sock = TcpStream::connect(addr)?;
    sock.set_nodelay(true)?;
    if let Some(ka) = keepalive {
        sys::set_keepalive(&sock, ka)?;
    }
    if let Some(t) = user_timeout {
        sys::set_user_timeout(&sock, t)?;
    }
    Ok(sock)
}

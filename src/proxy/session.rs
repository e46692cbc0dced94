//! A session: one client, the backend chosen for it, and the state machine
//! of its life. The session owns its transitions; each returns a
//! [`Verdict`], what the loop must do next (arm a timer, route, close...),
//! and the loop (`lifecycle.rs`) only carries that out, because only the
//! loop holds the registry, the timers and the ports' counters.
//!
//! ```text
//!            accept
//!              |
//!              v          no routable member          until passes
//!           (route) ------------------------> Waiting ------------> Closed
//!              |  ^                              | member appears
//!              |  +------------------------------+
//!              |  +--------- retry_at ---------- Held <--+ every member failed,
//!              |  |                               ^      | or start-up refused
//!              v  |                               |      |
//!          Connecting --- timeout/failure: next member --+
//!              | connected
//!              v
//!          Streaming { fin } -- both shut, error, fin timeout, eviction --> Closed
//! ```
//!
//! Every phase carries its own deadline (at most one), so a timer that
//! fires checks [`Phase::deadline`] and is ignored when the session has
//! moved on (lazy cancellation, see `timer.rs`).
//!
//! Orthogonal to the phase is the [`Stage`]: a PostgreSQL start-up under
//! examination (`startup.rs`), until it completes or turns out not to be
//! PostgreSQL, and then a plain byte relay (`relay.rs`).

use std::borrow::Cow;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::Level;
use mio::event::Event;
use mio::net::TcpStream;
use mio::Registry;

use super::buffer::Pool;
use super::listener::Target;
use super::relay::{Failed, Flow, Pair};
use super::startup::{Examined, Startup};
use super::stats::CloseReason;
use super::sys;
use super::token::Side;

/// How long a half-closed session may wait for the other direction.
pub const FIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a session is in its life; each phase carries its own deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No routable member yet; the client's bytes wait in `to_backend`.
    /// Closed at `until` (the end of `backend_wait_timeout`).
    Waiting {
        until: Instant,
    },
    /// Every routable member failed to connect, or the backend refused the
    /// start-up: route again at `retry_at`.
    Held {
        retry_at: Instant,
    },
    /// Non-blocking connect in flight; the next member at `deadline`.
    Connecting {
        deadline: Instant,
    },
    /// Relaying. `fin`: one direction is shut, and since when the other
    /// has until the fin timeout.
    Streaming {
        fin: Option<Fin>,
    },
    Closed,
}

/// A half-close: who ended their direction first, and the deadline for
/// the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fin {
    pub by: Side,
    pub deadline: Instant,
}

impl Phase {
    /// The phase's deadline, if it has one.
    pub fn deadline(&self) -> Option<Instant> {
        match *self {
            Phase::Waiting { until } => Some(until),
            Phase::Held { retry_at } => Some(retry_at),
            Phase::Connecting { deadline } => Some(deadline),
            Phase::Streaming { fin } => fin.map(|f| f.deadline),
            Phase::Closed => None,
        }
    }
}

/// What the session's bytes are: a start-up under examination, or a relay.
pub enum Stage {
    Startup(Box<Startup>),
    Relay,
}

/// Why a session closes, for the log line and the counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub reason: CloseReason,
    pub detail: Cow<'static, str>,
    pub level: Level,
}

impl Close {
    pub fn new(reason: CloseReason, detail: impl Into<Cow<'static, str>>, level: Level) -> Close {
        Close {
            reason,
            detail: detail.into(),
            level,
        }
    }
}

/// What the loop must do after a transition.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing until the next event.
    Nothing,
    /// Arm a timer for the session at this instant.
    Arm(Instant),
    /// Pump again soon: the byte budget ran out with work left.
    Queue,
    /// Pick a backend and connect now.
    Route,
    /// The connect failed or timed out: count it, try the next member.
    NextMember(String),
    /// The backend refused the start-up (or failed during it): hold the
    /// client and replay its start-up elsewhere, or relay the refusal.
    Retry(String),
    /// Its member stopped being routable while its start-up was examined:
    /// replay elsewhere, or close for this reason.
    Replay(Close),
    /// Its member stopped being routable while connecting: route again.
    Reroute,
    Close(Close),
}

/// Result of a connect check.
pub enum Connect {
    Pending,
    Done,
    Failed(io::Error),
}

/// Result of pumping bytes.
#[derive(Debug)]
pub enum Pumped {
    Flow(Flow),
    /// A socket failed.
    Failed(Failed),
    /// The backend refused the connection start-up because it is going away
    /// or not there yet (SQLSTATE 57P01-57P03), or closed without answering.
    Refused(String),
}

pub struct Session {
    /// Never reused; for logs and timer checks.
    pub id: u64,
    pub listener: usize,
    pub client_addr: SocketAddr,
    /// Both sockets and the bytes in flight.
    pub pair: Pair,
    pub target: Option<Target>,
    pub phase: Phase,
    pub stage: Stage,
    /// When the client first had to wait for a backend: the
    /// `backend_wait_timeout` budget counts from here, over every wait and
    /// retry of the session.
    pub waited_since: Option<Instant>,
    /// Addresses whose connect failed for this session.
    pub tried: Vec<SocketAddr>,
    /// `(bytes_up, bytes_down)` already added to the member's counters.
    pub counted: (u64, u64),
    /// On the run queue already.
    pub queued: bool,
    /// The backend socket came from the pre-connected pool.
    pub pooled: bool,
    /// A pooled socket failed this session: connect fresh from now on.
    pub pool_failed: bool,
}

impl Session {
    /// A new client; it starts waiting (forever, until routed).
    pub fn new(
        id: u64,
        listener: usize,
        client: TcpStream,
        client_addr: SocketAddr,
        examine_startup: bool,
        now: Instant,
    ) -> Session {
        Session {
            id,
            listener,
            client_addr,
            pair: Pair::new(client),
            target: None,
            phase: Phase::Waiting { until: now },
            stage: if examine_startup {
                Stage::Startup(Box::default())
            } else {
                Stage::Relay
            },
            waited_since: None,
            tried: Vec::new(),
            counted: (0, 0),
            queued: false,
            pooled: false,
            pool_failed: false,
        }
    }

    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Waiting for a routable member, or for a retry.
    pub fn is_held(&self) -> bool {
        matches!(self.phase, Phase::Waiting { .. } | Phase::Held { .. })
    }

    pub fn is_streaming(&self) -> bool {
        matches!(self.phase, Phase::Streaming { .. })
    }

    pub fn is_connecting(&self) -> bool {
        matches!(self.phase, Phase::Connecting { .. })
    }

    pub fn mark(&mut self, side: Side, ev: &Event) {
        self.pair.mark(side, ev);
    }

    // ---- transitions --------------------------------------------------

    /// No routable member: wait for one until `backend_wait_timeout`
    /// (`wait`) has passed since the client first waited.
    pub fn wait_for_member(&mut self, now: Instant, wait: Duration) -> Verdict {
        if wait.is_zero() {
            return Verdict::Close(Close::new(
                CloseReason::NoMember,
                "no routable member",
                Level::Info,
            ));
        }
        let until = *self.waited_since.get_or_insert(now) + wait;
        if until <= now {
            return Verdict::Close(Close::new(
                CloseReason::NoMember,
                "no routable member within backend_wait_timeout",
                Level::Info,
            ));
        }
        let before = self.phase;
        self.phase = Phase::Waiting { until };
        if before == self.phase {
            Verdict::Nothing // already armed
        } else {
            Verdict::Arm(until)
        }
    }

    /// Every routable member refused or timed out. During a failover the
    /// old leader's port refuses before Patroni shows the new leader, so
    /// hold the client and try again after `delay`, within
    /// `backend_wait_timeout` (PgBouncer's `server_login_retry`).
    pub fn hold(&mut self, now: Instant, delay: Duration, wait: Duration) -> Verdict {
        let since = *self.waited_since.get_or_insert(now);
        let retry_at = now + delay;
        if retry_at > since + wait {
            return Verdict::Close(Close::new(
                CloseReason::ConnectFailed,
                "every routable member failed to connect",
                Level::Info,
            ));
        }
        self.tried.clear();
        self.phase = Phase::Held { retry_at };
        Verdict::Arm(retry_at)
    }

    /// A connect to `target` is under way on `backend`'s socket.
    pub fn connecting(&mut self, target: Target, deadline: Instant) -> Verdict {
        // The last target was released first (it holds its member's counters).
        debug_assert!(self.target.is_none(), "a target replaced unreleased");
        self.target = Some(target);
        self.phase = Phase::Connecting { deadline };
        Verdict::Arm(deadline)
    }

    /// The connect finished. `at_once`: found done right after `connect`,
    /// before any event: the socket is writable already, so the client's
    /// buffered start-up leaves in this turn.
    pub fn connected(&mut self, at_once: bool) -> Verdict {
        self.phase = Phase::Streaming { fin: None };
        if at_once {
            if let Some(b) = self.pair.backend.as_mut() {
                b.writable = true;
            }
        }
        Verdict::Nothing
    }

    /// Whether a refused start-up may be retried after `delay`: within
    /// `backend_wait_timeout`, and with a start-up that can be replayed.
    pub fn may_retry(&self, now: Instant, delay: Duration, wait: Duration) -> bool {
        now + delay <= self.waited_since.unwrap_or(now) + wait
            && matches!(self.stage, Stage::Startup(_))
    }

    /// The backend refused the start-up: drop it, queue the client's
    /// start-up again and hold the client until `retry_at`. False when the
    /// start-up cannot be replayed (nothing changed then).
    pub fn replay(
        &mut self,
        now: Instant,
        retry_at: Instant,
        registry: &Registry,
        pool: &mut Pool,
    ) -> bool {
        let Stage::Startup(st) = &mut self.stage else {
            return false;
        };
        if !st.prepare_replay(self.id, &mut self.pair.to_backend, pool) {
            return false;
        }
        self.pair.drop_backend(registry);
        self.waited_since.get_or_insert(now);
        self.phase = Phase::Held { retry_at };
        true
    }

    /// Stops examining the start-up: the relay takes over, and what the
    /// server said so far goes to the client first.
    pub fn upgrade(&mut self, pool: &mut Pool) {
        if let Stage::Startup(st) = std::mem::replace(&mut self.stage, Stage::Relay) {
            st.disengage(&mut self.pair.to_client, pool);
        }
    }

    /// A timer of this session fired at `now`.
    pub fn on_deadline(&mut self, now: Instant) -> Verdict {
        if self.phase.deadline().is_none_or(|d| d > now) {
            return Verdict::Nothing; // moved on: lazy timer cancellation
        }
        match self.phase {
            Phase::Waiting { .. } => Verdict::Close(Close::new(
                CloseReason::NoMember,
                "no routable member within backend_wait_timeout",
                Level::Info,
            )),
            // The pause after a failure or refusal is over: route again.
            Phase::Held { .. } => Verdict::Route,
            Phase::Connecting { .. } => Verdict::NextMember("connect timeout".into()),
            Phase::Streaming { .. } => Verdict::Close(Close::new(
                CloseReason::FinTimeout,
                "half-closed for too long",
                Level::Debug,
            )),
            Phase::Closed => Verdict::Nothing,
        }
    }

    /// What a pump's result means for the session's life.
    pub fn on_pumped(&mut self, pumped: Pumped, now: Instant) -> Verdict {
        match pumped {
            Pumped::Flow(Flow::Idle) => {
                if self.is_held() && self.pair.client.read_eof && self.pair.to_backend.is_empty() {
                    return Verdict::Close(Close::new(
                        CloseReason::ClientLeft,
                        "client left while waiting for a backend",
                        Level::Debug,
                    ));
                }
                Verdict::Nothing
            }
            Pumped::Flow(Flow::Budget) => Verdict::Queue,
            Pumped::Flow(Flow::HalfClosed(by)) => match self.phase {
                Phase::Streaming { fin: None } => {
                    let deadline = now + FIN_TIMEOUT;
                    self.phase = Phase::Streaming {
                        fin: Some(Fin { by, deadline }),
                    };
                    Verdict::Arm(deadline)
                }
                _ => Verdict::Nothing,
            },
            Pumped::Flow(Flow::Finished) => {
                let reason = match self.phase {
                    Phase::Streaming {
                        fin:
                            Some(Fin {
                                by: Side::Backend, ..
                            }),
                    } => CloseReason::Server,
                    _ => CloseReason::Client,
                };
                Verdict::Close(Close::new(reason, "finished", Level::Debug))
            }
            Pumped::Refused(why) => Verdict::Retry(why),
            // The backend failed while the start-up was still held back:
            // the client has seen nothing of it, so try another connect.
            Pumped::Failed(Failed {
                side: Side::Backend,
                error,
            }) if matches!(self.stage, Stage::Startup(_)) => {
                Verdict::Retry(format!("backend error during the start-up: {error}"))
            }
            Pumped::Failed(Failed { side, error }) => {
                let (reason, name) = match side {
                    Side::Client => (CloseReason::ClientError, "client"),
                    Side::Backend => (CloseReason::ServerError, "backend"),
                };
                Verdict::Close(Close::new(
                    reason,
                    format!("{name} error: {error}"),
                    sys::close_level(&error),
                ))
            }
        }
    }

    /// Its member stopped being routable on the session's port (`close`:
    /// why, for a session that cannot go elsewhere).
    pub fn on_evicted(&self, close: Close) -> Verdict {
        match (self.phase, &self.stage) {
            (Phase::Connecting { .. }, _) => Verdict::Reroute,
            // Nothing but the start-up happened yet: replay it elsewhere
            // instead of failing the client.
            (Phase::Streaming { .. }, Stage::Startup(_)) => Verdict::Replay(close),
            (Phase::Streaming { .. }, Stage::Relay) => Verdict::Close(close),
            _ => Verdict::Nothing,
        }
    }

    /// A member became available on the session's port.
    pub fn on_member_available(&self) -> Verdict {
        if self.is_held() {
            Verdict::Route
        } else {
            Verdict::Nothing
        }
    }

    // ---- sockets ----------------------------------------------------------

    /// Has the non-blocking connect finished? A peer address means
    /// connected (one syscall, the usual case on a fast network); otherwise
    /// mio's procedure: an error means failed, `NotConnected` not yet.
    pub fn check_connect(&mut self) -> Connect {
        match self.pair.backend.as_ref() {
            Some(b) => connect_state(&b.sock),
            None => Connect::Pending,
        }
    }

    /// Moves bytes both ways, up to `budget` bytes per direction; before
    /// the connect is done, only collects what the client sends.
    pub fn pump(&mut self, pool: &mut Pool, budget: usize) -> Pumped {
        let connected = self.is_streaming();
        let r = match &mut self.stage {
            Stage::Startup(st) => match st.pump(&mut self.pair, pool, budget, connected) {
                Ok(Examined::Pending(flow)) => Ok(flow),
                Ok(Examined::Refused(why)) => return Pumped::Refused(why),
                Ok(Examined::Done) => {
                    self.upgrade(pool);
                    return self.pump(pool, budget);
                }
                Err(e) => Err(e),
            },
            Stage::Relay if connected => self.pair.relay(pool, budget),
            Stage::Relay => self.pair.collect(pool, budget, None).map(|()| Flow::Idle),
        };
        match r {
            Ok(flow) => Pumped::Flow(flow),
            Err(e) => Pumped::Failed(e),
        }
    }

    /// Gives back buffers. Sockets close, and so leave the poll, when the
    /// session is dropped (at the reap step).
    pub fn close(&mut self, pool: &mut Pool) {
        self.pair.close(pool);
        self.phase = Phase::Closed;
    }
}

/// Has the non-blocking connect of `sock` finished? (See
/// [`Session::check_connect`]; the pre-connected pool asks the same.)
pub fn connect_state(sock: &TcpStream) -> Connect {
    if sock.peer_addr().is_ok() {
        return Connect::Done;
    }
    match sock.take_error() {
        Ok(Some(e)) | Err(e) => return Connect::Failed(e),
        Ok(None) => {}
    }
    match sock.peer_addr() {
        Ok(_) => Connect::Done,
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Connect::Pending,
        Err(e) => Connect::Failed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    /// A session on a real (idle) loopback socket; the transitions under
    /// test never touch it. Time is whatever the test passes in.
    fn session(examine: bool) -> Session {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        c.set_nonblocking(true).unwrap();
        let addr = c.local_addr().unwrap();
        Session::new(1, 0, TcpStream::from_std(c), addr, examine, Instant::now())
    }

    fn target() -> Target {
        Target {
            member: Rc::from("node1"),
            addr: SocketAddr::from(([127, 0, 0, 1], 5432)),
            slot: 0,
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn reason(v: &Verdict) -> Option<CloseReason> {
        match v {
            Verdict::Close(c) => Some(c.reason),
            _ => None,
        }
    }

    #[test]
    fn waiting_counts_from_the_first_wait_and_closes_at_its_end() {
        let t0 = Instant::now();
        let mut s = session(true);
        assert_eq!(s.wait_for_member(t0, secs(10)), Verdict::Arm(t0 + secs(10)));
        assert!(s.is_held());
        // A second look (a topology change without a member) keeps the
        // deadline: nothing to arm.
        assert_eq!(s.wait_for_member(t0 + secs(3), secs(10)), Verdict::Nothing);
        assert_eq!(s.on_deadline(t0 + secs(9)), Verdict::Nothing, "not yet");
        assert_eq!(
            reason(&s.on_deadline(t0 + secs(10))),
            Some(CloseReason::NoMember)
        );
        assert_eq!(
            reason(&s.wait_for_member(t0 + secs(11), secs(10))),
            Some(CloseReason::NoMember),
            "the budget is spent"
        );
    }

    #[test]
    fn a_port_without_wait_refuses_at_once() {
        let mut s = session(false);
        let v = s.wait_for_member(Instant::now(), Duration::ZERO);
        assert_eq!(reason(&v), Some(CloseReason::NoMember));
    }

    #[test]
    fn held_after_every_member_failed_then_routed_again_within_the_wait() {
        let t0 = Instant::now();
        let mut s = session(true);
        s.tried.push(target().addr);
        let delay = Duration::from_millis(250);
        assert_eq!(s.hold(t0, delay, secs(1)), Verdict::Arm(t0 + delay));
        assert!(s.tried.is_empty(), "every member may be tried again");
        assert_eq!(
            s.phase,
            Phase::Held {
                retry_at: t0 + delay
            }
        );
        assert_eq!(s.on_deadline(t0 + delay), Verdict::Route);
        // Three more rounds fit in the second; the fifth does not.
        for i in 1..4 {
            let now = t0 + delay * i;
            assert_eq!(s.hold(now, delay, secs(1)), Verdict::Arm(now + delay));
        }
        let v = s.hold(t0 + delay * 4 + Duration::from_millis(1), delay, secs(1));
        assert_eq!(reason(&v), Some(CloseReason::ConnectFailed));
    }

    #[test]
    fn a_connect_times_out_to_the_next_member_and_stale_timers_are_ignored() {
        let t0 = Instant::now();
        let mut s = session(true);
        assert_eq!(s.wait_for_member(t0, secs(10)), Verdict::Arm(t0 + secs(10)));
        assert_eq!(
            s.connecting(target(), t0 + secs(5)),
            Verdict::Arm(t0 + secs(5))
        );
        // The wait's timer fires later than the connect's deadline moved it:
        // the connect deadline decides.
        assert_eq!(s.on_deadline(t0 + secs(4)), Verdict::Nothing);
        assert_eq!(
            s.on_deadline(t0 + secs(5)),
            Verdict::NextMember("connect timeout".into())
        );
        assert_eq!(s.connected(false), Verdict::Nothing);
        assert_eq!(s.phase, Phase::Streaming { fin: None });
        assert_eq!(
            s.on_deadline(t0 + secs(10)),
            Verdict::Nothing,
            "no deadline"
        );
    }

    #[test]
    fn a_half_close_arms_the_fin_timeout_once_and_names_who_closed() {
        let t0 = Instant::now();
        let mut s = session(false);
        s.connecting(target(), t0 + secs(5));
        s.connected(true);
        let half = |by| Pumped::Flow(Flow::HalfClosed(by));
        assert_eq!(
            s.on_pumped(half(Side::Backend), t0),
            Verdict::Arm(t0 + FIN_TIMEOUT)
        );
        assert_eq!(
            s.on_pumped(half(Side::Backend), t0 + secs(1)),
            Verdict::Nothing
        );
        assert_eq!(s.on_deadline(t0 + secs(59)), Verdict::Nothing);
        let v = s.on_pumped(Pumped::Flow(Flow::Finished), t0 + secs(2));
        assert_eq!(
            reason(&v),
            Some(CloseReason::Server),
            "the server closed first"
        );
        assert_eq!(
            reason(&s.on_deadline(t0 + FIN_TIMEOUT)),
            Some(CloseReason::FinTimeout)
        );
        let mut s = session(false);
        s.connected(false);
        let v = s.on_pumped(Pumped::Flow(Flow::Finished), t0);
        assert_eq!(reason(&v), Some(CloseReason::Client));
    }

    #[test]
    fn pump_results_become_verdicts() {
        let now = Instant::now();
        let mut s = session(true);
        s.connected(false);
        assert_eq!(s.on_pumped(Pumped::Flow(Flow::Budget), now), Verdict::Queue);
        assert_eq!(s.on_pumped(Pumped::Flow(Flow::Idle), now), Verdict::Nothing);
        assert_eq!(
            s.on_pumped(Pumped::Refused("57P03".into()), now),
            Verdict::Retry("57P03".into())
        );
        let failed = |side| {
            Pumped::Failed(Failed {
                side,
                error: io::ErrorKind::ConnectionReset.into(),
            })
        };
        // During the start-up a backend failure is retried, the client's is not.
        assert!(matches!(
            s.on_pumped(failed(Side::Backend), now),
            Verdict::Retry(_)
        ));
        let v = s.on_pumped(failed(Side::Client), now);
        assert_eq!(reason(&v), Some(CloseReason::ClientError));
        let mut relay = session(false);
        relay.connected(false);
        let v = relay.on_pumped(failed(Side::Backend), now);
        assert_eq!(reason(&v), Some(CloseReason::ServerError));
        assert!(matches!(
            v,
            Verdict::Close(Close {
                level: Level::Debug,
                ..
            })
        ));
    }

    #[test]
    fn eviction_depends_on_phase_and_stage() {
        let now = Instant::now();
        let close = || Close::new(CloseReason::RoleLost, "demoted", Level::Debug);
        let mut s = session(true);
        assert_eq!(
            s.on_evicted(close()),
            Verdict::Nothing,
            "waiting: no member"
        );
        assert_eq!(s.on_member_available(), Verdict::Route);
        s.connecting(target(), now + secs(5));
        assert_eq!(s.on_evicted(close()), Verdict::Reroute);
        assert_eq!(s.on_member_available(), Verdict::Nothing);
        s.connected(false);
        assert_eq!(s.on_evicted(close()), Verdict::Replay(close()));
        let mut pool = Pool::new(1024, 1);
        s.upgrade(&mut pool);
        assert_eq!(s.on_evicted(close()), Verdict::Close(close()));
    }

    #[test]
    fn a_refused_start_up_is_retried_only_within_the_wait() {
        let t0 = Instant::now();
        let delay = Duration::from_millis(250);
        let s = session(true);
        assert!(s.may_retry(t0, delay, secs(10)));
        assert!(!s.may_retry(t0, delay, Duration::ZERO), "no wait, no retry");
        let mut w = session(true);
        w.wait_for_member(t0, secs(1));
        assert!(w.may_retry(t0 + secs(1) - delay, delay, secs(1)));
        assert!(!w.may_retry(t0 + secs(1), delay, secs(1)), "budget spent");
        assert!(
            !session(false).may_retry(t0, delay, secs(10)),
            "nothing to replay"
        );
    }

    #[test]
    fn a_client_that_leaves_while_waiting_is_closed() {
        let now = Instant::now();
        let mut s = session(true);
        s.wait_for_member(now, secs(10));
        s.pair.client.read_eof = true;
        let v = s.on_pumped(Pumped::Flow(Flow::Idle), now);
        assert_eq!(reason(&v), Some(CloseReason::ClientLeft));
    }
}

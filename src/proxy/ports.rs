//! Listening ports: bind, add, remove, accept (with the EMFILE pause and
//! the session cap), and refresh a port's backends after a topology change
//! (which sessions lost their member, which waiting clients can go now).

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{error, info, warn, Level};
use mio::net::{TcpListener, TcpStream};
use mio::Interest;

use super::listener::{Listener, Target};
use super::session::{Close, Session, Verdict};
use super::stats::CloseReason;
use super::timer::Timer;
use super::token::{self, Side};
use super::{admin, buffer, sys, Proxy};
use crate::config::{ClusterConfig, Keepalive, PortConfig};
use crate::error::{Error, Result};
use crate::logging::debug;
use crate::policy::{self, Hold, LagEvent};
use crate::topology::{self, Route, Topology};

/// Connections accepted per listener per loop turn.
const ACCEPT_BATCH: usize = 256;
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(100);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// Whether the loop may accept, and why not.
pub struct Accept {
    /// An accept failed (EMFILE and the like): wait for `AcceptResume`.
    pub paused: bool,
    /// The next pause, doubled per failure in a row up to a second.
    backoff: Duration,
    /// A listener still had connections when its batch ended: poll again
    /// at once.
    pub more: bool,
    /// At `max_connections`: new clients wait in the backlog.
    at_capacity: bool,
}

impl Accept {
    pub fn new() -> Accept {
        Accept {
            paused: false,
            backoff: ACCEPT_PAUSE_MIN,
            more: false,
            at_capacity: false,
        }
    }

    /// Notes the session count; logs the transitions in and out of the cap.
    /// False when no client may be accepted now.
    fn below_cap(&mut self, sessions: usize, max: usize) -> bool {
        if sessions >= max {
            if !self.at_capacity {
                self.at_capacity = true;
                warn!("max_connections={max} reached; new clients wait in the backlog");
            }
            return false;
        }
        true
    }

    /// After the reap: below the cap again?
    pub fn check_capacity(&mut self, sessions: usize, max: usize) {
        if self.at_capacity && sessions < max {
            self.at_capacity = false;
            info!("below max_connections again; accepting");
        }
    }

    /// Pauses after a failed accept (logged once per episode); returns how
    /// long to wait before the next try.
    fn pause(&mut self, e: &io::Error, sessions: usize) -> Duration {
        let backoff = self.backoff;
        if backoff == ACCEPT_PAUSE_MIN {
            error!("accept failed: {e}; pausing accepts (sessions={sessions})");
        }
        self.paused = true;
        self.backoff = (backoff * 2).min(ACCEPT_PAUSE_MAX);
        backoff
    }
}

impl Proxy {
    pub(super) fn accept_clients(&mut self) {
        self.accept.more = false;
        if self.accept.paused || self.drain_deadline.is_some() {
            return;
        }
        let before = self.sessions.len();
        self.accept_ready_listeners();
        if self.sessions.len() != before {
            self.budget_pipes();
        }
    }

    fn accept_ready_listeners(&mut self) {
        for lk in 0..self.listeners.capacity() {
            let mut accepted = 0;
            while let Some(l) = self.listeners.get_mut(lk).filter(|l| l.accept_ready) {
                if !self
                    .accept
                    .below_cap(self.sessions.len(), self.config.max_connections)
                {
                    return;
                }
                if accepted == ACCEPT_BATCH {
                    self.accept.more = true;
                    break;
                }
                match l.socket.accept() {
                    Ok((sock, peer)) => {
                        accepted += 1;
                        self.accept.backoff = ACCEPT_PAUSE_MIN;
                        self.new_session(lk, sock, peer);
                    }
                    Err(e) => match sys::accept_error(&e) {
                        sys::AcceptError::WouldBlock => l.accept_ready = false,
                        sys::AcceptError::Retry => {}
                        // The pending connection stays in the backlog and,
                        // edge-triggered, no new event will come for it:
                        // retry on a timer.
                        sys::AcceptError::Pause => {
                            let wait = self.accept.pause(&e, self.sessions.len());
                            self.stats.accept_pauses += 1;
                            self.timers.add(self.now + wait, Timer::AcceptResume);
                            return;
                        }
                    },
                }
            }
        }
    }

    /// `sock` has `TCP_NODELAY` and the keepalive settings from its
    /// listener (`sys::set_accepted_options`).
    pub(super) fn new_session(&mut self, lk: usize, sock: TcpStream, peer: SocketAddr) {
        let id = self.next_id;
        self.next_id += 1;
        let entry = self.sessions.vacant_entry();
        let key = entry.key();
        let mut s = Session::new(id, lk, sock, peer, self.config.startup_replay, self.now);
        let tok = token::session(key, Side::Client);
        if let Err(e) = self.poll.registry().register(
            &mut s.pair.client.sock,
            tok,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            warn!("registering client {peer}: {e}");
            return;
        }
        entry.insert(s);
        if let Some(l) = self.listeners.get_mut(lk) {
            l.stats.accepted += 1;
        }
        self.route(key);
    }

    /// After a successful poll of `cluster`: feeds it to the lag rules of
    /// the cluster's ports, and refreshes every port when the topology
    /// `changed` and the others whose lag verdicts changed.
    pub(super) fn observe_poll(&mut self, cluster: &str, changed: bool) {
        let now = Instant::now();
        let interval = self.config.cluster_update_interval;
        for lk in 0..self.listeners.capacity() {
            let Some(l) = self.listeners.get_mut(lk).filter(|l| l.cluster == cluster) else {
                continue;
            };
            let mut events = Vec::new();
            if let (Some(rules), Some(topo)) = (l.policy.lag, self.clusters.topology(cluster)) {
                l.lag.set_interval(interval);
                events = policy::observe_poll(&mut l.lag, &rules, now, topo, &l.filter, &l.policy);
            }
            self.lag_events(lk, &events);
            if changed || !events.is_empty() {
                self.refresh_listener(lk);
            }
        }
    }

    /// A lag grace may have run out on port `lk`.
    pub(super) fn lag_deadline(&mut self, lk: usize, now: Instant) {
        let Some(l) = self.listeners.get_mut(lk) else {
            return;
        };
        let Some(rules) = l.policy.lag else { return };
        if l.lag_timer.is_some_and(|at| at <= now) {
            l.lag_timer = None;
        }
        let events = l.lag.tick(&rules, now);
        self.lag_events(lk, &events);
        if !events.is_empty() {
            self.refresh_listener(lk);
        }
    }

    /// Logs and counts lag evictions, closes and returns of port `lk`, and
    /// arms the timer of the next grace that can run out.
    fn lag_events(&mut self, lk: usize, events: &[LagEvent]) {
        let Some(l) = self.listeners.get_mut(lk) else {
            return;
        };
        for e in events {
            info!("port={} {e}", l.label);
            match e {
                LagEvent::Evicted { close, .. } => {
                    l.stats.lag_evictions += 1;
                    l.stats.lag_closes += u64::from(close.is_some());
                }
                LagEvent::Closed { .. } => l.stats.lag_closes += 1,
                LagEvent::Returned { .. } => l.stats.lag_returns += 1,
            }
        }
        // One timer entry per deadline, not one per poll.
        let next = l.policy.lag.and_then(|r| l.lag.next_deadline(&r));
        if next != l.lag_timer {
            l.lag_timer = next;
            if let Some(at) = next {
                self.timers.add(at, Timer::LagGrace(lk));
            }
        }
    }

    pub(super) fn refresh_listeners(&mut self, cluster: &str) {
        for lk in 0..self.listeners.capacity() {
            if self.listeners.get(lk).is_some_and(|l| l.cluster == cluster) {
                self.refresh_listener(lk);
            }
        }
    }

    /// Recomputes a port's backends from its cluster's topology; closes the
    /// sessions on members that lost what the port requires; routes waiting
    /// clients when a member became available.
    pub(super) fn refresh_listener(&mut self, lk: usize) {
        let Some(l) = self.listeners.get_mut(lk) else {
            return;
        };
        // The pooled sockets follow the backends at the end of the turn.
        self.warm.dirty |= l.preconnect > 0 || self.warm.has(lk);
        let evicted = refresh_backends(l, self.clusters.topology(&l.cluster));
        let has_open = l.backends.has_open();
        let label = l.label.clone();
        let mut verdicts: Vec<(usize, Verdict)> = Vec::new();
        for (k, s) in self.sessions.iter() {
            if s.listener != lk || s.is_closed() {
                continue;
            }
            let gone = s
                .target
                .as_ref()
                .and_then(|t| evicted.iter().find(|e| e.target == *t));
            let v = match gone {
                Some(e) => s.on_evicted(Close::new(
                    e.reason,
                    format!("member no longer routable: {}", e.why),
                    Level::Debug,
                )),
                None if has_open => s.on_member_available(),
                None => Verdict::Nothing,
            };
            if v != Verdict::Nothing {
                verdicts.push((k, v));
            }
        }
        for e in &evicted {
            let n = verdicts
                .iter()
                .filter(|(k, v)| {
                    matches!(v, Verdict::Close(_))
                        && self.sessions[*k]
                            .target
                            .as_ref()
                            .is_some_and(|t| t.member == e.target.member)
                })
                .count();
            info!(
                "port={label} member={} addr={} no longer routable ({}); closing {n} sessions",
                e.target.member, e.target.addr, e.why
            );
        }
        // Closes first (they free least-connections counters), then replays,
        // re-routes and waiting clients; in session order within each. (A
        // bucket per rank, not a sort: the same order, and one generic sort
        // less in the binary.)
        let mut ranked: [Vec<(usize, Verdict)>; 4] = Default::default();
        for (k, v) in verdicts {
            let rank = match v {
                Verdict::Close(_) => 0,
                Verdict::Replay(_) => 1,
                Verdict::Reroute => 2,
                _ => 3,
            };
            ranked[rank].push((k, v));
        }
        for (k, v) in ranked.into_iter().flatten() {
            self.apply(k, v);
        }
    }

    pub(super) fn add_listener(
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
        set_accepted_options(&socket, port.listen, self.config.tcp_keepalive.as_ref());
        let l = Listener::new(socket, cluster, port);
        info!(
            "port={} listening on {} roles={:?}",
            l.label, l.addr, port.roles
        );
        log_preconnect(&l);
        let lk = entry.key();
        entry.insert(l);
        self.refresh_listener(lk);
        Ok(())
    }

    /// Closes every session of listener `lk`.
    pub(super) fn close_listener_sessions(&mut self, lk: usize, why: &str) {
        // Sessions of a port that a reload removed or moved to another cluster.
        let keys: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.listener == lk)
            .map(|(k, _)| k)
            .collect();
        for k in keys {
            let close = Close::new(CloseReason::PortClosed, why.to_string(), Level::Debug);
            self.close_session(k, close);
        }
    }

    pub(super) fn remove_listener(&mut self, lk: usize, why: &str) {
        self.close_listener_sessions(lk, why);
        // Now: the key may go to a port added by the same reload.
        self.warm.close_listener(lk);
        if let Some(mut l) = self.listeners.try_remove(lk) {
            let _ = self.poll.registry().deregister(&mut l.socket);
            info!("port={} on {} closed: {why}", l.label, l.addr);
        }
    }

    /// Raises the open-files limit towards what the configuration needs
    /// (sessions, ports, admin connections and splice pipes) and warns when
    /// it stays below; then budgets the pipes.
    pub(super) fn check_fd_limit(&mut self) {
        let max = self.config.max_connections;
        let ports = self.listeners.len();
        let pipes = if self.config.splice {
            buffer::MAX_PIPES
        } else {
            0
        };
        let warm = self.warm_budget();
        self.warm_budgeted = warm;
        let wanted = fd_budget(max, ports + warm, pipes);
        match sys::raise_nofile_limit(wanted) {
            Ok((soft, _)) => {
                self.fd_limit = soft;
                let sessions = fd_budget(max, ports + warm, 0);
                if soft < sessions {
                    warn!(
                        "open files limit is {soft}, below the {sessions} that max_connections={max} needs; \
                         accepting pauses when it runs out, and splice pipes get only what open sessions leave"
                    );
                } else if soft < wanted {
                    warn!(
                        "open files limit is {soft}, below the {wanted} that max_connections={max} and splice need; \
                         splice pipes get only what sessions leave"
                    );
                } else {
                    debug!("open files limit {soft}");
                }
            }
            Err(e) => warn!("cannot read the open files limit: {e}"),
        }
        self.budget_pipes();
    }

    /// Lets the splice pipes use only the descriptors that the open
    /// sessions, room for another accept batch, the ports and the admin
    /// connections leave: a pipe must never take the descriptor an accept
    /// needs. Run whenever the session count changes in bulk (after
    /// accepting and after reaping).
    pub(super) fn budget_pipes(&mut self) {
        let sessions = (self.sessions.len() + ACCEPT_BATCH).min(self.config.max_connections);
        // What the last fd check counted (a refill that opens more runs it
        // again): no walk over every port per accept batch.
        let warm = self.warm_budgeted.max(self.warm.len());
        let base = fd_budget(sessions, self.listeners.len() + warm, 0);
        self.pool.set_max_pipes(pipes_within(self.fd_limit, base));
    }

    /// Descriptors the pre-connected sockets take: `preconnect` per
    /// routable member of each port, or what is open if that is more.
    fn warm_budget(&self) -> usize {
        let ports = self.listeners.iter();
        warm_fds(
            ports.map(|(_, l)| (l.preconnect, l.backends.list.len())),
            self.warm.len(),
        )
    }
}

/// Descriptors margin for everything else: stdio, the poll, the waker,
/// the signal pipe, the admin listener, the updaters' HTTP connections.
const FD_MARGIN: u64 = 64;

/// Descriptors the process needs with `sessions` sessions (two each),
/// `ports` listeners, the admin connections and `pipes` splice pipes (two
/// each).
fn fd_budget(sessions: usize, ports: usize, pipes: usize) -> u64 {
    sessions as u64 * 2
        + ports as u64
        + admin::MAX_ADMIN_CONNS as u64
        + pipes as u64 * 2
        + FD_MARGIN
}

/// Descriptors of the pre-connected sockets: `(preconnect, routable
/// members)` per port, or the `open` ones if more (a port whose members just
/// left still holds its sockets until the next refill).
fn warm_fds(ports: impl Iterator<Item = (usize, usize)>, open: usize) -> usize {
    ports
        .map(|(n, members)| n * members)
        .sum::<usize>()
        .max(open)
}

/// The pipes that fit in `limit` descriptors beside the `base` the rest
/// needs.
fn pipes_within(limit: u64, base: u64) -> usize {
    let spare = limit.saturating_sub(base) / 2;
    spare.min(buffer::MAX_PIPES as u64) as usize
}

/// A member that stopped being routable on a port.
struct Eviction {
    target: Target,
    reason: CloseReason,
    why: String,
}

/// Sets `l`'s backends to what `topo` and the port's policy make routable
/// (`policy::plan`: members held by lag, draining, preference or an idle
/// fallback stay, taking no new clients), logging the members that became
/// routable or changed whether they take new clients; returns the members
/// that are no longer routable, with why. Linear in members and backends:
/// every lookup goes through a map.
fn refresh_backends(l: &mut Listener, topo: Option<&Topology>) -> Vec<Eviction> {
    let empty = Topology::default();
    let plan = policy::plan(topo.unwrap_or(&empty), &l.filter, &l.policy, &l.lag);
    let routable: Vec<Route> = plan
        .routes
        .iter()
        .map(|r| Route {
            member: r.member,
            addr: r.addr,
            draining: r.hold.is_some(),
        })
        .collect();
    let routable_set: HashSet<(&str, SocketAddr)> =
        routable.iter().map(|r| (r.member, r.addr)).collect();
    let excluded: HashMap<&str, &policy::Reason> =
        plan.excluded.iter().map(|(m, r)| (*m, r)).collect();
    let routed: HashMap<&str, SocketAddr> =
        plan.routes.iter().map(|r| (r.member, r.addr)).collect();
    let mut evicted = Vec::new();
    for b in &l.backends.list {
        if routable_set.contains(&(&*b.member, b.addr)) {
            continue;
        }
        // The plan names every member of the topology, routed or excluded.
        let (reason, why) = match (excluded.get(&*b.member), routed.get(&*b.member)) {
            (Some(r), _) => (close_reason(r), r.to_string()),
            (None, Some(addr)) => (CloseReason::Removed, format!("address changed to {addr}")),
            (None, None) => (CloseReason::Removed, "removed from the cluster".to_string()),
        };
        let target = Target {
            member: b.member.clone(),
            addr: b.addr,
            slot: b.slot,
        };
        evicted.push(Eviction {
            target,
            reason,
            why,
        });
    }
    let current: HashMap<(&str, SocketAddr), &super::listener::Backend> = l
        .backends
        .list
        .iter()
        .map(|b| ((&*b.member, b.addr), b))
        .collect();
    let held = |h: Option<Hold>| match h {
        None => String::new(),
        Some(h) => format!(" but takes no new clients ({h})"),
    };
    for r in &plan.routes {
        match current.get(&(r.member, r.addr)) {
            None => info!(
                "port={} member={} addr={} routable{}",
                l.label,
                r.member,
                r.addr,
                held(r.hold)
            ),
            Some(b) if b.draining != r.hold.is_some() => match r.hold {
                Some(h) => info!(
                    "port={} member={} {h}; takes no new clients",
                    l.label, r.member
                ),
                None => info!("port={} member={} taking new clients", l.label, r.member),
            },
            Some(_) => {}
        }
    }
    if plan.fallback_active != l.fallback_active {
        l.fallback_active = plan.fallback_active;
        if plan.fallback_active {
            l.stats.fallbacks += 1;
            info!(
                "port={} no member of its roles takes new clients; using fallback",
                l.label
            );
        } else {
            info!(
                "port={} its roles take new clients again; fallback idle",
                l.label
            );
        }
    }
    l.backends.set(&routable);
    evicted
}

/// The close reason of a session whose member the plan excluded.
fn close_reason(r: &policy::Reason) -> CloseReason {
    match r {
        policy::Reason::Rule(x) => eviction_reason(x),
        policy::Reason::Lag => CloseReason::Lag,
        policy::Reason::FallbackReturn => CloseReason::FallbackReturn,
    }
}

/// The close reason of a session whose member stopped being routable.
fn eviction_reason(x: &topology::Exclusion) -> CloseReason {
    match x {
        topology::Exclusion::LagUnknown | topology::Exclusion::LagOver { .. } => CloseReason::Lag,
        topology::Exclusion::NoAddress | topology::Exclusion::Unroutable(..) => {
            CloseReason::Removed
        }
        topology::Exclusion::Role(_)
        | topology::Exclusion::SplitBrain
        | topology::Exclusion::State(_)
        | topology::Exclusion::NoLoadBalance => CloseReason::RoleLost,
    }
}

/// One line per port that keeps pre-connected sockets (at start and reload).
pub(super) fn log_preconnect(l: &Listener) {
    if l.preconnect > 0 {
        info!(
            "port={} keeps {} pre-connected sockets per member (max age {:.1}s)",
            l.label,
            l.preconnect,
            l.preconnect_max_age.as_secs_f64()
        );
    }
}

/// What accepted clients inherit from the listener; a failure is logged and
/// leaves those clients with the kernel's defaults (Nagle on, no keepalive).
pub(super) fn set_accepted_options(l: &TcpListener, addr: SocketAddr, ka: Option<&Keepalive>) {
    if let Err(e) = sys::set_accepted_options(l, ka) {
        warn!("listener {addr}: setting TCP_NODELAY and keepalive for its clients: {e}");
    }
}

pub(super) fn bind(addr: SocketAddr, backlog: u32) -> Result<TcpListener> {
    let std = sys::bind_listener(addr, backlog).map_err(|(step, source)| Error::Bind {
        addr,
        step,
        source,
    })?;
    Ok(TcpListener::from_std(std))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fd_budget_counts_the_splice_pipes() {
        let base = fd_budget(1000, 3, 0);
        assert_eq!(base, 2000 + 3 + admin::MAX_ADMIN_CONNS as u64 + FD_MARGIN);
        assert_eq!(
            fd_budget(1000, 3, buffer::MAX_PIPES),
            base + 2 * buffer::MAX_PIPES as u64,
            "two descriptors per pipe"
        );
    }

    #[test]
    fn pooled_sockets_count_in_the_budget() {
        // Two ports: preconnect 4 with 3 members, and one without.
        let warm = warm_fds([(4, 3), (0, 5)].into_iter(), 7);
        assert_eq!(warm, 12);
        assert_eq!(warm_fds([(4, 0)].into_iter(), 7), 7, "what is open");
        let base = fd_budget(100, 2 + warm, 0);
        assert_eq!(base, fd_budget(100, 2, 0) + 12, "one descriptor each");
        // Pipes get only what sessions and pooled sockets leave.
        assert_eq!(pipes_within(fd_budget(100, 2, 0) + 12, base), 0);
    }

    #[test]
    fn pipes_get_only_what_sessions_leave() {
        let base = fd_budget(100, 1, 0);
        assert_eq!(pipes_within(base, base), 0, "no room: no pipes");
        assert_eq!(pipes_within(base - 10, base), 0);
        assert_eq!(pipes_within(base + 21, base), 10);
        assert_eq!(pipes_within(u64::MAX, base), buffer::MAX_PIPES);
    }
}

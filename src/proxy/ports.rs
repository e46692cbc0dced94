//! Listening ports: bind, add, remove, accept (with the EMFILE pause and
//! the session cap), and refresh a port's backends after a topology change
//! (which sessions lost their member, which waiting clients can go now).

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn, Level};
use mio::net::{TcpListener, TcpStream};
use mio::Interest;

use super::listener::{Listener, Target};
use super::session::{Close, Session, Verdict};
use super::stats::CloseReason;
use super::timer::Timer;
use super::token::{self, Side};
use super::{admin, buffer, sys, Proxy};
use crate::config::{ClusterConfig, PortConfig};
use crate::error::{Error, Result};
use crate::topology::{self, Topology};

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
                            self.timers.add(Instant::now() + wait, Timer::AcceptResume);
                            return;
                        }
                    },
                }
            }
        }
    }

    pub(super) fn new_session(&mut self, lk: usize, sock: TcpStream, peer: SocketAddr) {
        let _ = sock.set_nodelay(true);
        if let Some(ka) = &self.config.tcp_keepalive {
            let _ = sys::set_keepalive(&sock, ka);
        }
        let id = self.next_id;
        self.next_id += 1;
        let entry = self.sessions.vacant_entry();
        let key = entry.key();
        let mut s = Session::new(
            id,
            lk,
            sock,
            peer,
            self.config.startup_replay,
            Instant::now(),
        );
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
        // re-routes and waiting clients.
        verdicts.sort_by_key(|(_, v)| match v {
            Verdict::Close(_) => 0,
            Verdict::Replay(_) => 1,
            Verdict::Reroute => 2,
            _ => 3,
        });
        for (k, v) in verdicts {
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
        let wanted = fd_budget(max, ports, pipes);
        match sys::raise_nofile_limit(wanted) {
            Ok((soft, _)) => {
                self.fd_limit = soft;
                let sessions = fd_budget(max, ports, 0);
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
        let base = fd_budget(sessions, self.listeners.len(), 0);
        self.pool.set_max_pipes(pipes_within(self.fd_limit, base));
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

/// Sets `l`'s backends to what `topo` makes routable, logging the members
/// that became routable or changed their draining; returns the members that
/// are no longer routable, with why.
fn refresh_backends(l: &mut Listener, topo: Option<&Topology>) -> Vec<Eviction> {
    let routable = topo
        .map(|t| topology::routable(t, &l.filter))
        .unwrap_or_default();
    let mut evicted = Vec::new();
    for b in &l.backends.list {
        if routable.iter().any(|r| b.is(r)) {
            continue;
        }
        let (reason, why) = match topo.and_then(|t| t.member(&b.member).map(|m| (t, m))) {
            None => (CloseReason::Removed, "removed from the cluster".to_string()),
            Some((t, m)) => match topology::eligibility(t, m, &l.filter) {
                Err(x) => (eviction_reason(&x), x.to_string()),
                Ok(addr) => (CloseReason::Removed, format!("address changed to {addr}")),
            },
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
    for r in &routable {
        match l.backends.list.iter().find(|b| b.is(r)) {
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
    l.backends.set(&routable);
    evicted
}

/// The close reason of a session whose member stopped being routable.
fn eviction_reason(x: &topology::Exclusion) -> CloseReason {
    match x {
        topology::Exclusion::LagUnknown | topology::Exclusion::LagOver { .. } => CloseReason::Lag,
        topology::Exclusion::NoAddress => CloseReason::Removed,
        topology::Exclusion::Role(_)
        | topology::Exclusion::SplitBrain
        | topology::Exclusion::State(_)
        | topology::Exclusion::NoLoadBalance => CloseReason::RoleLost,
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
    fn pipes_get_only_what_sessions_leave() {
        let base = fd_budget(100, 1, 0);
        assert_eq!(pipes_within(base, base), 0, "no room: no pipes");
        assert_eq!(pipes_within(base - 10, base), 0);
        assert_eq!(pipes_within(base + 21, base), 10);
        assert_eq!(pipes_within(u64::MAX, base), buffer::MAX_PIPES);
    }
}

//! One configured port: its listening socket, what it routes to, and its
//! counters; and [`Backends`], the socket-free least-connections state.
//!
//! The backend list is replaced on every topology change or reload by
//! [`Backends::set`], which carries the counters of backends that stay, so
//! balancing is not reset by an unrelated change. A backend's `active`
//! counts the sessions of this port that are connecting to or connected to
//! it.
//!
//! Per-member counters live in a slab ([`Backends::members`]) at a slot
//! that `Backend::slot` and `Target::slot` name. An entry lives while its
//! member is in the list or a session targets it ([`MemberStats::sessions`],
//! counted by [`Backends::pick`] and [`Backends::release`]), and goes with
//! the last of the two; only then can its slot be reused. So the table holds
//! the current members plus those still carrying sessions, however many
//! names a port routed to over its life, and a slot never names another
//! member while a session holds it. A member back within its sessions'
//! lifetime finds its entry (by name) with its counters.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use slab::Slab;

use super::stats::{MemberStats, PortStats};
use crate::config::{ClusterConfig, PortConfig};
use crate::policy::{LagTracker, PortPolicy};
use crate::topology::{pick_least, PortFilter, Route};

/// A member this port may route to.
#[derive(Debug, Clone)]
pub struct Backend {
    pub member: Rc<str>,
    pub addr: SocketAddr,
    pub active: u32,
    /// Routable, but takes no new clients (a leader being demoted).
    pub draining: bool,
    /// Index of the member's counters in [`Backends::members`].
    pub slot: usize,
}

impl Backend {
    fn is_target(&self, t: &Target) -> bool {
        self.member == t.member && self.addr == t.addr
    }
}

/// Where a session goes: the member, the address dialled, and the index of
/// the member's counters in its port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub member: Rc<str>,
    pub addr: SocketAddr,
    pub slot: usize,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.member, self.addr)
    }
}

/// The routable members of a port with their least-connections counters,
/// and the per-member counters of the members in the list or targeted by a
/// session.
#[derive(Debug, Default)]
pub struct Backends {
    pub list: Vec<Backend>,
    /// Where the next tie-break starts.
    cursor: usize,
    /// `Target::slot` and `Backend::slot` index it; see the module docs for
    /// when an entry goes.
    pub members: Slab<MemberStats>,
}

impl Backends {
    /// Replaces the routable set, keeping counters of backends that stay.
    pub fn set(&mut self, routable: &[Route]) {
        let old = std::mem::take(&mut self.list);
        let old: std::collections::HashMap<(&str, SocketAddr), &Backend> =
            old.iter().map(|b| ((&*b.member, b.addr), b)).collect();
        let members = &mut self.members;
        self.list = routable
            .iter()
            .map(|r| match old.get(&(r.member, r.addr)) {
                Some(b) => Backend {
                    draining: r.draining,
                    ..(*b).clone()
                },
                None => Backend {
                    member: Rc::from(r.member),
                    addr: r.addr,
                    active: 0,
                    draining: r.draining,
                    slot: member_slot(members, r.member),
                },
            })
            .collect();
        let listed: std::collections::HashSet<usize> = self.list.iter().map(|b| b.slot).collect();
        self.members
            .retain(|slot, m| m.sessions > 0 || listed.contains(&slot));
    }

    /// A backend that new clients can be sent to.
    pub fn has_open(&self) -> bool {
        self.list.iter().any(|b| !b.draining)
    }

    /// Least connections among backends whose address is not in `tried`;
    /// counts the pick.
    pub fn pick(&mut self, tried: &[SocketAddr]) -> Option<Target> {
        let i = pick_least(&self.list, self.cursor, |b| {
            (!b.draining && !tried.contains(&b.addr)).then_some(b.active)
        })?;
        self.cursor = i + 1;
        let b = &mut self.list[i];
        b.active += 1;
        if let Some(m) = self.members.get_mut(b.slot) {
            m.sessions += 1;
        }
        Some(Target {
            member: Rc::clone(&b.member),
            addr: b.addr,
            slot: b.slot,
        })
    }

    /// A session of this port left `target` (each [`Backends::pick`] is
    /// released once); the member's counters go with its last session once
    /// it is no longer in the list.
    pub fn release(&mut self, target: &Target) {
        if let Some(b) = self.list.iter_mut().find(|b| b.is_target(target)) {
            b.active = b.active.saturating_sub(1);
        }
        let Some(m) = self.member_stats(target) else {
            debug_assert!(false, "{target} released twice");
            return;
        };
        m.sessions = m.sessions.saturating_sub(1);
        if m.sessions == 0 && !self.list.iter().any(|b| b.slot == target.slot) {
            self.members.remove(target.slot);
        }
    }

    /// The counters of `target`'s member.
    pub fn member_stats(&mut self, target: &Target) -> Option<&mut MemberStats> {
        // The name check is a guard: a slot is not reused while a session
        // holds it.
        self.members
            .get_mut(target.slot)
            .filter(|m| m.member == target.member)
    }
}

/// The slot of `member` in `members`, added if new.
fn member_slot(members: &mut Slab<MemberStats>, member: &str) -> usize {
    match members.iter().find(|(_, m)| &*m.member == member) {
        Some((slot, _)) => slot,
        None => members.insert(MemberStats::new(Rc::from(member))),
    }
}

pub struct Listener {
    pub addr: SocketAddr,
    pub socket: TcpListener,
    pub cluster: String,
    /// `cluster:port`, for logs.
    pub label: String,
    pub filter: PortFilter,
    pub wait: Duration,
    pub backends: Backends,
    pub stats: PortStats,
    /// Lag grace and hysteresis, preference and fallback.
    pub policy: PortPolicy,
    /// The lag state of the cluster's members on this port.
    pub lag: LagTracker,
    /// Clients held at once beyond which new ones are refused.
    pub max_waiting: Option<usize>,
    /// New clients go to the fallback roles.
    pub fallback_active: bool,
    /// When the armed `Timer::LagGrace` of this port fires.
    pub lag_timer: Option<Instant>,
    /// The kernel said there are connections to accept; cleared on WouldBlock.
    pub accept_ready: bool,
    /// Pre-connected sockets per member (`warm.rs`); 0: off.
    pub preconnect: usize,
    pub preconnect_max_age: Duration,
}

impl Listener {
    pub fn new(socket: TcpListener, cluster: &ClusterConfig, port: &PortConfig) -> Listener {
        let mut l = Listener {
            addr: port.listen,
            socket,
            cluster: String::new(),
            label: String::new(),
            filter: PortFilter {
                roles: Vec::new(),
                host_port: None,
                max_lag_in_bytes: None,
            },
            wait: Duration::ZERO,
            backends: Backends::default(),
            stats: PortStats::default(),
            policy: PortPolicy::default(),
            lag: LagTracker::new(),
            max_waiting: None,
            fallback_active: false,
            lag_timer: None,
            accept_ready: false,
            preconnect: 0,
            preconnect_max_age: Duration::ZERO,
        };
        l.configure(cluster, port);
        l
    }

    /// Applies a (re)loaded port definition; the socket is kept.
    pub fn configure(&mut self, cluster: &ClusterConfig, port: &PortConfig) {
        self.cluster = cluster.name.clone();
        self.label = format!("{}:{}", cluster.name, port.name);
        self.filter = PortFilter {
            roles: port.roles.clone(),
            host_port: port.host_port,
            max_lag_in_bytes: port.max_lag_in_bytes,
        };
        self.wait = port.backend_wait_timeout;
        self.max_waiting = port.max_waiting;
        self.preconnect = port.preconnect;
        self.preconnect_max_age = port.preconnect_max_age;
        if self.policy != port.policy {
            // New rules: lag states start afresh at the next poll.
            self.policy = port.policy.clone();
            self.lag = LagTracker::new();
        }
    }

    /// The port's name without the cluster (`rw` of `main:rw`).
    pub fn port_name(&self) -> &str {
        self.label
            .split_once(':')
            .map_or(self.label.as_str(), |(_, p)| p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route<'a>(member: &'a str, port: u16, draining: bool) -> Route<'a> {
        Route {
            member,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            draining,
        }
    }

    #[test]
    fn least_connections_with_counters_kept_across_updates() {
        let mut b = Backends::default();
        b.set(&[route("a", 1, false), route("b", 2, false)]);
        let t1 = b.pick(&[]).unwrap();
        let t2 = b.pick(&[]).unwrap();
        assert_ne!(t1.member, t2.member, "one each");
        let t3 = b.pick(&[]).unwrap();
        // An unrelated change (c joins) keeps a's and b's counters.
        b.set(&[
            route("a", 1, false),
            route("b", 2, false),
            route("c", 3, false),
        ]);
        assert_eq!(&*b.pick(&[]).unwrap().member, "c", "the idle one");
        b.release(&t1);
        b.release(&t3);
        b.release(&t2);
        let active: Vec<u32> = b.list.iter().map(|x| x.active).collect();
        assert_eq!(active, [0, 0, 1]);
    }

    #[test]
    fn draining_and_tried_backends_are_skipped() {
        let mut b = Backends::default();
        b.set(&[route("a", 1, true), route("b", 2, false)]);
        assert!(b.has_open());
        let t = b.pick(&[]).unwrap();
        assert_eq!(&*t.member, "b");
        assert_eq!(b.pick(&[t.addr]), None, "a drains, b was tried");
        b.set(&[route("a", 1, true)]);
        assert!(!b.has_open());
    }

    #[test]
    fn member_counters_outlive_the_backend_list_while_a_session_holds_them() {
        let mut b = Backends::default();
        b.set(&[route("a", 1, false)]);
        let t = b.pick(&[]).unwrap();
        b.set(&[route("b", 2, false)]);
        b.member_stats(&t).unwrap().bytes_up += 7;
        // a is back while its session lives: same entry, same counters.
        b.set(&[route("a", 1, false), route("b", 2, false)]);
        assert_eq!(b.list[0].slot, t.slot, "a keeps its slot");
        assert_eq!(b.members[t.slot].bytes_up, 7);
        b.release(&t);
        assert_eq!(b.members[t.slot].bytes_up, 7, "listed: kept");
        assert_eq!(b.members[t.slot].sessions, 0);
    }

    fn names(b: &Backends) -> Vec<&str> {
        let mut v: Vec<&str> = b.members.iter().map(|(_, m)| &*m.member).collect();
        v.sort();
        v
    }

    #[test]
    fn counters_of_a_member_gone_from_list_and_sessions_go() {
        let mut b = Backends::default();
        b.set(&[route("a", 1, false), route("b", 2, false)]);
        let on_a = b.pick(&[]).unwrap();
        assert_eq!(&*on_a.member, "a");
        // a and b leave; b had no session: its counters go now.
        b.set(&[route("c", 3, false)]);
        assert_eq!(names(&b), ["a", "c"]);
        b.member_stats(&on_a).unwrap().bytes_down += 3;
        // a's last session ends: a goes too.
        b.release(&on_a);
        assert_eq!(names(&b), ["c"]);
        assert!(b.member_stats(&on_a).is_none());
    }

    #[test]
    fn fifty_members_in_turn_leave_no_trace() {
        let mut b = Backends::default();
        let mut held: Option<Target> = None;
        for i in 0..50u16 {
            let name = format!("pod-{i}");
            b.set(&[route(&name, 100 + i, false)]);
            // The session on the previous pod ends after its pod left.
            if let Some(t) = held.take() {
                b.release(&t);
            }
            let t = b.pick(&[]).unwrap();
            b.member_stats(&t).unwrap().connects += 1;
            held = Some(t);
            assert!(b.members.len() <= 2, "{:?}", names(&b));
        }
        assert_eq!(names(&b), ["pod-49"]);
        assert!(b.members.capacity() < 8, "slots are reused");
    }

    #[test]
    fn a_reused_slot_is_never_another_members() {
        let mut b = Backends::default();
        b.set(&[route("a", 1, false)]);
        let on_a = b.pick(&[]).unwrap();
        b.set(&[route("b", 2, false)]);
        let on_b = b.pick(&[]).unwrap();
        b.release(&on_a); // a goes, its slot is free
        b.set(&[route("b", 2, false), route("c", 3, false)]);
        let c = b.list.iter().find(|x| &*x.member == "c").unwrap().slot;
        assert_eq!(c, on_a.slot, "c took a's old slot");
        // A target naming a at that slot (a stale copy) reaches nothing.
        assert!(b.member_stats(&on_a).is_none());
        b.member_stats(&on_b).unwrap().bytes_up += 1;
        assert_eq!(b.members[c].bytes_up, 0);
        assert_eq!(b.members[c].member.as_ref(), "c");
    }
}

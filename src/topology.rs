//! The cluster as the proxy sees it, and the rules that turn it into backends.
//!
//! PURE: no sockets, clocks or threads. [`Topology`] is built by
//! `patroni::parse` (plus address resolution in the updater thread); the
//! event loop asks [`eligibility`] which members a port may route to,
//! [`diff`] what changed for the logs, and [`pick_least`] which backend gets
//! the next client.
//!
//! Eligibility rules, in the order they are checked (the first that fails is
//! the reason reported):
//! 1. role: the member's Patroni role must match one of the port's roles;
//! 2. leader sanity: with two `leader`s in one answer, nobody is a leader;
//! 3. state: a leader must be `running`; any other member `running`,
//!    `streaming` or `in archive recovery`;
//! 4. `noloadbalance` tag (not for the leader: it is for read traffic);
//! 5. lag, on ports with `max_lag_in_bytes`, for non-leaders: `replay_lag`
//!    when it is a number, else `lag`; unknown lag is over any limit;
//! 6. a resolved address that can reach a member: not unspecified
//!    (`0.0.0.0`, `::`, a `connect_address` slip that the kernel would send
//!    to this very host), broadcast or multicast.
//!
//! Every per-topology step is linear in the member count: [`routable`] and
//! [`judge_all`] check split brain once, [`diff`] matches members by name
//! through a map.
//!
//! A routable member can also be *draining*: a `leader` that is `running`
//! but publishes no `timeline`. Patroni omits the timeline exactly while an
//! action other than promote (demote, restart) is scheduled on the member,
//! which is how a switchover looks for about a second before the new leader
//! shows. A draining member gets no new clients (they wait for the next
//! leader), but its open sessions are not closed for it.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// A member's role as Patroni's `/cluster` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Leader,
    StandbyLeader,
    SyncStandby,
    QuorumStandby,
    Replica,
    /// A role this version does not know; never routable except on `any`.
    Other(String),
}

impl Role {
    pub fn parse(s: &str) -> Role {
        match s {
            "leader" => Role::Leader,
            "standby_leader" => Role::StandbyLeader,
            "sync_standby" => Role::SyncStandby,
            "quorum_standby" => Role::QuorumStandby,
            "replica" => Role::Replica,
            other => Role::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Role::Leader => "leader",
            Role::StandbyLeader => "standby_leader",
            Role::SyncStandby => "sync_standby",
            Role::QuorumStandby => "quorum_standby",
            Role::Replica => "replica",
            Role::Other(s) => s,
        }
    }

    /// Holds the leader lock (primary or standby leader).
    pub fn is_lock_holder(&self) -> bool {
        matches!(self, Role::Leader | Role::StandbyLeader)
    }
}

/// What a port asks for, as written in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortRole {
    /// Patroni `leader`.
    Leader,
    /// `sync_standby` or `quorum_standby`.
    Sync,
    /// `replica`.
    Async,
    /// Every member.
    Any,
    /// `standby_leader` (standby clusters).
    StandbyLeader,
}

impl PortRole {
    /// Case-insensitive, as the older tool.
    pub fn parse(s: &str) -> Option<PortRole> {
        match s.to_ascii_lowercase().as_str() {
            "leader" => Some(PortRole::Leader),
            "sync" => Some(PortRole::Sync),
            "async" => Some(PortRole::Async),
            "any" => Some(PortRole::Any),
            "standby_leader" => Some(PortRole::StandbyLeader),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PortRole::Leader => "leader",
            PortRole::Sync => "sync",
            PortRole::Async => "async",
            PortRole::Any => "any",
            PortRole::StandbyLeader => "standby_leader",
        }
    }

    pub fn accepts(self, role: &Role) -> bool {
        match self {
            PortRole::Leader => *role == Role::Leader,
            PortRole::Sync => matches!(role, Role::SyncStandby | Role::QuorumStandby),
            PortRole::Async => *role == Role::Replica,
            PortRole::Any => true,
            PortRole::StandbyLeader => *role == Role::StandbyLeader,
        }
    }
}

/// One member of a Patroni cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub name: String,
    pub role: Role,
    /// Patroni's `state` string, kept verbatim (`running`, `streaming`, ...).
    pub state: String,
    pub host: Option<String>,
    /// `host` resolved by the updater thread (never by the event loop).
    pub ip: Option<IpAddr>,
    pub port: Option<u16>,
    pub timeline: Option<u64>,
    /// `lag` in bytes; `None` when Patroni says `"unknown"` or omits it.
    pub lag: Option<u64>,
    /// `replay_lag` (Patroni 4.1+), preferred over `lag` when known.
    pub replay_lag: Option<u64>,
    /// `receive_lag` (Patroni 4.1+), for `/readiness?mode=write`.
    pub receive_lag: Option<u64>,
    pub noloadbalance: bool,
    /// Every tag `/cluster` lists, as Patroni's health checks compare them.
    pub tags: Vec<Tag>,
}

/// One member tag, in the form Patroni's `?tag_<key>=<value>` filter
/// compares: strings verbatim, anything else as Python's `str(v).lower()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    pub key: String,
    pub value: String,
    /// Python truthiness of the value (`bool(v)`), as Patroni tests
    /// `noloadbalance` in its health checks.
    pub truthy: bool,
}

impl Member {
    /// The lag the port limit is checked against.
    pub fn effective_lag(&self) -> Option<u64> {
        self.replay_lag.or(self.lag)
    }

    fn state_is_usable(&self) -> bool {
        match self.role {
            Role::Leader => self.state == "running",
            _ => matches!(
                self.state.as_str(),
                "running" | "streaming" | "in archive recovery"
            ),
        }
    }
}

/// One consistent `/cluster` answer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Topology {
    /// Sorted by name, as Patroni sends them.
    pub members: Vec<Member>,
    /// Only from Patroni 3.2.0 on.
    pub scope: Option<String>,
    /// Maintenance mode.
    pub paused: bool,
    /// Some member carries the `receive_lag`/`lsn` fields (Patroni 4.1+).
    pub lsn_fields: bool,
    /// `maximum_lag_on_failover` from the cluster's `/config`, when known
    /// (the updater reads it only for the health listeners).
    pub maximum_lag_on_failover: Option<i64>,
}

impl Topology {
    pub fn leaders(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(|m| m.role == Role::Leader)
    }

    /// More than one `leader` in a single answer: nobody can be trusted.
    /// Stops at the second leader.
    pub fn split_brain(&self) -> bool {
        self.leaders().nth(1).is_some()
    }

    /// The single leader, if the answer has exactly one.
    pub fn leader(&self) -> Option<&Member> {
        let mut it = self.leaders();
        match (it.next(), it.next()) {
            (Some(m), None) => Some(m),
            _ => None,
        }
    }

    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }
}

/// What a port needs from a member.
#[derive(Debug, Clone, PartialEq)]
pub struct PortFilter {
    pub roles: Vec<PortRole>,
    pub host_port: Option<u16>,
    pub max_lag_in_bytes: Option<u64>,
}

/// Why a member is not routable on a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exclusion {
    Role(String),
    SplitBrain,
    State(String),
    NoLoadBalance,
    LagUnknown,
    LagOver {
        lag: u64,
        max: u64,
    },
    NoAddress,
    /// The address cannot reach a member; the text says why.
    Unroutable(IpAddr, &'static str),
}

impl fmt::Display for Exclusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exclusion::Role(r) => write!(f, "role {r} not served by this port"),
            Exclusion::SplitBrain => write!(f, "more than one leader reported"),
            Exclusion::State(s) => write!(f, "state {s:?}"),
            Exclusion::NoLoadBalance => write!(f, "tagged noloadbalance"),
            Exclusion::LagUnknown => write!(f, "lag unknown"),
            Exclusion::LagOver { lag, max } => write!(f, "lag {lag} > {max} bytes"),
            Exclusion::NoAddress => write!(f, "no usable host/port"),
            Exclusion::Unroutable(ip, why) => write!(f, "address {ip} is {why}"),
        }
    }
}

/// Decides whether `m` is routable for `filter`; `Ok` carries the address
/// to dial.
pub fn eligibility(
    topo: &Topology,
    m: &Member,
    filter: &PortFilter,
) -> Result<SocketAddr, Exclusion> {
    judge(m.role == Role::Leader && topo.split_brain(), m, filter)
}

/// Every member of `topo` with its eligibility for `filter`, in member order;
/// linear (split brain is checked once).
pub fn judge_all<'a>(
    topo: &'a Topology,
    filter: &'a PortFilter,
) -> impl Iterator<Item = (&'a Member, Result<SocketAddr, Exclusion>)> + 'a {
    let split_brain = topo.split_brain();
    topo.members
        .iter()
        .map(move |m| (m, judge(split_brain, m, filter)))
}

/// [`eligibility`] with the topology's split brain already known, so that a
/// caller judging every member stays linear.
pub fn judge(split_brain: bool, m: &Member, filter: &PortFilter) -> Result<SocketAddr, Exclusion> {
    if !filter.roles.iter().any(|r| r.accepts(&m.role)) {
        return Err(Exclusion::Role(m.role.as_str().to_string()));
    }
    if m.role == Role::Leader && split_brain {
        return Err(Exclusion::SplitBrain);
    }
    if !m.state_is_usable() {
        return Err(Exclusion::State(m.state.clone()));
    }
    if m.noloadbalance && m.role != Role::Leader {
        return Err(Exclusion::NoLoadBalance);
    }
    if let Some(max) = filter.max_lag_in_bytes {
        if !m.role.is_lock_holder() {
            match m.effective_lag() {
                None => return Err(Exclusion::LagUnknown),
                Some(lag) if lag > max => return Err(Exclusion::LagOver { lag, max }),
                Some(_) => {}
            }
        }
    }
    let port = filter.host_port.or(m.port).ok_or(Exclusion::NoAddress)?;
    let ip = m.ip.ok_or(Exclusion::NoAddress)?;
    if let Some(why) = unroutable(ip) {
        return Err(Exclusion::Unroutable(ip, why));
    }
    Ok(SocketAddr::new(ip, port))
}

/// Why a member address cannot be dialled, if it cannot: the kernel takes an
/// unspecified destination for this host, and broadcast or multicast are
/// not one server.
pub fn unroutable(ip: IpAddr) -> Option<&'static str> {
    let ip = ip.to_canonical();
    if ip.is_unspecified() {
        Some("unspecified (a Patroni connect_address of 0.0.0.0 or ::?)")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip == IpAddr::from([255, 255, 255, 255]) {
        Some("broadcast")
    } else {
        None
    }
}

/// A member a port may route to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route<'a> {
    pub member: &'a str,
    pub addr: SocketAddr,
    /// Keep its sessions, but send it no new clients (see module docs).
    pub draining: bool,
}

/// Whether a routable member should get no new clients.
pub fn is_draining(m: &Member) -> bool {
    m.role == Role::Leader && m.timeline.is_none()
}

/// The routable members of `topo` for `filter`, in member order.
pub fn routable<'a>(topo: &'a Topology, filter: &PortFilter) -> Vec<Route<'a>> {
    let split_brain = topo.split_brain();
    topo.members
        .iter()
        .filter_map(|m| {
            let addr = judge(m.role == Role::Leader && split_brain, m, filter).ok()?;
            Some(Route {
                member: &m.name,
                addr,
                draining: is_draining(m),
            })
        })
        .collect()
}

/// A change worth an info line in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    LeaderChanged {
        from: Option<String>,
        to: Option<String>,
    },
    SplitBrain {
        leaders: Vec<String>,
    },
    MemberAdded {
        name: String,
        role: String,
        state: String,
    },
    MemberRemoved {
        name: String,
    },
    RoleChanged {
        name: String,
        from: String,
        to: String,
    },
    StateChanged {
        name: String,
        from: String,
        to: String,
    },
    AddressChanged {
        name: String,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "none".into());
        match self {
            Change::LeaderChanged { from, to } => {
                write!(f, "leader changed from={} to={}", opt(from), opt(to))
            }
            Change::SplitBrain { leaders } => {
                write!(
                    f,
                    "more than one leader reported ({}); refusing leader routing",
                    leaders.join(", ")
                )
            }
            Change::MemberAdded { name, role, state } => {
                write!(f, "member added member={name} role={role} state={state:?}")
            }
            Change::MemberRemoved { name } => write!(f, "member removed member={name}"),
            Change::RoleChanged { name, from, to } => {
                write!(f, "member role changed member={name} from={from} to={to}")
            }
            Change::StateChanged { name, from, to } => {
                write!(
                    f,
                    "member state changed member={name} from={from:?} to={to:?}"
                )
            }
            Change::AddressChanged { name } => write!(f, "member address changed member={name}"),
        }
    }
}

fn by_name(t: &Topology) -> HashMap<&str, &Member> {
    t.members.iter().map(|m| (m.name.as_str(), m)).collect()
}

/// Whether two answers route the same: everything but the lag figures
/// (`lag`, `replay_lag`, `receive_lag`), which move on every poll of a busy
/// cluster and are re-checked per poll anyway, and
/// `maximum_lag_on_failover`, which only health checks read.
pub fn same_routing(a: &Topology, b: &Topology) -> bool {
    let without_lag = |m: &Member| Member {
        lag: None,
        replay_lag: None,
        receive_lag: None,
        ..m.clone()
    };
    a.scope == b.scope
        && a.paused == b.paused
        && a.lsn_fields == b.lsn_fields
        && a.members.len() == b.members.len()
        && a.members
            .iter()
            .zip(&b.members)
            .all(|(x, y)| without_lag(x) == without_lag(y))
}

/// What changed between two answers (`old` is `None` before the first).
pub fn diff(old: Option<&Topology>, new: &Topology) -> Vec<Change> {
    let mut out = Vec::new();
    let leader_of = |t: &Topology| t.leader().map(|m| m.name.clone());
    let old_leader = old.and_then(leader_of);
    let new_leader = leader_of(new);
    if new.split_brain() {
        if !old.is_some_and(Topology::split_brain) {
            out.push(Change::SplitBrain {
                leaders: new.leaders().map(|m| m.name.clone()).collect(),
            });
        }
    } else if old.is_none() || old_leader != new_leader {
        out.push(Change::LeaderChanged {
            from: old_leader,
            to: new_leader,
        });
    }
    let empty = Topology::default();
    let old = old.unwrap_or(&empty);
    let (old_by_name, new_by_name) = (by_name(old), by_name(new));
    for m in &new.members {
        match old_by_name.get(m.name.as_str()) {
            None => out.push(Change::MemberAdded {
                name: m.name.clone(),
                role: m.role.as_str().into(),
                state: m.state.clone(),
            }),
            Some(o) => {
                if o.role != m.role {
                    out.push(Change::RoleChanged {
                        name: m.name.clone(),
                        from: o.role.as_str().into(),
                        to: m.role.as_str().into(),
                    });
                }
                if o.state != m.state {
                    out.push(Change::StateChanged {
                        name: m.name.clone(),
                        from: o.state.clone(),
                        to: m.state.clone(),
                    });
                }
                if (o.ip, o.port) != (m.ip, m.port) {
                    out.push(Change::AddressChanged {
                        name: m.name.clone(),
                    });
                }
            }
        }
    }
    for o in &old.members {
        if !new_by_name.contains_key(o.name.as_str()) {
            out.push(Change::MemberRemoved {
                name: o.name.clone(),
            });
        }
    }
    out
}

/// Least connections with rotating ties: `load` gives an item's active
/// count, or `None` when the item may not be picked (already tried). Among
/// equals, the first at or after `cursor` (wrapping) wins, so equal backends
/// take turns instead of the first always winning.
pub fn pick_least<T>(
    items: &[T],
    cursor: usize,
    load: impl Fn(&T) -> Option<u32>,
) -> Option<usize> {
    let n = items.len();
    let mut best: Option<(usize, u32)> = None;
    for k in 0..n {
        let i = (cursor + k) % n;
        if let Some(l) = load(&items[i]) {
            if best.is_none_or(|(_, b)| l < b) {
                best = Some((i, l));
            }
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn member(name: &str, role: &str, state: &str, lag: Option<u64>) -> Member {
        let n: u8 = name
            .trim_start_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .unwrap_or(1);
        Member {
            name: name.into(),
            role: Role::parse(role),
            state: state.into(),
            host: Some(format!("127.0.0.{n}")),
            ip: Some(IpAddr::from([127, 0, 0, n])),
            port: Some(5440 + u16::from(n)),
            timeline: Some(1),
            lag,
            replay_lag: None,
            receive_lag: None,
            noloadbalance: false,
            tags: Vec::new(),
        }
    }

    fn filter(roles: &[PortRole], max_lag: Option<u64>) -> PortFilter {
        PortFilter {
            roles: roles.to_vec(),
            host_port: None,
            max_lag_in_bytes: max_lag,
        }
    }

    fn names(t: &Topology, f: &PortFilter) -> Vec<String> {
        routable(t, f)
            .into_iter()
            .map(|r| r.member.to_string())
            .collect()
    }

    fn cluster(members: Vec<Member>) -> Topology {
        Topology {
            members,
            ..Topology::default()
        }
    }

    #[test]
    fn roles_map_to_ports() {
        let t = cluster(vec![
            member("n1", "leader", "running", None),
            member("n2", "sync_standby", "streaming", Some(0)),
            member("n3", "quorum_standby", "streaming", Some(0)),
            member("n4", "replica", "streaming", Some(0)),
            member("n5", "standby_leader", "streaming", None),
        ]);
        assert_eq!(names(&t, &filter(&[PortRole::Leader], None)), ["n1"]);
        assert_eq!(names(&t, &filter(&[PortRole::Sync], None)), ["n2", "n3"]);
        assert_eq!(names(&t, &filter(&[PortRole::Async], None)), ["n4"]);
        assert_eq!(names(&t, &filter(&[PortRole::StandbyLeader], None)), ["n5"]);
        assert_eq!(
            names(&t, &filter(&[PortRole::Any], None)),
            ["n1", "n2", "n3", "n4", "n5"]
        );
        assert_eq!(
            names(&t, &filter(&[PortRole::Sync, PortRole::Async], None)),
            ["n2", "n3", "n4"]
        );
    }

    #[test]
    fn states_by_role() {
        let t = cluster(vec![
            member("n1", "leader", "streaming", None),
            member("n2", "replica", "running", Some(0)),
            member("n3", "replica", "in archive recovery", Some(0)),
            member("n4", "replica", "stopped", None),
            member("n5", "replica", "starting", Some(0)),
            member("n6", "replica", "", Some(0)),
        ]);
        let any = filter(&[PortRole::Any], None);
        assert_eq!(names(&t, &any), ["n2", "n3"]);
        let leader = &t.members[0];
        assert_eq!(
            eligibility(&t, leader, &any),
            Err(Exclusion::State("streaming".into()))
        );
    }

    #[test]
    fn noloadbalance_skips_replicas_but_never_the_leader() {
        let mut t = cluster(vec![
            member("n1", "leader", "running", None),
            member("n2", "replica", "streaming", Some(0)),
        ]);
        t.members[0].noloadbalance = true;
        t.members[1].noloadbalance = true;
        assert_eq!(names(&t, &filter(&[PortRole::Any], None)), ["n1"]);
        assert_eq!(
            eligibility(&t, &t.members[1], &filter(&[PortRole::Async], None)),
            Err(Exclusion::NoLoadBalance)
        );
    }

    #[test]
    fn lag_limit_evicts_lagging_and_unknown_replicas() {
        let mut t = cluster(vec![
            member("n1", "leader", "running", None),
            member("n2", "replica", "streaming", Some(100)),
            member("n3", "replica", "streaming", Some(5000)),
            member("n4", "replica", "streaming", None),
        ]);
        let f = filter(&[PortRole::Any], Some(1000));
        assert_eq!(
            names(&t, &f),
            ["n1", "n2"],
            "the leader has no lag and is never evicted"
        );
        assert_eq!(
            eligibility(&t, &t.members[2], &f),
            Err(Exclusion::LagOver {
                lag: 5000,
                max: 1000
            })
        );
        assert_eq!(
            eligibility(&t, &t.members[3], &f),
            Err(Exclusion::LagUnknown)
        );
        // Without a limit lag does not matter.
        assert_eq!(
            names(&t, &filter(&[PortRole::Async], None)),
            ["n2", "n3", "n4"]
        );
        // replay_lag wins over lag when known.
        t.members[2].replay_lag = Some(10);
        t.members[1].replay_lag = Some(2000);
        assert_eq!(names(&t, &f), ["n1", "n3"]);
    }

    #[test]
    fn two_leaders_route_no_leader() {
        let t = cluster(vec![
            member("n1", "leader", "running", None),
            member("n2", "leader", "running", None),
            member("n3", "replica", "streaming", Some(0)),
        ]);
        assert!(t.split_brain());
        assert!(names(&t, &filter(&[PortRole::Leader], None)).is_empty());
        assert_eq!(names(&t, &filter(&[PortRole::Any], None)), ["n3"]);
        assert_eq!(t.leader(), None);
    }

    #[test]
    fn host_port_overrides_member_port() {
        let t = cluster(vec![member("n1", "leader", "running", None)]);
        let mut f = filter(&[PortRole::Leader], None);
        assert_eq!(routable(&t, &f)[0].addr, "127.0.0.1:5441".parse().unwrap());
        f.host_port = Some(6432);
        assert_eq!(routable(&t, &f)[0].addr, "127.0.0.1:6432".parse().unwrap());
        let mut t2 = t.clone();
        t2.members[0].ip = None;
        assert_eq!(
            eligibility(&t2, &t2.members[0], &f),
            Err(Exclusion::NoAddress)
        );
    }

    #[test]
    fn a_leader_without_timeline_is_draining() {
        let mut t = cluster(vec![
            member("n1", "leader", "running", None),
            member("n2", "replica", "streaming", Some(0)),
        ]);
        let f = filter(&[PortRole::Any], None);
        assert!(routable(&t, &f).iter().all(|r| !r.draining));
        // Patroni is demoting n1 (switchover): still leader, running, no timeline.
        t.members[0].timeline = None;
        t.members[1].timeline = None;
        let r = routable(&t, &f);
        assert_eq!(r.len(), 2, "still routable: its sessions are kept");
        assert!(r[0].draining, "but it takes no new clients");
        assert!(
            !r[1].draining,
            "replicas without a timeline are not draining"
        );
    }

    #[test]
    fn same_routing_ignores_lag_figures_only() {
        let t = cluster(vec![
            member("m1", "leader", "running", None),
            member("m2", "replica", "streaming", Some(10)),
        ]);
        let mut lagging = t.clone();
        lagging.members[1].lag = Some(99_999);
        lagging.members[1].replay_lag = Some(7);
        lagging.members[1].receive_lag = Some(3);
        assert!(same_routing(&t, &lagging));
        lagging.members[1].lag = None;
        assert!(
            same_routing(&t, &lagging),
            "unknown lag is still a lag figure"
        );
        lagging.maximum_lag_on_failover = Some(1);
        assert!(same_routing(&t, &lagging), "a health-check figure");

        let changes: [fn(&mut Topology); 8] = [
            |t| t.members[1].role = Role::SyncStandby,
            |t| t.members[1].state = "stopped".into(),
            |t| t.members[1].timeline = Some(9),
            |t| t.members[1].port = Some(6543),
            |t| t.members[1].noloadbalance = true,
            |t| {
                t.members[1].tags.push(Tag {
                    key: "nofailover".into(),
                    value: "true".into(),
                    truthy: true,
                })
            },
            |t| {
                t.members.pop();
            },
            |t| t.paused = true,
        ];
        for change in changes {
            let mut u = t.clone();
            change(&mut u);
            assert!(!same_routing(&t, &u), "{u:?}");
        }
    }

    #[test]
    fn diff_reports_failover() {
        let old = cluster(vec![
            member("n1", "leader", "running", None),
            member("n2", "replica", "streaming", Some(0)),
            member("n3", "replica", "streaming", Some(0)),
        ]);
        let new = cluster(vec![
            member("n2", "leader", "running", None),
            member("n3", "replica", "running", Some(0)),
            member("n4", "replica", "streaming", Some(0)),
        ]);
        let d = diff(Some(&old), &new);
        assert_eq!(
            d,
            vec![
                Change::LeaderChanged {
                    from: Some("n1".into()),
                    to: Some("n2".into())
                },
                Change::RoleChanged {
                    name: "n2".into(),
                    from: "replica".into(),
                    to: "leader".into()
                },
                Change::StateChanged {
                    name: "n2".into(),
                    from: "streaming".into(),
                    to: "running".into()
                },
                Change::StateChanged {
                    name: "n3".into(),
                    from: "streaming".into(),
                    to: "running".into()
                },
                Change::MemberAdded {
                    name: "n4".into(),
                    role: "replica".into(),
                    state: "streaming".into()
                },
                Change::MemberRemoved { name: "n1".into() },
            ]
        );
        assert!(diff(Some(&new), &new).is_empty());
        let first = diff(None, &old);
        assert_eq!(
            first[0],
            Change::LeaderChanged {
                from: None,
                to: Some("n1".into())
            }
        );
        assert_eq!(first.len(), 4);
    }

    #[test]
    fn unspecified_broadcast_and_multicast_hosts_are_not_routable() {
        let any = filter(&[PortRole::Any], None);
        for (ip, why) in [
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("::ffff:0.0.0.0", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
        ] {
            let mut m = member("n1", "leader", "running", None);
            m.ip = Some(ip.parse().unwrap());
            let t = cluster(vec![m.clone()]);
            let e = eligibility(&t, &m, &any).unwrap_err();
            assert!(matches!(e, Exclusion::Unroutable(..)), "{ip}: {e:?}");
            let shown = e.to_string();
            assert!(
                shown.starts_with(&format!("address {ip} is {why}")) || shown.contains(why),
                "{shown}"
            );
            assert!(routable(&t, &any).is_empty(), "{ip}");
        }
        let mut m = member("n1", "leader", "running", None);
        m.ip = Some("10.0.0.255".parse().unwrap());
        assert!(eligibility(&cluster(vec![m.clone()]), &m, &any).is_ok());
    }

    /// 60,000 members, half of them leaders: with the former nested scans
    /// (split brain per member, members matched by name in a list) this took
    /// minutes; linear it takes well under a second.
    #[test]
    fn per_topology_steps_are_linear_in_the_member_count() {
        let n = 60_000;
        let mk = |i: usize, role: &str| {
            let mut m = member("n1", role, "running", None);
            m.name = format!("m{i:06}");
            m
        };
        let t = cluster(
            (0..n)
                .map(|i| {
                    mk(
                        i,
                        if i == 0 || i >= n / 2 {
                            "leader"
                        } else {
                            "replica"
                        },
                    )
                })
                .collect(),
        );
        let mut old = t.clone();
        old.members.reverse();
        old.members[0].state = "stopped".into();
        let started = std::time::Instant::now();
        assert!(routable(&t, &filter(&[PortRole::Leader], None)).is_empty());
        assert_eq!(
            judge_all(&t, &filter(&[PortRole::Any], None))
                .filter(|(_, r)| r.is_ok())
                .count(),
            n / 2 - 1
        );
        let changes = diff(Some(&old), &t);
        assert_eq!(changes.len(), 1, "{:?}", &changes[..changes.len().min(3)]);
        let elapsed = started.elapsed();
        assert!(elapsed < std::time::Duration::from_secs(10), "{elapsed:?}");
    }

    #[test]
    fn diff_reports_split_brain_once() {
        let ok = cluster(vec![member("n1", "leader", "running", None)]);
        let two = cluster(vec![
            member("n1", "leader", "running", None),
            member("n2", "leader", "running", None),
        ]);
        assert_eq!(
            diff(Some(&ok), &two)[0],
            Change::SplitBrain {
                leaders: vec!["n1".into(), "n2".into()]
            }
        );
        assert!(!diff(Some(&two), &two)
            .iter()
            .any(|c| matches!(c, Change::SplitBrain { .. })));
        assert_eq!(
            diff(Some(&two), &ok)[0],
            Change::LeaderChanged {
                from: None,
                to: Some("n1".into())
            }
        );
    }

    #[test]
    fn least_connections_with_rotating_ties() {
        let all = |a: &u32| Some(*a);
        assert_eq!(pick_least(&[], 0, all), None);
        assert_eq!(pick_least(&[3, 1, 2], 0, all), Some(1));
        // Ties: the cursor decides, so sequential picks rotate.
        assert_eq!(pick_least(&[0, 0, 0], 0, all), Some(0));
        assert_eq!(pick_least(&[0, 0, 0], 1, all), Some(1));
        assert_eq!(pick_least(&[0, 0, 0], 5, all), Some(2));
        // Skipped candidates (already tried) are never picked.
        assert_eq!(
            pick_least(&[0, 5, 9], 0, |a| (*a != 0).then_some(*a)),
            Some(1)
        );
        assert_eq!(pick_least(&[0, 5], 0, |_| None), None);
    }
}

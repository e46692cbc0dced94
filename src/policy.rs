//! Per-port routing policy on top of the eligibility rules: lag with grace
//! and hysteresis, preference tiers among roles, and fallback roles.
//!
//! PURE: no sockets, no threads, and no clock of its own: the caller passes
//! `now` (the event loop's `Instant`, a fake one in tests).
//!
//! [`topology::eligibility`] says whether a member can serve a port at all
//! (role, split brain, state, `noloadbalance`, address). This module adds
//! the decisions that need memory or a view of the whole port, applied in
//! this order after those rules:
//!
//! 1. lag ([`LagTracker`]), on ports with `max_lag_in_bytes`, non-leaders
//!    only. Two separate decisions: a replica over the limit (or with
//!    unknown lag) takes no new clients at once; its open sessions are
//!    closed when it is still over the limit `lag_grace` seconds after that
//!    eviction, or at once over `max_lag_in_bytes_close`. It takes new
//!    clients again only after `lag_return_polls` consecutive polls at or
//!    under `lag_return_percent` of the limit. Each eviction, late close and
//!    return is reported once, as a [`LagEvent`].
//! 2. draining (a leader without timeline: see `topology`);
//! 3. preference: new clients go to the first tier that has a member taking
//!    new clients; a tier is a role listed in `prefer`, in that order, and
//!    then the port's other roles together. Least connections within it.
//! 4. fallback: only when no member of the port's own roles takes new
//!    clients, members of the `fallback` roles do. When the port's own roles
//!    come back, fallback members take no new clients, and their sessions
//!    are kept unless `fallback_return: close`.
//!
//! A member that is held (by lag, draining, preference or an idle fallback)
//! keeps its sessions and gets no new clients; one that is excluded loses
//! its sessions on the port. [`plan`] computes both sets for a port.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::topology::{self, Exclusion, Member, PortFilter, PortRole, Role, Topology};

/// Default `lag_return_percent`.
pub const DEFAULT_RETURN_PERCENT: u8 = 80;
/// Default `lag_return_polls`.
pub const DEFAULT_RETURN_POLLS: u32 = 3;

/// A port's lag rules, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagRules {
    /// `max_lag_in_bytes`: over it, no new clients.
    pub max: u64,
    /// `max_lag_in_bytes_close`: over it, sessions are closed at once.
    pub close_max: Option<u64>,
    /// `lag_grace`: how long sessions survive an eviction while the lag
    /// stays over `max`. Zero: closed with the eviction (the old behaviour).
    pub grace: Duration,
    /// At or under this many bytes a poll counts towards the return.
    pub return_mark: u64,
    /// Consecutive polls at or under `return_mark` needed to return.
    pub return_polls: u32,
}

impl LagRules {
    /// `return_percent` of `max`, rounded down.
    pub fn new(
        max: u64,
        close_max: Option<u64>,
        grace: Duration,
        return_percent: u8,
        return_polls: u32,
    ) -> LagRules {
        let mark = u128::from(max) * u128::from(return_percent.min(100)) / 100;
        LagRules {
            max,
            close_max,
            grace,
            return_mark: u64::try_from(mark).unwrap_or(max),
            return_polls: return_polls.max(1),
        }
    }

    fn over_hard(&self, lag: Lag) -> bool {
        matches!((lag, self.close_max), (Lag::Bytes(l), Some(c)) if l > c)
    }

    fn over(&self, lag: Lag) -> bool {
        match lag {
            Lag::Unknown => true,
            Lag::Bytes(l) => l > self.max,
        }
    }
}

/// What to do with sessions on a fallback member once the port's own roles
/// can take clients again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FallbackReturn {
    /// Keep them; only new clients move back (the default).
    #[default]
    Keep,
    /// Close them, so clients reconnect to the port's own roles.
    Close,
}

/// A port's policy beyond its eligibility filter, validated. The default
/// (no lag rules, no preference, no fallback) routes as before these rules
/// existed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PortPolicy {
    pub lag: Option<LagRules>,
    /// Roles in preference order; the port's other roles come after them.
    pub prefer: Vec<PortRole>,
    /// Roles used only when none of the port's roles takes new clients.
    pub fallback: Vec<PortRole>,
    pub fallback_return: FallbackReturn,
}

/// A preference tier: lower is preferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    /// Index into `prefer`, or `prefer.len()` for the port's other roles.
    Own(usize),
    Fallback,
}

impl PortPolicy {
    /// The tier of a member with Patroni role `role` on a port serving
    /// `roles`; `None` when the port does not serve it at all.
    pub fn tier(&self, roles: &[PortRole], role: &Role) -> Option<Tier> {
        if roles.iter().any(|r| r.accepts(role)) {
            let i = self.prefer.iter().position(|r| r.accepts(role));
            Some(Tier::Own(i.unwrap_or(self.prefer.len())))
        } else if self.fallback.iter().any(|r| r.accepts(role)) {
            Some(Tier::Fallback)
        } else {
            None
        }
    }
}

// ---------------------------------------------------------------------------
// Lag

/// A member's lag as one poll shows it, for the port's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lag {
    Bytes(u64),
    /// `"unknown"`, or no lag field at all.
    Unknown,
}

impl Lag {
    /// The lag of `m` the limit is checked against; `None` for a lock
    /// holder, whose lag is never limited.
    pub fn of(m: &Member) -> Option<Lag> {
        if m.role.is_lock_holder() {
            return None;
        }
        Some(m.effective_lag().map_or(Lag::Unknown, Lag::Bytes))
    }
}

impl fmt::Display for Lag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lag::Bytes(b) => write!(f, "{b}"),
            Lag::Unknown => f.write_str("unknown"),
        }
    }
}

/// What the lag rules allow a member now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LagVerdict {
    /// New clients and sessions.
    Routable,
    /// No new clients; open sessions kept (within `lag_grace`).
    Held,
    /// No new clients, and its sessions are to be closed.
    Closed,
}

/// Why sessions are closed for lag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCause {
    /// `lag_grace` is zero: closed with the eviction.
    AtOnce,
    /// Still over the limit `lag_grace` after the eviction.
    Grace(Duration),
    /// Over `max_lag_in_bytes_close`.
    HardLimit(u64),
}

/// A transition worth one log line and a counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LagEvent {
    /// Takes no new clients from now on; `close` when its sessions are
    /// closed at the same time.
    Evicted {
        member: String,
        lag: Lag,
        max: u64,
        close: Option<CloseCause>,
        grace: Duration,
    },
    /// Its sessions are closed, some time after the eviction.
    Closed {
        member: String,
        lag: Lag,
        max: u64,
        cause: CloseCause,
    },
    /// Takes new clients again.
    Returned {
        member: String,
        lag: u64,
        mark: u64,
        polls: u32,
    },
}

impl LagEvent {
    pub fn member(&self) -> &str {
        match self {
            LagEvent::Evicted { member, .. }
            | LagEvent::Closed { member, .. }
            | LagEvent::Returned { member, .. } => member,
        }
    }
}

fn over_text(lag: Lag, max: u64) -> String {
    match lag {
        Lag::Unknown => format!("lag unknown (limit {max} bytes)"),
        Lag::Bytes(b) => format!("lag {b} > {max} bytes"),
    }
}

fn cause_text(cause: CloseCause) -> String {
    match cause {
        CloseCause::AtOnce => "closing its sessions".into(),
        CloseCause::Grace(g) => {
            format!(
                "closing its sessions (lag_grace {} s over)",
                g.as_secs_f64()
            )
        }
        CloseCause::HardLimit(c) => {
            format!("closing its sessions (over max_lag_in_bytes_close {c})")
        }
    }
}

impl fmt::Display for LagEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LagEvent::Evicted {
                member,
                lag,
                max,
                close,
                grace,
            } => {
                let then = match close {
                    Some(c) => cause_text(*c),
                    None => format!(
                        "sessions kept for up to lag_grace {} s",
                        grace.as_secs_f64()
                    ),
                };
                write!(
                    f,
                    "member={member} evicted for lag: {}; no new clients, {then}",
                    over_text(*lag, *max)
                )
            }
            LagEvent::Closed {
                member,
                lag,
                max,
                cause,
            } => write!(
                f,
                "member={member} still over the lag limit: {}; {}",
                over_text(*lag, *max),
                cause_text(*cause)
            ),
            LagEvent::Returned {
                member,
                lag,
                mark,
                polls,
            } => write!(
                f,
                "member={member} back from lag eviction: lag {lag} <= {mark} bytes for {polls} polls; taking new clients"
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LagState {
    In,
    Out {
        since: Instant,
        closed: bool,
        /// Consecutive polls at or under the return mark.
        good: u32,
        /// When the last of them was counted.
        counted_at: Option<Instant>,
        /// The lag of the last poll.
        last: Lag,
    },
}

/// The lag state of one port's members, fed once per successful poll.
#[derive(Debug, Clone, Default)]
pub struct LagTracker {
    states: HashMap<String, LagState>,
    /// The least time between two polls that both count towards a return.
    spacing: Duration,
}

impl LagTracker {
    /// Every poll counts towards a return.
    pub fn new() -> LagTracker {
        LagTracker::default()
    }

    /// See [`LagTracker::with_interval`].
    pub fn set_interval(&mut self, interval: Duration) {
        self.spacing = interval * 3 / 4;
    }

    /// Polls count towards a return at most about once per `interval`
    /// (three quarters of it, for jitter), so the updater's faster polling
    /// after a change, which repeats the same Patroni figures, does not
    /// shorten the hysteresis.
    pub fn with_interval(interval: Duration) -> LagTracker {
        LagTracker {
            states: HashMap::new(),
            spacing: interval * 3 / 4,
        }
    }

    /// Feeds one poll. `readings` are the members the other rules allow
    /// (their state is updated); members in `present` but not in `readings`
    /// keep their state unchanged; any other member is forgotten, so a
    /// member that leaves the cluster starts afresh when it comes back.
    /// A member seen for the first time is routable unless over the limit.
    pub fn observe<'a>(
        &mut self,
        rules: &LagRules,
        now: Instant,
        readings: &[(&str, Lag)],
        present: impl IntoIterator<Item = &'a str>,
    ) -> Vec<LagEvent> {
        let present: Vec<&str> = present.into_iter().collect();
        self.states.retain(|name, _| {
            present.contains(&name.as_str()) || readings.iter().any(|(n, _)| n == name)
        });
        let mut events = Vec::new();
        for &(name, lag) in readings {
            let state = self.states.entry(name.to_string()).or_insert(LagState::In);
            if let Some(e) = step(rules, self.spacing, now, name, state, lag) {
                events.push(e);
            }
        }
        events
    }

    /// Closes the sessions of members whose grace ran out between polls;
    /// call it at [`LagTracker::next_deadline`].
    pub fn tick(&mut self, rules: &LagRules, now: Instant) -> Vec<LagEvent> {
        let mut events = Vec::new();
        for (name, state) in &mut self.states {
            if let LagState::Out {
                since,
                closed: closed @ false,
                last,
                ..
            } = state
            {
                if rules.over(*last) && now.duration_since(*since) >= rules.grace {
                    *closed = true;
                    events.push(LagEvent::Closed {
                        member: name.clone(),
                        lag: *last,
                        max: rules.max,
                        cause: CloseCause::Grace(rules.grace),
                    });
                }
            }
        }
        // One event per member at most, and a handful of members.
        crate::order::sort_short_by(&mut events, |a, b| a.member().cmp(b.member()));
        events
    }

    /// When the next grace runs out, if any member is held over the limit.
    pub fn next_deadline(&self, rules: &LagRules) -> Option<Instant> {
        self.states
            .values()
            .filter_map(|s| match s {
                LagState::Out {
                    since,
                    closed: false,
                    last,
                    ..
                } if rules.over(*last) => Some(*since + rules.grace),
                _ => None,
            })
            .min()
    }

    /// The verdict for `member`; unknown members are routable (the caller
    /// observes every member it routes before asking).
    pub fn verdict(&self, member: &str) -> LagVerdict {
        match self.states.get(member) {
            None | Some(LagState::In) => LagVerdict::Routable,
            Some(LagState::Out { closed: false, .. }) => LagVerdict::Held,
            Some(LagState::Out { closed: true, .. }) => LagVerdict::Closed,
        }
    }

    /// Members currently evicted for lag.
    pub fn evicted(&self) -> usize {
        self.states
            .values()
            .filter(|s| matches!(s, LagState::Out { .. }))
            .count()
    }
}

/// One poll for one member.
fn step(
    rules: &LagRules,
    spacing: Duration,
    now: Instant,
    name: &str,
    state: &mut LagState,
    lag: Lag,
) -> Option<LagEvent> {
    match state {
        LagState::In => {
            if !rules.over(lag) {
                return None;
            }
            let close = if rules.over_hard(lag) {
                Some(CloseCause::HardLimit(rules.close_max.unwrap_or(rules.max)))
            } else if rules.grace.is_zero() {
                Some(CloseCause::AtOnce)
            } else {
                None
            };
            *state = LagState::Out {
                since: now,
                closed: close.is_some(),
                good: 0,
                counted_at: None,
                last: lag,
            };
            Some(LagEvent::Evicted {
                member: name.to_string(),
                lag,
                max: rules.max,
                close,
                grace: rules.grace,
            })
        }
        LagState::Out {
            since,
            closed,
            good,
            counted_at,
            last,
        } => {
            *last = lag;
            if let Lag::Bytes(l) = lag {
                if l <= rules.return_mark {
                    if counted_at.is_none_or(|t| now.duration_since(t) >= spacing) {
                        *good += 1;
                        *counted_at = Some(now);
                    }
                    if *good >= rules.return_polls {
                        let polls = *good;
                        *state = LagState::In;
                        return Some(LagEvent::Returned {
                            member: name.to_string(),
                            lag: l,
                            mark: rules.return_mark,
                            polls,
                        });
                    }
                    return None;
                }
            }
            *good = 0;
            *counted_at = None;
            if *closed || !rules.over(lag) {
                return None;
            }
            let cause = if rules.over_hard(lag) {
                CloseCause::HardLimit(rules.close_max.unwrap_or(rules.max))
            } else if now.duration_since(*since) >= rules.grace {
                CloseCause::Grace(rules.grace)
            } else {
                return None;
            };
            *closed = true;
            Some(LagEvent::Closed {
                member: name.to_string(),
                lag,
                max: rules.max,
                cause,
            })
        }
    }
}

/// The filter `topology::eligibility` is asked with: the port's roles plus
/// its fallback roles, and no lag limit (lag is this module's business).
pub fn base_filter(filter: &PortFilter, policy: &PortPolicy) -> PortFilter {
    let mut roles = filter.roles.clone();
    roles.extend(policy.fallback.iter().copied());
    PortFilter {
        roles,
        host_port: filter.host_port,
        max_lag_in_bytes: None,
    }
}

/// Feeds one successful poll of `topo` to a port's tracker: members the
/// other rules allow are observed; the rest keep their state.
pub fn observe_poll(
    tracker: &mut LagTracker,
    rules: &LagRules,
    now: Instant,
    topo: &Topology,
    filter: &PortFilter,
    policy: &PortPolicy,
) -> Vec<LagEvent> {
    let base = base_filter(filter, policy);
    let readings: Vec<(&str, Lag)> = topo
        .members
        .iter()
        .filter(|m| topology::eligibility(topo, m, &base).is_ok())
        .filter_map(|m| Some((m.name.as_str(), Lag::of(m)?)))
        .collect();
    tracker.observe(
        rules,
        now,
        &readings,
        topo.members.iter().map(|m| m.name.as_str()),
    )
}

// ---------------------------------------------------------------------------
// The plan for a port

/// Why a routable member takes no new clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// A leader being demoted or restarted (see `topology`).
    Draining,
    /// Evicted for lag, sessions kept within `lag_grace`.
    Lag,
    /// A more preferred tier takes the new clients.
    Preference,
    /// A fallback member while the port's own roles take clients.
    FallbackIdle,
}

impl fmt::Display for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hold::Draining => "draining: a leader without timeline",
            Hold::Lag => "evicted for lag, sessions kept within lag_grace",
            Hold::Preference => "a preferred role takes the new clients",
            Hold::FallbackIdle => "fallback not in use",
        })
    }
}

/// Why a member's sessions on a port are closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// One of the eligibility rules.
    Rule(Exclusion),
    /// Evicted for lag, and its sessions closed.
    Lag,
    /// A fallback member with `fallback_return: close`, now that the
    /// port's own roles take clients.
    FallbackReturn,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Rule(x) => x.fmt(f),
            Reason::Lag => f.write_str("evicted for lag"),
            Reason::FallbackReturn => {
                f.write_str("fallback member, the port's roles are back (fallback_return: close)")
            }
        }
    }
}

impl Reason {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Reason::Rule(Exclusion::Role(_)) => "role",
            Reason::Rule(Exclusion::SplitBrain) => "split_brain",
            Reason::Rule(Exclusion::State(_)) => "state",
            Reason::Rule(Exclusion::NoLoadBalance) => "noloadbalance",
            Reason::Rule(Exclusion::LagUnknown | Exclusion::LagOver { .. }) | Reason::Lag => "lag",
            Reason::Rule(Exclusion::NoAddress | Exclusion::Unroutable(..)) => "address",
            Reason::FallbackReturn => "fallback_return",
        }
    }
}

/// A member that keeps its sessions on the port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRoute<'a> {
    pub member: &'a str,
    pub addr: SocketAddr,
    pub tier: Tier,
    /// `None`: it takes new clients.
    pub hold: Option<Hold>,
}

/// Which members of a cluster a port routes to, and how.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan<'a> {
    /// In member order.
    pub routes: Vec<PortRoute<'a>>,
    /// Members whose sessions on the port are to be closed, with why.
    pub excluded: Vec<(&'a str, Reason)>,
    /// New clients go to fallback members.
    pub fallback_active: bool,
}

impl Plan<'_> {
    /// Some member takes new clients.
    pub fn open(&self) -> bool {
        self.routes.iter().any(|r| r.hold.is_none())
    }
}

/// The plan for a port: every rule in the order of the module docs. With
/// the default [`PortPolicy`] and no lag limit it keeps what
/// `topology::routable` keeps, with `Hold::Draining` for `draining`.
pub fn plan<'a>(
    topo: &'a Topology,
    filter: &PortFilter,
    policy: &PortPolicy,
    lag: &LagTracker,
) -> Plan<'a> {
    let base = base_filter(filter, policy);
    let split_brain = topo.split_brain();
    let mut out = Plan::default();
    for m in &topo.members {
        let Some(tier) = policy.tier(&filter.roles, &m.role) else {
            out.excluded.push((
                &m.name,
                Reason::Rule(Exclusion::Role(m.role.as_str().into())),
            ));
            continue;
        };
        let addr = match topology::judge(split_brain, m, &base) {
            Ok(a) => a,
            Err(x) => {
                out.excluded.push((&m.name, Reason::Rule(x)));
                continue;
            }
        };
        let mut hold = None;
        if let (Some(rules), Some(reading)) = (policy.lag, Lag::of(m)) {
            // A member no poll has been fed for yet (a port added by a
            // reload) is judged by its lag as it stands.
            let verdict = match lag.states.contains_key(&m.name) {
                true => lag.verdict(&m.name),
                false if rules.over(reading) => LagVerdict::Closed,
                false => LagVerdict::Routable,
            };
            match verdict {
                LagVerdict::Routable => {}
                LagVerdict::Held => hold = Some(Hold::Lag),
                LagVerdict::Closed => {
                    out.excluded.push((&m.name, Reason::Lag));
                    continue;
                }
            }
        }
        if hold.is_none() && topology::is_draining(m) {
            hold = Some(Hold::Draining);
        }
        out.routes.push(PortRoute {
            member: &m.name,
            addr,
            tier,
            hold,
        });
    }
    let open_tier = |own: bool| {
        out.routes
            .iter()
            .filter(|r| r.hold.is_none() && (r.tier != Tier::Fallback) == own)
            .map(|r| r.tier)
            .min()
    };
    let active = open_tier(true).or_else(|| open_tier(false));
    out.fallback_active = active == Some(Tier::Fallback);
    let own_active = active.is_some() && !out.fallback_active;
    let mut kept = Vec::with_capacity(out.routes.len());
    for mut r in out.routes {
        if r.tier == Tier::Fallback && own_active && policy.fallback_return == FallbackReturn::Close
        {
            out.excluded.push((r.member, Reason::FallbackReturn));
            continue;
        }
        if r.hold.is_none() && Some(r.tier) != active {
            r.hold = Some(if r.tier == Tier::Fallback {
                Hold::FallbackIdle
            } else {
                Hold::Preference
            });
        }
        kept.push(r);
    }
    out.routes = kept;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn rules(max: u64, grace: u64, polls: u32) -> LagRules {
        LagRules::new(max, None, Duration::from_secs(grace), 80, polls)
    }

    /// A fake clock: poll `i` happens at `t0 + i * 3 s`.
    struct Clock(Instant);
    impl Clock {
        fn at(&self, secs: u64) -> Instant {
            self.0 + Duration::from_secs(secs)
        }
    }

    fn feed(t: &mut LagTracker, r: &LagRules, now: Instant, lag: Lag) -> Vec<LagEvent> {
        t.observe(r, now, &[("n2", lag)], ["n2"])
    }

    #[test]
    fn return_mark_is_a_share_of_the_limit() {
        assert_eq!(rules(1000, 0, 3).return_mark, 800);
        assert_eq!(
            LagRules::new(u64::MAX, None, Duration::ZERO, 100, 1).return_mark,
            u64::MAX
        );
        assert_eq!(LagRules::new(7, None, Duration::ZERO, 0, 0).return_polls, 1);
    }

    #[test]
    fn default_grace_closes_at_once_like_before() {
        let c = Clock(Instant::now());
        let r = rules(1000, 0, 1);
        let mut t = LagTracker::new();
        assert!(
            feed(&mut t, &r, c.at(0), Lag::Bytes(1000)).is_empty(),
            "at the limit is fine"
        );
        assert_eq!(t.verdict("n2"), LagVerdict::Routable);
        let e = feed(&mut t, &r, c.at(3), Lag::Bytes(1001));
        assert!(matches!(
            e[..],
            [LagEvent::Evicted {
                close: Some(CloseCause::AtOnce),
                ..
            }]
        ));
        assert_eq!(t.verdict("n2"), LagVerdict::Closed);
        // With 100 % and one poll it returns as soon as it is within the limit.
        let r = LagRules::new(1000, None, Duration::ZERO, 100, 1);
        let e = feed(&mut t, &r, c.at(6), Lag::Bytes(1000));
        assert!(matches!(e[..], [LagEvent::Returned { lag: 1000, .. }]));
        assert_eq!(t.verdict("n2"), LagVerdict::Routable);
    }

    #[test]
    fn grace_keeps_sessions_through_a_short_spike() {
        let c = Clock(Instant::now());
        let r = rules(1000, 30, 3);
        let mut t = LagTracker::new();
        feed(&mut t, &r, c.at(0), Lag::Bytes(10));
        let e = feed(&mut t, &r, c.at(3), Lag::Bytes(5000));
        assert!(
            matches!(e[..], [LagEvent::Evicted { close: None, .. }]),
            "{e:?}"
        );
        assert_eq!(t.verdict("n2"), LagVerdict::Held);
        assert_eq!(t.next_deadline(&r), Some(c.at(33)));
        // The spike ends: three good polls bring it back, sessions intact.
        for (i, s) in [6, 9].into_iter().enumerate() {
            assert!(
                feed(&mut t, &r, c.at(s), Lag::Bytes(100)).is_empty(),
                "poll {i}"
            );
            assert_eq!(t.verdict("n2"), LagVerdict::Held);
            assert_eq!(
                t.next_deadline(&r),
                None,
                "under the limit: no close pending"
            );
        }
        let e = feed(&mut t, &r, c.at(12), Lag::Bytes(100));
        assert!(matches!(
            e[..],
            [LagEvent::Returned {
                polls: 3,
                mark: 800,
                ..
            }]
        ));
        assert_eq!(t.verdict("n2"), LagVerdict::Routable);
        assert!(t.tick(&r, c.at(100)).is_empty());
    }

    #[test]
    fn grace_runs_out_at_a_poll_or_a_tick() {
        let c = Clock(Instant::now());
        let r = rules(1000, 10, 3);
        let mut t = LagTracker::new();
        feed(&mut t, &r, c.at(0), Lag::Bytes(5000));
        assert_eq!(t.verdict("n2"), LagVerdict::Held);
        assert!(feed(&mut t, &r, c.at(9), Lag::Unknown).is_empty());
        assert!(t.tick(&r, c.at(9)).is_empty());
        let e = t.tick(&r, c.at(10));
        assert!(matches!(
            e[..],
            [LagEvent::Closed {
                cause: CloseCause::Grace(_),
                lag: Lag::Unknown,
                ..
            }]
        ));
        assert_eq!(t.verdict("n2"), LagVerdict::Closed);
        assert!(t.tick(&r, c.at(11)).is_empty(), "reported once");
        assert!(feed(&mut t, &r, c.at(12), Lag::Bytes(5000)).is_empty());

        // Between the return mark and the limit at the end of the grace:
        // not over the limit, so sessions stay.
        let mut t = LagTracker::new();
        feed(&mut t, &r, c.at(0), Lag::Bytes(5000));
        feed(&mut t, &r, c.at(3), Lag::Bytes(900));
        assert!(t.tick(&r, c.at(20)).is_empty());
        assert!(feed(&mut t, &r, c.at(21), Lag::Bytes(900)).is_empty());
        assert_eq!(t.verdict("n2"), LagVerdict::Held);
        let e = feed(&mut t, &r, c.at(24), Lag::Bytes(1001));
        assert!(matches!(
            e[..],
            [LagEvent::Closed {
                cause: CloseCause::Grace(_),
                ..
            }]
        ));
    }

    #[test]
    fn hard_limit_closes_at_once() {
        let c = Clock(Instant::now());
        let r = LagRules::new(1000, Some(8000), Duration::from_secs(60), 80, 3);
        let mut t = LagTracker::new();
        let e = feed(&mut t, &r, c.at(0), Lag::Bytes(9000));
        assert!(matches!(
            e[..],
            [LagEvent::Evicted {
                close: Some(CloseCause::HardLimit(8000)),
                ..
            }]
        ));
        let mut t = LagTracker::new();
        feed(&mut t, &r, c.at(0), Lag::Bytes(2000));
        assert_eq!(t.verdict("n2"), LagVerdict::Held);
        assert!(
            feed(&mut t, &r, c.at(3), Lag::Bytes(8000)).is_empty(),
            "at the hard limit"
        );
        let e = feed(&mut t, &r, c.at(6), Lag::Bytes(8001));
        assert!(matches!(
            e[..],
            [LagEvent::Closed {
                cause: CloseCause::HardLimit(8000),
                ..
            }]
        ));
        // Unknown lag is over the limit, not over the hard limit.
        let mut t = LagTracker::new();
        let e = feed(&mut t, &r, c.at(0), Lag::Unknown);
        assert!(matches!(e[..], [LagEvent::Evicted { close: None, .. }]));
    }

    #[test]
    fn fast_polls_do_not_shorten_the_return() {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let r = rules(1000, 0, 3);
        let mut t = LagTracker::with_interval(Duration::from_secs(3));
        feed(&mut t, &r, ms(0), Lag::Bytes(5000));
        // Every 250 ms, as after a change: counted at 250, 2500 and 4750 ms.
        let mut back = None;
        for i in 1..40 {
            if !feed(&mut t, &r, ms(i * 250), Lag::Bytes(0)).is_empty() {
                back = Some(i * 250);
                break;
            }
        }
        assert_eq!(back, Some(4750));
        // A bad poll in between starts the count again.
        feed(&mut t, &r, ms(10_000), Lag::Bytes(5000));
        feed(&mut t, &r, ms(13_000), Lag::Bytes(0));
        feed(&mut t, &r, ms(16_000), Lag::Unknown);
        assert!(feed(&mut t, &r, ms(19_000), Lag::Bytes(0)).is_empty());
        assert!(feed(&mut t, &r, ms(22_000), Lag::Bytes(0)).is_empty());
        assert_eq!(feed(&mut t, &r, ms(25_000), Lag::Bytes(0)).len(), 1);
    }

    #[test]
    fn unknown_lag_never_counts_towards_a_return() {
        let c = Clock(Instant::now());
        let r = rules(1000, 0, 2);
        let mut t = LagTracker::new();
        feed(&mut t, &r, c.at(0), Lag::Unknown);
        for s in 1..10 {
            let lag = if s % 2 == 0 {
                Lag::Unknown
            } else {
                Lag::Bytes(0)
            };
            assert!(feed(&mut t, &r, c.at(s), lag).is_empty());
        }
        assert_eq!(t.verdict("n2"), LagVerdict::Closed);
    }

    #[test]
    fn members_are_forgotten_only_when_gone() {
        let c = Clock(Instant::now());
        let r = rules(1000, 0, 3);
        let mut t = LagTracker::new();
        t.observe(
            &r,
            c.at(0),
            &[("n2", Lag::Bytes(5000)), ("n3", Lag::Bytes(5000))],
            ["n2", "n3"],
        );
        // n2 is stopped (excluded by state): present, not observed, state kept.
        t.observe(&r, c.at(3), &[], ["n2"]);
        assert_eq!(t.verdict("n2"), LagVerdict::Closed);
        assert_eq!(
            t.verdict("n3"),
            LagVerdict::Routable,
            "left the cluster: forgotten"
        );
        assert_eq!(t.evicted(), 1);
    }

    /// A small deterministic generator for the property tests.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn a_lag_flapping_every_poll_is_evicted_once_and_returns_once() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for case in 0..500 {
            let max = 1 + rng.below(1 << 30);
            let polls = 2 + rng.below(5) as u32;
            let grace = rng.below(4) * 5;
            let close_max = (rng.below(2) == 0).then(|| max + rng.below(max));
            let r = LagRules::new(max, close_max, Duration::from_secs(grace), 80, polls);
            let c = Clock(Instant::now());
            let mut t = LagTracker::new();
            let mut events = Vec::new();
            let flaps = 1 + rng.below(200);
            let mut s = 0;
            // Over the limit (or unknown), then under the mark, every poll.
            for i in 0..flaps {
                let lag = if i % 2 == 0 {
                    if rng.below(4) == 0 {
                        Lag::Unknown
                    } else {
                        Lag::Bytes(max + 1 + rng.below(2 * max))
                    }
                } else {
                    Lag::Bytes(rng.below(r.return_mark + 1))
                };
                s += 1 + rng.below(3);
                events.extend(feed(&mut t, &r, c.at(s), lag));
                events.extend(t.tick(&r, c.at(s)));
            }
            // Then it settles under the mark.
            for _ in 0..polls {
                s += 3;
                events.extend(feed(&mut t, &r, c.at(s), Lag::Bytes(0)));
            }
            let count = |f: fn(&LagEvent) -> bool| events.iter().filter(|e| f(e)).count();
            assert_eq!(
                count(|e| matches!(e, LagEvent::Evicted { .. })),
                1,
                "case {case}: {events:?}"
            );
            assert_eq!(
                count(|e| matches!(e, LagEvent::Returned { .. })),
                1,
                "case {case}: {events:?}"
            );
            assert!(
                count(|e| matches!(e, LagEvent::Closed { .. })) <= 1,
                "case {case}"
            );
            assert_eq!(t.verdict("n2"), LagVerdict::Routable);
        }
    }

    #[test]
    fn any_lag_series_alternates_evictions_and_returns() {
        let mut rng = XorShift(42);
        for case in 0..300 {
            let max = 1000;
            let polls = 1 + rng.below(4) as u32;
            let r = LagRules::new(
                max,
                Some(3000),
                Duration::from_secs(rng.below(20)),
                80,
                polls,
            );
            let c = Clock(Instant::now());
            let mut t = LagTracker::new();
            let mut out = false;
            let mut closed = false;
            let mut good_run = 0;
            for i in 0..300 {
                let lag = match rng.below(10) {
                    0 => Lag::Unknown,
                    _ => Lag::Bytes(rng.below(4000)),
                };
                let events = feed(&mut t, &r, c.at(i * 3), lag);
                assert!(events.len() <= 1);
                good_run = match lag {
                    Lag::Bytes(l) if l <= r.return_mark => good_run + 1,
                    _ => 0,
                };
                match events.first() {
                    Some(LagEvent::Evicted { close, .. }) => {
                        assert!(!out, "case {case}: evicted twice");
                        out = true;
                        closed = close.is_some();
                        good_run = 0;
                    }
                    Some(LagEvent::Returned { .. }) => {
                        assert!(out, "case {case}: returned while in");
                        assert!(good_run >= polls as u64);
                        out = false;
                    }
                    Some(LagEvent::Closed { .. }) => {
                        assert!(out && !closed, "case {case}: closed twice");
                        closed = true;
                    }
                    None => {}
                }
                let want = match (out, closed) {
                    (false, _) => LagVerdict::Routable,
                    (true, false) => LagVerdict::Held,
                    (true, true) => LagVerdict::Closed,
                };
                assert_eq!(t.verdict("n2"), want, "case {case} poll {i}");
            }
        }
    }

    #[test]
    fn events_read_well() {
        let e = LagEvent::Evicted {
            member: "n2".into(),
            lag: Lag::Bytes(5000),
            max: 1000,
            close: None,
            grace: Duration::from_secs(30),
        };
        assert_eq!(
            e.to_string(),
            "member=n2 evicted for lag: lag 5000 > 1000 bytes; no new clients, sessions kept for up to lag_grace 30 s"
        );
        let e = LagEvent::Returned {
            member: "n2".into(),
            lag: 10,
            mark: 800,
            polls: 3,
        };
        assert!(e.to_string().contains("lag 10 <= 800 bytes for 3 polls"));
    }

    // ---- plan -------------------------------------------------------------

    fn member(name: &str, role: &str, lag: Option<u64>) -> Member {
        let n: u8 = name[1..].parse().unwrap();
        Member {
            name: name.into(),
            role: Role::parse(role),
            state: if role == "leader" {
                "running"
            } else {
                "streaming"
            }
            .into(),
            host: None,
            ip: Some(IpAddr::from([127, 0, 0, n])),
            port: Some(5432),
            timeline: Some(1),
            lag,
            replay_lag: None,
            receive_lag: None,
            noloadbalance: false,
            tags: Vec::new(),
        }
    }

    fn cluster(members: Vec<Member>) -> Topology {
        Topology {
            members,
            ..Topology::default()
        }
    }

    fn filter(roles: &[PortRole]) -> PortFilter {
        PortFilter {
            roles: roles.to_vec(),
            host_port: None,
            max_lag_in_bytes: None,
        }
    }

    fn open(p: &Plan) -> Vec<String> {
        p.routes
            .iter()
            .filter(|r| r.hold.is_none())
            .map(|r| r.member.to_string())
            .collect()
    }

    fn holds(p: &Plan) -> Vec<(String, Hold)> {
        p.routes
            .iter()
            .filter_map(|r| Some((r.member.to_string(), r.hold?)))
            .collect()
    }

    fn three() -> Topology {
        cluster(vec![
            member("n1", "leader", None),
            member("n2", "sync_standby", Some(0)),
            member("n3", "replica", Some(0)),
        ])
    }

    #[test]
    fn default_policy_keeps_what_routable_keeps() {
        let mut t = three();
        t.members[0].timeline = None;
        let f = filter(&[PortRole::Any]);
        let p = plan(&t, &f, &PortPolicy::default(), &LagTracker::new());
        let old = topology::routable(&t, &f);
        assert_eq!(p.routes.len(), old.len());
        for (a, b) in p.routes.iter().zip(&old) {
            assert_eq!((a.member, a.addr), (b.member, b.addr));
            assert_eq!(a.hold == Some(Hold::Draining), b.draining);
        }
        assert!(!p.fallback_active);
    }

    #[test]
    fn preference_sends_new_clients_to_the_first_tier_with_a_member() {
        let mut t = three();
        let f = filter(&[PortRole::Sync, PortRole::Async]);
        let pol = PortPolicy {
            prefer: vec![PortRole::Sync],
            ..PortPolicy::default()
        };
        let p = plan(&t, &f, &pol, &LagTracker::new());
        assert_eq!(open(&p), ["n2"]);
        assert_eq!(holds(&p), [("n3".into(), Hold::Preference)]);
        assert!(p.excluded.iter().any(|(m, _)| *m == "n1"));
        // No sync standby routable: async takes them, and no session is cut.
        t.members[1].state = "stopped".into();
        let p = plan(&t, &f, &pol, &LagTracker::new());
        assert_eq!(open(&p), ["n3"]);
        // Reversed preference.
        let t = three();
        let pol = PortPolicy {
            prefer: vec![PortRole::Async, PortRole::Sync],
            ..PortPolicy::default()
        };
        assert_eq!(open(&plan(&t, &f, &pol, &LagTracker::new())), ["n3"]);
    }

    #[test]
    fn fallback_only_when_no_own_member_takes_clients() {
        let mut t = three();
        let f = filter(&[PortRole::Async]);
        let pol = PortPolicy {
            fallback: vec![PortRole::Leader],
            ..PortPolicy::default()
        };
        let p = plan(&t, &f, &pol, &LagTracker::new());
        assert_eq!(open(&p), ["n3"]);
        assert_eq!(holds(&p), [("n1".into(), Hold::FallbackIdle)]);
        assert!(!p.fallback_active);
        t.members[2].noloadbalance = true;
        let p = plan(&t, &f, &pol, &LagTracker::new());
        assert_eq!(open(&p), ["n1"]);
        assert!(p.fallback_active);
        // Without a fallback, nothing takes clients (the old behaviour).
        assert!(!plan(&t, &f, &PortPolicy::default(), &LagTracker::new()).open());
        // fallback_return: close cuts the fallback's sessions once the
        // replica is back; by default they are kept.
        let t = three();
        let close = PortPolicy {
            fallback_return: FallbackReturn::Close,
            ..pol.clone()
        };
        let p = plan(&t, &f, &close, &LagTracker::new());
        assert_eq!(open(&p), ["n3"]);
        assert_eq!(
            p.excluded.iter().find(|(m, _)| *m == "n1").unwrap().1,
            Reason::FallbackReturn
        );
    }

    #[test]
    fn a_held_replica_turns_the_fallback_on_and_keeps_its_sessions() {
        let c = Clock(Instant::now());
        let mut t = three();
        t.members[2].lag = Some(5000);
        let f = filter(&[PortRole::Async]);
        let pol = PortPolicy {
            lag: Some(rules(1000, 30, 2)),
            fallback: vec![PortRole::Leader],
            ..PortPolicy::default()
        };
        let r = pol.lag.unwrap();
        let mut tr = LagTracker::new();
        let e = observe_poll(&mut tr, &r, c.at(0), &t, &f, &pol);
        assert_eq!(e.len(), 1, "only the replica is lag-limited: {e:?}");
        let p = plan(&t, &f, &pol, &tr);
        assert_eq!(open(&p), ["n1"]);
        assert_eq!(holds(&p), [("n3".into(), Hold::Lag)]);
        assert!(p.fallback_active);
        // Over the limit past the grace: its sessions go.
        observe_poll(&mut tr, &r, c.at(30), &t, &f, &pol);
        let p = plan(&t, &f, &pol, &tr);
        assert_eq!(
            p.excluded.iter().find(|(m, _)| *m == "n3").unwrap().1,
            Reason::Lag
        );
        assert_eq!(Reason::Lag.label(), "lag");
    }

    #[test]
    fn a_member_not_observed_yet_is_judged_by_its_lag() {
        let mut t = three();
        t.members[2].lag = Some(5000);
        let f = filter(&[PortRole::Async, PortRole::Sync]);
        let pol = PortPolicy {
            lag: Some(rules(1000, 30, 3)),
            ..PortPolicy::default()
        };
        let p = plan(&t, &f, &pol, &LagTracker::new());
        assert_eq!(open(&p), ["n2"]);
        assert_eq!(
            p.excluded.iter().find(|(m, _)| *m == "n3").unwrap().1,
            Reason::Lag
        );
    }

    #[test]
    fn tiers() {
        let pol = PortPolicy {
            prefer: vec![PortRole::Async],
            fallback: vec![PortRole::Leader],
            ..PortPolicy::default()
        };
        let roles = [PortRole::Sync, PortRole::Async];
        assert_eq!(pol.tier(&roles, &Role::Replica), Some(Tier::Own(0)));
        assert_eq!(pol.tier(&roles, &Role::QuorumStandby), Some(Tier::Own(1)));
        assert_eq!(pol.tier(&roles, &Role::Leader), Some(Tier::Fallback));
        assert_eq!(pol.tier(&roles, &Role::StandbyLeader), None);
        assert!(Tier::Own(5) < Tier::Fallback);
    }
}

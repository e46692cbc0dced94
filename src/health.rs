//! Patroni's health-check answers, derived from one `/cluster` poll.
//!
//! PURE: a request target in, a status code and a small JSON body out. The
//! event loop parses the HTTP request (or the agent-check line), finds the
//! cluster's last topology and its age, and asks [`decide`].
//!
//! The rules are Patroni's own (`api.py`, `do_GET`, `do_GET_readiness`,
//! `do_GET_liveness`), quirks included:
//! - paths match by substring, in Patroni's order: `standby_leader` /
//!   `standby-leader`, `leader`, `master` / `primary` / `read-write` (`/` is
//!   `/primary`), `replica`, `read-only` without `sync` or `quorum`,
//!   `health`; then the exact paths `/sync`, `/synchronous`, `/quorum`,
//!   `/async`, `/asynchronous`, `/read-only-quorum`, `/read-only-sync`,
//!   `/read-only-synchronous`; anything else is 503 (so `/standby` and
//!   `/sync/` are 503);
//! - the lock holder answers 200 on `/primary` whatever Postgres' state;
//! - `?lag=` takes Patroni's units (`B`, `kB`, `MB`, `GB`, `TB`, 1024-based,
//!   case-sensitive, `0x`/octal prefixes as strtol); a value Patroni cannot
//!   parse means "no limit";
//! - `?tag_<k>=<v>` applies only to a 200 that is not leader-type, and a tag
//!   the member lacks is 503; a query key given twice counts once (the first),
//!   and an empty value is no parameter at all (Python's `parse_qs`);
//! - `GET /liveness` and `GET /readiness` have their own rules; `HEAD` and
//!   `OPTIONS` on them fall to the generic check, which answers 503;
//! - `/readiness` without `lag=` compares with the cluster's
//!   `maximum_lag_on_failover`, which the updater reads from `GET /config`
//!   ([`maximum_lag_on_failover`]), 1 MiB while unknown.
//!
//! What `/cluster` cannot show is approximated, and man 5 lists it:
//! `?replication_state=` follows Patroni 4.2 (earlier releases ignore it);
//! Patroni 3.x answers `/quorum` with 503 and treats `/read-only-quorum` as
//! `/read-only` ([`Dialect`] is inferred from the answer's shape);
//! `/liveness` is 200 while the member is listed; lag is the `replay_lag`
//! (or `lag`) Patroni published, at most one `loop_wait` old.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use crate::topology::{is_draining, Member, Role, Topology};

/// Patroni's default `maximum_lag_on_failover` (1 MiB).
pub const DEFAULT_MAXIMUM_LAG_ON_FAILOVER: i64 = 1 << 20;
/// Longest agent-check line read.
pub const MAX_AGENT_LINE: usize = 1024;

/// The request methods a health check may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Options,
}

impl Method {
    pub fn parse(s: &str) -> Option<Method> {
        match s {
            "GET" => Some(Method::Get),
            "HEAD" => Some(Method::Head),
            "OPTIONS" => Some(Method::Options),
            _ => None,
        }
    }

    /// Patroni sends a body only on `GET`.
    pub fn has_body(self) -> bool {
        self == Method::Get
    }
}

/// Which member a check is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `/<cluster>/<member>/<endpoint>`.
    Member { cluster: String, member: String },
    /// `/<endpoint>`: the member this proxy stands beside.
    Local,
}

/// Patroni's query parameters, as `parse_qs` leaves them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Query {
    /// `lag=` as Patroni parses it; `None` when absent or unparsable.
    pub lag: Option<i64>,
    pub mode: Option<String>,
    pub replication_state: Option<String>,
    /// `tag_<key>=<value>` in query order, key without the prefix.
    pub tags: Vec<(String, String)>,
}

/// A parsed check request.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub target: Target,
    /// The endpoint path as Patroni would see it (`/replica`, `/`).
    pub endpoint: String,
    pub query: Query,
}

/// Parses a request target: `/<cluster>/<member>/<endpoint>?query` when
/// the first segment names a configured cluster (`is_cluster`), else the
/// local form `/<endpoint>?query` (an endpoint may have more segments:
/// Patroni matches paths by substring).
pub fn parse_target(target: &str, is_cluster: impl Fn(&str) -> bool) -> Result<Check, String> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, q),
        None => (target, ""),
    };
    if !path.starts_with('/') {
        return Err(format!("the path {path:?} does not start with /"));
    }
    let mut parts = path[1..].splitn(3, '/');
    let first = percent_decode(parts.next().unwrap_or(""));
    // A known cluster, or three segments (an unknown cluster: 404).
    let member_form = is_cluster(&first) || path[1..].splitn(3, '/').count() == 3;
    let (target, endpoint) = if member_form {
        let member = percent_decode(parts.next().unwrap_or(""));
        if member.is_empty() {
            return Err(format!("{path:?}: expected /{first}/<member>/<endpoint>"));
        }
        let endpoint = format!("/{}", parts.next().unwrap_or(""));
        (
            Target::Member {
                cluster: first,
                member,
            },
            endpoint,
        )
    } else {
        (Target::Local, path.to_string())
    };
    Ok(Check {
        target,
        endpoint,
        query: parse_query(query),
    })
}

/// Python's `parse_qs(query)` reduced to what Patroni reads: the first value
/// of each key; pairs without `=` or with an empty value are dropped.
pub fn parse_query(query: &str) -> Query {
    let mut q = Query::default();
    let mut seen: Vec<String> = Vec::new();
    for pair in query.split('&') {
        let Some((k, v)) = pair.split_once('=') else {
            continue;
        };
        if v.is_empty() {
            continue;
        }
        let k = percent_decode(&k.replace('+', " "));
        let v = percent_decode(&v.replace('+', " "));
        if seen.contains(&k) {
            continue;
        }
        seen.push(k.clone());
        if let Some(tag) = k.strip_prefix("tag_") {
            q.tags.push((tag.to_string(), v));
            continue;
        }
        match k.as_str() {
            "lag" => q.lag = parse_size(&v),
            "mode" => q.mode = Some(v),
            "replication_state" => q.replication_state = Some(v),
            _ => {}
        }
    }
    q
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Patroni's `parse_int(value, 'B')`: strtol (hex, octal, decimal prefixes),
/// a float when the rest starts with `.`/`e`, then an optional
/// case-sensitive unit `B`, `kB`, `MB`, `GB`, `TB`, rounded to the next
/// smaller unit as PostgreSQL does. `None` where Patroni gets `None`.
pub fn parse_size(value: &str) -> Option<i64> {
    let (val, unit) = number(value)?;
    if unit.is_empty() {
        return Some(rint(val) as i64);
    }
    let (mult, round): (f64, f64) = match unit {
        "B" => (1.0, 1.0),
        "kB" => (1024.0, 1.0),
        "MB" => (1048576.0, 1024.0),
        "GB" => (1073741824.0, 1048576.0),
        "TB" => (1099511627776.0, 1073741824.0),
        _ => return None,
    };
    let bytes = rint(val * mult / round) * round;
    Some(rint(bytes) as i64)
}

/// `maximum_lag_on_failover` from a `GET /config` body (the cluster's
/// dynamic configuration, as stored in the DCS), read as Patroni's
/// `global_config.get_int` does: a number, or a string its `parse_int`
/// reads without a unit (`"2097152"`, `"0x200000"`; `"16MB"` is not one);
/// no key or anything else is the 1 MiB default. Only a body that is not a
/// JSON object is an error.
pub fn maximum_lag_on_failover(body: &[u8]) -> Result<i64, String> {
    let doc: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let obj = doc.as_object().ok_or("not a JSON object")?;
    let value = match obj.get("maximum_lag_on_failover") {
        Some(serde_json::Value::Number(n)) => parse_int(&n.to_string()),
        Some(serde_json::Value::String(s)) => parse_int(s),
        _ => None,
    };
    Ok(value.unwrap_or(DEFAULT_MAXIMUM_LAG_ON_FAILOVER))
}

/// Patroni's `parse_int(value)` without a base unit (how its global
/// configuration reads integers): as [`parse_size`], but a value with any
/// unit at all is `None`.
pub fn parse_int(value: &str) -> Option<i64> {
    match number(value)? {
        (val, "") => Some(rint(val) as i64),
        _ => None,
    }
}

/// The number at the start of `value` (strtol, or strtod when the rest
/// starts with `.`/`e`), and the trimmed rest.
fn number(value: &str) -> Option<(f64, &str)> {
    let v = value.trim();
    let (mut val, mut unit) = strtol(v);
    if val.is_none() && unit.starts_with('.') || unit.starts_with(['.', 'e', 'E']) {
        (val, unit) = strtod(v);
    }
    Some((val?, unit.trim()))
}

/// strtol with base 0 on a trimmed string: (value, rest).
fn strtol(v: &str) -> (Option<f64>, &str) {
    let b = v.as_bytes();
    let sign_len = usize::from(matches!(b.first(), Some(b'+' | b'-')));
    let neg = b.first() == Some(&b'-');
    let digits = &v[sign_len..];
    let signed = |n: f64| if neg { -n } else { n };
    if let Some(h) = digits.strip_prefix("0x") {
        let n = h.bytes().take_while(u8::is_ascii_hexdigit).count();
        if n > 0 {
            let x = u64::from_str_radix(&h[..n], 16).map_or(f64::MAX, |x| x as f64);
            return (Some(signed(x)), &h[n..]);
        }
    }
    if let Some(o) = digits.strip_prefix('0') {
        let n = o.bytes().take_while(|c| (b'0'..=b'7').contains(c)).count();
        let x = u64::from_str_radix(if n == 0 { "0" } else { &o[..n] }, 8)
            .map_or(f64::MAX, |x| x as f64);
        return (Some(signed(x)), &o[n..]);
    }
    let n = digits.bytes().take_while(u8::is_ascii_digit).count();
    if n == 0 {
        return (None, v);
    }
    let x = digits[..n].parse::<f64>().unwrap_or(f64::MAX);
    (Some(signed(x)), &digits[n..])
}

/// strtod as Patroni's `DBL_RE`: `[-+]?[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?`.
fn strtod(v: &str) -> (Option<f64>, &str) {
    let b = v.as_bytes();
    let mut i = usize::from(matches!(b.first(), Some(b'+' | b'-')));
    let int_end = i + b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
    let mut end = int_end;
    if b.get(int_end) == Some(&b'.') {
        let frac = b[int_end + 1..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if frac > 0 {
            end = int_end + 1 + frac;
        }
    }
    if end == i {
        return (None, v);
    }
    i = end;
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let mut j = i + 1;
        if matches!(b.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        let n = b[j.min(b.len())..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if n > 0 {
            end = j + n;
        }
    }
    (v[..end].parse().ok(), &v[end..])
}

/// Python's round-half-even, as Patroni's `rint`.
fn rint(x: f64) -> f64 {
    let r = x.round();
    if (r - x).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// Which Patroni release's rules apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Before 4.0: no quorum paths, `/readiness` is "running".
    V3,
    /// 4.1 and later (4.0 is answered as 4.1).
    V4,
}

impl Dialect {
    /// From the answer's shape: quorum roles or the 4.1 LSN fields mean 4.x,
    /// no `scope` key means before 3.2; a cluster that shows neither is
    /// answered as the newest release.
    pub fn of(t: &Topology) -> Dialect {
        if t.lsn_fields || t.members.iter().any(|m| m.role == Role::QuorumStandby) {
            Dialect::V4
        } else if t.scope.is_none() {
            Dialect::V3
        } else {
            Dialect::V4
        }
    }
}

/// A cluster as the loop holds it.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    /// The last good poll's topology (`None` before the first).
    pub topology: Option<&'a Topology>,
    /// How long ago the last good poll was.
    pub age: Duration,
    /// `topology_ttl`; `None` when staleness is not checked.
    pub ttl: Option<Duration>,
}

impl View<'_> {
    /// Why the topology cannot be trusted, if it cannot.
    pub fn stale(&self) -> Option<String> {
        match (self.topology, self.ttl) {
            (None, _) => Some("no successful /cluster poll yet".into()),
            (Some(_), Some(ttl)) if self.age > ttl => Some(format!(
                "topology is stale: last good poll {:.1} s ago, topology_ttl {} s",
                self.age.as_secs_f64(),
                ttl.as_secs_f64()
            )),
            _ => None,
        }
    }
}

/// The answer to one check.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    /// Why a 503 (or 404), empty on 200.
    pub reason: String,
    /// A 200 for a leader that takes no new clients (agent `drain`).
    pub draining: bool,
    /// The JSON body for `GET`.
    pub body: String,
}

impl Answer {
    /// The agent-check reply line: `up ready`, `drain` or `down #reason`.
    /// `ready` cancels a `drain` sent earlier (HAProxy keeps an agent's
    /// administrative state until the agent itself changes it).
    pub fn agent_line(&self) -> String {
        if self.status == 200 && self.draining {
            "drain\n".to_string()
        } else if self.status == 200 {
            "up ready\n".to_string()
        } else {
            let reason: String = self
                .reason
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            format!("down #{reason}\n")
        }
    }
}

/// The answer for `check` on `member` of a cluster (`None`: unknown
/// cluster).
pub fn decide(
    method: Method,
    endpoint: &str,
    query: &Query,
    cluster: &str,
    member: &str,
    view: Option<&View>,
) -> Answer {
    let mut body = Body::new(cluster, member, endpoint);
    let Some(view) = view else {
        return body.finish(404, "no such cluster".into(), false);
    };
    body.age(view);
    if let Some(why) = view.stale() {
        return body.finish(503, why, false);
    }
    let topo = view.topology.expect("not stale");
    let Some(m) = topo.member(member) else {
        return body.finish(503, "member not in the last /cluster answer".into(), false);
    };
    body.member(m);
    let (status, reason) = rule(method, endpoint, query, topo, m);
    let draining = status == 200 && is_draining(m);
    body.finish(status, reason, draining)
}

/// The first segment's own GET handlers in Patroni that are not health
/// checks (we do not serve their documents).
const NOT_CHECKS: &[&str] = &[
    "patroni", "cluster", "history", "config", "metrics", "failsafe",
];

fn rule(method: Method, path: &str, q: &Query, t: &Topology, m: &Member) -> (u16, String) {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    if method == Method::Get {
        match first {
            "liveness" => return (200, String::new()),
            "readiness" => return readiness(q, t, m),
            f if NOT_CHECKS.contains(&f) => {
                return (404, format!("/{f} is not a health check; ask Patroni"))
            }
            _ => {}
        }
    }
    generic(path, q, t, m)
}

/// Postgres is up, as Patroni's SQL `state == running` (from `/cluster`,
/// where a replica's state is its replication state).
fn pg_running(m: &Member) -> bool {
    match m.role {
        Role::Leader => m.state == "running",
        _ => matches!(
            m.state.as_str(),
            "running" | "streaming" | "in archive recovery"
        ),
    }
}

fn replication_state(m: &Member) -> Option<&str> {
    matches!(m.state.as_str(), "streaming" | "in archive recovery").then_some(m.state.as_str())
}

/// `/readiness` (GET only).
fn readiness(q: &Query, t: &Topology, m: &Member) -> (u16, String) {
    if holds_lock(t, m) {
        return (200, String::new());
    }
    if !pg_running(m) {
        return (503, "PostgreSQL is not running".into());
    }
    if Dialect::of(t) == Dialect::V3 {
        return (200, String::new());
    }
    if replication_state(m) != Some("streaming") {
        return (503, "PostgreSQL replication state is not streaming".into());
    }
    let write = q.mode.as_deref() == Some("write");
    let lag = if write { m.receive_lag } else { m.replay_lag }.or(m.lag);
    let max = q.lag.unwrap_or_else(|| {
        t.maximum_lag_on_failover
            .unwrap_or(DEFAULT_MAXIMUM_LAG_ON_FAILOVER)
    });
    let mode = if write { "write" } else { "apply" };
    match lag {
        None => (503, format!("replication {mode} lag unknown")),
        Some(l) if i128::from(l) > i128::from(max) => (
            503,
            format!("replication {mode} lag {l} exceeds maximum allowable {max}"),
        ),
        Some(_) => (200, String::new()),
    }
}

fn holds_lock(t: &Topology, m: &Member) -> bool {
    m.role.is_lock_holder() && !(m.role == Role::Leader && t.split_brain())
}

/// Patroni's generic `do_GET` (also `HEAD` and `OPTIONS` on any path).
fn generic(path: &str, q: &Query, t: &Topology, m: &Member) -> (u16, String) {
    let path = if path == "/" { "/primary" } else { path };
    let lock = holds_lock(t, m);
    let primary = lock && m.role == Role::Leader;
    let standby_leader = lock && m.role == Role::StandbyLeader;
    let replica = replica_ok(q, m);
    let no = |why: &str| (503, why.to_string());
    let role = m.role.as_str();
    let leader_why = || {
        if m.role == Role::Leader && t.split_brain() {
            "more than one leader reported".to_string()
        } else {
            format!("role {role}")
        }
    };
    let v3 = Dialect::of(t) == Dialect::V3;
    let is_sync = m.role == Role::SyncStandby;
    let is_quorum = m.role == Role::QuorumStandby;
    let has = |s: &str| path.contains(s);
    let (status, reason) = if has("standby_leader") || has("standby-leader") {
        return if standby_leader {
            (200, String::new())
        } else {
            (503, leader_why())
        };
    } else if has("leader") {
        return if lock {
            (200, String::new())
        } else {
            (503, leader_why())
        };
    } else if has("master") || has("primary") || has("read-write") {
        return if primary {
            (200, String::new())
        } else {
            (503, leader_why())
        };
    } else if has("replica") {
        replica
    } else if has("read-only") && !has("sync") && (v3 || !has("quorum")) {
        if primary || standby_leader {
            (200, String::new())
        } else {
            replica
        }
    } else if has("health") {
        if pg_running(m) {
            (200, String::new())
        } else {
            (503, format!("state {:?}", m.state))
        }
    } else {
        match path {
            "/sync" | "/synchronous" if is_sync => replica,
            "/sync" | "/synchronous" => no(&format!("role {role}, not sync_standby")),
            "/quorum" if is_quorum && !v3 => replica,
            "/quorum" => no(&format!("role {role}, not quorum_standby")),
            "/async" | "/asynchronous" if !is_sync && !is_quorum => replica,
            "/async" | "/asynchronous" => no(&format!("role {role}, not asynchronous")),
            "/read-only-quorum" if !v3 && (primary || standby_leader) => (200, String::new()),
            "/read-only-quorum" if !v3 && is_quorum => replica,
            "/read-only-quorum" => no(&format!("role {role}")),
            "/read-only-sync" | "/read-only-synchronous" if primary || standby_leader => {
                (200, String::new())
            }
            "/read-only-sync" | "/read-only-synchronous" if is_sync => replica,
            "/read-only-sync" | "/read-only-synchronous" => no(&format!("role {role}")),
            _ => no(&format!("{path} is not a Patroni health check")),
        }
    };
    if status != 200 {
        return (status, reason);
    }
    for (key, want) in &q.tags {
        match m.tags.iter().find(|t| t.key == *key) {
            None => return (503, format!("no tag {key}")),
            Some(t) if t.value != *want => {
                return (503, format!("tag {key} is {:?}, not {want:?}", t.value))
            }
            Some(_) => {}
        }
    }
    (200, String::new())
}

/// Patroni's `replica_status_code`.
fn replica_ok(q: &Query, m: &Member) -> (u16, String) {
    if !matches!(
        m.role,
        Role::Replica | Role::SyncStandby | Role::QuorumStandby
    ) {
        return (503, format!("role {}, not a replica", m.role.as_str()));
    }
    if m.tags.iter().any(|t| t.key == "noloadbalance" && t.truthy) {
        return (503, "tagged noloadbalance".into());
    }
    if let Some(max) = q.lag {
        match m.effective_lag() {
            None => return (503, "lag unknown".into()),
            Some(l) if i128::from(l) > i128::from(max) => {
                return (503, format!("lag {l} > {max} bytes"))
            }
            Some(_) => {}
        }
    }
    if !pg_running(m) {
        return (503, format!("state {:?}", m.state));
    }
    if let Some(want) = &q.replication_state {
        if replication_state(m) != Some(want.as_str()) {
            return (503, format!("replication state is not {want:?}"));
        }
    }
    (200, String::new())
}

/// The JSON body, built field by field.
struct Body {
    json: String,
}

impl Body {
    fn new(cluster: &str, member: &str, endpoint: &str) -> Body {
        let mut json = String::with_capacity(256);
        json.push('{');
        push_field(&mut json, "cluster", cluster);
        push_field(&mut json, "member", member);
        push_field(&mut json, "check", endpoint);
        Body { json }
    }

    fn age(&mut self, v: &View) {
        if v.topology.is_some() {
            let _ = write!(
                self.json,
                ",\"poll_age_seconds\":{:.3}",
                v.age.as_secs_f64()
            );
        }
        if let Some(ttl) = v.ttl {
            let _ = write!(self.json, ",\"topology_ttl_seconds\":{}", ttl.as_secs_f64());
        }
    }

    fn member(&mut self, m: &Member) {
        push_field(&mut self.json, "role", m.role.as_str());
        push_field(&mut self.json, "state", &m.state);
        let mut num = |k: &str, v: Option<u64>| {
            let _ = match v {
                Some(n) => write!(self.json, ",\"{k}\":{n}"),
                None => write!(self.json, ",\"{k}\":null"),
            };
        };
        num("timeline", m.timeline);
        num("lag", m.lag);
        num("replay_lag", m.replay_lag);
        num("receive_lag", m.receive_lag);
    }

    fn finish(mut self, status: u16, reason: String, draining: bool) -> Answer {
        let _ = write!(self.json, ",\"status\":{status}");
        if draining {
            self.json.push_str(",\"draining\":true");
        }
        if !reason.is_empty() {
            push_field(&mut self.json, "reason", &reason);
        }
        self.json.push_str("}\n");
        Answer {
            status,
            reason,
            draining,
            body: self.json,
        }
    }
}

fn push_field(out: &mut String, key: &str, value: &str) {
    if !out.ends_with('{') {
        out.push(',');
    }
    let _ = write!(out, "\"{key}\":");
    out.push_str(&serde_json::Value::from(value).to_string());
}

/// The member a `/<endpoint>` check is about: the one named in the config,
/// else the only member (of every cluster) whose host is the local address
/// the check connected to. `Err((status, why))` otherwise.
pub fn local_member<'a>(
    configured: Option<(&'a str, &'a str)>,
    local: IpAddr,
    clusters: impl IntoIterator<Item = (&'a str, Option<&'a Topology>)>,
) -> Result<(String, String), (u16, String)> {
    if let Some((c, m)) = configured {
        return Ok((c.to_string(), m.to_string()));
    }
    let mut found = Vec::new();
    for (cluster, topo) in clusters {
        for m in topo.map(|t| t.members.as_slice()).unwrap_or_default() {
            let same = m.ip == Some(local)
                || m.host.as_deref().and_then(|h| h.parse::<IpAddr>().ok()) == Some(local);
            if same {
                found.push((cluster.to_string(), m.name.clone()));
            }
        }
    }
    match found.len() {
        0 => Err((
            503,
            format!("no member's host is {local}, the address this check connected to"),
        )),
        1 => Ok(found.pop().expect("one")),
        _ => Err((
            400,
            format!(
                "ambiguous: {} members have host {local} ({}); use /<cluster>/<member>/<endpoint> \
                 or name the member in health.member",
                found.len(),
                found
                    .iter()
                    .map(|(c, m)| format!("{c}/{m}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// Parses one agent-check line (`/demo/node1/primary`, from `agent-send`).
pub fn parse_agent_line(line: &[u8], is_cluster: impl Fn(&str) -> bool) -> Result<Check, String> {
    let text = std::str::from_utf8(line).map_err(|_| "the line is not UTF-8".to_string())?;
    let text = text.trim();
    if text.is_empty() {
        return Err("empty line; set agent-send \"/<cluster>/<member>/<endpoint>\\n\"".into());
    }
    parse_target(text, is_cluster)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::patroni;

    fn fixture(name: &str) -> Topology {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        patroni::parse(&std::fs::read(&path).unwrap())
            .unwrap()
            .topology
    }

    fn code(t: &Topology, member: &str, target: &str) -> u16 {
        code_m(t, member, Method::Get, target)
    }

    fn code_m(t: &Topology, member: &str, method: Method, target: &str) -> u16 {
        let c = parse_target(&format!("/c/{member}{target}"), |c| c == "c").unwrap();
        let view = View {
            topology: Some(t),
            age: Duration::from_secs(1),
            ttl: Some(Duration::from_secs(30)),
        };
        decide(method, &c.endpoint, &c.query, "c", member, Some(&view)).status
    }

    /// One row per member: the codes for these endpoints.
    const PATHS: &[&str] = &[
        "/",
        "/primary",
        "/leader",
        "/standby-leader",
        "/replica",
        "/read-only",
        "/sync",
        "/quorum",
        "/async",
        "/read-only-sync",
        "/read-only-quorum",
        "/health",
        "/liveness",
        "/readiness",
    ];

    fn matrix(t: &Topology) -> Vec<String> {
        t.members
            .iter()
            .map(|m| {
                let codes: Vec<String> = PATHS
                    .iter()
                    .map(|p| (code(t, &m.name, p) / 100).to_string())
                    .collect();
                format!("{} {}", m.name, codes.join(""))
            })
            .collect()
    }

    #[test]
    fn patroni_4_async_cluster() {
        // paths:           / p l s r ro sy q as ros roq h li re
        let t = fixture("patroni-4.1.5/normal.json");
        assert_eq!(
            matrix(&t),
            [
                "node1 22255255522222",
                "node2 55552255255222",
                "node3 55552255255222"
            ]
        );
    }

    #[test]
    fn patroni_4_sync_and_quorum() {
        let t = fixture("patroni-4.1.5/sync_on.json");
        let rows = matrix(&t);
        assert_eq!(rows[0], "node1 22255255522222");
        assert_eq!(rows[1], "node2 55552255255222", "async");
        assert_eq!(rows[2], "node3 55552225525222", "sync");
        let t = fixture("patroni-4.1.5/sync_quorum.json");
        // Quorum standbys answer 503 on /sync and /read-only-sync (Patroni
        // reads the sync_standby flag there).
        assert_eq!(matrix(&t)[1], "node2 55552252552222");
        assert_eq!(matrix(&t)[0], "node1 22255255522222");
    }

    #[test]
    fn patroni_3_rules() {
        let t = fixture("patroni-3.0.2/sync_on.json");
        assert_eq!(Dialect::of(&t), Dialect::V3);
        let rows = matrix(&t);
        // 3.x: no /quorum; /read-only-quorum is /read-only; readiness is
        // "running".
        assert_eq!(rows[0], "node1 22255255522222");
        assert_eq!(rows[1], "node2 55552225522222", "sync");
        assert_eq!(rows[2], "node3 55552255252222", "async");
    }

    #[test]
    fn stopped_replica() {
        let t = fixture("patroni-4.1.5/replica_stopped.json");
        assert_eq!(matrix(&t)[2], "node3 55555555555525");
        let t = fixture("patroni-3.0.2/replica_stopped.json");
        assert_eq!(matrix(&t)[2], "node3 55555555555525");
        // Gone from /cluster after the member key's ttl.
        let t = fixture("patroni-4.1.5/replica_stopped_after_ttl.json");
        assert_eq!(code(&t, "node3", "/health"), 503);
        assert_eq!(code(&t, "node3", "/liveness"), 503);
    }

    #[test]
    fn head_and_options_on_liveness_and_readiness_are_generic() {
        let t = fixture("patroni-4.1.5/normal.json");
        for m in [Method::Head, Method::Options] {
            assert_eq!(code_m(&t, "node1", m, "/liveness"), 503);
            assert_eq!(code_m(&t, "node1", m, "/readiness"), 503);
            assert_eq!(code_m(&t, "node1", m, "/"), 200);
            assert_eq!(code_m(&t, "node2", m, "/replica"), 200);
        }
        assert_eq!(code(&t, "node1", "/cluster"), 404);
        assert_eq!(code_m(&t, "node1", Method::Head, "/cluster"), 503);
    }

    #[test]
    fn substring_and_exact_path_quirks() {
        let t = fixture("patroni-4.1.5/sync_on.json");
        assert_eq!(code(&t, "node1", "/master"), 200);
        assert_eq!(code(&t, "node1", "/read-write"), 200);
        assert_eq!(code(&t, "node1", "/xprimaryx"), 200);
        assert_eq!(code(&t, "node1", "/standby_leader"), 503);
        assert_eq!(code(&t, "node2", "/replica/anything"), 200);
        assert_eq!(code(&t, "node3", "/synchronous"), 200);
        assert_eq!(code(&t, "node3", "/sync/"), 503, "exact paths only");
        assert_eq!(code(&t, "node3", "/read-only-synchronous"), 200);
        assert_eq!(code(&t, "node2", "/asynchronous"), 200);
        assert_eq!(code(&t, "node2", "/standby"), 503, "no /standby in Patroni");
        assert_eq!(code(&t, "node2", "/nonsense"), 503);
        assert_eq!(code(&t, "node2", "/healthy"), 200, "health by substring");
    }

    #[test]
    fn lag_limits_in_patroni_units() {
        let mut t = fixture("patroni-4.1.5/normal.json");
        t.members[1].replay_lag = Some(20 << 20);
        assert_eq!(code(&t, "node2", "/replica?lag=16MB"), 503);
        assert_eq!(code(&t, "node2", "/replica?lag=32MB"), 200);
        assert_eq!(
            code(&t, "node2", "/replica?lag=16mb"),
            200,
            "unparsable: no limit"
        );
        assert_eq!(
            code(&t, "node2", "/async?lag=20971520"),
            200,
            "lag > max only"
        );
        assert_eq!(code(&t, "node2", "/async?lag=20971519"), 503);
        assert_eq!(code(&t, "node2", "/read-only?lag=1GB"), 200);
        assert_eq!(
            code(&t, "node1", "/read-only?lag=0"),
            200,
            "leader never lags"
        );
        assert_eq!(
            code(&t, "node2", "/replica?lag=&lag=1"),
            503,
            "blank dropped"
        );
        assert_eq!(
            code(&t, "node2", "/replica?lag=1&lag=1GB"),
            503,
            "first wins"
        );
        // /readiness: default maximum_lag_on_failover 1 MiB; mode=write
        // uses receive_lag.
        assert_eq!(code(&t, "node2", "/readiness"), 503);
        assert_eq!(code(&t, "node2", "/readiness?lag=1GB"), 200);
        t.members[1].receive_lag = Some(0);
        assert_eq!(code(&t, "node2", "/readiness?mode=write"), 200);
        t.maximum_lag_on_failover = Some(64 << 20);
        assert_eq!(code(&t, "node2", "/readiness"), 200);
    }

    #[test]
    fn parse_size_is_patronis_parse_int() {
        for (s, want) in [
            ("16MB", Some(16 << 20)),
            ("1024", Some(1024)),
            (" 1 kB ", Some(1024)),
            ("0x400MB", Some(1 << 30)),
            ("010", Some(8)),
            ("1.5MB", Some(1536 * 1024)),
            ("1e3", Some(1000)),
            (".5kB", Some(512)),
            ("-1", Some(-1)),
            ("1TB", Some(1 << 40)),
            ("10mb", None),
            ("MB", None),
            ("", None),
            ("1 PB", None),
            ("08", None),
        ] {
            assert_eq!(parse_size(s), want, "{s:?}");
        }
    }

    #[test]
    fn maximum_lag_on_failover_is_read_as_patroni_reads_it() {
        let read = |b: &str| maximum_lag_on_failover(b.as_bytes());
        let default = Ok(1 << 20);
        for (body, want) in [
            (r#"{"maximum_lag_on_failover": 33554432}"#, Ok(32 << 20)),
            (r#"{"maximum_lag_on_failover": "2097152"}"#, Ok(2 << 20)),
            (r#"{"maximum_lag_on_failover": " 0x200000 "}"#, Ok(2 << 20)),
            (r#"{"maximum_lag_on_failover": 1048577.5}"#, Ok(1048578)),
            (r#"{"maximum_lag_on_failover": -1}"#, Ok(-1)),
            (r#"{"maximum_lag_on_failover": "16MB"}"#, default.clone()),
            (r#"{"maximum_lag_on_failover": true}"#, default.clone()),
            (r#"{"maximum_lag_on_failover": null}"#, default.clone()),
            (r#"{"ttl": 30, "loop_wait": 10}"#, default.clone()),
        ] {
            assert_eq!(read(body), want, "{body}");
        }
        assert!(read("[]").is_err());
        assert!(read("<html>").is_err());
    }

    #[test]
    fn parse_int_takes_no_unit() {
        for (s, want) in [
            ("2097152", Some(2 << 20)),
            (" 0x10 ", Some(16)),
            ("1e3", Some(1000)),
            ("2.5", Some(2)),
            ("16MB", None),
            ("1B", None),
            ("True", None),
        ] {
            assert_eq!(parse_int(s), want, "{s:?}");
        }
    }

    #[test]
    fn tags_and_noloadbalance() {
        let body = br#"{"scope": "c", "members": [
            {"name": "a", "role": "leader", "state": "running", "timeline": 1, "tags": {"dc": "x"}},
            {"name": "b", "role": "replica", "state": "streaming", "lag": 0, "tags": {"dc": "x", "n": 1, "flag": true}},
            {"name": "c", "role": "replica", "state": "streaming", "lag": 0, "tags": {"noloadbalance": "false"}}
        ]}"#;
        let t = patroni::parse(body).unwrap().topology;
        assert_eq!(code(&t, "b", "/replica?tag_dc=x"), 200);
        assert_eq!(code(&t, "b", "/replica?tag_dc=y"), 503);
        assert_eq!(code(&t, "b", "/replica?tag_n=1&tag_flag=true"), 200);
        assert_eq!(code(&t, "b", "/replica?tag_flag=True"), 503);
        assert_eq!(code(&t, "b", "/replica?tag_missing=x"), 503);
        assert_eq!(code(&t, "b", "/health?tag_dc=x"), 200);
        assert_eq!(
            code(&t, "a", "/read-only?tag_dc=y"),
            503,
            "tags on the primary"
        );
        assert_eq!(
            code(&t, "a", "/primary?tag_dc=y"),
            200,
            "ignored on leader paths"
        );
        // Patroni's bool("false") is True.
        assert_eq!(code(&t, "c", "/replica"), 503);
        assert_eq!(code(&t, "c", "/health"), 200);
    }

    #[test]
    fn replication_state_filter() {
        let body = br#"{"scope": "c", "members": [
            {"name": "a", "role": "leader", "state": "running", "timeline": 1},
            {"name": "b", "role": "replica", "state": "in archive recovery", "lag": 0},
            {"name": "d", "role": "replica", "state": "streaming", "lag": 0}
        ]}"#;
        let t = patroni::parse(body).unwrap().topology;
        assert_eq!(code(&t, "b", "/replica"), 200);
        assert_eq!(code(&t, "b", "/replica?replication_state=streaming"), 503);
        assert_eq!(code(&t, "d", "/replica?replication_state=streaming"), 200);
        assert_eq!(
            code(&t, "b", "/replica?replication_state=in+archive+recovery"),
            200
        );
        assert_eq!(code(&t, "b", "/readiness"), 503, "not streaming");
    }

    #[test]
    fn standby_cluster_and_draining_leader() {
        let body = br#"{"scope": "c", "members": [
            {"name": "a", "role": "standby_leader", "state": "streaming", "timeline": 1},
            {"name": "b", "role": "leader", "state": "running"}
        ]}"#;
        let t = patroni::parse(body).unwrap().topology;
        assert_eq!(code(&t, "a", "/standby-leader"), 200);
        assert_eq!(code(&t, "a", "/leader"), 200);
        assert_eq!(code(&t, "a", "/primary"), 503);
        assert_eq!(code(&t, "a", "/replica"), 503);
        assert_eq!(code(&t, "a", "/read-only"), 200);
        let c = parse_target("/c/b/primary", |c| c == "c").unwrap();
        let view = View {
            topology: Some(&t),
            age: Duration::ZERO,
            ttl: None,
        };
        let a = decide(Method::Get, &c.endpoint, &c.query, "c", "b", Some(&view));
        assert_eq!((a.status, a.draining), (200, true));
        assert_eq!(a.agent_line(), "drain\n");
    }

    #[test]
    fn unknown_cluster_member_and_staleness() {
        let t = fixture("patroni-4.1.5/normal.json");
        let q = Query::default();
        let a = decide(Method::Get, "/primary", &q, "x", "node1", None);
        assert_eq!(a.status, 404);
        let fresh = View {
            topology: Some(&t),
            age: Duration::from_secs(5),
            ttl: Some(Duration::from_secs(30)),
        };
        let a = decide(Method::Get, "/primary", &q, "demo", "node9", Some(&fresh));
        assert_eq!(a.status, 503);
        assert_eq!(
            a.agent_line(),
            "down #member not in the last /cluster answer\n"
        );
        let a = decide(Method::Get, "/primary", &q, "demo", "node1", Some(&fresh));
        assert_eq!(a.status, 200);
        assert_eq!(a.agent_line(), "up ready\n");
        let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(v["role"], "leader");
        assert_eq!(v["timeline"], 1);
        assert_eq!(v["poll_age_seconds"], 5.0);
        let stale = View {
            age: Duration::from_secs(31),
            ..fresh
        };
        let a = decide(Method::Get, "/primary", &q, "demo", "node1", Some(&stale));
        assert_eq!(a.status, 503);
        assert!(a.reason.starts_with("topology is stale"), "{}", a.reason);
        assert!(a.body.contains("stale"));
        let never = View {
            topology: None,
            ..fresh
        };
        let a = decide(Method::Get, "/health", &q, "demo", "node1", Some(&never));
        assert_eq!(a.status, 503);
    }

    #[test]
    fn targets_parse() {
        let demo = |c: &str| c == "demo";
        let c = parse_target("/demo/node1/replica?lag=16MB&tag_dc=a%20b&mode=write", demo).unwrap();
        assert_eq!(
            c.target,
            Target::Member {
                cluster: "demo".into(),
                member: "node1".into()
            }
        );
        assert_eq!(c.endpoint, "/replica");
        assert_eq!(c.query.lag, Some(16 << 20));
        assert_eq!(c.query.tags, [("dc".to_string(), "a b".to_string())]);
        assert_eq!(c.query.mode.as_deref(), Some("write"));
        assert_eq!(parse_target("/demo/node1", demo).unwrap().endpoint, "/");
        assert_eq!(parse_target("/demo/node1/", demo).unwrap().endpoint, "/");
        assert_eq!(
            parse_target("/demo/node1/a/b", demo).unwrap().endpoint,
            "/a/b"
        );
        let c = parse_target("/replica?lag=1", demo).unwrap();
        assert_eq!((c.target, c.endpoint.as_str()), (Target::Local, "/replica"));
        let c = parse_target("/sync/", demo).unwrap();
        assert_eq!((c.target, c.endpoint.as_str()), (Target::Local, "/sync/"));
        assert_eq!(parse_target("/", demo).unwrap().endpoint, "/");
        assert!(parse_target("replica", demo).is_err());
        assert!(parse_target("/demo/", demo).is_err());
        let c = parse_target("/other/node1/primary", demo).unwrap();
        assert!(matches!(c.target, Target::Member { cluster, .. } if cluster == "other"));
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("a%2Fb"), "a/b");
    }

    #[test]
    fn agent_lines() {
        let demo = |c: &str| c == "demo";
        let c = parse_agent_line(b"/demo/node1/primary\r\n", demo).unwrap();
        assert_eq!(c.endpoint, "/primary");
        assert!(parse_agent_line(b"\n", demo).is_err());
        assert!(parse_agent_line(b"\xff\n", demo).is_err());
        let a = Answer {
            status: 503,
            reason: "role replica\nx".into(),
            draining: false,
            body: String::new(),
        };
        assert_eq!(a.agent_line(), "down #role replica x\n");
    }

    #[test]
    fn local_member_by_address() {
        let t = fixture("patroni-4.1.5/normal.json");
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        // Every fixture member is on 127.0.0.1: ambiguous.
        let e = local_member(None, ip, [("demo", Some(&t))]).unwrap_err();
        assert_eq!(e.0, 400);
        assert!(
            e.1.contains("demo/node1, demo/node2, demo/node3"),
            "{}",
            e.1
        );
        let mut one = t.clone();
        one.members[1].host = Some("127.0.0.2".into());
        let two: IpAddr = "127.0.0.2".parse().unwrap();
        assert_eq!(
            local_member(None, two, [("demo", Some(&one))]).unwrap(),
            ("demo".into(), "node2".into())
        );
        let none: IpAddr = "10.9.9.9".parse().unwrap();
        assert_eq!(
            local_member(None, none, [("demo", Some(&t))])
                .unwrap_err()
                .0,
            503
        );
        assert_eq!(
            local_member(Some(("demo", "node3")), ip, [("demo", Some(&t))]).unwrap(),
            ("demo".into(), "node3".into())
        );
    }
}

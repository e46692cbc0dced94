//! Patroni's `GET /cluster` document -> [`Topology`].
//!
//! PURE: bytes in, a topology and a list of skipped members out. The parser
//! is deliberately lenient and works member by member, because every Patroni
//! release in use (2.x, 3.x, 4.x) says things differently:
//! - `scope` exists only from 3.2.0, so it is optional;
//! - `lag` is bytes or the string `"unknown"`; `replay_lag` exists from 4.1;
//! - `host`, `port`, `timeline`, `api_url` and `tags` may be missing (or null);
//! - tags may be booleans or strings (`noloadbalance: "true"`);
//! - roles and states unknown to us are kept verbatim, never rejected.
//!
//! A member that cannot be understood (no name, a port that is not a port,
//! ...) is skipped and reported; it never discards the rest of the answer.
//! Only a body that is not a JSON object with a `members` array is an error.

use std::collections::HashSet;

use serde_json::{Map, Value};

use crate::topology::{Member, Role, Tag, Topology};

/// Most members an answer may list. A Patroni cluster has a handful; this
/// bounds what one answer costs the event loop (each change is diffed and
/// routed per member) and the memory it holds.
pub const MAX_MEMBERS: usize = 1_000;

/// A parsed answer: the topology (addresses not resolved yet) and one line
/// per member that was skipped.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub topology: Topology,
    pub skipped: Vec<String>,
}

/// Parses a `/cluster` body.
pub fn parse(body: &[u8]) -> Result<Parsed, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let obj = doc.as_object().ok_or("not a JSON object")?;
    let members = match obj.get("members") {
        Some(Value::Array(a)) => a,
        Some(_) => return Err("`members` is not an array".into()),
        None => return Err("no `members` key".into()),
    };
    if members.len() > MAX_MEMBERS {
        return Err(format!(
            "`members` has {} entries; at most {MAX_MEMBERS} are accepted",
            members.len()
        ));
    }
    let mut topology = Topology {
        members: Vec::with_capacity(members.len()),
        scope: obj.get("scope").and_then(Value::as_str).map(str::to_string),
        paused: obj.get("pause").is_some_and(truthy),
        lsn_fields: members.iter().any(|m| m.get("receive_lag").is_some()),
        maximum_lag_on_failover: None,
    };
    let mut skipped = Vec::new();
    let mut names = HashSet::new();
    for (i, v) in members.iter().enumerate() {
        match member(v) {
            Ok(m) if names.contains(&m.name) => {
                skipped.push(format!("members[{i}] ({}): duplicate name", m.name))
            }
            Ok(m) => {
                names.insert(m.name.clone());
                topology.members.push(m)
            }
            Err(e) => {
                let name = v.get("name").and_then(Value::as_str).unwrap_or("?");
                skipped.push(format!("members[{i}] ({name}): {e}"));
            }
        }
    }
    Ok(Parsed { topology, skipped })
}

fn member(v: &Value) -> Result<Member, String> {
    let o = v.as_object().ok_or("not an object")?;
    let name = required_str(o, "name")?;
    if name.is_empty() {
        return Err("empty `name`".into());
    }
    let role = required_str(o, "role")?;
    // `state` may be missing or "" when the member key has none: unusable.
    let state = match o.get("state") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(format!("`state` is not a string: {other}")),
    };
    let host = match o.get("host") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => Some(s.trim().to_string()),
        Some(other) => return Err(format!("`host` is not a string: {other}")),
    };
    let port = match o.get("port") {
        None | Some(Value::Null) => None,
        Some(p) => match number(p) {
            Some(n) if (1..=65_535).contains(&n) => Some(n as u16),
            _ => return Err(format!("`port` is not a TCP port: {p}")),
        },
    };
    let tags = o.get("tags").and_then(Value::as_object);
    Ok(Member {
        name: name.to_string(),
        role: Role::parse(role),
        state,
        host,
        ip: None,
        port,
        timeline: o.get("timeline").and_then(number),
        lag: o.get("lag").and_then(number),
        replay_lag: o.get("replay_lag").and_then(number),
        receive_lag: o.get("receive_lag").and_then(number),
        noloadbalance: tags
            .and_then(|t| t.get("noloadbalance"))
            .is_some_and(truthy),
        tags: tags.map(patroni_tags).unwrap_or_default(),
    })
}

/// Tags as Patroni's health checks see them; a `null` value is no tag.
fn patroni_tags(tags: &Map<String, Value>) -> Vec<Tag> {
    tags.iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| Tag {
            key: k.clone(),
            value: match v {
                Value::String(s) => s.clone(),
                Value::Bool(b) => if *b { "true" } else { "false" }.to_string(),
                other => other.to_string().to_lowercase(),
            },
            truthy: python_truthy(v),
        })
        .collect()
}

/// Python's `bool(v)` of a JSON value.
fn python_truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Null => false,
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

fn required_str<'a>(o: &'a Map<String, Value>, key: &str) -> Result<&'a str, String> {
    match o.get(key) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) => Err(format!("no `{key}`")),
        Some(other) => Err(format!("`{key}` is not a string: {other}")),
    }
}

/// A non-negative integer, also from a numeric string (some mocks and
/// proxies in front of Patroni send those). `"unknown"` and the like: None.
fn number(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(|f| f as u64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Whether a tag is set. Patroni itself applies Python truthiness, where any
/// non-empty string counts; we follow it except for the spellings a human
/// means as "no" (`"false"`, `"no"`, `"off"`, `"0"`), which would otherwise
/// silently take a replica out of rotation.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !matches!(
            s.trim().to_ascii_lowercase().as_str(),
            "" | "false" | "no" | "off" | "0"
        ),
        Value::Null => false,
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{routable, PortFilter, PortRole};
    use std::net::IpAddr;

    fn fixture(name: &str) -> Topology {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        let body = std::fs::read(&path).unwrap();
        let parsed = parse(&body).unwrap();
        assert!(parsed.skipped.is_empty(), "{name}: {:?}", parsed.skipped);
        let mut t = parsed.topology;
        for m in &mut t.members {
            m.ip = m.host.as_deref().and_then(|h| h.parse::<IpAddr>().ok());
        }
        t
    }

    fn on(t: &Topology, roles: &[PortRole], max_lag: Option<u64>) -> Vec<String> {
        let f = PortFilter {
            roles: roles.to_vec(),
            host_port: None,
            max_lag_in_bytes: max_lag,
        };
        routable(t, &f)
            .into_iter()
            .map(|r| format!("{}@{}", r.member, r.addr))
            .collect()
    }

    #[test]
    fn patroni_3_0_2_captures_route_every_role() {
        let t = fixture("patroni-3.0.2/normal.json");
        assert_eq!(t.scope, None);
        assert_eq!(on(&t, &[PortRole::Leader], None), ["node1@127.0.0.1:5441"]);
        assert_eq!(
            on(&t, &[PortRole::Sync, PortRole::Async], Some(1 << 24)),
            ["node2@127.0.0.1:5442", "node3@127.0.0.1:5443"]
        );
        let t = fixture("patroni-3.0.2/sync_on.json");
        assert_eq!(on(&t, &[PortRole::Sync], None), ["node2@127.0.0.1:5442"]);
        assert_eq!(on(&t, &[PortRole::Async], None), ["node3@127.0.0.1:5443"]);
        let t = fixture("patroni-3.0.2/replica_stopped.json");
        assert_eq!(on(&t, &[PortRole::Async], None), ["node2@127.0.0.1:5442"]);
        assert_eq!(t.members[2].lag, None, "lag \"unknown\"");
        let t = fixture("patroni-3.0.2/after_failover.json");
        assert_eq!(on(&t, &[PortRole::Leader], None), ["node2@127.0.0.1:5442"]);
        for f in [
            "after_failover_settled.json",
            "replica_stopped_after_ttl.json",
        ] {
            fixture(&format!("patroni-3.0.2/{f}"));
        }
    }

    #[test]
    fn patroni_4_1_5_captures_route_every_role() {
        let t = fixture("patroni-4.1.5/normal.json");
        assert_eq!(t.scope.as_deref(), Some("demo"));
        assert_eq!(t.members[1].state, "streaming");
        assert_eq!(t.members[1].replay_lag, Some(0));
        assert_eq!(
            on(&t, &[PortRole::Async], Some(1024)),
            ["node2@127.0.0.1:5442", "node3@127.0.0.1:5443"]
        );
        assert_eq!(on(&t, &[PortRole::Any], None).len(), 3);
        let t = fixture("patroni-4.1.5/sync_on.json");
        assert_eq!(on(&t, &[PortRole::Sync], None), ["node3@127.0.0.1:5443"]);
        let t = fixture("patroni-4.1.5/sync_quorum.json");
        assert_eq!(
            on(&t, &[PortRole::Sync], None),
            ["node2@127.0.0.1:5442", "node3@127.0.0.1:5443"]
        );
        assert!(on(&t, &[PortRole::Async], None).is_empty());
        let t = fixture("patroni-4.1.5/replica_stopped.json");
        assert_eq!(on(&t, &[PortRole::Async], None), ["node2@127.0.0.1:5442"]);
        assert_eq!((t.members[2].lag, t.members[2].replay_lag), (None, None));
        let t = fixture("patroni-4.1.5/after_failover.json");
        assert_eq!(on(&t, &[PortRole::Leader], None), ["node2@127.0.0.1:5442"]);
        fixture("patroni-4.1.5/replica_stopped_after_ttl.json");
    }

    #[test]
    fn every_transition_line_parses() {
        let dir = format!("{}/tests/fixtures/transitions", env!("CARGO_MANIFEST_DIR"));
        let mut lines = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            for line in text.lines() {
                let v: Value = serde_json::from_str(line).unwrap();
                let body = serde_json::to_vec(&v["cluster"]).unwrap();
                let p = parse(&body).unwrap();
                assert!(p.skipped.is_empty(), "{line}");
                assert!(p.topology.leaders().count() <= 1);
                lines += 1;
            }
        }
        assert!(lines > 10);
    }

    #[test]
    fn malformed_member_is_skipped_not_fatal() {
        let body = br#"{"members": [
            {"name": "a", "role": "leader", "state": "running", "host": "10.0.0.1", "port": 5432, "api_url": null},
            {"name": "b", "role": "replica", "state": "streaming", "host": "10.0.0.2", "port": "x"},
            {"role": "replica", "state": "streaming"},
            {"name": "c", "role": 7, "state": "running"},
            "garbage",
            {"name": "a", "role": "replica", "state": "running"},
            {"name": "d", "role": "replica", "state": "running", "tags": {"noloadbalance": "true"}, "lag": "123"}
        ]}"#;
        let p = parse(body).unwrap();
        let names: Vec<_> = p.topology.members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["a", "d"]);
        assert_eq!(p.skipped.len(), 5, "{:?}", p.skipped);
        assert!(p.skipped[0].starts_with("members[1] (b): `port` is not a TCP port"));
        assert!(p.skipped[1].starts_with("members[2] (?): no `name`"));
        assert!(p.skipped[4].contains("duplicate name"));
        let d = &p.topology.members[1];
        assert!(d.noloadbalance);
        assert_eq!(d.lag, Some(123));
    }

    #[test]
    fn optional_fields_may_all_be_missing() {
        let p = parse(
            br#"{"members": [{"name": "x", "role": "weird", "state": null}], "pause": true}"#,
        )
        .unwrap();
        let m = &p.topology.members[0];
        assert_eq!(m.role, Role::Other("weird".into()));
        assert_eq!(
            (m.state.as_str(), m.host.as_ref(), m.port, m.lag),
            ("", None, None, None)
        );
        assert!(p.topology.paused);
        assert_eq!(
            parse(br#"{"members": []}"#).unwrap().topology.members.len(),
            0
        );
    }

    #[test]
    fn tag_truthiness() {
        for (v, want) in [
            ("true", true),
            ("false", false),
            ("\"true\"", true),
            ("\"yes\"", true),
            ("\"false\"", false),
            ("\"off\"", false),
            ("\"\"", false),
            ("1", true),
            ("0", false),
            ("null", false),
        ] {
            let body = format!(
                r#"{{"members": [{{"name": "x", "role": "replica", "state": "running", "tags": {{"noloadbalance": {v}}}}}]}}"#
            );
            assert_eq!(
                parse(body.as_bytes()).unwrap().topology.members[0].noloadbalance,
                want,
                "{v}"
            );
        }
    }

    #[test]
    fn broken_documents_are_errors() {
        assert!(parse(b"").unwrap_err().starts_with("not JSON"));
        assert!(parse(b"<html>").unwrap_err().starts_with("not JSON"));
        assert_eq!(parse(b"[]").unwrap_err(), "not a JSON object");
        assert_eq!(parse(b"{}").unwrap_err(), "no `members` key");
        assert_eq!(
            parse(br#"{"members": {}}"#).unwrap_err(),
            "`members` is not an array"
        );
    }

    #[test]
    fn an_answer_with_too_many_members_is_refused_with_the_count() {
        let member = |i: usize| {
            format!(
                r#"{{"name":"m{i}","role":"replica","state":"streaming","host":"127.0.0.1","port":5432}}"#
            )
        };
        let body = |n: usize| {
            let ms: Vec<String> = (0..n).map(member).collect();
            format!(r#"{{"members":[{}]}}"#, ms.join(","))
        };
        assert_eq!(
            parse(body(MAX_MEMBERS).as_bytes())
                .unwrap()
                .topology
                .members
                .len(),
            MAX_MEMBERS
        );
        assert_eq!(
            parse(body(10_000).as_bytes()).unwrap_err(),
            "`members` has 10000 entries; at most 1000 are accepted"
        );
    }
}

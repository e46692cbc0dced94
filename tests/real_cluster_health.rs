//! Differential test of the health-check answers: for every member, every
//! Patroni health endpoint and a spread of query parameters, the status code
//! we derive from one `/cluster` answer must equal the one that member's own
//! Patroni gives, in several cluster states.
//!
//! The two sides are asked within a second of each other, but Patroni sees
//! its Postgres live while `/cluster` is up to a `loop_wait` old, so a round
//! that disagrees is asked again (fresh `/cluster`, fresh answers) a few
//! times before a difference counts.
//!
//! Known, documented differences (man 5, HEALTH CHECKS) are not asked:
//! `?replication_state=` (Patroni 4.2; both versions here ignore it) is
//! checked against Patroni's answer without it plus the 4.2 rule.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use patroni_proxy::health::{self, Method, View};
use patroni_proxy::patroni;

use super::*;

const PATHS: &[&str] = &[
    "/",
    "/primary",
    "/master",
    "/leader",
    "/read-write",
    "/standby-leader",
    "/standby_leader",
    "/replica",
    "/read-only",
    "/standby",
    "/synchronous",
    "/sync",
    "/quorum",
    "/asynchronous",
    "/async",
    "/read-only-sync",
    "/read-only-synchronous",
    "/read-only-quorum",
    "/health",
    "/liveness",
    "/readiness",
    "/sync/",
    "/nonsense",
];

const QUERIES: &[&str] = &[
    "",
    "?lag=16MB",
    "?lag=1GB",
    "?lag=10mb",
    "?tag_dc=east",
    "?tag_dc=west",
    "?tag_weight=5",
    "?tag_nofailover=true",
    "?mode=write&lag=1MB",
    "?lag=16MB&tag_dc=east",
];

/// One request to a member.
#[derive(Clone, Debug)]
pub struct Ask {
    pub member: String,
    pub method: &'static str,
    pub target: String,
}

/// The status code of `method target` on a Patroni REST API; 0 when the
/// connection is refused (Patroni is down: a load balancer sees a failure).
pub fn status_of(api: &str, method: &str, target: &str) -> u16 {
    let addr: SocketAddr = api.trim_start_matches("http://").parse().unwrap();
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return 0;
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if write!(s, "{method} {target} HTTP/1.0\r\n\r\n").is_err() {
        return 0;
    }
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while !got.windows(2).any(|w| w == b"\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn method(m: &str) -> Method {
    Method::parse(m).unwrap()
}

/// Every request of one round: each member, each path with GET and every
/// query, plus HEAD and OPTIONS without a query.
pub fn asks(members: &[String]) -> Vec<Ask> {
    let mut out = Vec::new();
    for m in members {
        for p in PATHS {
            for q in QUERIES {
                out.push(Ask {
                    member: m.clone(),
                    method: "GET",
                    target: format!("{p}{q}"),
                });
            }
            for verb in ["HEAD", "OPTIONS"] {
                out.push(Ask {
                    member: m.clone(),
                    method: verb,
                    target: p.to_string(),
                });
            }
        }
        for q in ["?replication_state=streaming", "?replication_state=running"] {
            out.push(Ask {
                member: m.clone(),
                method: "GET",
                target: format!("/replica{q}"),
            });
        }
    }
    out
}

/// Where a round's body carries the cluster's `GET /config` (the proxy
/// reads `maximum_lag_on_failover` from it for `/readiness`).
const CONFIG: &str = "_config";

/// `/cluster`, with `/config` under [`CONFIG`].
fn round_body(c: &Cluster) -> Value {
    let mut body = c.topology().expect("/cluster");
    if let Some(config) = c.api_json("/config") {
        body[CONFIG] = config;
    }
    body
}

/// Our answer from a round's body (the proxy's rules, run directly).
pub fn ours(body: &Value, a: &Ask) -> u16 {
    let mut t = patroni::parse(body.to_string().as_bytes())
        .unwrap()
        .topology;
    t.maximum_lag_on_failover = body
        .get(CONFIG)
        .map(|c| health::maximum_lag_on_failover(c.to_string().as_bytes()).unwrap());
    let view = View {
        topology: Some(&t),
        age: Duration::ZERO,
        ttl: None,
    };
    let full = format!("/main/{}{}", a.member, a.target);
    let c = health::parse_target(&full, |c| c == "main").unwrap();
    health::decide(
        method(a.method),
        &c.endpoint,
        &c.query,
        "main",
        &a.member,
        Some(&view),
    )
    .status
}

/// Patroni's answer, with what the versions under test lack layered on:
/// `replication_state=` as Patroni 4.2 applies it.
fn theirs(c: &Cluster, body: &Value, a: &Ask) -> u16 {
    let api = &c.node(&a.member).api;
    let Some((path, q)) = a.target.split_once("?replication_state=") else {
        return status_of(api, a.method, &a.target);
    };
    let code = status_of(api, a.method, path);
    let state = body["members"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == a.member.as_str()))
        .map(|m| m["state"].as_str().unwrap_or("").to_string())
        .unwrap_or_default();
    // Patroni 4.2's `replication_state`: streaming, in archive recovery, or
    // none (a "running" state is PostgreSQL's, not a replication state).
    let replication = ["streaming", "in archive recovery"].contains(&state.as_str());
    if code == 200 && !(replication && state == q) {
        503
    } else {
        code
    }
}

/// Asks every request of a round on both sides; re-asks the differing ones
/// (with a fresh `/cluster`) until they agree or the rounds run out.
/// Returns the disagreements left and the number of requests compared.
pub fn compare(c: &Cluster, label: &str, ours_of: &dyn Fn(&Value, &Ask) -> u16) -> usize {
    let members: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).collect();
    let mut pending = asks(&members);
    let total = pending.len();
    let started = Instant::now();
    let mut last = Vec::new();
    for round in 0..6 {
        if round > 0 {
            thread::sleep(Duration::from_secs(2));
        }
        let body = round_body(c);
        last.clear();
        pending.retain(|a| {
            let theirs = theirs(c, &body, a);
            // Patroni down: a refused check is a failed check.
            let theirs = if theirs == 0 { 503 } else { theirs };
            let ours = ours_of(&body, a);
            if ours != theirs {
                last.push(format!(
                    "{} {} {}: ours {ours}, Patroni {theirs}",
                    a.member, a.method, a.target
                ));
            }
            ours != theirs
        });
        if pending.is_empty() {
            break;
        }
    }
    report(
        &format!("health differential {label}"),
        format!(
            "{total} requests, {} differ, {:.1} s",
            last.len(),
            started.elapsed().as_secs_f64()
        ),
    );
    assert!(
        last.is_empty(),
        "{label}: {} of {total} answers differ from Patroni's:\n{}\n/cluster: {:?}",
        last.len(),
        last.join("\n"),
        c.topology()
    );
    total
}

fn set_tags(node: &Node, tags: Option<&str>, original: &str) {
    let text = match tags {
        Some(t) => format!("{original}tags:\n{t}"),
        None => original.to_string(),
    };
    std::fs::write(&node.config, text).unwrap();
    let pidfile = node
        .config
        .parent()
        .unwrap()
        .join(format!("run/patroni{}.pid", &node.name[4..]));
    let pid = std::fs::read_to_string(pidfile).unwrap();
    assert_eq!(signal(pid.trim(), "HUP"), 0);
}

/// Stops a member's PostgreSQL while its Patroni stays up (paused cluster,
/// so Patroni does not start it again).
fn stop_postgres(c: &Cluster, node: &Node) {
    c.patronictl(&["pause", "demo", "--wait"]);
    let data = node
        .config
        .parent()
        .unwrap()
        .join(format!("{}/data/postmaster.pid", node.name));
    let stopped = || {
        c.topology().is_some_and(|t| {
            t["members"].as_array().is_some_and(|ms| {
                ms.iter()
                    .any(|m| m["name"] == node.name.as_str() && m["state"] == "stopped")
            })
        })
    };
    // The postmaster may be replaced while Patroni settles after the
    // previous state: read its PID afresh and ask again every 10 s.
    for _ in 0..6 {
        if let Some(pid) = std::fs::read_to_string(&data)
            .ok()
            .and_then(|p| p.lines().next().map(|l| l.trim().to_string()))
        {
            signal(&pid, "INT");
        }
        if wait_until(Duration::from_secs(10), stopped) {
            break;
        }
    }
    c.wait_member(&node.name, Duration::from_secs(5), |m| {
        m["state"] == "stopped"
    });
}

/// Sets the cluster's `maximum_lag_on_failover`, then waits until our side
/// answers a replica's `/readiness` with `want` (the proxy reads `/config`
/// every 30 s).
fn set_max_lag(c: &Cluster, value: i64, ours_of: &dyn Fn(&Value, &Ask) -> u16, want: u16) {
    let set = format!("maximum_lag_on_failover={value}");
    c.patronictl(&["edit-config", "demo", "-q", "--force", "-s", &set]);
    let ask = Ask {
        member: c.replicas()[0].name.clone(),
        method: "GET",
        target: "/readiness".into(),
    };
    assert!(
        wait_until(Duration::from_secs(75), || ours_of(&round_body(c), &ask)
            == want),
        "/readiness never followed maximum_lag_on_failover {value}"
    );
}

/// The states, in order; each compares every member and endpoint.
pub fn run_states(c: &Cluster, ours_of: &dyn Fn(&Value, &Ask) -> u16) {
    let mut n = 0;
    n += compare(c, "async", ours_of);
    if c.version == "4" {
        // /readiness without lag= compares with the cluster's
        // maximum_lag_on_failover: at -1 a streaming replica (lag 0) is
        // over it. (Patroni 3 answers /readiness by "running".)
        set_max_lag(c, -1, ours_of, 503);
        n += compare(c, "maximum_lag_on_failover -1", ours_of);
        set_max_lag(c, 1 << 20, ours_of, 200);
    }
    // Tags on one replica: custom ones, and noloadbalance.
    let victim = c.replicas()[0];
    let original = std::fs::read_to_string(&victim.config).unwrap();
    set_tags(
        victim,
        Some("  noloadbalance: true\n  nofailover: true\n  dc: east\n  weight: 5\n"),
        &original,
    );
    c.wait_member(&victim.name, Duration::from_secs(30), |m| {
        m["tags"]["dc"] == "east"
    });
    n += compare(c, "tags+noloadbalance", ours_of);
    set_tags(victim, None, &original);
    c.wait_member(&victim.name, Duration::from_secs(30), |m| {
        m.get("tags").is_none()
    });
    c.synchronous_mode("true");
    assert!(wait_until(Duration::from_secs(30), || c
        .topology()
        .is_some_and(|t| t.to_string().contains("sync_standby"))));
    n += compare(c, "synchronous_mode", ours_of);
    if c.version == "4" {
        c.synchronous_mode("quorum");
        assert!(wait_until(Duration::from_secs(60), || c
            .topology()
            .is_some_and(|t| t
                .to_string()
                .matches("quorum_standby")
                .count()
                == 2)));
        n += compare(c, "quorum", ours_of);
    }
    c.synchronous_mode("false");
    assert!(wait_until(Duration::from_secs(30), || c
        .topology()
        .is_some_and(|t| !t.to_string().contains("_standby"))));
    // A member whose PostgreSQL is stopped, its Patroni still answering.
    let victim = c.replicas()[0];
    stop_postgres(c, victim);
    n += compare(c, "stopped postgres (paused)", ours_of);
    c.patronictl(&["resume", "demo", "--wait"]);
    // A member whose Patroni is down too (refused counts as 503), once its
    // member key has expired: until then `/cluster` still lists it, and we
    // answer from that (man 5 says so).
    c.run(&["stop-node", &victim.name[4..]]);
    assert!(wait_until(Duration::from_secs(60), || c
        .topology()
        .is_some_and(|t| !t
            .to_string()
            .contains(&format!("\"{}\"", victim.name)))));
    n += compare(c, "stopped member", ours_of);
    c.run(&["start"]);
    report(
        "health differential total",
        format!("{n} requests compared"),
    );
}

/// The proxy's health listener over the same cluster: what a load
/// balancer would be told.
fn via_proxy(health: SocketAddr) -> impl Fn(&Value, &Ask) -> u16 {
    move |_, a| {
        let target = format!("/main/{}{}", a.member, a.target);
        let api = format!("http://{health}");
        match status_of(&api, a.method, &target) {
            0 => 503,
            code => code,
        }
    }
}

#[test]
#[ignore = "needs a real cluster: tests/cluster/run"]
fn j_health_answers_match_patroni() {
    let c = cluster();
    let hosts: Vec<String> = c.nodes.iter().map(|n| n.api.clone()).collect();
    let (health, rw) = (free_port(), free_port());
    let cfg = util::config(
        free_port(),
        &hosts,
        &format!("rw: {{listen: \"127.0.0.1:{rw}\", roles: [leader]}}"),
        &format!("health: {{listen: \"127.0.0.1:{health}\"}}"),
    )
    .replace(
        "cluster_update_interval: 0.2",
        &format!("cluster_update_interval: {INTERVAL}"),
    );
    let _proxy = Proxy::start(&cfg);
    let health = SocketAddr::from(([127, 0, 0, 1], health));
    // Both our sides: the rules run directly on the /cluster body the
    // round fetched, and the proxy's answer from its own poll.
    let both = move |body: &Value, a: &Ask| {
        let direct = ours(body, a);
        let proxied = via_proxy(health)(body, a);
        if direct == proxied {
            direct
        } else {
            // Not the same poll: let the round retry.
            0
        }
    };
    run_states(&c, &both);
}

/// A proxy with both health listeners over the real cluster; returns it
/// with the health and agent addresses.
fn health_proxy(c: &Cluster) -> (Proxy, SocketAddr, SocketAddr) {
    let hosts: Vec<String> = c.nodes.iter().map(|n| n.api.clone()).collect();
    let (health, agent, rw) = (free_port(), free_port(), free_port());
    let cfg = util::config(
        free_port(),
        &hosts,
        &format!("rw: {{listen: \"127.0.0.1:{rw}\", roles: [leader]}}"),
        &format!("health: {{listen: \"127.0.0.1:{health}\", agent_listen: \"127.0.0.1:{agent}\"}}"),
    )
    .replace(
        "cluster_update_interval: 0.2",
        &format!("cluster_update_interval: {INTERVAL}"),
    );
    let a = |p| SocketAddr::from(([127, 0, 0, 1], p));
    (Proxy::start(&cfg), a(health), a(agent))
}

/// A child process killed when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "needs a real cluster: tests/cluster/run"]
fn k_haproxy_routes_by_role_through_the_agent_port() {
    let c = cluster();
    let (_proxy, _, agent) = health_proxy(&c);
    // The packaged configuration, pointed at this cluster.
    let root = env!("CARGO_MANIFEST_DIR");
    let mut cfg =
        std::fs::read_to_string(format!("{root}/packaging/haproxy/haproxy-agent.cfg")).unwrap();
    let (primary, replicas) = (free_port(), free_port());
    cfg = cfg
        .replace("agent-port 8011", &format!("agent-port {}", agent.port()))
        .replace("*:5000", &format!("127.0.0.1:{primary}"))
        .replace("*:5001", &format!("127.0.0.1:{replicas}"));
    for (i, n) in c.nodes.iter().enumerate() {
        cfg = cfg.replace(&format!("10.0.0.{}:5432", i + 1), &n.pg.to_string());
    }
    let dir = util::TempDir::new();
    let path = dir.0.join("haproxy.cfg");
    std::fs::write(&path, &cfg).unwrap();
    let _haproxy = Child(
        Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .spawn()
            .expect("haproxy"),
    );
    let a = |p| SocketAddr::from(([127, 0, 0, 1], p));
    let leader = c.leader();
    let (old, old_port) = (leader.name.clone(), leader.pg.port());
    // HAProxy starts with every server up until the first agent answers:
    // wait for several connections in a row on the right members.
    let all_on = |port: u16, want: &dyn Fn((bool, u16)) -> bool| {
        (0..4).all(|_| whereami(a(port), CONNECT).is_ok_and(want))
    };
    assert!(
        wait_until(Duration::from_secs(30), || all_on(primary, &|w| w
            == (false, old_port))),
        "HAProxy never routed the primary port to the leader only"
    );
    assert!(
        wait_until(Duration::from_secs(30), || all_on(replicas, &|w| w.0)),
        "HAProxy never routed the replica port to replicas only"
    );
    let candidate = c.replicas()[0].name.clone();
    let started = Instant::now();
    c.switchover(&old, &candidate);
    let new_port = c.node(&candidate).pg.port();
    assert!(
        wait_until(Duration::from_secs(60), || all_on(primary, &|w| w
            == (false, new_port))),
        "HAProxy never followed the switchover"
    );
    report(
        "haproxy agent switchover",
        format!(
            "writes on the new leader through HAProxy {:.1} s after patronictl switchover",
            started.elapsed().as_secs_f64()
        ),
    );
    assert!(wait_until(Duration::from_secs(30), || all_on(
        replicas,
        &|w| w.0
    )));
    c.run(&["wait"]);
}

#[test]
#[ignore = "needs a real cluster: tests/cluster/run"]
fn l_prometheus_scrapes_the_proxy() {
    let c = cluster();
    let (_proxy, health, _) = health_proxy(&c);
    let dir = util::TempDir::new();
    let cfg = dir.0.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             scrape_configs:\n  - job_name: patroni-proxy\n    static_configs:\n      - targets: [\"{health}\"]\n"
        ),
    )
    .unwrap();
    let web = free_port();
    let _prometheus = Child(
        Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{web}"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus (Debian package prometheus)"),
    );
    let web = SocketAddr::from(([127, 0, 0, 1], web));
    let query = |q: &str| -> Value {
        let q: String = q
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b == b'_' {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        // HTTP/1.0: Prometheus closes the connection after its answer.
        util::http_request(web, "GET", &format!("/api/v1/query?query={q}"), "HTTP/1.0")
            .ok()
            .and_then(|(code, body)| (code == 200).then(|| serde_json::from_str(&body).ok()))
            .flatten()
            .unwrap_or(Value::Null)
    };
    // The scrape is healthy and a series comes back.
    assert!(
        wait_until(Duration::from_secs(60), || {
            query("up{job=\"patroni-proxy\"}")["data"]["result"][0]["value"][1] == "1"
        }),
        "Prometheus never scraped the proxy: {:?}",
        query("up")
    );
    assert!(wait_until(Duration::from_secs(30), || {
        let v = &query("patroni_proxy_cluster_polls_total{cluster=\"main\"}")["data"]["result"][0];
        v["value"][1]
            .as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .is_some_and(|n| n > 0.0)
    }));
    // The README's queries are valid and answer.
    for q in [
        "sum by (cluster, member) (patroni_proxy_backend_sessions_current)",
        "max by (cluster) (patroni_proxy_cluster_topology_age_seconds)",
        "time() - patroni_proxy_cluster_last_good_poll_timestamp_seconds",
    ] {
        let v = query(q);
        assert_eq!(v["status"], "success", "{q}: {v}");
    }
    let age = query("max by (cluster) (patroni_proxy_cluster_topology_age_seconds)");
    let secs: f64 = age["data"]["result"][0]["value"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(secs < 10.0, "{age}");
    report(
        "prometheus",
        format!("scraped; seconds since the last good poll {secs:.2}"),
    );
}

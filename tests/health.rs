//! The health listeners: Patroni-compatible checks, the agent port,
//! `/health` and `/metrics` (judged by promtool), against the real binary
//! and a mock Patroni serving captured `/cluster` answers.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

use crate::metrics::promtool;
use crate::util::{self, free_port, wait_until, MockPatroni, Mode, Proxy};

/// A proxy with health listeners over `body`; returns (proxy, health,
/// agent, admin) addresses.
fn start(mock: &MockPatroni, extra: &str) -> (Proxy, SocketAddr, SocketAddr, SocketAddr) {
    let (admin, health, agent, rw) = (free_port(), free_port(), free_port(), free_port());
    let ports = format!("rw: {{listen: \"127.0.0.1:{rw}\", roles: [leader]}}");
    let cfg = util::config(
        admin,
        &[mock.url()],
        &ports,
        &format!(
            "health: {{listen: \"0.0.0.0:{health}\", agent_listen: \"127.0.0.1:{agent}\"}}\n{extra}"
        ),
    );
    let proxy = Proxy::start(&cfg);
    let a = |p| SocketAddr::from(([127, 0, 0, 1], p));
    (proxy, a(health), a(agent), a(admin))
}

/// Status line code and body of an HTTP/1.0 request.
fn ask(addr: SocketAddr, method: &str, target: &str) -> (u16, String) {
    util::http_request(addr, method, target, "HTTP/1.0").unwrap()
}

fn agent(addr: SocketAddr, line: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(line).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn addrs() -> HashMap<&'static str, SocketAddr> {
    [("node1", 1), ("node2", 2), ("node3", 3)]
        .into_iter()
        .map(|(n, i)| (n, SocketAddr::from(([127, 0, 0, i], 5432))))
        .collect()
}

#[test]
fn checks_answer_with_patronis_codes() {
    let mock = MockPatroni::start(&util::fixture("patroni-4.1.5/sync_on.json", &addrs()));
    let (_proxy, health, _, _) = start(&mock, "");
    assert!(wait_until(Duration::from_secs(10), || ask(
        health,
        "GET",
        "/main/node1/primary"
    )
    .0 == 200));
    let (code, body) = ask(health, "GET", "/main/node1/primary");
    assert_eq!(code, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["role"].as_str(), v["timeline"].as_u64()),
        (Some("leader"), Some(1))
    );
    assert!(v["poll_age_seconds"].as_f64().unwrap() < 10.0);
    for (target, want) in [
        ("/main/node1/", 200),
        ("/main/node1/leader", 200),
        ("/main/node1/replica", 503),
        ("/main/node2/replica?lag=16MB", 200),
        ("/main/node2/async", 200),
        ("/main/node2/sync", 503),
        ("/main/node3/sync", 200),
        ("/main/node3/read-only-sync", 200),
        ("/main/node3/tag_x", 503),
        ("/main/node3/health", 200),
        ("/main/node3/readiness", 200),
        ("/main/node3/standby", 503),
        ("/main/node9/primary", 503),
        ("/other/node1/primary", 404),
        ("/main//x", 400),
        ("/sync/", 503),
    ] {
        assert_eq!(ask(health, "GET", target).0, want, "GET {target}");
    }
    // HEAD and OPTIONS (HAProxy's default method): the status line
    // and headers only; on /readiness they fall to the generic check.
    for m in ["HEAD", "OPTIONS"] {
        let (code, body) = ask(health, m, "/main/node2/replica");
        assert_eq!((code, body.as_str()), (200, ""), "{m}");
        assert_eq!(ask(health, m, "/main/node1/readiness").0, 503, "{m}");
    }
    assert_eq!(ask(health, "POST", "/main/node1/primary").0, 405);
    // The admin routes are not on the health listener.
    assert_eq!(ask(health, "GET", "/clusters").0, 503, "a check path there");
    assert_eq!(ask(health, "GET", "/update_clusters").0, 503);
    assert_eq!(ask(health, "GET", "/").0, 200);
}

#[test]
fn agent_port_answers_one_line() {
    let mock = MockPatroni::start(&util::fixture("patroni-4.1.5/normal.json", &addrs()));
    let (_proxy, health, agent_addr, _) = start(&mock, "");
    assert!(wait_until(Duration::from_secs(10), || ask(
        health,
        "GET",
        "/main/node1/primary"
    )
    .0 == 200));
    assert_eq!(agent(agent_addr, b"/main/node1/primary\n"), "up ready\n");
    assert_eq!(
        agent(agent_addr, b"/main/node2/replica?lag=1MB\r\n"),
        "up ready\n"
    );
    let down = agent(agent_addr, b"/main/node2/primary\n");
    assert!(down.starts_with("down #role replica"), "{down}");
    assert!(agent(agent_addr, b"/main/node7/replica\n").starts_with("down #member not in"));
    assert!(agent(agent_addr, b"\xff\xfe\n").starts_with("down #"));
    // No agent-send: after the idle time, a hint.
    let silent = agent(agent_addr, b"");
    assert!(silent.starts_with("down #no request line"), "{silent}");
    // A draining leader (running, no timeline): drain.
    let mut body = util::fixture("patroni-4.1.5/normal.json", &addrs());
    body["members"][0]
        .as_object_mut()
        .unwrap()
        .remove("timeline");
    mock.set(&body);
    assert!(wait_until(Duration::from_secs(10), || agent(
        agent_addr,
        b"/main/node1/primary\n"
    ) == "drain\n"));
}

#[test]
fn a_local_address_check_answers_for_the_member_on_that_address() {
    let mock = MockPatroni::start(&util::fixture("patroni-4.1.5/normal.json", &addrs()));
    let (_proxy, health, _, _) = start(&mock, "");
    let on = |i: u8| SocketAddr::from(([127, 0, 0, i], health.port()));
    assert!(wait_until(Duration::from_secs(10), || ask(
        on(1),
        "GET",
        "/primary"
    )
    .0 == 200));
    assert_eq!(ask(on(2), "GET", "/primary").0, 503);
    assert_eq!(ask(on(2), "OPTIONS", "/replica").0, 200);
    let (code, body) = ask(on(9), "GET", "/replica");
    assert_eq!(code, 503);
    assert!(body.contains("no member's host is 127.0.0.9"), "{body}");
    // Two members on one address: ambiguous.
    let mut two = addrs();
    two.insert("node3", SocketAddr::from(([127, 0, 0, 2], 5433)));
    mock.set(&util::fixture("patroni-4.1.5/normal.json", &two));
    assert!(wait_until(Duration::from_secs(10), || ask(
        on(2),
        "GET",
        "/replica"
    )
    .0 == 400));
    let (_, body) = ask(on(2), "GET", "/replica");
    assert!(body.contains("main/node2, main/node3"), "{body}");
}

#[test]
fn a_named_member_answers_local_checks() {
    let mock = MockPatroni::start(&util::fixture("patroni-4.1.5/normal.json", &addrs()));
    let (admin, h2, rw) = (free_port(), free_port(), free_port());
    let cfg = util::config(
        admin,
        &[mock.url()],
        &format!("rw: {{listen: \"127.0.0.1:{rw}\", roles: [leader]}}"),
        &format!("health: {{listen: \"127.0.0.1:{h2}\", member: main/node3}}\n"),
    );
    let _p = Proxy::start(&cfg);
    let h2 = SocketAddr::from(([127, 0, 0, 1], h2));
    assert!(wait_until(Duration::from_secs(10), || ask(
        h2, "GET", "/replica"
    )
    .0 == 200));
    assert_eq!(ask(h2, "GET", "/primary").0, 503);
}

#[test]
fn stale_topology_fails_every_check_and_health() {
    let mock = MockPatroni::start(&util::fixture("patroni-4.1.5/normal.json", &addrs()));
    let (proxy, health, agent_addr, admin) = start(&mock, "topology_ttl: 1\n");
    assert!(wait_until(Duration::from_secs(10), || ask(
        health, "GET", "/health"
    )
    .0 == 200));
    let (code, body) = ask(admin, "GET", "/health");
    assert_eq!(code, 200, "{body}");
    mock.set_mode(Mode::Status(500));
    assert!(wait_until(Duration::from_secs(10), || ask(
        health,
        "GET",
        "/main/node1/primary"
    )
    .0 == 503));
    let (_, body) = ask(health, "GET", "/main/node1/primary");
    assert!(body.contains("topology is stale"), "{body}");
    assert!(agent(agent_addr, b"/main/node1/primary\n").starts_with("down #topology is stale"));
    let (code, body) = ask(health, "GET", "/health");
    assert_eq!(code, 503);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["problems"][0]["problem"]
            .as_str()
            .unwrap()
            .contains("stale"),
        "{body}"
    );
    drop(proxy);
}

#[test]
fn health_names_a_port_without_a_routable_member() {
    let mut body = util::fixture("patroni-4.1.5/normal.json", &addrs());
    body["members"][0]["role"] = "replica".into();
    let mock = MockPatroni::start(&body);
    let (proxy, health, _, _) = start(&mock, "");
    assert!(
        wait_until(Duration::from_secs(10), || {
            let (code, body) = ask(health, "GET", "/health");
            code == 503 && !body.contains("no successful")
        }),
        "{}",
        proxy.log()
    );
    let (_, body) = ask(health, "GET", "/health");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["problems"][0]["port"], "rw", "{body}");
    assert_eq!(v["problems"][0]["problem"], "no routable member");
}

#[test]
fn metrics_on_both_listeners_satisfy_promtool() {
    let mock = MockPatroni::start(&util::fixture("patroni-4.1.5/sync_on.json", &addrs()));
    let (_proxy, health, _, admin) = start(&mock, "");
    assert!(wait_until(Duration::from_secs(10), || ask(
        health,
        "GET",
        "/main/node1/primary"
    )
    .0 == 200));
    for addr in [health, admin] {
        let (code, text) = ask(addr, "GET", "/metrics");
        assert_eq!(code, 200);
        assert_eq!(promtool(&text), "", "{text}");
        for series in [
            "patroni_proxy_member_info{cluster=\"main\",member=\"node3\",role=\"sync_standby\",state=\"streaming\"} 1",
            "patroni_proxy_member_routable{cluster=\"main\",port=\"rw\",member=\"node1\"} 1",
            "patroni_proxy_cluster_polls_total{cluster=\"main\"} ",
            "patroni_proxy_health_checks_total{listener=\"http\",status=\"2xx\"} ",
            "process_resident_memory_bytes ",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
    }
}

#[test]
fn every_metric_is_documented_in_man_5() {
    let mock = MockPatroni::start(&util::fixture("patroni-4.1.5/normal.json", &addrs()));
    let (_proxy, health, _, _) = start(&mock, "");
    assert!(wait_until(Duration::from_secs(10), || ask(
        health, "GET", "/health"
    )
    .0 == 200));
    let (_, text) = ask(health, "GET", "/metrics");
    let man5 = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/man/patroni-proxy.5"))
        .unwrap();
    let served = patroni_proxy::metrics::family_names(&text);
    assert!(served.len() > 30, "{served:?}");
    let documented: Vec<&str> = man5
        .lines()
        .filter_map(|l| l.strip_prefix(".B "))
        .filter(|n| n.starts_with("patroni_proxy_") || n.starts_with("process_"))
        .collect();
    for name in &served {
        assert!(
            documented.contains(&name.as_str()),
            "{name} is not in man 5 METRICS"
        );
    }
    for name in &documented {
        assert!(
            served.iter().any(|s| s == name),
            "man 5 documents {name}, which /metrics does not serve"
        );
    }
}

#[test]
fn reload_adds_moves_and_removes_the_health_listeners() {
    let mock = MockPatroni::start(&util::fixture("patroni-4.1.5/normal.json", &addrs()));
    let (admin, rw, h1, h2, ag) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let ports = format!("rw: {{listen: \"127.0.0.1:{rw}\", roles: [leader]}}");
    let cfg = |extra: &str| util::config(admin, &[mock.url()], &ports, extra);
    let proxy = Proxy::start(&cfg(""));
    let a = |p| SocketAddr::from(([127, 0, 0, 1], p));
    assert!(TcpStream::connect(a(h1)).is_err());
    proxy.rewrite_config(&cfg(&format!(
        "health: {{listen: \"127.0.0.1:{h1}\", agent_listen: \"127.0.0.1:{ag}\"}}\n"
    )));
    proxy.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(
        a(h1)
    )
    .is_ok()
        && ask(a(h1), "GET", "/main/node1/primary").0 == 200));
    assert_eq!(agent(a(ag), b"/main/node1/primary\n"), "up ready\n");
    proxy.rewrite_config(&cfg(&format!("health: {{listen: \"127.0.0.1:{h2}\"}}\n")));
    proxy.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(
        a(h2)
    )
    .is_ok()));
    assert_eq!(ask(a(h2), "GET", "/main/node2/replica").0, 200);
    assert!(wait_until(Duration::from_secs(5), || TcpStream::connect(
        a(h1)
    )
    .is_err()
        && TcpStream::connect(a(ag)).is_err()));
}

/// HTTPS on the health listener (the same `tls:` keys as the admin
/// listener), judged by curl; plain HTTP gets no answer there; and
/// `health.allow.read` refuses a caller outside its networks with 403.
#[test]
fn health_listener_serves_https_and_keeps_to_its_allow_list() {
    use crate::util::certs::{https_status, Ca, KeyFormat};

    let dir = util::TempDir::new();
    let ca = Ca::new(&dir.0, "ca");
    let server = ca.issue("health", "IP:127.0.0.1", KeyFormat::Pkcs8);
    let mock = MockPatroni::start(&util::fixture("patroni-4.1.5/sync_on.json", &addrs()));
    let (admin, health, rw) = (free_port(), free_port(), free_port());
    let ports = format!("rw: {{listen: \"127.0.0.1:{rw}\", roles: [leader]}}");
    let section = |extra: &str| {
        format!(
            "health:\n  listen: \"127.0.0.1:{health}\"\n  tls: {{cert: \"{}\", key: \"{}\", min_version: \"1.3\"}}\n{extra}",
            server.cert.display(),
            server.key.display()
        )
    };
    let cfg = util::config(admin, &[mock.url()], &ports, &section(""));
    let proxy = Proxy::start(&cfg);
    let curl = |path: &str| https_status(&ca.cert, &format!("https://127.0.0.1:{health}{path}"));
    assert!(
        wait_until(Duration::from_secs(10), || curl("/main/node1/primary")
            == "200"),
        "{}",
        proxy.log()
    );
    assert_eq!(curl("/main/node1/replica"), "503");
    assert_eq!(curl("/main/nobody/primary"), "503");
    // Plain HTTP on the TLS port: no HTTP answer.
    assert!(
        !util::http_request(local_addr(health), "GET", "/main/node1/primary", "HTTP/1.0")
            .is_ok_and(|(code, _)| code == 200)
    );
    // ... and that failed handshake is counted.
    let counted = || {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&ca.cert)
            .arg(format!("https://127.0.0.1:{health}/metrics"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| {
                l.strip_prefix("patroni_proxy_tls_handshake_failures_total{listener=\"health\"} ")
                    .map(str::to_string)
            })
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(
        wait_until(Duration::from_secs(10), || counted() >= 1),
        "{}",
        proxy.log()
    );
    drop(proxy);

    // Reading only from 10.0.0.0/8: this loopback caller is refused.
    let cfg = util::config(
        admin,
        &[mock.url()],
        &ports,
        &section("  allow: {read: [\"10.0.0.0/8\"]}\n"),
    );
    let _proxy = Proxy::start(&cfg);
    assert!(wait_until(Duration::from_secs(10), || curl(
        "/main/node1/primary"
    ) == "403"));
}

fn local_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A leader and a streaming replica `lag` bytes behind (Patroni 4.1 shape).
fn leader_and_replica(lag: u64) -> Value {
    let at = |i| SocketAddr::from(([127, 0, 0, i], 5432));
    util::cluster(vec![
        util::member("node1", "leader", "running", at(1), None),
        util::member("node2", "replica", "streaming", at(2), Some(lag)),
    ])
}

#[test]
fn readiness_uses_the_clusters_maximum_lag_on_failover() {
    // 3 MiB behind: over Patroni's 1 MiB default, within the cluster's 8 MiB.
    let mock = MockPatroni::start(&leader_and_replica(3 << 20));
    mock.set_config(Some(&serde_json::json!({
        "ttl": 30, "loop_wait": 10, "retry_timeout": 10,
        "maximum_lag_on_failover": 8 << 20,
        "postgresql": {"use_pg_rewind": true, "parameters": {"max_connections": 100}},
    })));
    let (proxy, health, agent_port, _) = start(&mock, "");
    let ready = || ask(health, "GET", "/main/node2/readiness").0;
    assert!(
        wait_until(Duration::from_secs(10), || ready() == 200),
        "{}",
        proxy.log()
    );
    assert!(agent(agent_port, b"/main/node2/readiness\n").starts_with("up"));
    // An explicit lag= still wins, and a lag over the cluster's limit fails.
    assert_eq!(ask(health, "GET", "/main/node2/readiness?lag=1MB").0, 503);
    mock.set(&leader_and_replica(9 << 20));
    assert!(wait_until(Duration::from_secs(10), || ready() == 503));
    assert!(proxy.log().contains("maximum_lag_on_failover 8388608"));
    // Read once, not on every poll (every 0.2 s here).
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(mock.config_requests(), 1);
}

#[test]
fn readiness_keeps_patronis_default_when_config_fails() {
    let mock = MockPatroni::start(&leader_and_replica(3 << 20));
    // GET /config answers 502 (no configuration in the DCS).
    let (proxy, health, _, _) = start(&mock, "");
    assert!(wait_until(Duration::from_secs(10), || {
        mock.config_requests() >= 1 && proxy.log().contains("GET /config failed")
    }));
    let (code, body) = ask(health, "GET", "/main/node2/readiness");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("exceeds maximum allowable 1048576"), "{body}");
    assert_eq!(ask(health, "GET", "/main/node2/readiness?lag=4MB").0, 200);
    assert_eq!(
        proxy.log().matches("GET /config failed").count(),
        1,
        "logged once"
    );
    drop(proxy);

    // Without a health listener, /config is never asked for.
    let mock = MockPatroni::start(&leader_and_replica(0));
    let rw = free_port();
    let ports = format!("rw: {{listen: \"127.0.0.1:{rw}\", roles: [leader]}}");
    let proxy = Proxy::start(&util::config(free_port(), &[mock.url()], &ports, ""));
    assert_eq!(proxy.update(), 200);
    assert_eq!(proxy.update(), 200);
    assert_eq!(mock.config_requests(), 0);
}

//! Scenarios against a real Patroni cluster (etcd + PostgreSQL + Patroni on
//! 127.0.0.1, managed by `tests/cluster/cluster`). Run by `tests/cluster/run`
//! for each Patroni version:
//!
//! ```text
//! PATRONI_VERSION=3 cargo test --test real_cluster -- --ignored --test-threads=1 --nocapture
//! ```
//!
//! Every scenario starts from a healthy cluster (it starts whatever is
//! missing) and does not assume which member leads. Clients speak the
//! PostgreSQL protocol (`tests/pg`) and ask `pg_is_in_recovery(),
//! inet_server_port()` to learn where they landed. Lines starting with
//! `REPORT` are the figures the suite records (failover timings, pgbench).
//!
//! The `tls_` scenarios need the cluster started with `CLUSTER_TLS=1` (REST
//! API over HTTPS only, `verify_client: required`); `tests/cluster/run`
//! runs them on a cluster of their own and skips them on the plain one.

#[path = "util/mod.rs"]
mod util;

mod pg;

/// Health checks against Patroni's own answers.
#[path = "real_cluster_health.rs"]
mod health_differential;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use pg::{whereami, Pg};
use util::{free_port, http_get, wait_until, Proxy};

/// The proxy's poll interval in these scenarios.
const INTERVAL: f64 = 1.0;
const CONNECT: Duration = Duration::from_secs(45);

struct Node {
    name: String,
    pg: SocketAddr,
    api: String,
    config: PathBuf,
}

struct Cluster {
    version: String,
    nodes: Vec<Node>,
    patronictl: String,
    script: PathBuf,
    /// The cluster's state directory.
    state: PathBuf,
    /// With `CLUSTER_TLS=1`: the cluster's CA and a client certificate.
    tls: Option<ClusterTls>,
}

struct ClusterTls {
    ca: PathBuf,
    ca_key: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/cluster/cluster")
}

fn run_script(args: &[&str]) -> String {
    let out = Command::new(script())
        .args(args)
        .output()
        .expect("run tests/cluster/cluster");
    assert!(
        out.status.success(),
        "tests/cluster/cluster {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The running cluster, started (or completed) and healthy.
fn cluster() -> Cluster {
    run_script(&["start"]);
    let env = run_script(&["env"]);
    let get = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap()
            .to_string()
    };
    let n: usize = get("NODES").parse().unwrap();
    let nodes = (1..=n)
        .map(|i| {
            let v = get(&format!("NODE{i}"));
            let f: Vec<&str> = v.split(' ').collect();
            Node {
                name: format!("node{i}"),
                pg: f[0].parse().unwrap(),
                api: f[1].into(),
                config: f[2].into(),
            }
        })
        .collect();
    let tls = env.contains("TLS_CA=").then(|| ClusterTls {
        ca: get("TLS_CA").into(),
        ca_key: get("TLS_CA_KEY").into(),
        cert: get("TLS_CERT").into(),
        key: get("TLS_KEY").into(),
    });
    Cluster {
        version: get("PATRONI_VERSION"),
        nodes,
        patronictl: get("PATRONICTL"),
        script: script(),
        state: get("STATE").into(),
        tls,
    }
}

impl Cluster {
    /// `/cluster` from the first member that answers.
    fn topology(&self) -> Option<Value> {
        self.api_json("/cluster")
    }

    /// `GET path` (a JSON document) from the first member that answers.
    fn api_json(&self, path: &str) -> Option<Value> {
        if let Some(t) = &self.tls {
            return self.nodes.iter().find_map(|n| {
                let out = Command::new("curl")
                    .args(["-sf", "--max-time", "2", "--cacert"])
                    .arg(&t.ca)
                    .arg("--cert")
                    .arg(&t.cert)
                    .arg("--key")
                    .arg(&t.key)
                    .arg(format!("{}{path}", n.api))
                    .output()
                    .ok()?;
                out.status
                    .success()
                    .then(|| serde_json::from_slice(&out.stdout).ok())
                    .flatten()
            });
        }
        self.nodes.iter().find_map(|n| {
            let addr = n.api.trim_start_matches("http://").parse().ok()?;
            let (code, body) = http_get(addr, path).ok()?;
            (code == 200)
                .then(|| serde_json::from_str(&body).ok())
                .flatten()
        })
    }

    fn leader(&self) -> &Node {
        let t = self.topology().expect("a /cluster answer");
        let name = t["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["role"] == "leader")
            .and_then(|m| m["name"].as_str())
            .expect("a leader")
            .to_string();
        self.node(&name)
    }

    fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).unwrap()
    }

    fn by_port(&self, port: u16) -> &Node {
        self.nodes.iter().find(|n| n.pg.port() == port).unwrap()
    }

    fn replicas(&self) -> Vec<&Node> {
        let leader = self.leader().name.clone();
        self.nodes.iter().filter(|n| n.name != leader).collect()
    }

    /// The running leader other than `old`, once `/cluster` shows one.
    fn wait_new_leader(&self, old: &str, timeout: Duration) -> (String, Instant) {
        let mut found = None;
        let ok = wait_until(timeout, || {
            found = self.topology().and_then(|t| {
                t["members"].as_array()?.iter().find_map(|m| {
                    (m["role"] == "leader" && m["state"] == "running" && m["name"] != old)
                        .then(|| m["name"].as_str().unwrap().to_string())
                })
            });
            found.is_some()
        });
        assert!(ok, "no new leader within {timeout:?}");
        (found.unwrap(), Instant::now())
    }

    fn wait_member(&self, name: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) {
        let ok = wait_until(timeout, || {
            self.topology().is_some_and(|t| {
                t["members"]
                    .as_array()
                    .is_some_and(|ms| ms.iter().any(|m| m["name"] == name && pred(m)))
            })
        });
        assert!(
            ok,
            "member {name} never reached the expected state: {:?}",
            self.topology()
        );
    }

    fn patronictl(&self, args: &[&str]) {
        let config = &self
            .nodes
            .iter()
            .find(|n| n.config.exists())
            .unwrap()
            .config;
        let out = Command::new(&self.patronictl)
            .arg("-c")
            .arg(config)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "patronictl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn synchronous_mode(&self, mode: &str) {
        let set = format!("synchronous_mode={mode}");
        self.patronictl(&["edit-config", "demo", "-q", "--force", "-s", &set]);
    }

    fn switchover(&self, leader: &str, candidate: &str) {
        self.patronictl(&[
            "switchover",
            "demo",
            "--leader",
            leader,
            "--candidate",
            candidate,
            "--force",
        ]);
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new(&self.script).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A session straight to a member (not through the proxy).
    fn direct(&self, node: &Node) -> Pg {
        Pg::connect(node.pg, Duration::from_secs(10)).expect("direct connection")
    }
}

/// The proxy in front of the cluster: one port per role.
struct Rig {
    c: Cluster,
    proxy: Proxy,
    rw: SocketAddr,
    ro: SocketAddr,
    sync: SocketAddr,
    any: SocketAddr,
    /// Like `ro`, with `lag_grace: 600`.
    graced: SocketAddr,
}

fn rig_with_hosts(c: Cluster, hosts: Vec<String>) -> Rig {
    rig_polling(c, hosts, INTERVAL)
}

fn rig_polling(c: Cluster, hosts: Vec<String>, interval: f64) -> Rig {
    let [rw, ro, sync, any, graced] = [0; 5].map(|_| free_port());
    let ports = format!(
        "rw: {{listen: \"127.0.0.1:{rw}\", roles: [leader], backend_wait_timeout: 40}}\n\
         ro: {{listen: \"127.0.0.1:{ro}\", roles: [sync, async], max_lag_in_bytes: 1048576}}\n\
         sync: {{listen: \"127.0.0.1:{sync}\", roles: [sync], backend_wait_timeout: 0}}\n\
         any: {{listen: \"127.0.0.1:{any}\", roles: [any]}}\n\
         graced: {{listen: \"127.0.0.1:{graced}\", roles: [sync, async], max_lag_in_bytes: 1048576, lag_grace: 600}}"
    );
    let cfg = util::config(free_port(), &hosts, &ports, "").replace(
        "cluster_update_interval: 0.2",
        &format!("cluster_update_interval: {interval}"),
    );
    let proxy = Proxy::start(&cfg);
    let a = |p| SocketAddr::from(([127, 0, 0, 1], p));
    let n = c.nodes.len();
    proxy.wait_backends("main", "rw", &[c.leader().name.as_str()]);
    assert!(wait_until(Duration::from_secs(20), || proxy
        .backends("main", "ro")
        .len()
        == n - 1));
    Rig {
        c,
        proxy,
        rw: a(rw),
        ro: a(ro),
        sync: a(sync),
        any: a(any),
        graced: a(graced),
    }
}

fn rig() -> Rig {
    let c = cluster();
    let hosts = c.nodes.iter().map(|n| n.api.clone()).collect();
    rig_with_hosts(c, hosts)
}

fn report(what: &str, text: String) {
    println!("REPORT patroni-{} {what}: {text}", version_label());
}

fn version_label() -> String {
    std::env::var("PATRONI_VERSION").unwrap_or_else(|_| "3".into())
}

/// Writes through the leader port until one succeeds on a member other than
/// the one on `old_port`; returns when and where.
fn first_write(rw: SocketAddr, old_port: u16, deadline: Duration) -> (Instant, u16) {
    let end = Instant::now() + deadline;
    loop {
        let attempt = Pg::connect(rw, CONNECT).and_then(|mut pg| {
            pg.query("CREATE TABLE IF NOT EXISTS pp_probe (at timestamptz); INSERT INTO pp_probe VALUES (now())")?;
            pg.whereami()
        });
        match attempt {
            Ok((false, port)) if port != old_port => return (Instant::now(), port),
            Ok((false, _)) => thread::sleep(Duration::from_millis(20)),
            Ok((true, port)) => panic!("the leader port reached a replica on {port}"),
            Err(_) if Instant::now() < end => thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("no write through the proxy within {deadline:?}: {e}"),
        }
    }
}

/// Reports when the new leader showed in `/cluster` and when the first write
/// through the proxy landed on it (`times`: the event, the new leader seen,
/// the first write); checks the latter is within one poll interval (plus
/// slack for a shared 2-core machine) and that the old leader's session on
/// the leader port is closed.
fn timing_and_old_session(
    what: &str,
    since: &str,
    times: (Instant, Instant, Instant),
    new_name: &str,
    old_session: &mut Pg,
) {
    let (event, seen, written) = times;
    let lag = written.saturating_duration_since(seen).as_secs_f64();
    report(
        what,
        format!(
            "new leader {new_name} in /cluster {:.2}s {since}; first write through the proxy {lag:.2}s after that",
            seen.duration_since(event).as_secs_f64()
        ),
    );
    assert!(
        lag <= INTERVAL + 0.5,
        "first write {lag:.2}s after /cluster showed the new leader"
    );
    assert!(
        old_session.query("SELECT 1").is_err(),
        "the old leader's leader-port session is closed"
    );
}

/// Opens sessions on the replica port until there is one on each replica.
fn one_session_per_replica(rig: &Rig) -> Vec<(u16, Pg)> {
    let want = rig.c.nodes.len() - 1;
    let mut out: Vec<(u16, Pg)> = Vec::new();
    for _ in 0..want * 3 {
        let mut s = Pg::connect(rig.ro, CONNECT).unwrap();
        let (recovery, port) = s.whereami().unwrap();
        assert!(recovery, "the replica port reached the leader");
        if !out.iter().any(|(p, _)| *p == port) {
            out.push((port, s));
        }
        if out.len() == want {
            break;
        }
    }
    assert_eq!(
        out.len(),
        want,
        "least connections spreads clients over every replica"
    );
    out
}

#[test]
#[ignore = "needs a real cluster: tests/cluster/run"]
fn a_routing_by_role() {
    let rig = rig();
    let leader = rig.c.leader().pg.port();
    for _ in 0..3 {
        assert_eq!(whereami(rig.rw, CONNECT).unwrap(), (false, leader));
    }
    // Least connections over the streaming replicas.
    let held: Vec<Pg> = (0..4)
        .map(|_| Pg::connect(rig.ro, CONNECT).unwrap())
        .collect();
    let mut ports: Vec<u16> = held
        .into_iter()
        .map(|mut s| s.whereami().unwrap())
        .map(|(r, p)| {
            assert!(r, "replica port reached a primary");
            p
        })
        .collect();
    ports.sort();
    let replicas: Vec<u16> = rig.c.replicas().iter().map(|n| n.pg.port()).collect();
    assert_eq!(ports.len(), 4);
    for r in &replicas {
        assert_eq!(ports.iter().filter(|p| *p == r).count(), 2, "{ports:?}");
    }
    // `any` reaches all members.
    let held: Vec<Pg> = (0..3)
        .map(|_| Pg::connect(rig.any, CONNECT).unwrap())
        .collect();
    let mut any: Vec<u16> = held
        .into_iter()
        .map(|mut s| s.whereami().unwrap().1)
        .collect();
    any.sort();
    let mut all: Vec<u16> = rig.c.nodes.iter().map(|n| n.pg.port()).collect();
    all.sort();
    assert_eq!(any, all);
    // No synchronous mode: the sync port has nobody and refuses at once.
    assert!(rig.proxy.backends("main", "sync").is_empty());
    assert!(whereami(rig.sync, CONNECT).is_err());
}

#[test]
#[ignore = "needs a real cluster: tests/cluster/run"]
fn b_kill_the_leader() {
    let rig = rig();
    let old = rig.c.leader();
    let (old_name, old_port) = (old.name.clone(), old.pg.port());
    let mut on_leader = Pg::connect(rig.rw, CONNECT).unwrap();
    assert_eq!(on_leader.whereami().unwrap(), (false, old_port));
    let replicas = one_session_per_replica(&rig);

    let killed_at = Instant::now();
    let killed = rig.c.run(&["kill-leader"]);
    assert_eq!(format!("node{killed}"), old_name);
    let writer = {
        let rw = rig.rw;
        thread::spawn(move || first_write(rw, old_port, Duration::from_secs(90)))
    };
    let (new_name, seen_at) = rig.c.wait_new_leader(&old_name, Duration::from_secs(90));
    let (written_at, port) = writer.join().unwrap();
    let new = rig.c.node(&new_name);
    assert_eq!(port, new.pg.port(), "writes land on the new leader");
    timing_and_old_session(
        "kill-leader",
        "after the kill",
        (killed_at, seen_at, written_at),
        &new_name,
        &mut on_leader,
    );
    for (port, mut s) in replicas {
        let survived = s.query("SELECT 1").is_ok();
        if port == new.pg.port() {
            assert!(
                !survived,
                "the promoted replica's replica-port session is closed"
            );
        } else {
            assert!(
                survived,
                "the session on the surviving replica is still usable"
            );
        }
    }
    rig.c.run(&["start"]); // the killed member rejoins
}

#[test]
#[ignore = "needs a real cluster: tests/cluster/run"]
fn c_switchover() {
    let rig = rig();
    let old = rig.c.leader().name.clone();
    let candidate = rig.c.replicas()[0].name.clone();
    let mut on_leader = Pg::connect(rig.rw, CONNECT).unwrap();
    let old_port = on_leader.whereami().unwrap().1;
    // Writing from before the switchover: the first write that lands on
    // another member is the one that counts.
    let writer = {
        let rw = rig.rw;
        thread::spawn(move || first_write(rw, old_port, Duration::from_secs(60)))
    };
    let started = Instant::now();
    rig.c.switchover(&old, &candidate);
    let (new_name, seen_at) = rig.c.wait_new_leader(&old, Duration::from_secs(60));
    assert_eq!(new_name, candidate);
    let (written_at, port) = writer.join().unwrap();
    assert_eq!(port, rig.c.node(&candidate).pg.port());
    timing_and_old_session(
        "switchover",
        "after patronictl started",
        (started, seen_at, written_at),
        &new_name,
        &mut on_leader,
    );
    rig.c.run(&["wait"]);
}

#[test]
#[ignore = "needs a real cluster: tests/cluster/run"]
fn d_stopped_replica_leaves_and_comes_back() {
    let rig = rig();
    let victim = rig.c.replicas()[0].name.clone();
    let i = &victim[4..];
    rig.c.run(&["stop-node", i]);
    rig.c.wait_member(&victim, Duration::from_secs(30), |m| {
        m["state"] != "running" && m["state"] != "streaming"
    });
    assert!(wait_until(Duration::from_secs(10), || !rig
        .proxy
        .backends("main", "ro")
        .contains(&victim)));
    let port = rig.c.node(&victim).pg.port();
    for _ in 0..4 {
        assert_ne!(
            whereami(rig.ro, CONNECT).unwrap().1,
            port,
            "the stopped replica gets no clients"
        );
    }
    rig.c.run(&["start"]);
    assert!(wait_until(Duration::from_secs(30), || rig
        .proxy
        .backends("main", "ro")
        .contains(&victim)));
    let mut seen = false;
    for _ in 0..6 {
        seen |= whereami(rig.ro, CONNECT).unwrap().1 == port;
    }
    assert!(seen, "the restarted replica takes clients again");
}

#[test]
#[ignore = "needs a real cluster: tests/cluster/run"]
fn e_lagging_replica_is_evicted_and_returns() {
    let rig = rig();
    let sessions = one_session_per_replica(&rig);
    let victim_port = sessions[0].0;
    let victim = rig.c.by_port(victim_port).name.clone();
    // A long session on the victim through the port with lag_grace.
    let mut graced = (0..10)
        .find_map(|_| {
            let mut s = Pg::connect(rig.graced, CONNECT).unwrap();
            (s.whereami().unwrap().1 == victim_port).then_some(s)
        })
        .expect("a session on the victim through the graced port");
    // Patroni 4.1 reports replay_lag: pause replay. Patroni resumes a
    // paused replay by itself (PostgreSQL 14+) unless the cluster is in
    // maintenance mode, so pause Patroni first. Older Patronis report only
    // `lag`, which follows the received position: stop the WAL receiver
    // instead (SIGSTOP), so the received position stalls.
    let v4 = rig.c.version == "4";
    let mut direct = rig.c.direct(rig.c.by_port(victim_port));
    let walreceiver = if v4 {
        rig.c.patronictl(&["pause", "demo", "--wait"]);
        direct.query("SELECT pg_wal_replay_pause()").unwrap();
        None
    } else {
        let pid = direct
            .query("SELECT pid FROM pg_stat_wal_receiver")
            .unwrap()[0][0]
            .clone()
            .unwrap();
        assert_eq!(signal(&pid, "STOP"), 0);
        Some(pid)
    };
    let mut writer = Pg::connect(rig.rw, CONNECT).unwrap();
    writer
        .query("CREATE TABLE IF NOT EXISTS pp_lag (x text)")
        .unwrap();
    // A steady trickle of about 170 KB/s of WAL. Patroni's lag figures are
    // snapshots refreshed every loop_wait (2 s) on both sides, so a healthy
    // replica can read up to rate x loop_wait behind: the rate must stay
    // well under limit / loop_wait for only the paused replica to cross it.
    let evicted = wait_until(Duration::from_secs(90), || {
        let _ =
            writer.query("INSERT INTO pp_lag SELECT repeat('x', 1000) FROM generate_series(1, 50)");
        thread::sleep(Duration::from_millis(300));
        !rig.proxy.backends("main", "ro").contains(&victim)
    });
    assert!(
        evicted,
        "the lagging replica never left the replica port: {:?}",
        rig.c.topology()
    );
    let mut sessions = sessions;
    assert!(
        sessions[0].1.query("SELECT 1").is_err(),
        "its session on the lag-limited port was closed"
    );
    assert!(
        sessions[1].1.query("SELECT 1").is_ok(),
        "the other replica's session is untouched"
    );
    for _ in 0..4 {
        assert_ne!(whereami(rig.ro, CONNECT).unwrap().1, victim_port);
    }
    assert!(
        rig.proxy.log().contains(&format!("member={victim}")),
        "eviction logged"
    );
    // The `any` port has no lag limit: the member stays there.
    assert!(rig.proxy.backends("main", "any").contains(&victim));
    // With lag_grace the long session lives on, and new clients avoid it.
    assert!(
        graced.query("SELECT 1").is_ok(),
        "a session within lag_grace is kept"
    );
    for _ in 0..4 {
        assert_ne!(whereami(rig.graced, CONNECT).unwrap().1, victim_port);
    }
    report(
        "lag with grace",
        format!("{victim} evicted on both lag-limited ports; its session on the lag_grace port kept, on the other closed"),
    );
    match walreceiver {
        None => {
            direct.query("SELECT pg_wal_replay_resume()").unwrap();
            rig.c.patronictl(&["resume", "demo", "--wait"]);
        }
        Some(pid) => assert_eq!(signal(&pid, "CONT"), 0),
    }
    assert!(
        wait_until(Duration::from_secs(60), || rig
            .proxy
            .backends("main", "ro")
            .contains(&victim)),
        "the replica came back once it caught up"
    );
    assert!(
        graced.query("SELECT 1").is_ok(),
        "and it never lost the session"
    );
    writer.query("DROP TABLE pp_lag").unwrap();
}

fn signal(pid: &str, sig: &str) -> i32 {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid)
        .status()
        .map_or(1, |s| s.code().unwrap_or(1))
}

#[test]
#[ignore = "needs a real cluster: tests/cluster/run"]
fn f_sync_port_follows_the_sync_standby() {
    let rig = rig();
    rig.c.synchronous_mode("true");
    let sync_name = || -> Option<String> {
        rig.c.topology()?["members"]
            .as_array()?
            .iter()
            .find_map(|m| {
                (m["role"] == "sync_standby" && m["state"] != "stopped")
                    .then(|| m["name"].as_str().unwrap().to_string())
            })
    };
    assert!(wait_until(Duration::from_secs(30), || sync_name().is_some()));
    let first = sync_name().unwrap();
    assert!(wait_until(Duration::from_secs(10), || rig
        .proxy
        .backends("main", "sync")
        == [first.clone()]));
    for _ in 0..3 {
        assert_eq!(
            whereami(rig.sync, CONNECT).unwrap(),
            (true, rig.c.node(&first).pg.port())
        );
    }
    // Take the sync standby away: Patroni names the other replica, and the
    // sync port follows.
    rig.c.run(&["stop-node", &first[4..]]);
    assert!(wait_until(Duration::from_secs(60), || sync_name()
        .is_some_and(|n| n != first)));
    let second = sync_name().unwrap();
    assert!(wait_until(Duration::from_secs(10), || rig
        .proxy
        .backends("main", "sync")
        == [second.clone()]));
    assert_eq!(
        whereami(rig.sync, CONNECT).unwrap(),
        (true, rig.c.node(&second).pg.port())
    );
    rig.c.run(&["start"]);
    if rig.c.version == "4" {
        rig.c.synchronous_mode("quorum");
        let n = rig.c.nodes.len() - 1;
        assert!(
            wait_until(Duration::from_secs(60), || rig
                .proxy
                .backends("main", "sync")
                .len()
                == n),
            "quorum standbys on the sync port: {:?}",
            rig.c.topology()
        );
        let ports: Vec<u16> = (0..n * 2)
            .map(|_| whereami(rig.sync, CONNECT).unwrap().1)
            .collect();
        assert!(
            rig.c
                .replicas()
                .iter()
                .all(|r| ports.contains(&r.pg.port())),
            "{ports:?}"
        );
    }
    rig.c.synchronous_mode("false");
    assert!(wait_until(Duration::from_secs(30), || rig
        .proxy
        .backends("main", "sync")
        .is_empty()));
    rig.c.run(&["wait"]);
}

#[test]
#[ignore = "needs a real cluster: tests/cluster/run"]
fn g_noloadbalance_tag_takes_a_replica_out() {
    let rig = rig();
    let victim = rig.c.replicas()[0];
    let (name, config) = (victim.name.clone(), victim.config.clone());
    let original = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{original}tags:\n  noloadbalance: true\n")).unwrap();
    let hup = || {
        let pidfile = config
            .parent()
            .unwrap()
            .join(format!("run/patroni{}.pid", &name[4..]));
        let pid = std::fs::read_to_string(pidfile).unwrap();
        assert_eq!(signal(pid.trim(), "HUP"), 0);
    };
    hup();
    rig.c.wait_member(&name, Duration::from_secs(30), |m| {
        m["tags"]["noloadbalance"] == true
    });
    assert!(wait_until(Duration::from_secs(10), || !rig
        .proxy
        .backends("main", "ro")
        .contains(&name)));
    assert!(!rig.proxy.backends("main", "any").contains(&name));
    for _ in 0..4 {
        assert_ne!(whereami(rig.ro, CONNECT).unwrap().1, victim.pg.port());
    }
    std::fs::write(&config, original).unwrap();
    hup();
    assert!(wait_until(Duration::from_secs(30), || rig
        .proxy
        .backends("main", "ro")
        .contains(&name)));
}

/// A replica's name, and every member's API with that replica's first.
fn replica_api_first(c: &Cluster) -> (String, Vec<String>) {
    let first = c.replicas()[0].name.clone();
    let mut hosts: Vec<String> = vec![c.node(&first).api.clone()];
    hosts.extend(
        c.nodes
            .iter()
            .filter(|n| n.name != first)
            .map(|n| n.api.clone()),
    );
    (first, hosts)
}

#[test]
#[ignore = "needs a real cluster: tests/cluster/run"]
fn h_first_api_host_dies_and_routing_goes_on() {
    let c = cluster();
    // The proxy asks a replica's API first; that Patroni is killed (its
    // PostgreSQL keeps running, so there is no failover).
    let (first, hosts) = replica_api_first(&c);
    let rig = rig_with_hosts(c, hosts.clone());
    assert_eq!(rig.proxy.status()["clusters"]["main"]["api_host"], hosts[0]);
    rig.c.run(&["kill-api", &first[4..]]);
    assert_eq!(rig.proxy.update(), 200, "the next host answers");
    assert_ne!(rig.proxy.status()["clusters"]["main"]["api_host"], hosts[0]);
    let leader = rig.c.leader().pg.port();
    for _ in 0..3 {
        assert_eq!(whereami(rig.rw, CONNECT).unwrap(), (false, leader));
        assert!(whereami(rig.ro, CONNECT).unwrap().0);
    }
    rig.c.run(&["start"]);
}

#[test]
#[ignore = "needs a real cluster: tests/cluster/run"]
fn i_pgbench_new_connections_across_a_switchover() {
    let rig = rig();
    let (n, candidate) = pgbench_across_a_switchover(&rig.c, &rig.proxy, rig.rw);
    assert_eq!(
        whereami(rig.rw, CONNECT).unwrap(),
        (false, rig.c.node(&candidate).pg.port())
    );
    assert!(n.tx > 100, "pgbench made progress");
    rig.c.run(&["wait"]);
}

/// `pgbench -S -C` through `port` (a leader port) while the leader is
/// switched over to the first replica; reports and checks that no new
/// connection failed for want of a backend. Returns the counts and the new
/// leader.
fn pgbench_across_a_switchover(
    c: &Cluster,
    proxy: &Proxy,
    rw: SocketAddr,
) -> (PgbenchCounts, String) {
    let port = rw.port().to_string();
    let init = Command::new("pgbench")
        .args(["-i", "-s", "1", "-q"])
        .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "postgres"])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let old = c.leader().name.clone();
    let candidate = c.replicas()[0].name.clone();
    let done = Arc::new(AtomicBool::new(false));
    let bench = {
        let done = done.clone();
        thread::spawn(move || {
            // One-second runs, so that a client aborted by the switchover
            // does not silence the rest of the measurement.
            let mut n = PgbenchCounts::default();
            while !done.load(Ordering::SeqCst) {
                let out = Command::new("pgbench")
                    .args(["-n", "-S", "-C", "-c", "4", "-j", "2", "-T", "1"])
                    .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "postgres"])
                    .output()
                    .unwrap();
                n.add(
                    &String::from_utf8_lossy(&out.stdout),
                    &String::from_utf8_lossy(&out.stderr),
                );
            }
            n
        })
    };
    thread::sleep(Duration::from_secs(3));
    c.switchover(&old, &candidate);
    c.wait_new_leader(&old, Duration::from_secs(60));
    thread::sleep(Duration::from_secs(4));
    done.store(true, Ordering::SeqCst);
    let n = bench.join().unwrap();
    let replayed = proxy.log().matches("refused the start-up").count();
    report(
        &format!(
            "pgbench -S -C across a switchover ({})",
            proxy_port_name(proxy, rw)
        ),
        format!(
            "{} transactions; {} new connections refused by the old leader while it shut down, \
             {} transactions cut on it; {} connections failed otherwise; \
             {replayed} start-ups replayed by the proxy",
            n.tx, n.refused_by_demoted, n.cut, n.failed_otherwise
        ),
    );
    for l in &n.lines {
        println!("  {l}");
    }
    assert_eq!(
        n.failed_otherwise, 0,
        "no new connection failed for want of a backend"
    );
    (n, candidate)
}

/// The name of the proxy's port listening on `addr`, for reports.
fn proxy_port_name(proxy: &Proxy, addr: SocketAddr) -> String {
    let status = proxy.status();
    let ports = status["clusters"]["main"]["ports"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    ports
        .iter()
        .find(|(_, p)| p["listen"].as_str() == Some(addr.to_string().as_str()))
        .map_or_else(|| addr.to_string(), |(name, _)| name.clone())
}

/// What pgbench -C runs reported.
#[derive(Default)]
struct PgbenchCounts {
    tx: u64,
    /// Connections PostgreSQL on the old leader refused while shutting down
    /// (or that it closed during startup): they reached the demoted leader in
    /// the gap before `/cluster` showed the switchover.
    refused_by_demoted: u64,
    /// Transactions whose session was cut on the demoted leader.
    cut: u64,
    /// Any other connection failure: the proxy failing a new client.
    failed_otherwise: u64,
    lines: Vec<String>,
}

impl PgbenchCounts {
    fn add(&mut self, stdout: &str, stderr: &str) {
        self.tx += stdout
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|v| v.split('/').next()?.trim().parse().ok())
            .unwrap_or(0);
        for l in stderr.lines().filter(|l| l.contains("error")) {
            let from_demoted = [
                "shutting down",
                "closed the connection",
                "starting up",
                "terminating connection",
            ]
            .iter()
            .any(|s| l.contains(s));
            if l.contains("connection to server") {
                if from_demoted {
                    self.refused_by_demoted += 1;
                } else {
                    self.failed_otherwise += 1;
                }
            } else if l.contains("aborted in command") {
                self.cut += 1;
            }
            self.lines.push(l.to_string());
        }
    }
}

/// The PID in the cluster's `run/NAME.pid` (`patroni2`, `etcd`).
fn pid_of(name: &str) -> String {
    let state = run_script(&["env"])
        .lines()
        .find_map(|l| l.strip_prefix("STATE=").map(str::to_string))
        .unwrap();
    std::fs::read_to_string(format!("{state}/run/{name}.pid"))
        .unwrap()
        .trim()
        .to_string()
}

/// Sends SIGCONT to a process when dropped, so a failed assertion never
/// leaves a Patroni frozen for the scenarios after it.
struct Frozen(String);

impl Drop for Frozen {
    fn drop(&mut self) {
        signal(&self.0, "CONT");
    }
}

/// When `when(seen)` first holds, polled every 10 ms for up to 60 s.
fn first_time(mut when: impl FnMut() -> bool) -> Option<Instant> {
    wait_until(Duration::from_secs(60), &mut when).then(Instant::now)
}

/// A loopback listener that records when the first request arrives (within
/// 60 s), and its request line; answers 200.
fn callback_witness() -> (String, thread::JoinHandle<Option<(Instant, String)>>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let t = thread::spawn(move || {
        let mut conn = None;
        wait_until(Duration::from_secs(60), || {
            conn = l.accept().ok();
            conn.is_some()
        });
        let (mut conn, _) = conn?;
        let at = Instant::now();
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let n = std::io::Read::read(&mut conn, &mut buf).unwrap_or(0);
        let line = String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        let _ =
            std::io::Write::write_all(&mut conn, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        Some((at, line))
    });
    (url, t)
}

#[test]
#[ignore = "needs a real cluster: tests/cluster/run"]
fn j_frozen_first_api_host_is_passed_over_within_api_timeout() {
    let c = cluster();
    // The proxy asks a replica's API first; that Patroni is frozen with
    // SIGSTOP: its socket accepts, but nothing answers (worse than dead).
    let (first, hosts) = replica_api_first(&c);
    let pid = pid_of(&format!("patroni{}", &first[4..]));
    let rig = rig_with_hosts(c, hosts.clone());
    let status = |rig: &Rig| rig.proxy.status()["clusters"]["main"].clone();
    assert_eq!(status(&rig)["api_host"], hosts[0]);
    let leader = rig.c.leader().pg.port();

    assert_eq!(signal(&pid, "STOP"), 0);
    let _thaw = Frozen(pid);
    let frozen_at = Instant::now();
    // api_timeout is 2 s: the first poll after the freeze waits that long
    // for the frozen host, then the next host answers.
    assert!(wait_until(Duration::from_secs(15), || status(&rig)
        ["api_host"]
        != hosts[0]));
    let moved = frozen_at.elapsed();
    // Clients meanwhile: every one lands where its port says.
    let (mut rw_ok, mut ro_ok, mut wrong, mut failed) = (0, 0, 0, 0);
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        match whereami(rig.rw, CONNECT) {
            Ok((false, p)) if p == leader => rw_ok += 1,
            Ok(_) => wrong += 1,
            Err(_) => failed += 1,
        }
        match whereami(rig.ro, CONNECT) {
            Ok((true, _)) => ro_ok += 1,
            Ok(_) => wrong += 1,
            Err(_) => failed += 1,
        }
    }
    let s = status(&rig);
    assert_eq!(s["status"], "ok", "{s}");
    report(
        "frozen first API (SIGSTOP)",
        format!(
            "next host used after {:.1}s; over 12 s: rw {rw_ok} ok, ro {ro_ok} ok, {wrong} misrouted, {failed} failed",
            moved.as_secs_f64()
        ),
    );
    assert_eq!((wrong, failed), (0, 0));
    assert!(
        moved < Duration::from_secs(2 * INTERVAL as u64 + 4),
        "{moved:?}"
    );
}

#[test]
#[ignore = "needs a real cluster: tests/cluster/run"]
fn j_callback_moves_the_leader_port_at_once() {
    // Polling every 10 s, the proxy alone would follow a switchover up to
    // 10 s late; Patroni's on_role_change callback
    // (packaging/patroni-proxy-callback, configured by tests/cluster/cluster
    // to read $STATE/callback.conf) makes it poll at once.
    let c = cluster();
    let hosts = c.nodes.iter().map(|n| n.api.clone()).collect();
    let rig = rig_polling(c, hosts, 10.0);
    let conf = rig.c.state.join("callback.conf");
    let (witness, witnessed) = callback_witness();
    std::fs::write(&conf, format!("http://{}\n{witness}\n", rig.proxy.admin)).unwrap();
    let old = rig.c.leader().name.clone();
    let candidate = rig.c.replicas()[0].name.clone();
    let apis: Vec<SocketAddr> = rig
        .c
        .nodes
        .iter()
        .map(|n| n.api.trim_start_matches("http://").parse().unwrap())
        .collect();
    let shown = {
        let candidate = candidate.clone();
        thread::spawn(move || {
            first_time(|| {
                apis.iter().any(|a| {
                    http_get(*a, "/cluster")
                        .ok()
                        .and_then(|(_, b)| serde_json::from_str::<Value>(&b).ok())
                        .is_some_and(|t| {
                            t["members"].as_array().is_some_and(|ms| {
                                ms.iter().any(|m| {
                                    m["name"] == candidate.as_str()
                                        && m["role"] == "leader"
                                        && m["state"] == "running"
                                })
                            })
                        })
                })
            })
        })
    };
    let followed = {
        let (admin, candidate) = (rig.proxy.admin, candidate.clone());
        thread::spawn(move || {
            first_time(|| {
                http_get(admin, "/clusters")
                    .ok()
                    .and_then(|(_, b)| serde_json::from_str::<Value>(&b).ok())
                    .is_some_and(|s| {
                        let b = &s["clusters"]["main"]["ports"]["rw"]["backends"];
                        b.as_array().is_some_and(|b| {
                            b.len() == 1
                                && b[0]["member"] == candidate.as_str()
                                && b[0]["draining"] == false
                        })
                    })
            })
        })
    };
    let started = Instant::now();
    rig.c.switchover(&old, &candidate);
    let shown = shown
        .join()
        .unwrap()
        .expect("/cluster never showed the new leader");
    let followed = followed
        .join()
        .unwrap()
        .expect("the leader port never followed");
    let (called, line) = witnessed
        .join()
        .unwrap()
        .expect("Patroni ran no on_role_change callback within 60 s");
    let _ = std::fs::remove_file(&conf);
    let secs = |a: Instant, b: Instant| {
        if a >= b {
            a.duration_since(b).as_secs_f64()
        } else {
            -b.duration_since(a).as_secs_f64()
        }
    };
    let gap = secs(followed, shown);
    report(
        "callback",
        format!(
            "cluster_update_interval 10: new leader {candidate} in /cluster {:.2}s after patronictl started, callback {:+.3}s and leader port {gap:+.3}s after that",
            secs(shown, started),
            secs(called, shown)
        ),
    );
    assert!(
        line.contains(" /update_clusters HTTP/1."),
        "the callback sent {line:?}"
    );
    assert!(
        gap <= 0.5,
        "the leader port followed {gap:.3}s after /cluster showed {candidate}"
    );
    assert_eq!(
        whereami(rig.rw, CONNECT).unwrap(),
        (false, rig.c.node(&candidate).pg.port())
    );
    rig.c.run(&["wait"]);
}

#[test]
#[ignore = "needs a real cluster: tests/cluster/run"]
fn k_every_api_unreachable_beyond_topology_ttl() {
    // Every Patroni frozen (SIGSTOP) for longer than the proxy's
    // topology_ttl (4 s) but shorter than Patroni's own TTL (20 s), so
    // PostgreSQL and the leader key stay as they were.
    let c = cluster();
    let pids: Vec<String> = (1..=c.nodes.len())
        .map(|i| pid_of(&format!("patroni{i}")))
        .collect();
    let hosts: Vec<String> = c.nodes.iter().map(|n| n.api.clone()).collect();
    let rw = free_port();
    let cfg = util::config(
        free_port(),
        &hosts,
        &format!("rw: {{listen: \"127.0.0.1:{rw}\", roles: [leader], backend_wait_timeout: 1}}"),
        "topology_ttl: 4\napi_timeout: 0.5",
    )
    .replace(
        "cluster_update_interval: 0.2",
        &format!("cluster_update_interval: {INTERVAL}"),
    );
    let proxy = Proxy::start(&cfg);
    let leader = c.leader();
    proxy.wait_backends("main", "rw", &[leader.name.as_str()]);
    let rw = SocketAddr::from(([127, 0, 0, 1], rw));
    let mut open = Pg::connect(rw, CONNECT).unwrap();
    assert_eq!(open.whereami().unwrap(), (false, leader.pg.port()));

    let frozen: Vec<Frozen> = pids
        .into_iter()
        .map(|pid| {
            assert_eq!(signal(&pid, "STOP"), 0);
            Frozen(pid)
        })
        .collect();
    let at = Instant::now();
    assert!(wait_until(Duration::from_secs(15), || proxy.status()
        ["clusters"]["main"]["status"]
        == "stale"));
    let stale_after = at.elapsed();
    let refused = (0..5)
        .filter(|_| Pg::connect(rw, Duration::from_secs(5)).is_err())
        .count();
    let kept = open.whereami().is_ok();
    drop(frozen); // SIGCONT to all
    let thawed = Instant::now();
    assert!(wait_until(Duration::from_secs(20), || proxy.status()
        ["clusters"]["main"]["status"]
        == "ok"));
    let fresh_after = thawed.elapsed();
    let routes_again = whereami(rw, CONNECT).is_ok();
    report(
        "every API frozen beyond topology_ttl=4s",
        format!(
            "stale after {:.1}s; new clients refused {refused}/5; open session kept: {kept}; fresh again {:.1}s after SIGCONT; routes again: {routes_again}",
            stale_after.as_secs_f64(),
            fresh_after.as_secs_f64()
        ),
    );
    assert_eq!(refused, 5, "new clients are refused while stale");
    assert!(kept, "open sessions are kept");
    assert!(routes_again);
}

#[test]
#[ignore = "needs a real cluster: tests/cluster/run"]
fn l_etcd_frozen_beyond_patroni_ttl_and_back() {
    // etcd frozen (SIGSTOP) for 30 s, longer than Patroni's ttl (20 s):
    // what Patroni does, what the proxy routes each second, and that it
    // routes writes again once etcd is back.
    let rig = rig();
    let pid = pid_of("etcd");
    let status = || rig.proxy.status()["clusters"]["main"]["status"].clone();
    assert_eq!(signal(&pid, "STOP"), 0);
    let etcd = Frozen(pid);
    let at = Instant::now();
    let (mut primary, mut standby, mut failed, mut stale) = (0, 0, 0, 0);
    let mut first_standby = None;
    while at.elapsed() < Duration::from_secs(30) {
        match whereami(rig.rw, Duration::from_secs(2)) {
            Ok((false, _)) => primary += 1,
            Ok((true, _)) => {
                standby += 1;
                first_standby.get_or_insert(at.elapsed());
            }
            Err(_) => failed += 1,
        }
        if status() == "stale" {
            stale += 1;
        }
        thread::sleep(Duration::from_millis(500));
    }
    drop(etcd); // SIGCONT
    let back = Instant::now();
    let mut writes_again = None;
    while back.elapsed() < Duration::from_secs(90) {
        if matches!(whereami(rig.rw, Duration::from_secs(2)), Ok((false, _))) {
            writes_again = Some(back.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(250));
    }
    report(
        "etcd frozen 30 s (ttl 20)",
        format!(
            "rw samples during the freeze: {primary} reached a primary, {standby} a read-only member (first after {:?}), {failed} refused; {stale} samples with a stale topology; writes through rw again {:?} after SIGCONT",
            first_standby.map(|d| format!("{:.1}s", d.as_secs_f64())),
            writes_again.map(|d| format!("{:.1}s", d.as_secs_f64()))
        ),
    );
    assert!(writes_again.is_some(), "rw routes to a primary again");
    rig.c.run(&["wait"]);
}

#[test]
#[ignore = "needs a real cluster: tests/cluster/run"]
fn m_switchover_with_many_open_sessions() {
    // Many sessions open on every port during a switchover: each one on a
    // member that kept what its port requires must survive; counted.
    let rig = rig();
    let old = rig.c.leader().name.clone();
    let candidate = rig.c.replicas()[0].name.clone();
    let port_of = |name: &str| rig.c.node(name).pg.port();
    let (old_port, cand_port) = (port_of(&old), port_of(&candidate));
    let open = |addr: SocketAddr, n: usize| -> Vec<(u16, Pg)> {
        (0..n)
            .map(|_| {
                let mut s = Pg::connect(addr, CONNECT).unwrap();
                let port = s.whereami().unwrap().1;
                (port, s)
            })
            .collect()
    };
    let mut ro = open(rig.ro, 120);
    let mut any = open(rig.any, 60);
    let mut rw = open(rig.rw, 20);
    let total = ro.len() + any.len() + rw.len();
    rig.c.switchover(&old, &candidate);
    let (new_name, _) = rig.c.wait_new_leader(&old, Duration::from_secs(60));
    assert_eq!(new_name, candidate);
    rig.c.run(&["wait"]);
    // Let the proxy apply the settled topology.
    thread::sleep(Duration::from_secs(3));
    let alive = |s: &mut Pg| s.query("SELECT 1").is_ok();
    // `ro` serves replicas: the other replica kept its role, the candidate
    // did not (the proxy closes those), the old leader was never on it.
    let (mut ro_kept, mut ro_kept_alive, mut ro_lost_alive) = (0, 0, 0);
    for (port, s) in ro.iter_mut() {
        if *port == cand_port {
            ro_lost_alive += usize::from(alive(s));
        } else {
            ro_kept += 1;
            ro_kept_alive += usize::from(alive(s));
        }
    }
    // `any` serves every role: the members Patroni did not restart keep
    // their sessions (the old leader's PostgreSQL restarts as a replica).
    let (mut any_kept, mut any_kept_alive) = (0, 0);
    for (port, s) in any.iter_mut() {
        if *port != old_port {
            any_kept += 1;
            any_kept_alive += usize::from(alive(s));
        }
    }
    let rw_alive = rw
        .iter_mut()
        .map(|(_, s)| usize::from(alive(s)))
        .sum::<usize>();
    report(
        "switchover with open sessions",
        format!(
            "{total} open; ro: {ro_kept_alive}/{ro_kept} on the replica that kept its role survived, {ro_lost_alive} on the promoted one; any: {any_kept_alive}/{any_kept} on members not restarted survived; rw: {rw_alive}/{} on the old leader survived",
            rw.len()
        ),
    );
    assert_eq!(
        ro_kept_alive, ro_kept,
        "ro sessions on a kept replica survive"
    );
    assert_eq!(ro_lost_alive, 0, "ro sessions on the new leader are closed");
    assert_eq!(
        any_kept_alive, any_kept,
        "any sessions on members not restarted survive"
    );
    assert_eq!(rw_alive, 0, "rw sessions on the old leader are closed");
}

/// One sample of the proxy's `/metrics`: the value of `name` on port
/// `port` of cluster `main`.
fn port_metric(proxy: &Proxy, name: &str, port: &str) -> Option<f64> {
    let (_, body) = proxy.get("/metrics").ok()?;
    let labels = format!("{{cluster=\"main\",port=\"{port}\"}}");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(labels.as_str()))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
#[ignore = "needs a real cluster: tests/cluster/run"]
fn n_preconnected_leader_port_across_a_switchover() {
    // `preconnect: 3` on a leader port: PostgreSQL accepts the pooled
    // connections (its fork done ahead of the client), clients are handed
    // them, and across a switchover no client gets one to the old leader.
    let c = cluster();
    let hosts: Vec<String> = c.nodes.iter().map(|n| n.api.clone()).collect();
    let pc = free_port();
    let ports = format!(
        "pc: {{listen: \"127.0.0.1:{pc}\", roles: [leader], backend_wait_timeout: 40, preconnect: 3}}"
    );
    let cfg = util::config(free_port(), &hosts, &ports, "").replace(
        "cluster_update_interval: 0.2",
        &format!("cluster_update_interval: {INTERVAL}"),
    );
    let proxy = Proxy::start(&cfg);
    let addr = SocketAddr::from(([127, 0, 0, 1], pc));
    proxy.wait_backends("main", "pc", &[c.leader().name.as_str()]);
    let ready = |n: f64| {
        wait_until(Duration::from_secs(20), || {
            port_metric(&proxy, "patroni_proxy_port_preconnected", "pc") == Some(n)
        })
    };
    assert!(
        ready(3.0),
        "3 pooled connections to the leader: {}",
        proxy.log()
    );
    let leader_port = c.leader().pg.port();
    for _ in 0..20 {
        assert_eq!(whereami(addr, CONNECT).unwrap(), (false, leader_port));
    }
    let hits = port_metric(&proxy, "patroni_proxy_port_preconnect_hits_total", "pc").unwrap_or(0.0);
    assert!(
        hits >= 10.0,
        "most of 20 sequential clients got a pooled connection: {hits}"
    );

    let (n, candidate) = pgbench_across_a_switchover(&c, &proxy, addr);
    assert!(n.tx > 100, "pgbench made progress");
    c.run(&["wait"]);
    let new_port = c.node(&candidate).pg.port();
    assert!(
        wait_until(Duration::from_secs(20), || whereami(addr, CONNECT)
            == Ok((false, new_port))),
        "the port reaches the new leader"
    );
    // Whatever the pool held when the switchover happened, every client
    // from now on is on the new leader, pooled or not.
    for _ in 0..20 {
        assert_eq!(whereami(addr, CONNECT).unwrap(), (false, new_port));
    }
    assert!(ready(3.0), "3 pooled connections to the new leader");
    let after =
        port_metric(&proxy, "patroni_proxy_port_preconnect_hits_total", "pc").unwrap_or(0.0);
    let misses =
        port_metric(&proxy, "patroni_proxy_port_preconnect_misses_total", "pc").unwrap_or(0.0);
    report(
        "preconnect: 3 on the leader port",
        format!("{after} clients handed a pooled connection, {misses} found none ready"),
    );
}

/// Drops every packet of one TCP connection (by its local port on
/// loopback) while it lives: an nftables table of its own, deleted on drop.
struct Blackhole;

impl Blackhole {
    const TABLE: &'static str = "pp_blackhole";

    /// `None` when nftables cannot be used here (no CAP_NET_ADMIN).
    fn port(port: u16) -> Option<Blackhole> {
        let nft = |args: &str| {
            Command::new("nft")
                .args(args.split(' '))
                .output()
                .is_ok_and(|o| o.status.success())
        };
        let _ = nft(&format!("delete table inet {}", Self::TABLE));
        let t = Self::TABLE;
        let ok = nft(&format!("add table inet {t}"))
            && nft(&format!(
                "add chain inet {t} out {{ type filter hook output priority 0 ; }}"
            ))
            && nft(&format!("add rule inet {t} out tcp sport {port} drop"))
            && nft(&format!("add rule inet {t} out tcp dport {port} drop"));
        let hole = Blackhole;
        ok.then_some(hole)
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", Self::TABLE])
            .output();
    }
}

/// The local port of process `pid`'s established TCP connections to `to`.
fn local_ports_to(pid: i32, to: SocketAddr) -> Vec<u16> {
    let out = Command::new("ss")
        .args(["-Htnp", "state", "established", "dst", &to.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .filter_map(|l| {
            l.split_whitespace()
                .nth(2)?
                .rsplit_once(':')?
                .1
                .parse()
                .ok()
        })
        .collect()
}

#[test]
#[ignore = "needs a real cluster: tests/cluster/run"]
fn o_blackholed_backend_ends_its_session_within_tcp_user_timeout() {
    // A member that vanishes from the network mid-session: every packet of
    // the session's backend connection is dropped, PostgreSQL and Patroni
    // are untouched. With `tcp_user_timeout: 3` the query that was sent
    // into the hole fails within seconds, not after the kernel's 15 minutes
    // of retransmissions.
    let c = cluster();
    let hosts: Vec<String> = c.nodes.iter().map(|n| n.api.clone()).collect();
    let rw = free_port();
    let ports = format!("rw: {{listen: \"127.0.0.1:{rw}\", roles: [leader]}}");
    let cfg = util::config(free_port(), &hosts, &ports, "tcp_user_timeout: 3");
    let proxy = Proxy::start(&cfg);
    let leader = c.leader();
    proxy.wait_backends("main", "rw", &[leader.name.as_str()]);
    let mut s = Pg::connect(SocketAddr::from(([127, 0, 0, 1], rw)), CONNECT).unwrap();
    assert_eq!(s.whereami().unwrap(), (false, leader.pg.port()));
    let backend = local_ports_to(proxy.pid(), leader.pg);
    if backend.is_empty() {
        // `ss -p` shows no process here (not root, or no iproute2).
        report(
            "blackholed backend",
            "skipped: ss cannot show the proxy's sockets".into(),
        );
        return;
    }
    assert_eq!(backend.len(), 1, "one backend connection: {backend:?}");
    let Some(hole) = Blackhole::port(backend[0]) else {
        report(
            "blackholed backend",
            "skipped: nft is not usable here (needs CAP_NET_ADMIN)".into(),
        );
        return;
    };
    let sent = Instant::now();
    let r = s.query("SELECT 1");
    let took = sent.elapsed();
    drop(hole);
    report(
        "blackholed backend",
        format!(
            "the query sent into the hole failed after {:.1}s with tcp_user_timeout: 3 ({r:?})",
            took.as_secs_f64()
        ),
    );
    assert!(r.is_err(), "the session ended");
    assert!(
        took >= Duration::from_secs(2) && took <= Duration::from_secs(20),
        "ended by the user timeout: {took:?}"
    );
    assert!(
        proxy.wait_log("timed out"),
        "the proxy logs why: {}",
        proxy.log()
    );
    // The member itself is fine: a new session reaches it.
    assert_eq!(
        whereami(SocketAddr::from(([127, 0, 0, 1], rw)), CONNECT)
            .unwrap()
            .1,
        leader.pg.port()
    );
}

// ---- HTTPS-only REST API with verify_client: required ------------------------

/// The cluster, which must have been started with `CLUSTER_TLS=1`.
fn tls_cluster() -> Cluster {
    let c = cluster();
    assert!(
        c.tls.is_some(),
        "the tls_ scenarios need the cluster started with CLUSTER_TLS=1 (tests/cluster/run does)"
    );
    assert!(c.nodes.iter().all(|n| n.api.starts_with("https://")));
    c
}

/// A proxy with rw (leader) and ro (replicas) ports, the cluster's https
/// hosts and `tls` as the cluster's `tls:` block (YAML lines).
fn tls_proxy(c: &Cluster, tls: &str) -> (Proxy, SocketAddr, SocketAddr) {
    let [rw, ro] = [0; 2].map(|_| free_port());
    let hosts: Vec<String> = c.nodes.iter().map(|n| n.api.clone()).collect();
    let ports = format!(
        "rw: {{listen: \"127.0.0.1:{rw}\", roles: [leader], backend_wait_timeout: 40}}\n\
         ro: {{listen: \"127.0.0.1:{ro}\", roles: [sync, async]}}"
    );
    let block: String = tls.lines().map(|l| format!("      {l}\n")).collect();
    let cfg = util::config(free_port(), &hosts, &ports, "")
        .replace(
            "cluster_update_interval: 0.2",
            &format!("cluster_update_interval: {INTERVAL}"),
        )
        .replace("    ports:\n", &format!("    tls:\n{block}    ports:\n"));
    let proxy = Proxy::start(&cfg);
    let a = |p| SocketAddr::from(([127, 0, 0, 1], p));
    (proxy, a(rw), a(ro))
}

fn tls_block(ca: &std::path::Path, cert: &std::path::Path, key: &std::path::Path) -> String {
    format!(
        "ca_cert: {}\nclient_cert: {}\nclient_key: {}\n",
        ca.display(),
        cert.display(),
        key.display()
    )
}

#[test]
#[ignore = "needs a real cluster with CLUSTER_TLS=1: tests/cluster/run"]
fn tls_a_routing_switchover_and_client_certificate_rotation() {
    let c = tls_cluster();
    let t = c.tls.as_ref().unwrap();
    // The client certificate in files of our own, to rotate them.
    let dir = util::TempDir::new();
    let (cert, key) = (dir.0.join("client.pem"), dir.0.join("client.key"));
    std::fs::copy(&t.cert, &cert).unwrap();
    std::fs::copy(&t.key, &key).unwrap();
    let (proxy, rw, ro) = tls_proxy(&c, &tls_block(&t.ca, &cert, &key));
    let leader = c.leader();
    proxy.wait_backends("main", "rw", &[leader.name.as_str()]);
    assert_eq!(whereami(rw, CONNECT).unwrap(), (false, leader.pg.port()));
    assert!(wait_until(Duration::from_secs(20), || proxy
        .backends("main", "ro")
        .len()
        == c.nodes.len() - 1));
    assert!(whereami(ro, CONNECT).unwrap().0, "ro reaches a replica");

    // A switchover (patronictl over HTTPS with the ctl: certificates).
    let old = leader.name.clone();
    let candidate = c.replicas()[0].name.clone();
    c.switchover(&old, &candidate);
    let (new_name, _) = c.wait_new_leader(&old, Duration::from_secs(60));
    let new_port = c.node(&new_name).pg.port();
    let followed = wait_until(Duration::from_secs(30), || {
        whereami(rw, Duration::from_secs(5)).is_ok_and(|w| w == (false, new_port))
    });
    assert!(followed, "rw never reached the new leader {new_name}");
    report(
        "tls",
        format!("switchover followed over HTTPS to {new_name}"),
    );

    // Rotation: a new client key and certificate from the cluster's CA, in
    // place, then SIGHUP.
    let ca = util::certs::Ca::existing(&dir.0, &t.ca, &t.ca_key);
    let fresh = ca.issue("client2", "", util::certs::KeyFormat::Sec1);
    std::fs::copy(&fresh.cert, &cert).unwrap();
    std::fs::copy(&fresh.key, &key).unwrap();
    let reloads = proxy.log().matches("configuration reloaded").count();
    proxy.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(10), || proxy
        .log()
        .matches("configuration reloaded")
        .count()
        > reloads));
    let fails = proxy.status()["clusters"]["main"]["stats"]["tls_failures"].clone();
    thread::sleep(Duration::from_secs_f64(INTERVAL * 3.0));
    let s = proxy.status();
    assert!(s["clusters"]["main"]["last_error"].is_null(), "{s}");
    assert_eq!(s["clusters"]["main"]["stats"]["tls_failures"], fails, "{s}");
    assert_eq!(whereami(rw, CONNECT).unwrap(), (false, new_port));
    c.run(&["wait"]);
}

#[test]
#[ignore = "needs a real cluster with CLUSTER_TLS=1: tests/cluster/run"]
fn tls_b_refusals_skip_verify_and_ca_rotation() {
    let c = tls_cluster();
    let t = c.tls.as_ref().unwrap();
    let dir = util::TempDir::new();
    let stranger = util::certs::Ca::new(&dir.0, "stranger");
    let leader = c.leader().name.clone();

    // A CA file that trusts someone else: refused, logged once per host.
    let trusted = dir.0.join("trusted.pem");
    std::fs::copy(&stranger.cert, &trusted).unwrap();
    let (proxy, rw, _) = tls_proxy(&c, &tls_block(&trusted, &t.cert, &t.key));
    assert!(
        proxy.wait_log("TLS failure: unknown issuer"),
        "{}",
        proxy.log()
    );
    thread::sleep(Duration::from_secs_f64(INTERVAL * 3.0));
    assert!(proxy.backends("main", "rw").is_empty());
    let log = proxy.log();
    for n in &c.nodes {
        let line = format!("host={} TLS failure: unknown issuer", n.api);
        assert!(log.matches(&line).count() <= 1, "{log}");
    }
    assert!(proxy.status()["clusters"]["main"]["stats"]["tls_failures"].as_u64() > Some(1));

    // Rotation of the trust: the right CA in the same file, SIGHUP.
    std::fs::copy(&t.ca, &trusted).unwrap();
    proxy.signal(libc::SIGHUP);
    proxy.wait_backends("main", "rw", &[leader.as_str()]);
    assert!(!whereami(rw, CONNECT).unwrap().0);
    drop(proxy);

    // No client certificate: Patroni refuses the handshake.
    let (proxy, _, _) = tls_proxy(&c, &format!("ca_cert: {}\n", t.ca.display()));
    let refused = wait_until(Duration::from_secs(15), || {
        proxy.log().lines().any(|l| {
            l.contains("TLS failure:") && l.contains("client certificate") && l.contains("was sent")
        })
    });
    assert!(refused, "{}", proxy.log());
    assert!(proxy.backends("main", "rw").is_empty());
    drop(proxy);

    // skip_verify: the stranger CA does not matter, with a warning.
    let block = format!(
        "{}skip_verify: true\n",
        tls_block(&stranger.cert, &t.cert, &t.key)
    );
    let (proxy, rw, _) = tls_proxy(&c, &block);
    proxy.wait_backends("main", "rw", &[leader.as_str()]);
    assert!(!whereami(rw, CONNECT).unwrap().0);
    assert!(proxy
        .log()
        .contains("clusters.main.tls.skip_verify: certificate verification is OFF"));
}

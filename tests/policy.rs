//! The per-port routing policies against the mock Patroni: lag grace and
//! hysteresis, preference, fallback, max_waiting, and the callback's
//! `POST /update_clusters`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::*;

struct Rig {
    nodes: Vec<Backend>,
    api: MockPatroni,
    proxy: Proxy,
    port: SocketAddr,
}

/// Three nodes (node1 leader, node2 and node3 replicas, no lag) and one port
/// `p` with `opts`, polled every `interval` seconds.
fn rig(opts: &str, interval: f64) -> Rig {
    let (nodes, api) = three_nodes(0);
    api.set(&members(&nodes, 0, 0));
    let port = free_port();
    let cfg = config(
        free_port(),
        &[api.url()],
        &format!("p: {{listen: \"127.0.0.1:{port}\", {opts}}}"),
        "",
    )
    .replace(
        "cluster_update_interval: 0.2",
        &format!("cluster_update_interval: {interval}"),
    );
    let proxy = Proxy::start(&cfg);
    Rig {
        nodes,
        api,
        proxy,
        port: local(port),
    }
}

/// node1 leader, node2 and node3 streaming replicas with these lags.
fn members(n: &[Backend], lag2: u64, lag3: u64) -> Value {
    cluster(vec![
        member("node1", "leader", "running", n[0].addr, None),
        member("node2", "replica", "streaming", n[1].addr, Some(lag2)),
        member("node3", "replica", "streaming", n[2].addr, Some(lag3)),
    ])
}

impl Rig {
    fn set_lag(&self, lag3: u64) {
        self.api.set(&members(&self.nodes, 0, lag3));
        assert_eq!(self.proxy.update(), 200);
    }

    fn stats(&self) -> Value {
        self.proxy.status()["clusters"]["main"]["ports"]["p"]["stats"].clone()
    }

    /// Clients connected until one lands on `member`.
    fn session_on(&self, member: &str) -> Client {
        for _ in 0..20 {
            let mut c = Client::connect(self.port);
            if c.greeting() == member {
                return c;
            }
        }
        panic!("no session on {member}");
    }

    fn new_clients_go_to(&self, n: usize) -> Vec<String> {
        let mut seen: Vec<String> = (0..n).map(|_| whoami(self.port)).collect();
        seen.sort();
        seen.dedup();
        seen
    }
}

#[test]
fn a_lag_crossing_the_limit_every_poll_is_evicted_once_and_returns_once() {
    let rig = rig("roles: [async], max_lag_in_bytes: 1000", 1.0);
    rig.proxy.wait_backends("main", "p", &["node2", "node3"]);
    for i in 0..20 {
        rig.set_lag(if i % 2 == 0 { 5000 } else { 0 });
        // While it flaps, new clients only ever go to node2.
        assert_eq!(whoami(rig.port), "node2", "poll {i}");
    }
    // It settles: three polls (about one interval apart) bring it back.
    let start = Instant::now();
    rig.set_lag(0);
    assert!(wait_until(Duration::from_secs(20), || rig.stats()
        ["lag_returns"]
        == 1));
    assert!(
        start.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        start.elapsed()
    );
    let s = rig.stats();
    assert_eq!(s["lag_evictions"], 1, "{s}");
    assert_eq!(s["lag_closes"], 1, "default lag_grace 0 closes at once");
    let log = rig.proxy.log();
    assert_eq!(
        log.matches("member=node3 evicted for lag").count(),
        1,
        "{log}"
    );
    assert_eq!(
        log.matches("member=node3 back from lag eviction").count(),
        1
    );
    assert!(
        log.contains("lag 5000 > 1000 bytes"),
        "the figures are logged"
    );
    assert!(rig.new_clients_go_to(6).contains(&"node3".to_string()));
}

#[test]
fn a_long_session_survives_a_short_lag_spike_within_lag_grace() {
    let rig = rig(
        "roles: [async], max_lag_in_bytes: 1000, lag_grace: 30, max_lag_in_bytes_close: 100000, lag_return_polls: 1",
        0.2,
    );
    rig.proxy.wait_backends("main", "p", &["node2", "node3"]);
    let mut long = rig.session_on("node3");
    rig.set_lag(5000);
    assert_eq!(
        rig.new_clients_go_to(4),
        ["node2"],
        "no new clients on node3"
    );
    assert!(
        long.echo("still reading"),
        "its session is kept within the grace"
    );
    rig.set_lag(0);
    assert!(wait_until(Duration::from_secs(10), || rig.stats()
        ["lag_returns"]
        == 1));
    assert!(long.echo("after the spike"));
    assert_eq!(rig.stats()["lag_closes"], 0);
    // Over the hard limit: closed at once, whatever the grace.
    rig.set_lag(200_000);
    assert!(long.is_closed());
    let s = rig.stats();
    assert_eq!(
        (s["lag_evictions"].as_u64(), s["lag_closes"].as_u64()),
        (Some(2), Some(1))
    );
    assert!(rig
        .proxy
        .log()
        .contains("over max_lag_in_bytes_close 100000"));
}

#[test]
fn lag_grace_runs_out_between_polls() {
    // A poll every 10 s: the grace of 1 s is ended by the loop's timer.
    let rig = rig("roles: [async], max_lag_in_bytes: 1000, lag_grace: 1", 10.0);
    rig.proxy.wait_backends("main", "p", &["node2", "node3"]);
    let mut s = rig.session_on("node3");
    let evicted = Instant::now();
    rig.set_lag(5000);
    assert!(s.echo("within the grace"));
    assert!(wait_until(Duration::from_secs(10), || rig.stats()
        ["lag_closes"]
        == 1));
    assert!(evicted.elapsed() >= Duration::from_secs(1));
    assert!(s.is_closed());
    assert!(rig
        .proxy
        .log()
        .contains("closing its sessions (lag_grace 1 s over)"));
}

#[test]
fn fallback_to_the_leader_only_while_no_replica_takes_clients() {
    for (ret, kept) in [("", true), (", fallback_return: close", false)] {
        let rig = rig(&format!("roles: [async], fallback: [leader]{ret}"), 0.2);
        // An idle fallback member is listed (taking no new clients), unless
        // its sessions would be closed anyway.
        let listed: &[&str] = if kept {
            &["node1", "node2", "node3"]
        } else {
            &["node2", "node3"]
        };
        rig.proxy.wait_backends("main", "p", listed);
        assert_eq!(rig.new_clients_go_to(4), ["node2", "node3"]);
        // Every replica stopped: reads go to the leader, not nowhere.
        rig.api.set(&cluster(vec![
            member("node1", "leader", "running", rig.nodes[0].addr, None),
            member("node2", "replica", "stopped", rig.nodes[1].addr, None),
            member("node3", "replica", "stopped", rig.nodes[2].addr, None),
        ]));
        assert_eq!(rig.proxy.update(), 200);
        let mut on_leader = Client::connect(rig.port);
        assert_eq!(on_leader.greeting(), "node1");
        assert_eq!(rig.stats()["fallbacks"], 1);
        // A replica is back: new clients go to it; the leader's session is
        // kept, or closed with `fallback_return: close`.
        rig.api.set(&members(&rig.nodes, 0, 0));
        assert_eq!(rig.proxy.update(), 200);
        assert_eq!(rig.new_clients_go_to(4), ["node2", "node3"]);
        if kept {
            assert!(on_leader.echo("kept"), "{ret}");
        } else {
            assert!(on_leader.is_closed(), "{ret}");
            let closed = &rig.stats()["closed"]["fallback_return"];
            assert_eq!(closed, 1, "{}", rig.stats());
        }
    }
    // Without a fallback nothing takes the clients (the old behaviour).
    let rig = rig("roles: [async], backend_wait_timeout: 0", 0.2);
    rig.api.set(&cluster(vec![
        member("node1", "leader", "running", rig.nodes[0].addr, None),
        member("node2", "replica", "stopped", rig.nodes[1].addr, None),
    ]));
    assert_eq!(rig.proxy.update(), 200);
    assert!(Client::connect(rig.port).is_closed());
}

#[test]
fn preference_sends_new_clients_to_sync_first() {
    let rig = rig("roles: [sync, async], prefer: [sync]", 0.2);
    let sync_on = |n: &[Backend], two: &str| {
        cluster(vec![
            member("node1", "leader", "running", n[0].addr, None),
            member("node2", "sync_standby", two, n[1].addr, Some(0)),
            member("node3", "replica", "streaming", n[2].addr, Some(0)),
        ])
    };
    rig.api.set(&sync_on(&rig.nodes, "streaming"));
    assert_eq!(rig.proxy.update(), 200);
    assert_eq!(
        rig.new_clients_go_to(6),
        ["node2"],
        "least connections within sync only"
    );
    let mut on_sync = rig.session_on("node2");
    // No sync standby routable: async takes the new clients.
    rig.api.set(&sync_on(&rig.nodes, "stopped"));
    assert_eq!(rig.proxy.update(), 200);
    assert!(on_sync.is_closed(), "a stopped member loses its sessions");
    assert_eq!(rig.new_clients_go_to(4), ["node3"]);
    let mut on_async = rig.session_on("node3");
    // The sync standby is back: it takes the new clients, async sessions stay.
    rig.api.set(&sync_on(&rig.nodes, "streaming"));
    assert_eq!(rig.proxy.update(), 200);
    assert_eq!(rig.new_clients_go_to(4), ["node2"]);
    assert!(on_async.echo("kept: preference never cuts a session"));
}

#[test]
fn held_clients_beyond_max_waiting_are_refused_at_once() {
    let rig = rig(
        "roles: [leader], max_waiting: 2, backend_wait_timeout: 30",
        0.2,
    );
    rig.api.set(&cluster(vec![member(
        "node2",
        "replica",
        "streaming",
        rig.nodes[1].addr,
        Some(0),
    )]));
    assert_eq!(rig.proxy.update(), 200);
    let mut held: Vec<Client> = (0..2).map(|_| Client::connect(rig.port)).collect();
    assert!(wait_until(Duration::from_secs(10), || rig.stats()["held"] == 2));
    let start = Instant::now();
    assert!(Client::connect(rig.port).is_closed());
    assert!(start.elapsed() < Duration::from_secs(3), "refused at once");
    assert_eq!(rig.stats()["refused"]["too_many_waiting"], 1);
    // A leader appears: the held ones go to it.
    rig.api.set(&members(&rig.nodes, 0, 0));
    assert_eq!(rig.proxy.update(), 200);
    for c in &mut held {
        assert_eq!(c.greeting(), "node1");
    }
}

#[test]
fn the_callback_may_post_update_clusters() {
    let rig = rig("roles: [leader]", 0.2);
    let mut s = std::net::TcpStream::connect(rig.proxy.admin).unwrap();
    std::io::Write::write_all(
        &mut s,
        b"POST /update_clusters HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut s, &mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    assert!(out.ends_with("updated 1 cluster(s)\n"), "{out}");
}

/// A backend that accepts and then never reads: its receive window fills
/// and stays shut, as with a member whose postmaster is stopped (SIGSTOP).
fn stalled_backend() -> (SocketAddr, std::thread::JoinHandle<()>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        if let Ok((conn, _)) = l.accept() {
            let _ = std::io::Write::write_all(&mut &conn, b"stalled\n");
            std::thread::sleep(Duration::from_secs(30));
            drop(conn);
        }
    });
    (addr, t)
}

/// Writes through `port` until the proxy gives up on the session; the time
/// that took, or `None` within `limit`.
fn write_until_closed(port: SocketAddr, limit: Duration) -> Option<Duration> {
    let mut c = Client::connect(port);
    assert_eq!(c.greeting(), "stalled");
    c.stream
        .set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    let start = Instant::now();
    while start.elapsed() < limit {
        match std::io::Write::write(&mut c.stream, &chunk) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

#[test]
fn tcp_user_timeout_ends_a_session_to_a_stalled_member() {
    for (timeout, ends) in [
        ("tcp_user_timeout: 1", true),
        ("tcp_user_timeout: 0", false),
    ] {
        let (addr, _t) = stalled_backend();
        let api = MockPatroni::start(&cluster(vec![member(
            "node1", "leader", "running", addr, None,
        )]));
        let rw = free_port();
        let proxy = Proxy::start(&config(
            free_port(),
            &[api.url()],
            &format!("rw: {{listen: \"127.0.0.1:{rw}\", roles: [leader]}}"),
            &format!("{timeout}\nsplice: false"),
        ));
        proxy.wait_backends("main", "rw", &["node1"]);
        let took = write_until_closed(local(rw), Duration::from_secs(if ends { 20 } else { 4 }));
        if ends {
            let took = took.expect("the session to the stalled member never ended");
            assert!(took < Duration::from_secs(15), "{took:?}");
            let closed =
                || proxy.status()["clusters"]["main"]["ports"]["rw"]["stats"]["closed"].clone();
            assert!(
                wait_until(Duration::from_secs(5), || closed()["server_error"] == 1),
                "counted as a backend failure: {}",
                closed()
            );
        } else {
            assert_eq!(took, None, "without TCP_USER_TIMEOUT the session hangs on");
        }
    }
}

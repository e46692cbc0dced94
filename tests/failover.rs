//! Topology changes while clients are connected: failover, switchover,
//! split brain, clients held while there is no leader, API outages.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::util::*;

struct Rig {
    nodes: Vec<Backend>,
    api: MockPatroni,
    proxy: Proxy,
    rw: SocketAddr,
    ro: SocketAddr,
    any: SocketAddr,
}

fn rig(extra: &str, rw_opts: &str) -> Rig {
    let (nodes, api) = three_nodes(0);
    let (rw, ro, any) = (free_port(), free_port(), free_port());
    let ports = format!(
        "rw: {{listen: \"127.0.0.1:{rw}\", roles: [leader]{rw_opts}}}\nro: {{listen: \"127.0.0.1:{ro}\", roles: [sync, async]}}\nany: {{listen: \"127.0.0.1:{any}\", roles: [any]}}"
    );
    let proxy = Proxy::start(&config(free_port(), &[api.url()], &ports, extra));
    proxy.wait_backends("main", "ro", &["node2", "node3"]);
    Rig {
        nodes,
        api,
        proxy,
        rw: local(rw),
        ro: local(ro),
        any: local(any),
    }
}

impl Rig {
    fn set(&self, members: &[(&str, &str, &str)]) {
        let ms = members
            .iter()
            .map(|(name, role, state)| {
                let i: usize = name[4..].parse().unwrap();
                let lag = (*role != "leader").then_some(0);
                member(name, role, state, self.nodes[i - 1].addr, lag)
            })
            .collect();
        self.api.set(&cluster(ms));
    }
}

/// Clients of the replica port, one per replica, keyed by the member reached.
fn one_per_replica(rig: &Rig) -> (Client, Client) {
    let mut a = Client::connect(rig.ro);
    let mut b = Client::connect(rig.ro);
    match (a.greeting().as_str(), b.greeting().as_str()) {
        ("node2", "node3") => (a, b),
        ("node3", "node2") => (b, a),
        other => panic!("expected one client per replica: {other:?}"),
    }
}

#[test]
fn failover_closes_only_sessions_whose_member_lost_the_role() {
    let rig = rig("", "");
    let mut leader = Client::connect(rig.rw);
    assert_eq!(leader.greeting(), "node1");
    let (mut on2, mut on3) = one_per_replica(&rig);

    // node1 crashed and vanished; node2 took over.
    rig.set(&[
        ("node2", "leader", "running"),
        ("node3", "replica", "running"),
    ]);
    assert_eq!(rig.proxy.update(), 200);
    assert!(leader.is_closed(), "sessions to the old leader are closed");
    assert!(
        on2.is_closed(),
        "node2 is no longer a replica: its replica-port session is closed"
    );
    assert!(
        on3.echo("survivor"),
        "the session on the surviving replica is untouched"
    );
    assert_eq!(whoami(rig.rw), "node2");
    assert_eq!(whoami(rig.ro), "node3");
    let log = rig.proxy.log();
    assert!(log.contains("leader changed from=node1 to=node2"), "{log}");
    assert!(log.contains("member removed member=node1"));
}

#[test]
fn switchover_demotes_the_old_leader_but_keeps_its_any_sessions() {
    let rig = rig("", "");
    let mut rw = Client::connect(rig.rw);
    assert_eq!(rw.greeting(), "node1");
    // Least connections on `any`: a fresh port, so the first client gets node1.
    let mut any = Client::connect(rig.any);
    assert_eq!(any.greeting(), "node1");

    rig.set(&[
        ("node1", "replica", "streaming"),
        ("node2", "leader", "running"),
        ("node3", "replica", "streaming"),
    ]);
    assert_eq!(rig.proxy.update(), 200);
    assert!(
        rw.is_closed(),
        "the demoted leader's leader-port session is closed"
    );
    assert!(
        any.echo("node1 is still a member"),
        "node1 keeps a role the `any` port accepts"
    );
    assert_eq!(whoami(rig.rw), "node2");
}

#[test]
fn two_leaders_in_one_answer_route_no_leader() {
    let rig = rig("", "");
    rig.set(&[
        ("node1", "leader", "running"),
        ("node2", "leader", "running"),
        ("node3", "replica", "streaming"),
    ]);
    assert_eq!(rig.proxy.update(), 200);
    assert!(rig.proxy.backends("main", "rw").is_empty());
    assert!(rig
        .proxy
        .wait_log("more than one leader reported (node1, node2)"));
    // A new leader-port client is held, and connected once the answer is sane.
    let mut held = Client::connect(rig.rw);
    assert!(
        held.silent_for(Duration::from_millis(300)),
        "no backend while the leader is ambiguous"
    );
    rig.set(&[
        ("node1", "replica", "streaming"),
        ("node2", "leader", "running"),
        ("node3", "replica", "streaming"),
    ]);
    assert_eq!(rig.proxy.update(), 200);
    assert_eq!(held.greeting(), "node2");
}

#[test]
fn client_is_held_while_there_is_no_leader_and_connected_when_one_appears() {
    let rig = rig("", "");
    rig.set(&[
        ("node1", "replica", "running"),
        ("node2", "replica", "running"),
        ("node3", "replica", "running"),
    ]);
    assert_eq!(rig.proxy.update(), 200);
    assert!(rig.proxy.backends("main", "rw").is_empty());
    let mut c = Client::connect(rig.rw);
    // The client speaks first, as a PostgreSQL client sends its startup packet.
    use std::io::Write;
    c.stream.write_all(b"startup\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    rig.set(&[
        ("node1", "replica", "running"),
        ("node2", "replica", "running"),
        ("node3", "leader", "running"),
    ]);
    // No /update_clusters: the updater polls fast while there is no leader.
    assert_eq!(c.greeting(), "node3");
    assert_eq!(
        c.line().as_deref(),
        Some("startup"),
        "bytes sent while held were delivered"
    );
    assert!(c.echo("after"));
}

#[test]
fn held_client_is_closed_after_backend_wait_timeout() {
    let rig = rig("", ", backend_wait_timeout: 0.5");
    rig.set(&[("node2", "replica", "running")]);
    assert_eq!(rig.proxy.update(), 200);
    let start = Instant::now();
    let mut c = Client::connect(rig.rw);
    assert!(c.is_closed());
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
}

#[test]
fn zero_backend_wait_refuses_at_once() {
    let rig = rig("", ", backend_wait_timeout: 0");
    rig.set(&[("node2", "replica", "running")]);
    assert_eq!(rig.proxy.update(), 200);
    let start = Instant::now();
    assert!(Client::connect(rig.rw).is_closed());
    assert!(start.elapsed() < Duration::from_millis(400));
}

#[test]
fn clients_wait_for_the_first_topology() {
    let n1 = Backend::start("node1");
    let api = MockPatroni::start(&cluster(vec![]));
    api.set_mode(Mode::Status(503));
    let rw = free_port();
    let p = Proxy::start(&config(
        free_port(),
        &[api.url()],
        &format!("rw: {{listen: \"127.0.0.1:{rw}\", roles: [leader]}}"),
        "",
    ));
    let mut c = Client::connect(local(rw));
    std::thread::sleep(Duration::from_millis(300));
    api.set(&cluster(vec![member(
        "node1", "leader", "running", n1.addr, None,
    )]));
    assert_eq!(c.greeting(), "node1");
    drop(p);
}

#[test]
fn next_api_host_is_used_when_the_first_hangs_or_fails() {
    let n1 = Backend::start("node1");
    let body = cluster(vec![member("node1", "leader", "running", n1.addr, None)]);
    let hung = MockPatroni::start(&body);
    hung.set_mode(Mode::Hang);
    let closing = MockPatroni::start(&body);
    closing.set_mode(Mode::Close);
    let good = MockPatroni::start(&body);
    let rw = free_port();
    let cfg = config(
        free_port(),
        &[hung.url(), closing.url(), good.url()],
        &format!("rw: {{listen: \"127.0.0.1:{rw}\", roles: [leader]}}"),
        "api_timeout: 0.3",
    );
    let p = Proxy::start(&cfg);
    p.wait_backends("main", "rw", &["node1"]);
    assert_eq!(whoami(local(rw)), "node1");
    assert_eq!(p.status()["clusters"]["main"]["api_host"], good.url());
    // Failed hosts go to the back of the line: later polls reach the good
    // host first instead of waiting for the hung one every time.
    let before = hung.requests();
    let polls = good.requests();
    assert!(wait_until(Duration::from_secs(5), || good.requests() >= polls + 5));
    assert!(
        hung.requests() <= before + 1,
        "the hung host is not retried on every poll"
    );
}

#[test]
fn stale_topology_refuses_new_clients_but_keeps_sessions() {
    let rig = rig("topology_ttl: 1", "");
    let mut open = Client::connect(rig.rw);
    assert_eq!(open.greeting(), "node1");
    rig.api.set_mode(Mode::Close);
    assert!(rig.proxy.wait_log("refusing new clients"));
    assert!(
        Client::connect(rig.rw).is_closed(),
        "new clients are refused"
    );
    assert!(open.echo("kept"), "open sessions are kept");
    assert_eq!(rig.proxy.status()["clusters"]["main"]["status"], "stale");
    rig.set(&[
        ("node1", "leader", "running"),
        ("node2", "replica", "streaming"),
        ("node3", "replica", "streaming"),
    ]);
    assert!(rig.proxy.wait_log("topology fresh again"));
    assert_eq!(whoami(rig.rw), "node1");
}

#[test]
fn proxy_environment_variables_do_not_hijack_api_polls() {
    let (_n1, _api, cfg, rw) = one_leader("");
    // Port 9 (discard) on loopback: nothing listens, every proxied request would fail.
    let p = Proxy::start_with(&cfg, |cmd| {
        for var in [
            "HTTP_PROXY",
            "http_proxy",
            "HTTPS_PROXY",
            "https_proxy",
            "ALL_PROXY",
            "all_proxy",
        ] {
            cmd.env(var, "http://127.0.0.1:9");
        }
    });
    p.wait_backends("main", "rw", &["node1"]);
    assert_eq!(p.update(), 200);
    assert_eq!(whoami(local(rw)), "node1");
}

#[test]
fn leader_being_demoted_keeps_its_sessions_but_new_clients_wait_for_the_next() {
    let rig = rig("", "");
    let mut open = Client::connect(rig.rw);
    assert_eq!(open.greeting(), "node1");
    // Switchover under way: Patroni publishes the old leader without a
    // timeline while it stops PostgreSQL (real 3.0.2 capture shape).
    let mut demoting = member("node1", "leader", "running", rig.nodes[0].addr, None);
    demoting.as_object_mut().unwrap().remove("timeline");
    rig.api.set(&cluster(vec![
        demoting,
        member("node2", "replica", "streaming", rig.nodes[1].addr, Some(0)),
        member("node3", "replica", "streaming", rig.nodes[2].addr, Some(0)),
    ]));
    assert_eq!(rig.proxy.update(), 200);
    assert!(rig.proxy.wait_log("member=node1 draining"));
    assert!(open.echo("not cut for a missing timeline"));
    let mut held = Client::connect(rig.rw);
    assert!(
        held.silent_for(Duration::from_millis(400)),
        "no new client goes to a leader being demoted"
    );
    rig.set(&[
        ("node1", "replica", "stopping"),
        ("node2", "leader", "running"),
        ("node3", "replica", "streaming"),
    ]);
    assert_eq!(
        held.greeting(),
        "node2",
        "the held client goes to the new leader (fast polling)"
    );
    assert!(
        open.is_closed(),
        "and the demoted leader's session is closed"
    );
}

#[test]
fn a_held_client_keeps_its_session_past_the_wait_deadline() {
    let rig = rig("", ", backend_wait_timeout: 0.6");
    rig.set(&[("node2", "replica", "running")]);
    assert_eq!(rig.proxy.update(), 200);
    let mut c = Client::connect(rig.rw);
    std::thread::sleep(Duration::from_millis(200));
    rig.set(&[
        ("node1", "leader", "running"),
        ("node2", "replica", "streaming"),
    ]);
    assert_eq!(c.greeting(), "node1", "connected while held");
    // Past the moment the wait would have expired, the session lives on.
    std::thread::sleep(Duration::from_millis(900));
    assert!(c.echo("still connected after the wait deadline"));
}

/// A leader port in front of PostgreSQL-like backends.
fn pg_rig(members: &[(&str, &str, SocketAddr)], rw_opts: &str) -> (MockPatroni, Proxy, SocketAddr) {
    let ms = members
        .iter()
        .map(|(n, role, a)| member(n, role, "running", *a, Some(0)))
        .collect();
    let api = MockPatroni::start(&cluster(ms));
    let rw = free_port();
    let ports = format!("rw: {{listen: \"127.0.0.1:{rw}\", roles: [leader]{rw_opts}}}");
    let proxy = Proxy::start(&config(free_port(), &[api.url()], &ports, ""));
    let leader = members.iter().find(|m| m.1 == "leader").unwrap().0;
    proxy.wait_backends("main", "rw", &[leader]);
    (api, proxy, local(rw))
}

#[test]
fn a_refused_startup_is_retried_until_the_server_accepts() {
    // A leader restarting: it refuses two start-ups, then accepts.
    let pg = PgBackend::start("node1", 2);
    let (_api, p, rw) = pg_rig(&[("node1", "leader", pg.addr)], "");
    let start = Instant::now();
    assert_eq!(
        pg_start(rw, true),
        Ok((1, "node1".to_string())),
        "one N, then a clean start-up"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(450),
        "two retries, 250 ms apart"
    );
    assert_eq!(pg.refused.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert!(p.log().contains(
        "refused the start-up (the database system is shutting down); retrying in 250 ms"
    ));
    // Without an SSLRequest too.
    pg.set_refuse(1);
    assert_eq!(pg_start(rw, false), Ok((0, "node1".to_string())));
}

#[test]
fn a_refused_startup_follows_the_switchover() {
    // The old leader shuts down before /cluster says so: it refuses.
    let old = PgBackend::start("node1", usize::MAX);
    let new = PgBackend::start("node2", 0);
    let (api, p, rw) = pg_rig(
        &[
            ("node1", "leader", old.addr),
            ("node2", "replica", new.addr),
        ],
        "",
    );
    let client = std::thread::spawn(move || pg_start(rw, true));
    assert!(wait_until(Duration::from_secs(5), || old
        .refused
        .load(std::sync::atomic::Ordering::SeqCst)
        >= 1));
    api.set(&cluster(vec![
        member("node1", "replica", "stopping", old.addr, None),
        member("node2", "leader", "running", new.addr, None),
    ]));
    assert_eq!(p.update(), 200);
    assert_eq!(
        client.join().unwrap(),
        Ok((1, "node2".to_string())),
        "the client never saw the refusal"
    );
}

#[test]
fn a_refusal_is_relayed_when_no_retry_is_left() {
    let pg = PgBackend::start("node1", usize::MAX);
    let (_api, p, rw) = pg_rig(
        &[("node1", "leader", pg.addr)],
        ", backend_wait_timeout: 0.6",
    );
    let start = Instant::now();
    let err = pg_start(rw, true).unwrap_err();
    assert!(
        err.contains("57P03") && err.contains("the database system is shutting down"),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(p.log().contains("relaying it"));
}

#[test]
fn a_start_up_on_a_demoted_leader_is_replayed_on_the_new_one() {
    // The old leader took the TCP connection but has not answered the
    // start-up when the switchover shows in /cluster.
    let old = PgBackend::start("node1", 0);
    old.set_silent(true);
    let new = PgBackend::start("node2", 0);
    let (api, p, rw) = pg_rig(
        &[
            ("node1", "leader", old.addr),
            ("node2", "replica", new.addr),
        ],
        "",
    );
    let client = std::thread::spawn(move || pg_start(rw, true));
    assert!(wait_until(Duration::from_secs(5), || old
        .held
        .load(std::sync::atomic::Ordering::SeqCst)
        == 1));
    api.set(&cluster(vec![
        member("node1", "replica", "streaming", old.addr, Some(0)),
        member("node2", "leader", "running", new.addr, None),
    ]));
    assert_eq!(p.update(), 200);
    assert_eq!(
        client.join().unwrap(),
        Ok((1, "node2".to_string())),
        "replayed, not failed"
    );
    assert!(p.log().contains("member no longer routable"));
}

#[test]
fn a_login_cut_by_a_reset_is_replayed() {
    // A backend killed mid-login by a shutdown: AuthenticationOk, then RST.
    let pg = PgBackend::start("node1", 0);
    pg.set_reset(1);
    let (_api, p, rw) = pg_rig(&[("node1", "leader", pg.addr)], "");
    assert_eq!(
        pg_start(rw, true),
        Ok((1, "node1".to_string())),
        "the client saw one clean login"
    );
    assert!(
        p.log().contains("backend error during the start-up"),
        "{}",
        p.log()
    );
}

#[test]
fn a_startup_sent_while_a_replay_waits_is_not_sent_early() {
    // The server answers the SSLRequest and closes before the startup
    // packet; the client's startup arrives while the replay waits, and must
    // reach the next server only after its N (the mock rejects early data,
    // as PostgreSQL does).
    let pg = PgBackend::start("node1", 0);
    pg.set_close_after_n(1);
    let (_api, p, rw) = pg_rig(&[("node1", "leader", pg.addr)], "");
    assert_eq!(
        pg_start(rw, true),
        Ok((1, "node1".to_string())),
        "{}",
        p.log()
    );
    let early = pg.early.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(early, 0, "nothing may be sent behind an SSLRequest");
}

#[test]
fn startup_replay_can_be_turned_off() {
    let pg = PgBackend::start("node1", 1);
    let api = MockPatroni::start(&cluster(vec![member(
        "node1", "leader", "running", pg.addr, None,
    )]));
    let rw = free_port();
    let ports = format!("rw: {{listen: \"127.0.0.1:{rw}\", roles: [leader]}}");
    let p = Proxy::start(&config(
        free_port(),
        &[api.url()],
        &ports,
        "startup_replay: false",
    ));
    p.wait_backends("main", "rw", &["node1"]);
    let err = pg_start(local(rw), true).unwrap_err();
    assert!(
        err.contains("57P03"),
        "the refusal is relayed as sent: {err}"
    );
    assert_eq!(pg_start(local(rw), true), Ok((1, "node1".to_string())));
}

/// A replica whose lag moves on every poll is not a topology change worth
/// fast polling: the updater stays at one poll per cluster_update_interval.
#[test]
fn lag_moving_every_poll_keeps_the_normal_poll_rate() {
    use std::sync::atomic::{AtomicBool, Ordering};

    let (nodes, api) = three_nodes(0);
    let ro = free_port();
    let cfg = config(
        free_port(),
        &[api.url()],
        &format!("ro: {{listen: \"127.0.0.1:{ro}\", roles: [async]}}"),
        "",
    )
    .replace(
        "cluster_update_interval: 0.2",
        "cluster_update_interval: 0.5",
    );
    let p = Proxy::start(&cfg);
    p.wait_backends("main", "ro", &["node2", "node3"]);
    let bodies: Vec<_> = (1..=200u64)
        .map(|lag| {
            cluster(vec![
                member("node1", "leader", "running", nodes[0].addr, None),
                member("node2", "replica", "streaming", nodes[1].addr, Some(lag)),
                member(
                    "node3",
                    "replica",
                    "streaming",
                    nodes[2].addr,
                    Some(lag * 2),
                ),
            ])
        })
        .collect();
    let stop = AtomicBool::new(false);
    let polls = std::thread::scope(|s| {
        s.spawn(|| {
            // Bounded even if the main thread panics before it says stop.
            let deadline = Instant::now() + Duration::from_secs(20);
            for body in bodies.iter().cycle() {
                if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                    break;
                }
                api.set(body);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        // Let a few lag changes land first, then count polls over 3 s:
        // about 6 at 0.5 s, about 12 if lag moving switched to 250 ms polls.
        std::thread::sleep(Duration::from_millis(1200));
        let lag = || p.status()["clusters"]["main"]["members"][1]["lag"].clone();
        let (before, lag_before) = (api.requests(), lag());
        std::thread::sleep(Duration::from_secs(3));
        let polls = api.requests() - before;
        let lag_after = lag();
        stop.store(true, Ordering::SeqCst);
        // Every poll's figures still reach the loop (lag policies need them).
        assert_ne!(lag_after, lag_before, "the loop saw node2's lag move");
        polls
    });
    assert!(
        (2..=9).contains(&polls),
        "{polls} polls in 3 s at a 0.5 s interval with lag moving every poll"
    );
    p.wait_backends("main", "ro", &["node2", "node3"]);
}

#[test]
fn members_replaced_over_time_leave_no_counters_behind() {
    // Kubernetes-style rollouts: every pod comes back under a new name. A
    // member's counters live while it is routable or has sessions, then go.
    let node = Backend::start("pod");
    let pod = |i: usize| {
        cluster(vec![member(
            &format!("pod-{i}"),
            "leader",
            "running",
            node.addr,
            None,
        )])
    };
    let api = MockPatroni::start(&pod(0));
    let rw = free_port();
    let ports = format!("rw: {{listen: \"127.0.0.1:{rw}\", roles: [leader]}}");
    let proxy = Proxy::start(&config(free_port(), &[api.url()], &ports, ""));
    let mut previous: Option<Client> = None;
    for i in 0..50 {
        api.set(&pod(i));
        assert_eq!(proxy.update(), 200);
        proxy.wait_backends("main", "rw", &[&format!("pod-{i}")]);
        if let Some(mut c) = previous.take() {
            assert!(c.is_closed(), "the session on pod-{} outlived it", i - 1);
        }
        let mut c = Client::connect(local(rw));
        assert_eq!(c.greeting(), "pod");
        assert!(c.echo("hi"));
        previous = Some(c);
    }
    let (code, text) = proxy.get("/metrics").unwrap();
    assert_eq!(code, 200);
    let mut named: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("patroni_proxy_backend_"))
        .filter_map(|l| l.split("member=\"").nth(1)?.split('"').next())
        .collect();
    named.dedup();
    assert_eq!(named, ["pod-49"], "backend series of gone members remain");
    let connects = text
        .lines()
        .find(|l| l.starts_with("patroni_proxy_backend_connects_total{"))
        .unwrap();
    assert!(connects.ends_with(" 1"), "{connects}");
    assert!(
        text.contains(
            "patroni_proxy_backend_sessions_current{cluster=\"main\",port=\"rw\",member=\"pod-49\"} 1"
        ),
        "{text}"
    );
    let s = proxy.status();
    let members = s["clusters"]["main"]["ports"]["rw"]["stats"]["members"]
        .as_object()
        .unwrap();
    assert_eq!(members.keys().collect::<Vec<_>>(), ["pod-49"]);
}

//! Admin interface, SIGHUP reload, SIGTERM drain.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::util::*;

struct Rig {
    nodes: Vec<Backend>,
    api: MockPatroni,
    proxy: Proxy,
    admin: u16,
    rw: u16,
    ro: u16,
}

fn ports_yaml(rw: u16, ro: u16, ro_opts: &str) -> String {
    format!("rw: {{listen: \"127.0.0.1:{rw}\", roles: [leader]}}\nro: {{listen: \"127.0.0.1:{ro}\", {ro_opts}}}")
}

fn rig(extra: &str) -> Rig {
    let (nodes, api) = three_nodes(5000);
    let (admin, rw, ro) = (free_port(), free_port(), free_port());
    let proxy = Proxy::start(&config(
        admin,
        &[api.url()],
        &ports_yaml(rw, ro, "roles: [async]"),
        extra,
    ));
    proxy.wait_backends("main", "ro", &["node2", "node3"]);
    Rig {
        nodes,
        api,
        proxy,
        admin,
        rw,
        ro,
    }
}

fn raw_admin(admin: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn admin_root_and_bad_requests() {
    let rig = rig("");
    let a = rig.proxy.admin;
    assert_eq!(rig.proxy.get("/").unwrap(), (200, "OK".to_string()));
    assert!(raw_admin(a, b"HEAD / HTTP/1.0\r\n\r\n").starts_with("HTTP/1.1 200 OK"));
    assert!(raw_admin(a, b"GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(
        raw_admin(a, b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").starts_with("HTTP/1.1 405")
    );
    assert!(raw_admin(a, b"\x16\x03\x01\x00\xa5\x01\x00\x00\r\n\r\n").starts_with("HTTP/1.1 400"));
    let mut big = b"GET / HTTP/1.1\r\nX-Filler: ".to_vec();
    big.extend(vec![b'a'; 9000]);
    assert!(raw_admin(a, &big).starts_with("HTTP/1.1 413"));
    let start = Instant::now();
    assert!(
        raw_admin(a, b"GET / HTTP/1.1\r\n").starts_with("HTTP/1.1 408"),
        "a slow request times out"
    );
    assert!(start.elapsed() < Duration::from_secs(8));
    // Still serving after all that.
    assert_eq!(rig.proxy.get("/").unwrap().0, 200);
}

#[test]
fn update_clusters_reports_success_and_failure() {
    let rig = rig("api_timeout: 0.5");
    let (code, body) = rig.proxy.get("/update_clusters").unwrap();
    assert_eq!((code, body.as_str()), (200, "updated 1 cluster(s)\n"));
    rig.api.set_mode(Mode::Status(500));
    let (code, body) = rig.proxy.get("/update_clusters").unwrap();
    assert_eq!(code, 503);
    assert!(
        body.contains("main: ")
            && body.contains(&rig.api.url())
            && body.contains("HTTP status 500"),
        "{body}"
    );
    rig.api.set_mode(Mode::Close);
    let (code, body) = rig.proxy.get("/update_clusters").unwrap();
    assert_eq!(code, 503, "{body}");
    // The loop kept serving clients while the polls ran.
    assert_eq!(whoami(local(rig.rw)), "node1");
}

#[test]
fn clusters_json_shows_members_ports_and_connections() {
    let rig = rig("");
    let mut held: Vec<Client> = (0..2).map(|_| Client::connect(local(rig.rw))).collect();
    for c in held.iter_mut() {
        c.greeting();
    }
    let s = rig.proxy.status();
    let c = &s["clusters"]["main"];
    assert_eq!(c["status"], "ok");
    assert_eq!(c["leader"], "node1");
    assert_eq!(c["scope"], "demo");
    assert_eq!(c["members"][2]["name"], "node3");
    assert_eq!(c["members"][2]["lag"], 5000);
    assert_eq!(c["members"][0]["ports"]["rw"]["routable"], true);
    assert_eq!(
        c["members"][0]["ports"]["ro"]["reason"],
        "role leader not served by this port"
    );
    assert_eq!(c["ports"]["rw"]["backends"][0]["member"], "node1");
    assert_eq!(c["ports"]["rw"]["backends"][0]["active"], 2);
    assert_eq!(c["ports"]["rw"]["sessions"], 2);
    assert_eq!(s["sessions"], 2);
}

#[test]
fn clusters_json_counts_sessions_bytes_and_polls() {
    let (nodes, api) = three_nodes(0);
    let (rw, ro) = (free_port(), free_port());
    let proxy = Proxy::start(&config(
        free_port(),
        &[api.url()],
        &ports_yaml(rw, ro, "roles: [async], backend_wait_timeout: 0"),
        "",
    ));
    proxy.wait_backends("main", "ro", &["node2", "node3"]);
    let rig = Rig {
        nodes,
        api,
        proxy,
        admin: 0,
        rw,
        ro,
    };
    let mut c = Client::connect(local(rig.rw));
    assert_eq!(c.greeting(), "node1");
    assert!(c.echo("hello"));
    drop(c);
    // A port without a routable member refuses at once (wait 0).
    let mut r = Client::connect(local(rig.ro));
    r.greeting();
    rig.api.set(&cluster(vec![member(
        "node1",
        "leader",
        "running",
        rig.nodes[0].addr,
        None,
    )]));
    rig.proxy.wait_backends("main", "ro", &[]);
    assert_eq!(r.line(), None, "closed: its member left");
    let _ = Client::connect(local(rig.ro)).line();
    let stats = |port: &str| rig.proxy.status()["clusters"]["main"]["ports"][port]["stats"].clone();
    assert!(wait_until(Duration::from_secs(10), || {
        stats("rw")["closed"]["client"] == 1 && stats("ro")["refused"]["no_member"] == 1
    }));
    let rw = stats("rw");
    assert_eq!(rw["accepted"], 1);
    assert_eq!(rw["members"]["node1"]["connects"], 1);
    assert_eq!(rw["members"]["node1"]["bytes_up"], "hello\n".len());
    // The greeting counts too, although the start-up examination read it.
    assert_eq!(rw["members"]["node1"]["bytes_down"], "node1\nhello\n".len());
    let ro = stats("ro");
    assert_eq!(ro["accepted"], 2);
    assert_eq!(ro["closed"]["removed"], 1, "{ro}");
    let cluster = &rig.proxy.status()["clusters"]["main"]["stats"];
    assert!(cluster["polls"].as_u64().unwrap() >= 2, "{cluster}");
    assert_eq!(cluster["poll_errors"], 0);
    assert_eq!(cluster["leader_changes"], 0);
}

#[test]
fn sighup_changes_a_port_in_place_keeping_its_socket_and_sessions() {
    let rig = rig("");
    let pid = rig.proxy.pid();
    let (rw_inode, ro_inode) = (
        listen_inode(pid, rig.rw).unwrap(),
        listen_inode(pid, rig.ro).unwrap(),
    );
    let mut leader = Client::connect(local(rig.rw));
    assert_eq!(leader.greeting(), "node1");
    let mut a = Client::connect(local(rig.ro));
    let mut b = Client::connect(local(rig.ro));
    let (na, nb) = (a.greeting(), b.greeting());
    let (mut on2, mut on3) = if na == "node2" { (a, b) } else { (b, a) };
    assert_eq!((na.as_str().min(nb.as_str())), "node2");

    // Same addresses; the replica port gets a lag limit (node3 lags 5000)
    // and a role more.
    rig.proxy.rewrite_config(&config(
        rig.admin,
        &[rig.api.url()],
        &ports_yaml(
            rig.rw,
            rig.ro,
            "roles: [async, leader], max_lag_in_bytes: 1000",
        ),
        "",
    ));
    rig.proxy.signal(libc::SIGHUP);
    assert!(rig.proxy.wait_log("configuration reloaded"));
    rig.proxy.wait_backends("main", "ro", &["node1", "node2"]);
    assert!(on3.is_closed(), "node3 is over the new lag limit");
    assert!(
        on2.echo("kept"),
        "a session on a still-routable member survives the reload"
    );
    assert!(
        leader.echo("kept too"),
        "an unchanged port keeps its sessions"
    );
    assert_eq!(
        listen_inode(pid, rig.rw),
        Some(rw_inode),
        "the socket was not re-created"
    );
    assert_eq!(
        listen_inode(pid, rig.ro),
        Some(ro_inode),
        "the socket was not re-created"
    );
    assert_eq!(
        rig.proxy
            .log()
            .matches(&format!("listening on 127.0.0.1:{}", rig.ro))
            .count(),
        1
    );
}

#[test]
fn sighup_adds_and_removes_ports_and_moves_hosts() {
    let rig = rig("");
    let mut doomed = Client::connect(local(rig.ro));
    doomed.greeting();
    // A second API with another topology: changing hosts restarts the updater.
    let other = MockPatroni::start(&cluster(vec![member(
        "node2",
        "leader",
        "running",
        rig.nodes[1].addr,
        None,
    )]));
    let new_port = free_port();
    rig.proxy.rewrite_config(&config(
        rig.admin,
        &[other.url()],
        &format!("rw: {{listen: \"127.0.0.1:{}\", roles: [leader]}}\nnew: {{listen: \"127.0.0.1:{new_port}\", roles: [any]}}", rig.rw),
        "",
    ));
    rig.proxy.signal(libc::SIGHUP);
    assert!(rig.proxy.wait_log("configuration reloaded"));
    assert!(doomed.is_closed(), "a removed port's sessions end");
    assert!(
        TcpStream::connect(local(rig.ro)).is_err(),
        "a removed port stops listening"
    );
    rig.proxy.wait_backends("main", "rw", &["node2"]);
    assert_eq!(whoami(local(rig.rw)), "node2");
    assert_eq!(whoami(local(new_port)), "node2");

    // The admin address moves too, and a new poll interval applies.
    let new_admin = free_port();
    rig.proxy.rewrite_config(
        &config(
            new_admin,
            &[other.url()],
            &format!("rw: {{listen: \"127.0.0.1:{}\", roles: [leader]}}", rig.rw),
            "",
        )
        .replace(
            "cluster_update_interval: 0.2",
            "cluster_update_interval: 0.5",
        ),
    );
    rig.proxy.signal(libc::SIGHUP);
    assert!(rig
        .proxy
        .wait_log(&format!("admin interface moved to 127.0.0.1:{new_admin}")));
    assert_eq!(http_get(local(new_admin), "/").unwrap().0, 200);
    assert!(
        TcpStream::connect(local(rig.admin)).is_err(),
        "the old admin address is closed"
    );
    let polls = other.requests();
    std::thread::sleep(Duration::from_millis(1600));
    let rate = other.requests() - polls;
    assert!(
        (2..=5).contains(&rate),
        "{rate} polls in 1.6 s at a 0.5 s interval"
    );
}

#[test]
fn broken_reload_keeps_the_running_configuration() {
    let rig = rig("");
    for broken in [
        "clusters: [",
        "clusters:\n  main:\n    hosts: []\n    ports: {}\n",
        "nonsense_key: 1\nclusters: {}\n",
    ] {
        rig.proxy.rewrite_config(broken);
        let before = rig.proxy.log().matches("reload failed").count();
        rig.proxy.signal(libc::SIGHUP);
        assert!(wait_until(Duration::from_secs(5), || rig
            .proxy
            .log()
            .matches("reload failed")
            .count()
            > before));
        assert_eq!(whoami(local(rig.rw)), "node1");
        assert!(["node2", "node3"].contains(&whoami(local(rig.ro)).as_str()));
    }
    // A port that cannot bind also fails the whole reload.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    rig.proxy.rewrite_config(&config(
        rig.admin,
        &[rig.api.url()],
        &format!(
            "{}\nextra: {{listen: \"127.0.0.1:{taken_port}\", roles: [any]}}",
            ports_yaml(rig.rw, rig.ro, "roles: [leader]")
        ),
        "",
    ));
    rig.proxy.signal(libc::SIGHUP);
    assert!(rig.proxy.wait_log(&format!(
        "bind 127.0.0.1:{taken_port}: Address already in use"
    )));
    assert_eq!(
        rig.proxy.backends("main", "ro"),
        ["node2", "node3"],
        "the ro port kept its old roles"
    );
}

#[test]
fn sigterm_drains_then_exits() {
    let mut rig = rig("");
    let mut open = Client::connect(local(rig.rw));
    assert_eq!(open.greeting(), "node1");
    rig.proxy.signal(libc::SIGTERM);
    assert!(rig.proxy.wait_log("no longer accepting"));
    assert!(
        TcpStream::connect(local(rig.rw)).is_err(),
        "new clients are refused"
    );
    assert!(open.echo("finishing my work"), "open sessions keep working");
    assert!(
        rig.proxy.wait_exit(Duration::from_millis(300)).is_none(),
        "waits for the session"
    );
    drop(open);
    let status = rig
        .proxy
        .wait_exit(Duration::from_secs(5))
        .expect("exits once drained");
    assert!(status.success(), "{status:?}");
}

#[test]
fn second_sigterm_exits_at_once() {
    let mut rig = rig("shutdown_timeout: 60");
    let mut open = Client::connect(local(rig.rw));
    open.greeting();
    rig.proxy.signal(libc::SIGTERM);
    assert!(rig.proxy.wait_log("no longer accepting"));
    rig.proxy.signal(libc::SIGTERM);
    let status = rig
        .proxy
        .wait_exit(Duration::from_secs(5))
        .expect("second signal exits at once");
    assert!(status.success());
    assert!(open.is_closed());
}

#[test]
fn shutdown_timeout_bounds_the_drain() {
    let mut rig = rig("shutdown_timeout: 0.5");
    let mut open = Client::connect(local(rig.rw));
    open.greeting();
    let start = Instant::now();
    rig.proxy.signal(libc::SIGINT);
    let status = rig
        .proxy
        .wait_exit(Duration::from_secs(5))
        .expect("exits at the deadline");
    assert!(status.success());
    assert!(start.elapsed() >= Duration::from_millis(400));
    assert!(open.is_closed());
}

#[test]
fn systemd_is_told_ready_reloading_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = TempDir::new();
    let path = dir.0.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let next = || {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let (_nodes, api) = three_nodes(0);
    let (admin, rw) = (free_port(), free_port());
    let ports = format!("rw: {{listen: \"127.0.0.1:{rw}\", roles: [leader]}}");
    let cfg = config(admin, &[api.url()], &ports, "");
    let mut proxy = Proxy::start_with(&cfg, |cmd| {
        cmd.env("NOTIFY_SOCKET", &path);
    });
    let ready = next();
    assert!(
        ready.starts_with("READY=1\nSTATUS=serving 1 ports of 1 clusters"),
        "{ready}"
    );
    proxy.signal(libc::SIGHUP);
    assert!(next().starts_with("RELOADING=1"));
    assert!(next().starts_with("READY=1\nSTATUS=reloaded"));
    proxy.rewrite_config("clusters: [");
    proxy.signal(libc::SIGHUP);
    assert!(next().starts_with("RELOADING=1"));
    let failed = next();
    assert!(
        failed.starts_with("READY=1\nSTATUS=reload failed, previous configuration kept"),
        "{failed}"
    );
    proxy.signal(libc::SIGTERM);
    assert!(next().starts_with("STOPPING=1"));
    assert!(proxy.wait_exit(Duration::from_secs(5)).unwrap().success());
}

//! Bytes on the wire: large transfers, half-close, concurrency, connect
//! failures and timeouts, connection and file-descriptor limits.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::util::*;

/// A proxy with one `any` port in front of `members` (name, address).
fn any_port(members: &[(&str, SocketAddr)], extra: &str) -> (MockPatroni, Proxy, SocketAddr) {
    let ms = members
        .iter()
        .enumerate()
        .map(|(i, (n, a))| {
            member(
                n,
                if i == 0 { "leader" } else { "replica" },
                if i == 0 { "running" } else { "streaming" },
                *a,
                Some(0),
            )
        })
        .collect();
    let api = MockPatroni::start(&cluster(ms));
    let port = free_port();
    let p = Proxy::start(&config(
        free_port(),
        &[api.url()],
        &format!("any: {{listen: \"127.0.0.1:{port}\", roles: [any]}}"),
        extra,
    ));
    let names: Vec<&str> = members.iter().map(|(n, _)| *n).collect();
    p.wait_backends("main", "any", &names);
    (api, p, local(port))
}

#[test]
fn half_close_is_passed_through() {
    let b = Backend::start("node1");
    let (_api, _p, port) = any_port(&[("node1", b.addr)], "");
    let mut c = Client::connect(port);
    assert_eq!(c.greeting(), "node1");
    c.stream.write_all(b"last words\n").unwrap();
    c.stream.shutdown(Shutdown::Write).unwrap();
    // The backend sees our FIN only through the proxy, echoes, then closes.
    assert_eq!(
        c.line().as_deref(),
        Some("last words"),
        "the reply still comes back after our FIN"
    );
    assert!(c.line().is_none(), "and then the backend's FIN");
    assert!(
        wait_until(Duration::from_secs(5), || b.open() == 0),
        "the backend saw the client's FIN"
    );
}

#[test]
fn sixty_four_mib_both_ways_arrive_intact_through_pipes() {
    let max_pipes = sixty_four_mib("");
    assert!(
        max_pipes > 0,
        "a bulk transfer is spliced through kernel pipes"
    );
}

#[test]
fn sixty_four_mib_both_ways_arrive_intact_through_buffers() {
    assert_eq!(sixty_four_mib("splice: false"), 0);
}

/// Sends 64 MiB of pseudo-random bytes through the proxy to an echo backend
/// while reading the echo, then half-closes; checks count and checksum.
/// Returns the most pipes seen in use during the transfer.
fn sixty_four_mib(extra: &str) -> u64 {
    const TOTAL: usize = 64 << 20;
    let b = Backend::start("node1");
    let (_api, p, port) = any_port(&[("node1", b.addr)], extra);
    let mut c = Client::connect(port);
    assert_eq!(c.greeting(), "node1");
    let mut writer = c.stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut seed = 0x9E3779B97F4A7C15u64;
        let mut sum = Fnv::default();
        let mut chunk = vec![0u8; 1 << 16];
        let mut sent = 0;
        while sent < TOTAL {
            for x in chunk.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *x = seed as u8;
            }
            writer.write_all(&chunk).unwrap();
            sum.update(&chunk);
            sent += chunk.len();
        }
        writer.shutdown(Shutdown::Write).unwrap();
        sum.0
    });
    let mut got = 0;
    let mut sum = Fnv::default();
    let mut buf = vec![0u8; 1 << 16];
    let mut max_pipes = 0;
    c.stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    loop {
        let n = c.stream.read(&mut buf).expect("reading the echo");
        if n == 0 {
            break;
        }
        sum.update(&buf[..n]);
        if got / (8 << 20) != (got + n) / (8 << 20) {
            max_pipes = max_pipes.max(p.status()["pipes_in_use"].as_u64().unwrap());
        }
        got += n;
    }
    assert_eq!(got, TOTAL);
    assert_eq!(sum.0, sender.join().unwrap(), "checksum of what came back");
    let s = p.status();
    assert_eq!(s["sessions"], 0);
    assert_eq!(s["buffers_in_use"], 0, "buffers go back to the pool");
    assert_eq!(s["pipes_in_use"], 0, "pipes go back to the pool");
    max_pipes
}

#[derive(Default)]
struct Fnv(u64);

impl Fnv {
    fn update(&mut self, data: &[u8]) {
        if self.0 == 0 {
            self.0 = 0xcbf29ce484222325;
        }
        for b in data {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100000001b3);
        }
    }
}

#[test]
fn two_thousand_concurrent_connections() {
    let (b1, b2) = (Backend::start("node1"), Backend::start("node2"));
    let (_api, p, port) = any_port(&[("node1", b1.addr), ("node2", b2.addr)], "");
    let mut clients: Vec<Client> = (0..2000).map(|_| Client::connect(port)).collect();
    let mut per = std::collections::HashMap::new();
    for c in clients.iter_mut() {
        *per.entry(c.greeting()).or_insert(0) += 1;
    }
    assert_eq!(per.get("node1"), Some(&1000), "{per:?}");
    assert_eq!(per.get("node2"), Some(&1000), "{per:?}");
    for (i, c) in clients.iter_mut().enumerate() {
        assert!(c.echo(&format!("client {i}")));
    }
    assert_eq!(p.status()["sessions"], 2000);
    assert_eq!(
        p.status()["buffers_in_use"],
        0,
        "idle sessions hold no buffer"
    );
    drop(clients);
    assert!(wait_until(Duration::from_secs(10), || p.status()
        ["sessions"]
        == 0));
}

#[test]
fn connect_timeout_moves_on_to_the_next_member() {
    let hole = BlackHole::start();
    let good = Backend::start("node2");
    let (_api, p, port) = any_port(
        &[("node1", hole.addr), ("node2", good.addr)],
        "connect_timeout: 0.5",
    );
    let start = Instant::now();
    let mut c = Client::connect(port);
    assert_eq!(c.greeting(), "node2");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(p.log().contains("connect timeout; trying the next member"));
}

#[test]
fn refused_connect_moves_on_and_when_all_fail_the_client_is_held() {
    let dead = refused_addr();
    let good = Backend::start("node2");
    let (api, p, port) = any_port(&[("node1", dead), ("node2", good.addr)], "");
    for _ in 0..3 {
        assert_eq!(whoami(port), "node2");
    }
    // Only the dead member is left (the old leader whose port refuses
    // before Patroni shows the new one): the client is held, retried, and
    // connected as soon as a reachable member shows.
    api.set(&cluster(vec![member(
        "node1", "leader", "running", dead, None,
    )]));
    assert_eq!(p.update(), 200);
    let mut c = Client::connect(port);
    assert!(
        c.silent_for(Duration::from_millis(600)),
        "held while every member refuses"
    );
    api.set(&cluster(vec![
        member("node1", "replica", "stopped", dead, None),
        member("node2", "leader", "running", good.addr, None),
    ]));
    assert_eq!(p.update(), 200);
    assert_eq!(c.greeting(), "node2");
}

#[test]
fn when_all_members_keep_failing_the_client_is_closed_after_the_wait() {
    let dead = refused_addr();
    let api = MockPatroni::start(&cluster(vec![member(
        "node1", "leader", "running", dead, None,
    )]));
    let port = free_port();
    let ports =
        format!("rw: {{listen: \"127.0.0.1:{port}\", roles: [leader], backend_wait_timeout: 0.7}}");
    let p = Proxy::start(&config(free_port(), &[api.url()], &ports, ""));
    p.wait_backends("main", "rw", &["node1"]);
    let start = Instant::now();
    assert!(Client::connect(local(port)).is_closed());
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert!(p.log().contains("every routable member failed to connect"));
    // One warning for the session's first failure; the retries log at debug.
    let warns = p
        .log()
        .lines()
        .filter(|l| l.contains("[WARN]") && l.contains("connect failed"))
        .count();
    assert_eq!(warns, 1, "{}", p.log());
}

#[test]
fn max_connections_pauses_accepting_and_resumes() {
    let b = Backend::start("node1");
    let (_api, p, port) = any_port(&[("node1", b.addr)], "max_connections: 3");
    let mut held: Vec<Client> = (0..3).map(|_| Client::connect(port)).collect();
    for c in held.iter_mut() {
        assert_eq!(c.greeting(), "node1");
    }
    // The fourth completes its TCP handshake in the backlog but is not served.
    let mut fourth = Client::connect(port);
    assert!(
        fourth.silent_for(Duration::from_millis(500)),
        "held in the backlog, not closed"
    );
    assert!(p.log().contains("max_connections=3 reached"));
    held.pop();
    assert_eq!(fourth.greeting(), "node1", "served once a slot is free");
}

#[test]
fn running_out_of_file_descriptors_is_survived_and_recovered_from() {
    let (_b, _api, cfg, port) = one_leader("");
    let p = Proxy::start_with(&cfg, |cmd| nofile_limit(cmd, 48));
    p.wait_backends("main", "rw", &["node1"]);
    // Each session needs two descriptors: 40 clients cannot all be served.
    let mut clients: Vec<Client> = (0..40).map(|_| Client::connect(local(port))).collect();
    let mut served = 0;
    for c in clients.iter_mut() {
        c.stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        if c.line().is_some() {
            served += 1;
        }
    }
    assert!(served > 5 && served < 40, "served {served}");
    assert!(p.wait_log("Too many open files"), "the shortage is logged");
    drop(clients);
    // Still alive, and serving again once descriptors are free.
    assert!(wait_until(Duration::from_secs(10), || p.status()
        ["sessions"]
        == 0));
    let mut c = Client::connect(local(port));
    assert_eq!(c.greeting(), "node1");
}

#[test]
fn accept_pauses_on_emfile_and_resumes_when_descriptors_free() {
    // A port with no routable member: each held client costs the proxy one
    // descriptor, so the table fills and accept itself fails with EMFILE.
    let (_n1, _api, cfg, _) = one_leader("");
    let held = free_port();
    let cfg = cfg.replace(
        "    ports:\n",
        &format!("    ports:\n      held: {{listen: \"127.0.0.1:{held}\", roles: [sync], backend_wait_timeout: 60}}\n"),
    );
    let p = Proxy::start_with(&cfg, |cmd| nofile_limit(cmd, 40));
    let mut clients: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(local(held)).unwrap())
        .collect();
    assert!(
        p.wait_log("accept failed: Too many open files"),
        "accept hit the descriptor limit"
    );
    assert!(
        p.log().matches("pausing accepts").count() == 1,
        "logged once per episode, no busy loop"
    );
    // Free descriptors by closing the first 20 (accepted) clients: accepting
    // resumes on its timer, and every remaining client, including those that
    // were still queued in the backlog, becomes a session.
    let rest = clients.split_off(20);
    drop(clients);
    let sessions = || {
        p.get("/clusters")
            .ok()
            .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
            .and_then(|s| s["sessions"].as_u64())
    };
    assert!(
        wait_until(Duration::from_secs(10), || sessions() == Some(20)),
        "the backlog was not drained after the pause: {:?} sessions\n{}",
        sessions(),
        p.log()
    );
    drop(rest);
    assert!(wait_until(Duration::from_secs(10), || p.status()
        ["sessions"]
        == 0));
}

#[test]
fn splice_pipes_never_take_the_descriptors_sessions_need() {
    // max_connections=8 needs 16 descriptors and fits in a limit of 40;
    // splice pipes (two descriptors each) must make do with what is left,
    // or the pipes of a few bulk transfers push accept into EMFILE.
    let (_b, _api, cfg, port) = one_leader("max_connections: 8\nbuffer_size: 1024");
    let p = Proxy::start_with(&cfg, |cmd| nofile_limit(cmd, 40));
    p.wait_backends("main", "rw", &["node1"]);
    let mut clients = Vec::new();
    for i in 0..8 {
        let mut c = Client::connect(local(port));
        c.stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        assert_eq!(
            c.line().as_deref(),
            Some("node1"),
            "client {i} not served\n{}",
            p.log()
        );
        // A bulk transfer that stays stuck: the echo comes back to a client
        // that does not read, so both directions keep bytes in flight.
        c.stream.set_nonblocking(true).unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut sent = 0;
        while Instant::now() < deadline && sent < 32 << 20 {
            match c.stream.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                    if c.stream.write(&chunk).is_err() {
                        break;
                    }
                }
                Err(e) => panic!("client {i}: {e}"),
            }
        }
        clients.push(c);
    }
    assert!(!p.log().contains("Too many open files"), "{}", p.log());
}

#[test]
fn a_short_exchange_that_is_not_postgresql_passes_at_once() {
    // The client speaks first with one byte and the server answers one byte:
    // nothing of the start-up examination may hold it back.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut c in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut b = [0u8; 64];
                while let Ok(n) = c.read(&mut b) {
                    if n == 0 || c.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let (_api, _p, port) = any_port(&[("node1", addr)], "");
    for msg in [&b"x"[..], b"R", b"E\x00", b"\x00\x00\x00\x08"] {
        let mut c = TcpStream::connect(port).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        c.write_all(msg).unwrap();
        let mut got = vec![0u8; msg.len()];
        c.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("{msg:?} came back? {e}"));
        assert_eq!(got, msg);
    }
}

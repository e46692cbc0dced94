//! `preconnect: N`: pre-connected backend sockets. A recording backend
//! (silent until spoken to, as PostgreSQL) notes every connection it
//! accepts, when, whether a client's bytes arrived on it and whether the
//! proxy closed it.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::*;

/// One accepted connection as the backend saw it.
#[derive(Debug, Clone)]
struct Conn {
    accepted: Instant,
    /// When the first byte arrived.
    data: Option<Instant>,
    /// When the proxy closed it (or the backend did).
    closed: Option<Instant>,
}

/// How a [`Recorder`] treats what it accepts.
#[derive(Default)]
struct Knobs {
    /// Close every connection at once.
    close_at_once: AtomicBool,
    /// Close the next this many connections that receive data, unanswered.
    kill_on_data: AtomicUsize,
}

struct Recorder {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Conn>>>,
    socks: Arc<Mutex<Vec<TcpStream>>>,
    knobs: Arc<Knobs>,
}

impl Recorder {
    /// `pg`: answer a PostgreSQL start-up as server `pg`; otherwise echo.
    fn start(pg: Option<&str>) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let r = Recorder {
            addr: listener.local_addr().unwrap(),
            conns: Arc::default(),
            socks: Arc::default(),
            knobs: Arc::default(),
        };
        let (conns, socks, knobs) = (r.conns.clone(), r.socks.clone(), r.knobs.clone());
        let pg = pg.map(str::to_string);
        thread::spawn(move || {
            for c in listener.incoming() {
                let Ok(mut c) = c else { continue };
                let i = {
                    let mut v = conns.lock().unwrap();
                    v.push(Conn {
                        accepted: Instant::now(),
                        data: None,
                        closed: None,
                    });
                    v.len() - 1
                };
                if knobs.close_at_once.load(Ordering::SeqCst) {
                    conns.lock().unwrap()[i].closed = Some(Instant::now());
                    continue;
                }
                socks.lock().unwrap().push(c.try_clone().unwrap());
                let (conns, knobs, pg) = (conns.clone(), knobs.clone(), pg.clone());
                thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let mut first = true;
                    loop {
                        match c.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if first {
                                    first = false;
                                    conns.lock().unwrap()[i].data = Some(Instant::now());
                                    let left = &knobs.kill_on_data;
                                    if left
                                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                                            v.checked_sub(1)
                                        })
                                        .is_ok()
                                    {
                                        break; // closed without answering
                                    }
                                    if let Some(name) = &pg {
                                        // The whole start-up is one small packet.
                                        let mut out = pg_message(b'R', &0u32.to_be_bytes());
                                        out.extend(pg_message(
                                            b'S',
                                            format!("server_name\0{name}\0").as_bytes(),
                                        ));
                                        out.extend(pg_message(b'Z', b"I"));
                                        if c.write_all(&out).is_err() {
                                            break;
                                        }
                                        continue;
                                    }
                                }
                                if c.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = c.shutdown(Shutdown::Both);
                    conns.lock().unwrap()[i]
                        .closed
                        .get_or_insert(Instant::now());
                });
            }
        });
        r
    }

    fn conns(&self) -> Vec<Conn> {
        self.conns.lock().unwrap().clone()
    }

    /// Connections accepted and not closed.
    fn open(&self) -> usize {
        self.conns().iter().filter(|c| c.closed.is_none()).count()
    }

    /// Closes every connection accepted so far, from the server side.
    fn kick(&self) {
        for s in self.socks.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn leader(name: &str, r: &Recorder) -> serde_json::Value {
    member(name, "leader", "running", r.addr, None)
}

fn replica(name: &str, r: &Recorder) -> serde_json::Value {
    member(name, "replica", "streaming", r.addr, Some(0))
}

/// A proxy with one leader port `rw` carrying `opts`.
fn proxy(api: &MockPatroni, opts: &str) -> (Proxy, SocketAddr) {
    let rw = free_port();
    let cfg = config(
        free_port(),
        &[api.url()],
        &format!("rw: {{listen: \"127.0.0.1:{rw}\", roles: [leader], {opts}}}"),
        "",
    );
    (Proxy::start(&cfg), local(rw))
}

/// The value of `name` for port `rw` in `/metrics`.
fn metric(p: &Proxy, name: &str) -> Option<f64> {
    let (_, body) = p.get("/metrics").ok()?;
    body.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains("port=\"rw\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// One round trip through `addr`: the bytes come back.
fn echo(addr: SocketAddr, msg: &str) -> bool {
    let Ok(mut c) = TcpStream::connect(addr) else {
        return false;
    };
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(msg.as_bytes()).unwrap();
    let mut got = vec![0u8; msg.len()];
    c.read_exact(&mut got).is_ok() && got == msg.as_bytes()
}

const LONG: Duration = Duration::from_secs(15);

/// Waits until `/metrics` shows `n` pooled sockets ready on `rw`.
fn wait_ready(p: &Proxy, n: u32) {
    let ready = || metric(p, "patroni_proxy_port_preconnected");
    assert!(
        wait_until(LONG, || ready() == Some(f64::from(n))),
        "{n} ready never shown: {:?}\n{}",
        ready(),
        p.log()
    );
}

#[test]
fn a_client_gets_a_connection_accepted_before_it_came_and_the_pool_refills() {
    let n1 = Recorder::start(None);
    let api = MockPatroni::start(&cluster(vec![leader("node1", &n1)]));
    let (p, rw) = proxy(&api, "preconnect: 2");
    assert!(
        wait_until(LONG, || n1.open() == 2),
        "two pooled connections before any client: {:?}\n{}",
        n1.conns(),
        p.log()
    );
    wait_ready(&p, 2);
    let before = Instant::now();
    assert!(echo(rw, "hello"));
    let conns = n1.conns();
    let used: Vec<&Conn> = conns.iter().filter(|c| c.data.is_some()).collect();
    assert_eq!(used.len(), 1, "{conns:?}");
    assert!(
        used[0].accepted < before,
        "the client got a pooled connection"
    );
    // A replacement, and the gauge back at 2.
    assert!(
        wait_until(LONG, || n1
            .conns()
            .iter()
            .filter(|c| c.accepted > before)
            .count()
            == 1),
        "{:?}",
        n1.conns()
    );
    wait_ready(&p, 2);
    assert_eq!(
        metric(&p, "patroni_proxy_port_preconnect_hits_total"),
        Some(1.0)
    );
    assert_eq!(
        metric(&p, "patroni_proxy_port_preconnect_misses_total"),
        Some(0.0)
    );
    let port = &p.status()["clusters"]["main"]["ports"]["rw"]["stats"];
    assert_eq!(port["preconnect_hits"], 1, "{port}");
    assert!(p.log().contains("keeps 2 pre-connected sockets per member"));
}

#[test]
fn a_switchover_closes_the_old_leaders_pooled_connections() {
    let (n1, n2) = (Recorder::start(None), Recorder::start(None));
    let api = MockPatroni::start(&cluster(vec![leader("node1", &n1), replica("node2", &n2)]));
    let (p, rw) = proxy(&api, "preconnect: 2");
    assert!(wait_until(LONG, || n1.open() == 2), "{}", p.log());
    assert_eq!(n2.conns().len(), 0, "a replica gets none on a leader port");

    api.set(&cluster(vec![replica("node1", &n1), leader("node2", &n2)]));
    assert_eq!(p.update(), 200);
    for i in 0..5 {
        assert!(echo(rw, &format!("client {i}")));
    }
    assert!(
        n1.conns().iter().all(|c| c.data.is_none()),
        "no client reached the old leader: {:?}",
        n1.conns()
    );
    assert!(
        wait_until(LONG, || n1.open() == 0),
        "the old leader's pooled connections are closed: {:?}",
        n1.conns()
    );
    assert!(wait_until(LONG, || n2.open() == 2), "{:?}", n2.conns());
    assert!(n2.conns().iter().filter(|c| c.data.is_some()).count() == 5);
}

#[test]
fn pooled_connections_are_recycled_after_their_max_age() {
    let n1 = Recorder::start(None);
    let api = MockPatroni::start(&cluster(vec![leader("node1", &n1)]));
    let (p, rw) = proxy(&api, "preconnect: 2, preconnect_max_age: 1");
    assert!(wait_until(LONG, || n1.open() == 2), "{}", p.log());
    let first: Vec<Instant> = n1.conns().iter().map(|c| c.accepted).collect();
    // Within a few seconds, the first two are closed and two new are open.
    assert!(
        wait_until(LONG, || {
            let c = n1.conns();
            c[..2].iter().all(|c| c.closed.is_some())
                && c.iter().filter(|c| c.closed.is_none()).count() == 2
        }),
        "{:?}",
        n1.conns()
    );
    let c = n1.conns();
    let lived = c[0].closed.unwrap() - first[0];
    assert!(
        lived >= Duration::from_millis(900),
        "closed after {lived:?}, before its age"
    );
    assert!(echo(rw, "still served"));
}

#[test]
fn connections_the_server_closes_are_replaced_without_spinning() {
    let n1 = Recorder::start(None);
    let api = MockPatroni::start(&cluster(vec![leader("node1", &n1)]));
    let (p, rw) = proxy(&api, "preconnect: 2");
    assert!(wait_until(LONG, || n1.open() == 2), "{}", p.log());
    // The server closes them: the proxy notices and opens two new ones.
    n1.kick();
    assert!(
        wait_until(LONG, || {
            let c = n1.conns();
            c.len() == 4 && c[2..].iter().all(|c| c.closed.is_none())
        }),
        "{:?}\n{}",
        n1.conns(),
        p.log()
    );
    wait_ready(&p, 2);
    assert!(echo(rw, "hello"), "a client on a replacement");

    // A server that closes every connection at once: the proxy backs off.
    n1.knobs.close_at_once.store(true, Ordering::SeqCst);
    n1.kick();
    thread::sleep(Duration::from_millis(500));
    let before = n1.conns().len();
    thread::sleep(Duration::from_secs(3));
    let during = n1.conns().len() - before;
    assert!(
        during <= 10,
        "{during} connections in 3 s to a server that closes each at once"
    );
    assert!(during >= 1, "still trying");
}

#[test]
fn a_pooled_connection_that_dies_after_hand_over_is_replayed_elsewhere() {
    let n1 = Recorder::start(Some("node1"));
    let api = MockPatroni::start(&cluster(vec![leader("node1", &n1)]));
    let (p, rw) = proxy(&api, "preconnect: 2");
    assert!(wait_until(LONG, || n1.open() == 2), "{}", p.log());
    // The first connection to get the client's start-up closes unanswered.
    n1.knobs.kill_on_data.store(1, Ordering::SeqCst);
    let before = Instant::now();
    assert_eq!(pg_start(rw, false), Ok((0, "node1".to_string())));
    let conns = n1.conns();
    let used: Vec<&Conn> = conns.iter().filter(|c| c.data.is_some()).collect();
    assert_eq!(used.len(), 2, "the pooled one, then a retry: {conns:?}");
    assert!(used[0].accepted < before, "the first was pooled");
    assert!(p.log().contains("retrying in 0 ms"), "{}", p.log());
}

#[test]
fn preconnect_limits_name_their_keys() {
    let dir = TempDir::new();
    let path = dir.0.join("p.yaml");
    std::fs::write(
        &path,
        "clusters:\n  main:\n    hosts: [\"http://127.0.0.1:1\"]\n    ports:\n      rw: {listen: \"127.0.0.1:1\", roles: [leader], preconnect: 65, preconnect_max_age: 0}\n",
    )
    .unwrap();
    let o = Command::new(BIN).arg("-t").arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("clusters.main.ports.rw.preconnect: 65 is out of range"),
        "{err}"
    );
    assert!(
        err.contains("clusters.main.ports.rw.preconnect_max_age: 0 seconds"),
        "{err}"
    );
}

#[test]
fn a_reload_that_turns_preconnect_off_closes_the_pooled_connections() {
    let n1 = Recorder::start(None);
    let api = MockPatroni::start(&cluster(vec![leader("node1", &n1)]));
    let rw = free_port();
    let admin = free_port();
    let cfg = |opts: &str| {
        config(
            admin,
            &[api.url()],
            &format!("rw: {{listen: \"127.0.0.1:{rw}\", roles: [leader]{opts}}}"),
            "",
        )
    };
    let p = Proxy::start(&cfg(", preconnect: 3"));
    assert!(wait_until(LONG, || n1.open() == 3), "{}", p.log());
    p.rewrite_config(&cfg(", preconnect: 1"));
    p.signal(libc::SIGHUP);
    assert!(wait_until(LONG, || n1.open() == 1), "{:?}", n1.conns());
    assert!(p.wait_log("keeps 1 pre-connected sockets per member"));
    p.rewrite_config(&cfg(""));
    p.signal(libc::SIGHUP);
    assert!(wait_until(LONG, || n1.open() == 0), "{:?}", n1.conns());
    assert!(echo(local(rw), "plain connect"));
    assert_eq!(n1.conns().len(), 4, "three pooled, one for the client");
}

#[test]
fn a_drain_closes_the_pooled_connections_and_keeps_the_sessions() {
    let n1 = Recorder::start(None);
    let api = MockPatroni::start(&cluster(vec![leader("node1", &n1)]));
    let (mut p, rw) = proxy(&api, "preconnect: 2");
    assert!(wait_until(LONG, || n1.open() == 2), "{}", p.log());
    let mut c = TcpStream::connect(rw).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    c.read_exact(&mut got).unwrap();
    assert!(wait_until(LONG, || n1.open() == 3), "{:?}", n1.conns());
    p.signal(libc::SIGTERM);
    assert!(
        wait_until(LONG, || n1.open() == 1),
        "only the session's connection stays: {:?}",
        n1.conns()
    );
    c.write_all(b"pong").unwrap();
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"pong");
    drop(c);
    assert!(p.wait_exit(LONG).is_some_and(|s| s.success()));
}

#[test]
fn a_member_that_refuses_connects_is_retried_after_a_backoff() {
    // Nothing listens there: every connect is refused.
    let addr = refused_addr();
    let api = MockPatroni::start(&cluster(vec![member(
        "node1", "leader", "running", addr, None,
    )]));
    let (p, _rw) = proxy(&api, "preconnect: 2");
    let failed = || p.log().matches("connect failed").count();
    // Retried within seconds (each after the backoff), not once per
    // preconnect_max_age, and not in a tight loop.
    assert!(wait_until(LONG, || failed() >= 3), "{}", p.log());
    let before = failed();
    thread::sleep(Duration::from_secs(3));
    let during = failed() - before;
    assert!((1..=6).contains(&during), "{during} failed connects in 3 s");
    assert_eq!(metric(&p, "patroni_proxy_port_preconnected"), Some(0.0));
}

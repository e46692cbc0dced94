//! Shared test tools: the proxy as a child process, a mock Patroni REST API,
//! greeting/echo backends, port allocation, and `wait_until` (no fixed
//! sleeps). Everything binds loopback only.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub mod certs;

pub const BIN: &str = env!("CARGO_BIN_EXE_patroni-proxy");

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A port below the ephemeral range (so client sockets never take it),
/// unique in this process and free when handed out.
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 400) as u16 * 25,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let p = NEXT.fetch_add(1, Ordering::SeqCst);
        if p >= 32_000 {
            NEXT.store(20_000, Ordering::SeqCst);
            continue;
        }
        if TcpListener::bind(("127.0.0.1", p)).is_ok() && TcpListener::bind(("0.0.0.0", p)).is_ok()
        {
            return p;
        }
    }
}

/// An address that refuses connections: a port from [`free_port`], which
/// nothing binds. (A port taken from port 0 and closed again could be handed
/// to the next listener bound to port 0, another test's backend.)
pub fn refused_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A per-test directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "patroni-proxy-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- mock Patroni ----------------------------------------------------------

/// How the mock answers `GET /cluster`.
#[derive(Clone)]
pub enum Mode {
    /// 200 with the body, HTTP/1.0, no Content-Length, close (as Patroni).
    Body(String),
    /// Accept and never answer.
    Hang,
    /// Close without a response (Patroni on a DCS error).
    Close,
    /// Answer with this status and a short body.
    Status(u16),
}

pub struct MockPatroni {
    pub addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    requests: Arc<AtomicUsize>,
    /// The `GET /config` body; `None` answers 502, as Patroni does when
    /// the DCS has no configuration.
    config: Arc<Mutex<Option<String>>>,
    config_requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl MockPatroni {
    pub fn start(body: &Value) -> MockPatroni {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(Mutex::new(Mode::Body(body.to_string())));
        let requests = Arc::new(AtomicUsize::new(0));
        let config = Arc::new(Mutex::new(None::<String>));
        let config_requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, r, s) = (mode.clone(), requests.clone(), stop.clone());
        let (c, cr) = (config.clone(), config_requests.clone());
        thread::spawn(move || {
            let mut hung = Vec::new();
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n")
                    && conn.read(&mut byte).map(|n| n == 1).unwrap_or(false)
                {
                    head.push(byte[0]);
                }
                let path = String::from_utf8_lossy(&head)
                    .split(' ')
                    .nth(1)
                    .unwrap_or("")
                    .to_string();
                let mode = m.lock().unwrap().clone();
                if path == "/config" {
                    cr.fetch_add(1, Ordering::SeqCst);
                    let _ = match c.lock().unwrap().clone() {
                        Some(b) => write!(
                            conn,
                            "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{b}"
                        ),
                        None => write!(conn, "HTTP/1.0 502 Bad Gateway\r\n\r\n"),
                    };
                    continue;
                }
                if path == "/cluster" {
                    r.fetch_add(1, Ordering::SeqCst);
                } else {
                    let _ = conn.write_all(b"HTTP/1.0 404 Not Found\r\n\r\n");
                    continue;
                }
                match mode {
                    Mode::Body(b) => {
                        let _ = write!(conn, "HTTP/1.0 200 OK\r\nServer: BaseHTTP/0.6 Python/3.11\r\nContent-Type: application/json\r\n\r\n{b}");
                    }
                    Mode::Hang => hung.push(conn),
                    Mode::Close => drop(conn),
                    Mode::Status(code) => {
                        let _ = write!(
                            conn,
                            "HTTP/1.0 {code} Oops\r\nContent-Type: text/plain\r\n\r\nno"
                        );
                    }
                }
            }
        });
        MockPatroni {
            addr,
            mode,
            requests,
            config,
            config_requests,
            stop,
        }
    }

    /// What `GET /config` answers from now on (`None`: 502).
    pub fn set_config(&self, body: Option<&Value>) {
        *self.config.lock().unwrap() = body.map(Value::to_string);
    }

    /// `GET /config` requests so far.
    pub fn config_requests(&self) -> usize {
        self.config_requests.load(Ordering::SeqCst)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, body: &Value) {
        *self.mode.lock().unwrap() = Mode::Body(body.to_string());
    }

    pub fn set_raw(&self, body: &str) {
        *self.mode.lock().unwrap() = Mode::Body(body.to_string());
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for MockPatroni {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // unblock accept
    }
}

/// A `/cluster` member entry (Patroni 4.1 shape) pointing at `addr`.
pub fn member(name: &str, role: &str, state: &str, addr: SocketAddr, lag: Option<u64>) -> Value {
    let mut m = json!({
        "name": name, "role": role, "state": state,
        "api_url": format!("http://{}:8008/patroni", addr.ip()),
        "host": addr.ip().to_string(), "port": addr.port(), "timeline": 1,
    });
    if role != "leader" && role != "standby_leader" {
        m["lag"] = lag.map_or(json!("unknown"), |l| json!(l));
    }
    m
}

pub fn cluster(members: Vec<Value>) -> Value {
    json!({"members": members, "scope": "demo"})
}

/// A real captured `/cluster` body from `tests/fixtures`, with member `i`
/// (node1, node2, ...) pointed at `addrs[i]`.
pub fn fixture(name: &str, addrs: &HashMap<&str, SocketAddr>) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for m in v["members"].as_array_mut().unwrap() {
        let a = addrs[m["name"].as_str().unwrap()];
        m["host"] = json!(a.ip().to_string());
        m["port"] = json!(a.port());
    }
    v
}

// ---- backends --------------------------------------------------------------

/// A server that writes `"<name>\n"` on accept, then echoes everything, and
/// half-closes when the client does.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    pub open: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Backend {
    pub fn start(name: &str) -> Backend {
        Backend::start_on(name, "127.0.0.1:0")
    }

    pub fn start_on(name: &str, addr: &str) -> Backend {
        let listener = TcpListener::bind(addr).unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, a, o, s) = (
            name.to_string(),
            accepted.clone(),
            open.clone(),
            stop.clone(),
        );
        thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                a.fetch_add(1, Ordering::SeqCst);
                o.fetch_add(1, Ordering::SeqCst);
                let (n, o) = (n.clone(), o.clone());
                thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(move || {
                        let _ = conn.write_all(format!("{n}\n").as_bytes());
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            match conn.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(k) => {
                                    if conn.write_all(&buf[..k]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = conn.shutdown(Shutdown::Write);
                        o.fetch_sub(1, Ordering::SeqCst);
                    })
                    .unwrap();
            }
        });
        Backend {
            name: name.to_string(),
            addr,
            accepted,
            open,
            stop,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

/// A listener whose accept queue is full, so the kernel drops further SYNs
/// and a connect to it hangs until the connector's timeout.
pub struct BlackHole {
    pub addr: SocketAddr,
    _listener: TcpListener,
    _fillers: Vec<TcpStream>,
}

impl BlackHole {
    pub fn start() -> BlackHole {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        // SAFETY: the fd is owned by `listener`; listen takes no pointers.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let addr = listener.local_addr().unwrap();
        let mut fillers = Vec::new();
        // Fill the queue: with backlog 0 Linux queues one connection; a few
        // more make sure. These connects complete or time out quickly.
        for _ in 0..3 {
            if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                fillers.push(s);
            }
        }
        BlackHole {
            addr,
            _listener: listener,
            _fillers: fillers,
        }
    }
}

// ---- clients ---------------------------------------------------------------

/// A client connection through the proxy.
pub struct Client {
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .expect("connect to the proxy");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Client { stream, reader }
    }

    /// The backend's greeting line (its member name).
    pub fn greeting(&mut self) -> String {
        self.line().expect("a greeting from the backend")
    }

    /// One line, or `None` at end of stream or on error.
    pub fn line(&mut self) -> Option<String> {
        let mut s = String::new();
        match self.reader.read_line(&mut s) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(s.trim_end().to_string()),
        }
    }

    /// Sends a line and expects it back.
    pub fn echo(&mut self, msg: &str) -> bool {
        if self
            .stream
            .write_all(format!("{msg}\n").as_bytes())
            .is_err()
        {
            return false;
        }
        self.line().as_deref() == Some(msg)
    }

    /// True when nothing arrives within `d` while the connection stays open
    /// (the client is held): a timeout, not an end of stream. The usual read
    /// timeout applies again afterwards.
    pub fn silent_for(&mut self, d: Duration) -> bool {
        self.stream.set_read_timeout(Some(d)).unwrap();
        let silent = matches!(
            self.reader.fill_buf(),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
        );
        self.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        silent
    }

    /// True when the proxy closed the connection (EOF or reset).
    pub fn is_closed(&mut self) -> bool {
        self.stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut b = [0u8; 1];
        matches!(self.reader.read(&mut b), Ok(0) | Err(_))
    }
}

/// Connects through `addr` and returns the greeting (the member reached).
pub fn whoami(addr: SocketAddr) -> String {
    Client::connect(addr).greeting()
}

// ---- the proxy -------------------------------------------------------------

pub struct Proxy {
    pub child: Child,
    pub dir: TempDir,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    log_path: PathBuf,
}

impl Proxy {
    /// Starts the proxy with `config` (YAML) and waits for its admin port.
    pub fn start(config: &str) -> Proxy {
        Proxy::start_with(config, |_| {})
    }

    pub fn start_with(config: &str, tweak: impl FnOnce(&mut Command)) -> Proxy {
        let p = Proxy::spawn(config, admin_address(config), tweak);
        let up = wait_until(Duration::from_secs(10), || {
            p.get("/").map(|r| r.0 == 200).unwrap_or(false)
        });
        assert!(up, "proxy did not come up; log:\n{}", p.log());
        p
    }

    /// Starts the proxy with its admin interface on `admin` (which may be
    /// HTTPS or closed to us) and waits until it listens there.
    pub fn start_admin(config: &str, admin: SocketAddr) -> Proxy {
        let p = Proxy::spawn(config, admin, |_| {});
        let up = wait_until(Duration::from_secs(10), || {
            TcpStream::connect(admin).is_ok()
        });
        assert!(up, "proxy did not come up; log:\n{}", p.log());
        p
    }

    fn spawn(config: &str, admin: SocketAddr, tweak: impl FnOnce(&mut Command)) -> Proxy {
        let dir = TempDir::new();
        let config_path = dir.0.join("patroni-proxy.yaml");
        std::fs::write(&config_path, config).unwrap();
        let log_path = dir.0.join("proxy.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("-v")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        tweak(&mut cmd);
        let child = cmd.spawn().expect("spawn patroni-proxy");
        Proxy {
            child,
            dir,
            admin,
            config_path,
            log_path,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `GET path` on the admin interface: (status, body).
    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(self.admin, path)
    }

    /// The `/clusters` document.
    pub fn status(&self) -> Value {
        let (code, body) = self.get("/clusters").unwrap();
        assert_eq!(code, 200);
        serde_json::from_str(&body).unwrap()
    }

    /// Member names routable on `cluster`'s `port`.
    pub fn backends(&self, cluster: &str, port: &str) -> Vec<String> {
        let s = self.status();
        s["clusters"][cluster]["ports"][port]["backends"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|b| b["member"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until `port` routes to exactly `members` (in member order).
    pub fn wait_backends(&self, cluster: &str, port: &str, members: &[&str]) {
        let ok = wait_until(Duration::from_secs(10), || {
            self.backends(cluster, port) == members
        });
        assert!(
            ok,
            "port {cluster}:{port} never routed to {members:?}; has {:?}\nlog:\n{}",
            self.backends(cluster, port),
            self.log()
        );
    }

    /// Polls every cluster now; returns the status code.
    pub fn update(&self) -> u16 {
        self.get("/update_clusters").unwrap().0
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill with a valid pid and signal number has no memory effects.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status
    }

    /// Replaces the config file (for SIGHUP tests).
    pub fn rewrite_config(&self, config: &str) {
        std::fs::write(&self.config_path, config).unwrap();
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str) -> bool {
        wait_until(Duration::from_secs(10), || self.log().contains(needle))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("---- proxy log ----\n{}", self.log());
        }
    }
}

fn admin_address(config: &str) -> SocketAddr {
    config
        .lines()
        .find_map(|l| l.trim().strip_prefix("listen_address:"))
        .map(|v| v.trim().trim_matches('"').parse().unwrap())
        .unwrap_or_else(|| "127.0.0.1:8009".parse().unwrap())
}

/// A minimal HTTP/1.0 GET.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, "HTTP/1.1\r\nHost: x")
}

/// `method target version` (plus any header lines in `version`), then the
/// status code and body of the answer.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    version: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(s, "{method} {target} {version}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// A config with one cluster; `ports` is YAML for the `ports:` map, indented
/// by the caller's choice (each line gets six spaces here).
pub fn config(admin_port: u16, hosts: &[String], ports: &str, extra: &str) -> String {
    let hosts: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
    let ports: String = ports.lines().map(|l| format!("      {l}\n")).collect();
    format!(
        "cluster_update_interval: 0.2\nlisten_address: \"127.0.0.1:{admin_port}\"\nlog_level: debug\n{extra}\nclusters:\n  main:\n    hosts: [{}]\n    ports:\n{ports}",
        hosts.join(", ")
    )
}

/// The inode of the socket listening on `port` in process `pid` (to prove a
/// listener was not re-created).
pub fn listen_inode(pid: i32, port: u16) -> Option<u64> {
    let tcp = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let inode: u64 = tcp.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let local_port = u16::from_str_radix(f[1].split(':').nth(1)?, 16).ok()?;
        (local_port == port && f[3] == "0A")
            .then(|| f[9].parse().ok())
            .flatten()
    })?;
    let owned = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .any(|e| {
            std::fs::read_link(e.path())
                .map(|t| t.to_string_lossy() == format!("socket:[{inode}]"))
                .unwrap_or(false)
        });
    owned.then_some(inode)
}

/// `127.0.0.1:port`.
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Backends node1..node3 and a mock API answering node1 leader, node2 and
/// node3 streaming replicas (node3 `node3_lag` bytes behind).
pub fn three_nodes(node3_lag: u64) -> (Vec<Backend>, MockPatroni) {
    let nodes: Vec<Backend> = ["node1", "node2", "node3"]
        .iter()
        .map(|n| Backend::start(n))
        .collect();
    let api = MockPatroni::start(&cluster(vec![
        member("node1", "leader", "running", nodes[0].addr, None),
        member("node2", "replica", "streaming", nodes[1].addr, Some(0)),
        member(
            "node3",
            "replica",
            "streaming",
            nodes[2].addr,
            Some(node3_lag),
        ),
    ]));
    (nodes, api)
}

/// Backend node1, a mock API with node1 as the only member (leader), and a
/// config with one `rw` leader port; returns them with the port.
pub fn one_leader(extra: &str) -> (Backend, MockPatroni, String, u16) {
    let n1 = Backend::start("node1");
    let api = MockPatroni::start(&cluster(vec![member(
        "node1", "leader", "running", n1.addr, None,
    )]));
    let rw = free_port();
    let cfg = config(
        free_port(),
        &[api.url()],
        &format!("rw: {{listen: \"127.0.0.1:{rw}\", roles: [leader]}}"),
        extra,
    );
    (n1, api, cfg, rw)
}

// ---- a PostgreSQL-like backend ---------------------------------------------

/// A backend speaking the start of the PostgreSQL protocol: it answers an
/// SSLRequest with `N`, refuses the next `refuse` start-ups with SQLSTATE
/// 57P03 ("the database system is shutting down") and closes; after that it
/// accepts (AuthenticationOk, ParameterStatus `server_name` = its name,
/// ReadyForQuery) and echoes.
pub struct PgBackend {
    pub addr: SocketAddr,
    pub refused: Arc<AtomicUsize>,
    /// Start-ups received and left unanswered while silent.
    pub held: Arc<AtomicUsize>,
    /// Connections rejected for data sent behind an SSLRequest.
    pub early: Arc<AtomicUsize>,
    refuse_left: Arc<AtomicUsize>,
    /// Logins to cut with a reset right after AuthenticationOk.
    reset_left: Arc<AtomicUsize>,
    /// Connections to close right after answering the SSLRequest.
    close_after_n_left: Arc<AtomicUsize>,
    silent: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl PgBackend {
    pub fn start(name: &str, refuse: usize) -> PgBackend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let b = PgBackend {
            addr,
            refused: Arc::new(AtomicUsize::new(0)),
            held: Arc::new(AtomicUsize::new(0)),
            early: Arc::new(AtomicUsize::new(0)),
            refuse_left: Arc::new(AtomicUsize::new(refuse)),
            reset_left: Arc::new(AtomicUsize::new(0)),
            close_after_n_left: Arc::new(AtomicUsize::new(0)),
            silent: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let name = name.to_string();
        let (refused, held, left, reset, silent, stop) = (
            b.refused.clone(),
            b.held.clone(),
            b.refuse_left.clone(),
            b.reset_left.clone(),
            b.silent.clone(),
            b.stop.clone(),
        );
        let close_after_n = b.close_after_n_left.clone();
        let early = b.early.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let counters = PgCounters {
                    refused: refused.clone(),
                    held: held.clone(),
                    refuse_left: left.clone(),
                    reset_left: reset.clone(),
                    close_after_n_left: close_after_n.clone(),
                    early: early.clone(),
                    silent: silent.clone(),
                };
                let n = name.clone();
                thread::spawn(move || pg_backend_session(conn, &n, &counters));
            }
        });
        b
    }

    pub fn set_refuse(&self, n: usize) {
        self.refuse_left.store(n, Ordering::SeqCst);
    }

    /// Cut the next `n` logins with a reset right after AuthenticationOk
    /// (a backend killed mid-login by a shutdown).
    pub fn set_reset(&self, n: usize) {
        self.reset_left.store(n, Ordering::SeqCst);
    }

    /// Close the next `n` connections right after answering the SSLRequest.
    pub fn set_close_after_n(&self, n: usize) {
        self.close_after_n_left.store(n, Ordering::SeqCst);
    }

    /// Receive start-ups but never answer them (a server stuck mid-login).
    pub fn set_silent(&self, on: bool) {
        self.silent.store(on, Ordering::SeqCst);
    }
}

impl Drop for PgBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn read_u32(c: &mut TcpStream) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    c.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

struct PgCounters {
    refused: Arc<AtomicUsize>,
    held: Arc<AtomicUsize>,
    refuse_left: Arc<AtomicUsize>,
    reset_left: Arc<AtomicUsize>,
    close_after_n_left: Arc<AtomicUsize>,
    early: Arc<AtomicUsize>,
    silent: Arc<AtomicBool>,
}

fn take_one(n: &AtomicUsize) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

fn pg_backend_session(mut c: TcpStream, name: &str, k: &PgCounters) -> Option<()> {
    c.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let (mut len, mut code) = (read_u32(&mut c).ok()?, read_u32(&mut c).ok()?);
    if len == 8 && code == 80_877_103 {
        // As PostgreSQL (CVE-2021-23214): nothing may follow an SSLRequest
        // before its answer.
        c.set_nonblocking(true).ok()?;
        let early = c.peek(&mut [0u8; 1]).is_ok();
        c.set_nonblocking(false).ok()?;
        if early {
            k.early.fetch_add(1, Ordering::SeqCst);
            let body = b"SFATAL\0C08P01\0Mreceived unencrypted data after SSL request\0\0";
            c.write_all(&pg_message(b'E', body)).ok()?;
            return None;
        }
        c.write_all(b"N").ok()?;
        if take_one(&k.close_after_n_left) {
            return None;
        }
        len = read_u32(&mut c).ok()?;
        code = read_u32(&mut c).ok()?;
    }
    assert_eq!(code, 196_608, "protocol 3.0 startup");
    let mut rest = vec![0u8; len as usize - 8];
    c.read_exact(&mut rest).ok()?;
    if k.silent.load(Ordering::SeqCst) {
        k.held.fetch_add(1, Ordering::SeqCst);
        let mut sink = [0u8; 64];
        while matches!(c.read(&mut sink), Ok(n) if n > 0) {}
        return None;
    }
    if take_one(&k.refuse_left) {
        k.refused.fetch_add(1, Ordering::SeqCst);
        c.write_all(&pg_message(
            b'E',
            b"SFATAL\0C57P03\0Mthe database system is shutting down\0\0",
        ))
        .ok()?;
        return None;
    }
    if take_one(&k.reset_left) {
        c.write_all(&pg_message(b'R', &0u32.to_be_bytes())).ok()?;
        let lin = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: `lin` is a valid linger struct read by the call; the fd is live.
        unsafe {
            libc::setsockopt(
                c.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &lin as *const libc::linger as *const libc::c_void,
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
        return None; // dropped with linger 0: a reset
    }
    c.write_all(&pg_message(b'R', &0u32.to_be_bytes())).ok()?;
    c.write_all(&pg_message(
        b'S',
        format!("server_name\0{name}\0").as_bytes(),
    ))
    .ok()?;
    c.write_all(&pg_message(b'Z', b"I")).ok()?;
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(k) => c.write_all(&buf[..k]).ok()?,
        }
    }
}

pub fn pg_message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// A client's start-up through `addr`: an SSLRequest first when `ssl`, then
/// the startup packet. Returns the `N` answers seen and the `server_name` the
/// backend announced, or the server's error message.
pub fn pg_start(addr: SocketAddr, ssl: bool) -> Result<(usize, String), String> {
    let mut c = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut ns = 0;
    if ssl {
        c.write_all(&[0, 0, 0, 8, 4, 210, 22, 47]).unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b)
            .map_err(|e| format!("no answer to SSLRequest: {e}"))?;
        assert_eq!(b[0], b'N');
        ns += 1;
    }
    let body = b"\x00\x03\x00\x00user\x00postgres\x00database\x00postgres\x00\x00";
    let mut startup = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    startup.extend_from_slice(body);
    c.write_all(&startup).unwrap();
    let mut name = String::new();
    loop {
        let mut tag = [0u8; 1];
        c.read_exact(&mut tag)
            .map_err(|e| format!("connection lost: {e}"))?;
        let len = read_u32(&mut c).map_err(|e| e.to_string())? as usize;
        let mut body = vec![0u8; len - 4];
        c.read_exact(&mut body).map_err(|e| e.to_string())?;
        match tag[0] {
            b'R' | b'K' => {}
            b'S' => {
                name = String::from_utf8_lossy(&body)
                    .split('\0')
                    .nth(1)
                    .unwrap_or("")
                    .to_string()
            }
            b'Z' => return Ok((ns, name)),
            b'E' => return Err(String::from_utf8_lossy(&body).into_owned()),
            other => return Err(format!("unexpected message {:?}", other as char)),
        }
    }
}

/// Runs the child with an open-files limit of `n` (soft and hard).
pub fn nofile_limit(cmd: &mut Command, n: libc::rlim_t) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe; runs in the child before exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

//! packaging/patroni-proxy-callback, the Patroni `on_role_change` callback:
//! run as Patroni runs it, with each of its transports (curl, python3, bash)
//! alone on PATH, against tiny loopback HTTP servers and the real proxy.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::*;

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/packaging/patroni-proxy-callback"
);

/// A loopback HTTP server that records request heads and answers `status`
/// to POST (and 200 to anything else).
struct Recorder {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Recorder {
    fn start(post_status: u16) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let h = heads.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n")
                    && conn.read(&mut byte).map(|n| n == 1).unwrap_or(false)
                {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let status = if head.starts_with("POST ") {
                    post_status
                } else {
                    200
                };
                h.lock().unwrap().push(head);
                let _ = conn.write_all(
                    format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                );
            }
        });
        Recorder { addr, heads }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Request lines received so far.
    fn lines(&self) -> Vec<String> {
        self.heads
            .lock()
            .unwrap()
            .iter()
            .map(|h| h.lines().next().unwrap_or("").to_string())
            .collect()
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .ok()?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!p.is_empty()).then(|| std::fs::canonicalize(p).unwrap())
}

/// A PATH directory with `sh`, `sleep`, `timeout` and only `tools` as
/// transports; `None` when a tool is missing on this machine.
fn bin_dir(dir: &Path, tools: &[&str]) -> Option<PathBuf> {
    let bin = dir.join(format!("bin-{}", tools.join("-")));
    std::fs::create_dir_all(&bin).unwrap();
    for t in ["sh", "sleep", "timeout"].iter().chain(tools) {
        let target = if *t == "python3" {
            // The interpreter itself, not a version manager's shim.
            let out = Command::new("python3")
                .args(["-c", "import sys; print(sys.executable)"])
                .output()
                .ok()?;
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        } else {
            which(t)?
        };
        let _ = std::os::unix::fs::symlink(target, bin.join(t));
    }
    Some(bin)
}

/// Runs the callback as Patroni does (`ACTION ROLE SCOPE`), with `args`
/// before them and only `env` in its environment.
fn run(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> (Output, Duration) {
    let start = Instant::now();
    let out = Command::new(bin.join("sh"))
        .arg(SCRIPT)
        .args(args)
        .args(["on_role_change", "primary", "demo"])
        .env_clear()
        .env("PATH", bin)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (out, start.elapsed())
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn callback_tells_every_proxy_with_each_transport() {
    let dir = TempDir::new();
    for tools in [&["curl"][..], &["python3"], &["bash"]] {
        let Some(bin) = bin_dir(&dir.0, tools) else {
            eprintln!("skipping {tools:?}: not installed");
            continue;
        };
        let new = Recorder::start(200);
        let old = Recorder::start(405); // a proxy from before POST
        let conf = dir.0.join("callback.conf");
        std::fs::write(
            &conf,
            format!(
                "# proxies\n{}/\n\n{}  # the old one\n",
                new.url(),
                old.url()
            ),
        )
        .unwrap();
        let conf = conf.to_str().unwrap();
        for (args, env) in [
            (vec![new.url(), old.url()], vec![]),
            (
                vec![],
                vec![("PATRONI_PROXY_URLS", format!("{},{}", new.url(), old.url()))],
            ),
            (
                vec![],
                vec![("PATRONI_PROXY_CALLBACK_CONF", conf.to_string())],
            ),
        ] {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let (out, _) = run(&bin, &args, &env);
            assert!(out.status.success(), "{tools:?}");
            assert_eq!(stderr(&out), "", "{tools:?}");
        }
        let post = "POST /update_clusters HTTP/1.";
        let get = "GET /update_clusters HTTP/1.";
        assert_eq!(new.lines().len(), 3, "{tools:?}: {:?}", new.lines());
        assert!(new.lines().iter().all(|l| l.starts_with(post)), "{tools:?}");
        let heads = new.heads.lock().unwrap().clone();
        assert!(
            heads
                .iter()
                .all(|h| h.to_ascii_lowercase().contains("content-length: 0")),
            "{tools:?}: {heads:?}"
        );
        let old_lines = old.lines();
        assert_eq!(old_lines.len(), 6, "{tools:?}: {old_lines:?}");
        for pair in old_lines.chunks(2) {
            assert!(
                pair[0].starts_with(post) && pair[1].starts_with(get),
                "{tools:?}: {pair:?}"
            );
        }
    }
}

#[test]
fn callback_never_fails_patroni() {
    let dir = TempDir::new();
    let hole = BlackHole::start();
    let silent = TcpListener::bind("127.0.0.1:0").unwrap(); // accepts, never answers
    let refused = local(free_port());
    let error = Recorder::start(503);
    for tools in [&["curl"][..], &["python3"], &["bash"]] {
        let Some(bin) = bin_dir(&dir.0, tools) else {
            continue;
        };
        let urls = [
            format!("http://{}", hole.addr),
            format!("http://{}", silent.local_addr().unwrap()),
            format!("http://{refused}"),
            error.url(),
        ];
        let all = urls.join(" ");
        let (out, took) = run(
            &bin,
            &[],
            &[("PATRONI_PROXY_URLS", &all), ("PATRONI_PROXY_TIMEOUT", "2")],
        );
        assert!(out.status.success(), "{tools:?}");
        // The watchdog stops waiting after 2 x 2 + 2 s whatever happens.
        assert!(took < Duration::from_secs(9), "{tools:?}: took {took:?}");
        let err = stderr(&out);
        for u in &urls {
            assert!(
                err.contains(&format!("{u}/update_clusters")),
                "{tools:?}: {err}"
            );
        }
        assert!(err.contains("HTTP 503"), "{tools:?}: {err}");
        // Nothing configured: still exit 0, with a hint.
        let (out, _) = run(
            &bin,
            &[],
            &[("PATRONI_PROXY_CALLBACK_CONF", "/nonexistent")],
        );
        assert!(out.status.success());
        assert!(
            stderr(&out).contains("no proxy configured"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn callback_makes_the_proxy_follow_a_switchover_at_once() {
    let n1 = Backend::start("node1");
    let n2 = Backend::start("node2");
    let api = MockPatroni::start(&cluster(vec![
        member("node1", "leader", "running", n1.addr, None),
        member("node2", "replica", "streaming", n2.addr, Some(0)),
    ]));
    let rw = free_port();
    // A poll interval no test outlives: only the callback can explain a
    // prompt switch.
    let cfg = config(
        free_port(),
        &[api.url()],
        &format!("rw: {{listen: \"127.0.0.1:{rw}\", roles: [leader]}}"),
        "",
    )
    .replace(
        "cluster_update_interval: 0.2",
        "cluster_update_interval: 600",
    );
    let proxy = Proxy::start(&cfg);
    proxy.wait_backends("main", "rw", &["node1"]);
    api.set(&cluster(vec![
        member("node1", "replica", "streaming", n1.addr, Some(0)),
        member("node2", "leader", "running", n2.addr, None),
    ]));
    let dir = TempDir::new();
    let bin = bin_dir(&dir.0, &["curl"])
        .or_else(|| bin_dir(&dir.0, &["python3"]))
        .expect("curl or python3");
    let admin = format!("http://{}", proxy.admin);
    let start = Instant::now();
    let (out, _) = run(&bin, &[&admin], &[]);
    assert!(out.status.success());
    assert_eq!(stderr(&out), "");
    // /update_clusters answers once the new topology is in effect.
    assert_eq!(proxy.backends("main", "rw"), ["node2"]);
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(whoami(local(rw)), "node2");
}

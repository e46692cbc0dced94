//! HTTPS and access rules on the admin listener, judged by `curl` and
//! `openssl s_client` (certificates from tests/util/certs.rs).

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::util::certs::{https_status, Ca, Issued, KeyFormat};
use crate::util::*;

struct Rig {
    _dir: TempDir,
    ca: Ca,
    proxy: Proxy,
    admin: SocketAddr,
    rw: u16,
    _n1: Backend,
    _api: MockPatroni,
}

/// A proxy whose admin listener has `admin` (YAML lines under `admin:`,
/// with `{cert}`, `{key}` and `{ca}` replaced by the test PKI's files).
fn rig(admin: &str) -> Rig {
    let dir = TempDir::new();
    let ca = Ca::new(&dir.0, "ca");
    let server = ca.issue("admin", "IP:127.0.0.1", KeyFormat::Sec1);
    let (n1, api, cfg, rw) = one_leader("");
    let port = free_port();
    let block: String = admin
        .replace("{cert}", server.cert.to_str().unwrap())
        .replace("{key}", server.key.to_str().unwrap())
        .replace("{ca}", ca.cert.to_str().unwrap())
        .lines()
        .map(|l| format!("  {l}\n"))
        .collect();
    // `admin.listen` instead of listen_address.
    let cfg = cfg
        .lines()
        .filter(|l| !l.starts_with("listen_address:"))
        .collect::<Vec<_>>()
        .join("\n")
        + &format!("\nadmin:\n  listen: \"127.0.0.1:{port}\"\n{block}");
    let proxy = Proxy::start_admin(&cfg, local(port));
    Rig {
        _dir: dir,
        ca,
        proxy,
        admin: local(port),
        rw,
        _n1: n1,
        _api: api,
    }
}

fn curl(r: &Rig, args: &[&str], path: &str) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"])
        .arg("--cacert")
        .arg(&r.ca.cert)
        .args(args)
        .arg(format!("https://{}{path}", r.admin))
        .output()
        .unwrap()
}

/// The HTTP status curl got (0: no answer).
fn status(o: &Output) -> u16 {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0)
}

/// `openssl s_client` with `args`; true when the handshake completed.
fn handshake(r: &Rig, args: &[&str]) -> (bool, String) {
    let mut child = Command::new("openssl")
        .args(["s_client", "-ign_eof", "-connect"])
        .arg(r.admin.to_string())
        .arg("-CAfile")
        .arg(&r.ca.cert)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A request, so that s_client exits after the answer.
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET / HTTP/1.0\r\n\r\n");
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (text.contains("HTTP/1.1 200"), text)
}

fn client_cert(ca: &Ca, name: &str) -> Issued {
    ca.issue(name, "", KeyFormat::Pkcs8)
}

#[test]
fn tls_1_2_and_1_3_are_served_and_plain_http_is_not() {
    let r = rig("tls: {cert: {cert}, key: {key}}");
    for v in ["1.2", "1.3"] {
        let o = curl(&r, &[&format!("--tlsv{v}"), "--tls-max", v], "/clusters");
        assert_eq!(
            status(&o),
            200,
            "TLS {v}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(String::from_utf8_lossy(&o.stdout).contains("\"clusters\""));
    }
    let (ok, out) = handshake(&r, &["-tls1_2"]);
    assert!(ok, "{out}");
    assert!(out.contains("Protocol  : TLSv1.2"), "{out}");
    let (ok, out) = handshake(&r, &["-tls1_3"]);
    assert!(ok, "{out}");
    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let plain = http_get(r.admin, "/");
    assert!(plain.map(|(code, _)| code != 200).unwrap_or(true));
    assert!(r.proxy.log().contains("serves HTTPS only"));
}

#[test]
fn min_version_and_ciphers_refuse_what_is_left_out() {
    let r = rig(
        "tls:\n  cert: {cert}\n  key: {key}\n  min_version: \"1.2\"\n  ciphers: [TLS_AES_256_GCM_SHA384, TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384]",
    );
    let (ok, out) = handshake(&r, &["-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384"]);
    assert!(ok, "{out}");
    let (ok, out) = handshake(&r, &["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"]);
    assert!(!ok, "an excluded TLS 1.2 suite was accepted: {out}");
    let (ok, out) = handshake(&r, &["-tls1_3", "-ciphersuites", "TLS_AES_128_GCM_SHA256"]);
    assert!(!ok, "an excluded TLS 1.3 suite was accepted: {out}");
    let (ok, out) = handshake(&r, &["-tls1_3", "-ciphersuites", "TLS_AES_256_GCM_SHA384"]);
    assert!(ok, "{out}");
    // TLS 1.1 is never offered (the client allows it at security level 0).
    let (ok, out) = handshake(&r, &["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"]);
    assert!(!ok, "TLS 1.1 was accepted: {out}");
    // rustls answers a 1.1-only hello with an alert (handshake_failure).
    assert!(out.contains("SSL alert number"), "{out}");

    let r = rig("tls: {cert: {cert}, key: {key}, min_version: 1.3}");
    let o = curl(&r, &["--tls-max", "1.2"], "/");
    assert_eq!(status(&o), 0, "TLS 1.2 reached a 1.3-only listener");
    assert_eq!(status(&curl(&r, &["--tlsv1.3"], "/")), 200);
}

#[test]
fn unknown_cipher_names_are_a_config_error_listing_the_valid_ones() {
    let dir = TempDir::new();
    let path = dir.0.join("c.yaml");
    std::fs::write(
        &path,
        "admin:\n  tls: {cert: /x.pem, ciphers: [ECDHE-RSA-AES128-GCM-SHA256]}\nclusters: {}\n",
    )
    .unwrap();
    let o = Command::new(BIN).arg("-t").arg(&path).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("admin.tls.ciphers[0]: unknown cipher suite \"ECDHE-RSA-AES128-GCM-SHA256\"; valid names: TLS_AES_256_GCM_SHA384, TLS_AES_128_GCM_SHA256, TLS_CHACHA20_POLY1305_SHA256, TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"),
        "{err}"
    );
}

#[test]
fn a_client_certificate_is_required_and_checked() {
    let r = rig("tls: {cert: {cert}, key: {key}, client_ca: {ca}}");
    let o = curl(&r, &[], "/");
    assert_eq!(status(&o), 0, "answered without a client certificate");
    let good = client_cert(&r.ca, "operator");
    let args = [
        "--cert",
        good.cert.to_str().unwrap(),
        "--key",
        good.key.to_str().unwrap(),
    ];
    assert_eq!(status(&curl(&r, &args, "/clusters")), 200);
    let other_dir = TempDir::new();
    let stranger = Ca::new(&other_dir.0, "stranger");
    let bad = client_cert(&stranger, "intruder");
    let args = [
        "--cert",
        bad.cert.to_str().unwrap(),
        "--key",
        bad.key.to_str().unwrap(),
    ];
    assert_eq!(
        status(&curl(&r, &args, "/")),
        0,
        "a stranger's certificate passed"
    );
}

#[test]
fn stalled_handshakes_are_closed_and_do_not_stop_the_data_ports() {
    let r = rig("tls: {cert: {cert}, key: {key}}");
    // A thousand clients that connect and never finish a handshake; one
    // of them sends half a ClientHello.
    let mut idle: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(r.admin).unwrap())
        .collect();
    idle[0]
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    let start = Instant::now();
    for _ in 0..3 {
        assert_eq!(whoami(local(r.rw)), "node1", "the data port still accepts");
    }
    // The server closes the stalled ones (idle deadline), at most 64 at
    // a time being accepted: the first is closed well within a minute.
    idle[0]
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut idle[0], &mut buf);
    assert!(
        matches!(n, Ok(0)) || n.is_err() && start.elapsed() < Duration::from_secs(25),
        "stalled handshake still open after {:?}: {n:?}",
        start.elapsed()
    );
    assert!(start.elapsed() < Duration::from_secs(25));
    drop(idle);
    // And the admin interface answers again.
    let ok = wait_until(Duration::from_secs(30), || {
        status(&curl(&r, &[], "/")) == 200
    });
    assert!(ok);
}

#[test]
fn allow_keeps_action_routes_to_trusted_networks() {
    let r = rig("allow:\n  read: [0.0.0.0/0, \"::/0\"]\n  action: [10.0.0.0/8]");
    let (code, _) = http_get(r.admin, "/clusters").unwrap();
    assert_eq!(code, 200, "read routes stay open");
    let (code, body) = http_get(r.admin, "/update_clusters").unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("forbidden by admin.allow"));
    assert!(r.proxy.log().contains("route refused to 127.0.0.1"));

    let r = rig("allow: {read: [192.0.2.0/24], action: [127.0.0.1]}");
    assert_eq!(http_get(r.admin, "/").unwrap().0, 403);
    assert_eq!(http_get(r.admin, "/update_clusters").unwrap().0, 200);

    // TLS and allow together, on reload: the action network changes.
    let r = rig("tls: {cert: {cert}, key: {key}}\nallow: {action: [\"::1\"]}");
    assert_eq!(status(&curl(&r, &[], "/update_clusters")), 403);
    let cfg = std::fs::read_to_string(&r.proxy.config_path)
        .unwrap()
        .replace("action: [\"::1\"]", "action: [127.0.0.0/8]");
    r.proxy.rewrite_config(&cfg);
    r.proxy.signal(libc::SIGHUP);
    assert!(r.proxy.wait_log("configuration reloaded"));
    assert_eq!(status(&curl(&r, &[], "/update_clusters")), 200);
}

#[test]
fn sighup_rotates_the_admin_certificate() {
    let r = rig("tls: {cert: {cert}, key: {key}}");
    assert_eq!(status(&curl(&r, &[], "/")), 200);
    // A new certificate from a new CA, written over the old files.
    let dir = TempDir::new();
    let new_ca = Ca::new(&dir.0, "new-ca");
    let fresh = new_ca.issue("admin2", "IP:127.0.0.1", KeyFormat::Pkcs1);
    let cfg = std::fs::read_to_string(&r.proxy.config_path).unwrap();
    let cert = cfg
        .split("cert: ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap();
    let key = cfg
        .split("key: ")
        .nth(1)
        .unwrap()
        .split('}')
        .next()
        .unwrap();
    std::fs::copy(&fresh.cert, cert.trim()).unwrap();
    std::fs::copy(&fresh.key, key.trim()).unwrap();
    r.proxy.signal(libc::SIGHUP);
    assert!(
        r.proxy.wait_log("configuration reloaded"),
        "{}",
        r.proxy.log()
    );
    assert_eq!(
        status(&curl(&r, &[], "/")),
        0,
        "the old CA no longer verifies"
    );
    assert_eq!(
        https_status(&new_ca.cert, &format!("https://{}/", r.admin)),
        "200"
    );
}

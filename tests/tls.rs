//! HTTPS to Patroni: the `tls:` block against `openssl s_server` playing a
//! Patroni REST API with `verify_client: required`, certificates made by
//! `openssl` (tests/util/certs.rs).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::util::certs::{rehash_link, Ca, Issued, KeyFormat, TlsPatroni};
use crate::util::*;

/// A CA, a server certificate for 127.0.0.1 and a client certificate.
struct Pki {
    dir: TempDir,
    ca: Ca,
    server: Issued,
    client: Issued,
}

fn pki(client_format: KeyFormat) -> Pki {
    let dir = TempDir::new();
    let ca = Ca::new(&dir.0, "ca");
    let server = ca.issue("server", "IP:127.0.0.1,DNS:localhost", KeyFormat::Pkcs8);
    let client = ca.issue("client", "", client_format);
    Pki {
        dir,
        ca,
        server,
        client,
    }
}

/// One leader member at `n1`; the proxy config with `tls` (YAML lines,
/// indented under the cluster) and a `rw` port.
fn setup(hosts: &[String], tls: &str) -> (Backend, String, String, u16) {
    let n1 = Backend::start("node1");
    let body = cluster(vec![member("node1", "leader", "running", n1.addr, None)]).to_string();
    let rw = free_port();
    let hosts: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
    let cfg = format!(
        "cluster_update_interval: 0.2\nlisten_address: \"127.0.0.1:{}\"\nlog_level: debug\nclusters:\n  main:\n    hosts: [{}]\n    tls:\n{}\n    ports:\n      rw: {{listen: \"127.0.0.1:{rw}\", roles: [leader]}}\n",
        free_port(),
        hosts.join(", "),
        tls.lines()
            .map(|l| format!("      {l}"))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    (n1, body, cfg, rw)
}

/// The `tls:` block trusting `ca`, with `p`'s client certificate.
fn block_trusting(ca: &Path, p: &Pki, extra: &str) -> String {
    format!(
        "ca_cert: {}\nclient_cert: {}\nclient_key: {}\n{extra}",
        ca.display(),
        p.client.cert.display(),
        p.client.key.display()
    )
}

fn tls_block(p: &Pki, extra: &str) -> String {
    block_trusting(&p.ca.cert, p, extra)
}

/// A Patroni API with `server`'s certificate that requires a client
/// certificate from `p`'s CA; [`setup`]'s body goes in with `set`.
fn api(p: &Pki, server: &Issued) -> TlsPatroni {
    TlsPatroni::start(&p.dir.0, server, Some(&p.ca.cert), "{}")
}

fn check(cfg: &str) -> (i32, String) {
    let dir = TempDir::new();
    let path = dir.0.join("c.yaml");
    std::fs::write(&path, cfg).unwrap();
    let o = Command::new(BIN).arg("-t").arg(&path).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn client_certificates_in_every_key_format_reach_a_verify_client_required_api() {
    for format in [KeyFormat::Pkcs1, KeyFormat::Pkcs8, KeyFormat::Sec1] {
        let p = pki(format);
        let api = api(&p, &p.server);
        let (n1, body, cfg, rw) = setup(&[api.url()], &tls_block(&p, "skip_verify: false"));
        api.set(&body);
        let (code, err) = check(&cfg);
        assert_eq!(code, 0, "{format:?}: {err}");
        let proxy = Proxy::start(&cfg);
        proxy.wait_backends("main", "rw", &["node1"]);
        assert_eq!(whoami(local(rw)), "node1", "{format:?}");
        drop(n1);
    }
}

#[test]
fn broken_tls_material_is_a_config_error_naming_the_key() {
    let p = pki(KeyFormat::Sec1);
    let other = p.ca.issue("other", "", KeyFormat::Pkcs8);
    let junk = p.dir.0.join("junk.pem");
    std::fs::write(&junk, "hello\n").unwrap();
    let cases = [
        (
            "ca_cert: /x/ca.pem".to_string(),
            "clusters.main.tls.ca_cert: /x/ca.pem: no such file".to_string(),
        ),
        (
            format!("ca_cert: {}", junk.display()),
            format!(
                "clusters.main.tls.ca_cert: {}: no certificate in the file",
                junk.display()
            ),
        ),
        (
            format!(
                "ca_cert: {}\nclient_cert: {}\nclient_key: {}",
                p.ca.cert.display(),
                p.client.cert.display(),
                other.key.display()
            ),
            format!(
                "clusters.main.tls.client_key: {} does not match the certificate in {}",
                other.key.display(),
                p.client.cert.display()
            ),
        ),
        (
            format!(
                "ca_cert: {}\nclient_cert: {}",
                p.ca.cert.display(),
                p.client.cert.display()
            ),
            format!(
                "clusters.main.tls.client_cert: {}: no private key in the file; set client_key",
                p.client.cert.display()
            ),
        ),
        (
            format!("ca_dir: {}", p.dir.0.join("nope").display()),
            format!(
                "clusters.main.tls.ca_dir: {}: no such file",
                p.dir.0.join("nope").display()
            ),
        ),
        (
            "username: u\npassword_file: /x/pw".to_string(),
            "clusters.main.tls.password_file: /x/pw: no such file".to_string(),
        ),
        (
            "ca_cert: /x\nbogus: 1".to_string(),
            "clusters.main.tls: unknown field `bogus`".to_string(),
        ),
    ];
    for (tls, want) in cases {
        let (_n1, _, cfg, _) = setup(&["https://127.0.0.1:1".to_string()], &tls);
        let (code, err) = check(&cfg);
        assert_eq!(code, 2, "{tls}: {err}");
        assert!(err.contains(&want), "{tls}:\nwant {want}\ngot  {err}");
    }
}

#[test]
fn ca_dir_loads_pem_files_once_despite_rehash_links() {
    let p = pki(KeyFormat::Pkcs8);
    let cadir = p.dir.0.join("cas");
    std::fs::create_dir(&cadir).unwrap();
    std::fs::copy(&p.ca.cert, cadir.join("ca.pem")).unwrap();
    let other = Ca::new(&cadir, "other-ca");
    rehash_link(&cadir, &cadir.join("ca.pem"));
    rehash_link(&cadir, &other.cert);
    std::fs::write(cadir.join("README"), "not a certificate\n").unwrap();
    let api = api(&p, &p.server);
    let tls = format!(
        "ca_dir: {}\nclient_cert: {}\nclient_key: {}",
        cadir.display(),
        p.client.cert.display(),
        p.client.key.display()
    );
    let (_n1, body, cfg, rw) = setup(&[api.url()], &tls);
    api.set(&body);
    let proxy = Proxy::start(&cfg);
    proxy.wait_backends("main", "rw", &["node1"]);
    assert_eq!(whoami(local(rw)), "node1");
    // ca.pem, other-ca.pem (and other-ca.key, no certificate): two CAs.
    assert!(
        proxy.wait_log(&format!(
            "2 trusted CA certificates from {}",
            cadir.display()
        )),
        "{}",
        proxy.log()
    );
}

#[test]
fn wrong_ca_is_refused_logged_once_and_counted() {
    let p = pki(KeyFormat::Pkcs8);
    let stranger = Ca::new(&p.dir.0, "stranger");
    let api = api(&p, &p.server);
    let tls = block_trusting(&stranger.cert, &p, "");
    let (_n1, body, cfg, _) = setup(&[api.url()], &tls);
    api.set(&body);
    let proxy = Proxy::start(&cfg);
    let counted = wait_until(Duration::from_secs(15), || {
        proxy.status()["clusters"]["main"]["stats"]["tls_failures"]
            .as_u64()
            .unwrap_or(0)
            >= 3
    });
    assert!(counted, "{}", proxy.status());
    let log = proxy.log();
    let line = format!("host={} TLS failure: unknown issuer", api.url());
    assert_eq!(log.matches(&line).count(), 1, "{log}");
    assert!(proxy.backends("main", "rw").is_empty());
}

#[test]
fn a_missing_client_certificate_is_refused_and_logged() {
    let p = pki(KeyFormat::Pkcs8);
    let api = api(&p, &p.server);
    let (_n1, body, cfg, _) = setup(&[api.url()], &format!("ca_cert: {}", p.ca.cert.display()));
    api.set(&body);
    let proxy = Proxy::start(&cfg);
    assert!(
        proxy.wait_log("requires a client certificate and none was sent"),
        "{}",
        proxy.log()
    );
    assert!(proxy.backends("main", "rw").is_empty());
}

#[test]
fn skip_verify_works_and_warns_at_start_and_on_reload() {
    let p = pki(KeyFormat::Pkcs8);
    let stranger = Ca::new(&p.dir.0, "stranger");
    let api = api(&p, &p.server);
    let tls = block_trusting(&stranger.cert, &p, "skip_verify: true");
    let (_n1, body, cfg, rw) = setup(&[api.url()], &tls);
    api.set(&body);
    let proxy = Proxy::start(&cfg);
    proxy.wait_backends("main", "rw", &["node1"]);
    assert_eq!(whoami(local(rw)), "node1");
    let warning = "clusters.main.tls.skip_verify: certificate verification is OFF";
    assert_eq!(proxy.log().matches(warning).count(), 1, "{}", proxy.log());
    proxy.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(10), || proxy
        .log()
        .matches(warning)
        .count()
        == 2));
}

#[test]
fn verify_hostname_false_still_checks_the_ca() {
    let p = pki(KeyFormat::Pkcs8);
    // A member certificate without any IP in its SAN.
    let bare = p.ca.issue("bare", "DNS:patroni1.example", KeyFormat::Pkcs8);
    let api = api(&p, &bare);

    let (_n1, body, cfg, _) = setup(&[api.url()], &tls_block(&p, ""));
    api.set(&body);
    let proxy = Proxy::start(&cfg);
    assert!(
        proxy.wait_log("TLS failure: name mismatch"),
        "{}",
        proxy.log()
    );
    drop(proxy);

    let (_n2, body, cfg, rw) = setup(&[api.url()], &tls_block(&p, "verify_hostname: false"));
    api.set(&body);
    let proxy = Proxy::start(&cfg);
    proxy.wait_backends("main", "rw", &["node1"]);
    assert_eq!(whoami(local(rw)), "node1");
    drop(proxy);

    // Another CA's certificate is still refused.
    let stranger = Ca::new(&p.dir.0, "stranger");
    let tls = block_trusting(&stranger.cert, &p, "verify_hostname: false");
    let (_n3, body, cfg, _) = setup(&[api.url()], &tls);
    api.set(&body);
    let proxy = Proxy::start(&cfg);
    assert!(
        proxy.wait_log("TLS failure: unknown issuer"),
        "{}",
        proxy.log()
    );
    assert!(proxy.backends("main", "rw").is_empty());
}

#[test]
fn sighup_rotates_certificates_and_a_broken_file_keeps_the_old_ones() {
    let p = pki(KeyFormat::Pkcs8);
    let ca_file = p.dir.0.join("trusted.pem");
    std::fs::copy(&p.ca.cert, &ca_file).unwrap();
    let port = free_port();
    let api = TlsPatroni::start_on(port, &p.dir.0, &p.server, Some(&p.ca.cert), "{}");
    let tls = block_trusting(&ca_file, &p, "");
    let (_n1, body, cfg, rw) = setup(&[api.url()], &tls);
    api.set(&body);
    let proxy = Proxy::start(&cfg);
    proxy.wait_backends("main", "rw", &["node1"]);

    // A broken CA file: the reload fails, the running material stays.
    std::fs::write(&ca_file, "garbage\n").unwrap();
    proxy.signal(libc::SIGHUP);
    assert!(proxy.wait_log("reload failed"), "{}", proxy.log());
    assert!(proxy.log().contains("clusters.main.tls.ca_cert"));
    assert_eq!(whoami(local(rw)), "node1");

    // Patroni moves to a new CA: polls fail until the proxy trusts it.
    let new_ca = Ca::new(&p.dir.0, "new-ca");
    let new_server = new_ca.issue("server2", "IP:127.0.0.1", KeyFormat::Sec1);
    drop(api);
    let api = TlsPatroni::start_on(port, &p.dir.0, &new_server, Some(&p.ca.cert), &body);
    assert!(
        proxy.wait_log("TLS failure: unknown issuer"),
        "{}",
        proxy.log()
    );
    std::fs::copy(&new_ca.cert, &ca_file).unwrap();
    proxy.signal(libc::SIGHUP);
    assert!(proxy.wait_log("configuration reloaded"), "{}", proxy.log());
    let healthy = wait_until(Duration::from_secs(10), || {
        proxy.status()["clusters"]["main"]["last_error"].is_null()
    });
    assert!(healthy, "{}\n{}", proxy.status(), proxy.log());
    proxy.wait_backends("main", "rw", &["node1"]);
    drop(api);
}

#[test]
fn basic_auth_is_sent_and_never_shown() {
    // A one-shot API that records the request head.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let n1 = Backend::start("node1");
    let body = cluster(vec![member("node1", "leader", "running", n1.addr, None)]).to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && c.read(&mut b).map(|n| n == 1).unwrap_or(false) {
                head.push(b[0]);
            }
            let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
            let _ = write!(c, "HTTP/1.0 200 OK\r\n\r\n{body}");
        }
    });
    let dir = TempDir::new();
    let pw = dir.0.join("pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let tls = format!("username: patroni\npassword_file: {}", pw.display());
    let (_n, _, cfg, _) = setup(&[format!("http://{addr}")], &tls);
    let proxy = Proxy::start(&cfg);
    let head = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    // base64("patroni:s3cret")
    assert!(
        head.to_ascii_lowercase()
            .contains("authorization: basic cgf0cm9uatpzm2nyzxq=\r\n"),
        "{head}"
    );
    proxy.wait_backends("main", "rw", &["node1"]);
    let status = proxy.get("/clusters").unwrap().1;
    let log = proxy.log();
    for text in [&status, &log] {
        assert!(!text.contains("s3cret") && !text.contains("cGF0cm9uaTpzM2NyZXQ"));
    }
    assert!(log.contains("clusters.main.tls.username: the password is sent over plain http://"));
}

//! Test certificates made by the `openssl` command: a CA and certificates
//! it signs, with the key format of choice. Files live in the caller's
//! directory.

use std::path::{Path, PathBuf};
use std::process::Command;

/// How a private key is written.
#[derive(Clone, Copy, Debug)]
pub enum KeyFormat {
    /// RSA, `BEGIN RSA PRIVATE KEY`.
    Pkcs1,
    /// EC P-256, `BEGIN PRIVATE KEY`.
    Pkcs8,
    /// EC P-256, `BEGIN EC PRIVATE KEY`.
    Sec1,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command is needed for TLS tests");
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A certificate authority in `dir` (`<name>.pem`, `<name>.key`).
pub struct Ca {
    pub dir: PathBuf,
    pub name: String,
    pub cert: PathBuf,
    key: PathBuf,
}

/// A certificate and its key.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Ca {
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                key.to_str().unwrap(),
                "-out",
                cert.to_str().unwrap(),
                "-days",
                "3",
                "-subj",
                &format!("/CN={name}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        Ca {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            cert,
            key,
        }
    }

    /// A CA whose files exist already; new certificates go to `dir`.
    pub fn existing(dir: &Path, cert: &Path, key: &Path) -> Ca {
        Ca {
            dir: dir.to_path_buf(),
            name: "existing".to_string(),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        }
    }

    /// A certificate for `cn` with `san` (e.g. `"IP:127.0.0.1,DNS:localhost"`,
    /// or `""` for none), usable by servers and clients.
    pub fn issue(&self, cn: &str, san: &str, format: KeyFormat) -> Issued {
        let key = self.dir.join(format!("{cn}.key"));
        let cert = self.dir.join(format!("{cn}.pem"));
        let csr = self.dir.join(format!("{cn}.csr"));
        let ext = self.dir.join(format!("{cn}.ext"));
        let k = key.to_str().unwrap();
        match format {
            KeyFormat::Pkcs1 => openssl(&self.dir, &["genrsa", "-traditional", "-out", k, "2048"]),
            KeyFormat::Pkcs8 => openssl(
                &self.dir,
                &[
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-out",
                    k,
                ],
            ),
            KeyFormat::Sec1 => openssl(
                &self.dir,
                &[
                    "ecparam",
                    "-name",
                    "prime256v1",
                    "-genkey",
                    "-noout",
                    "-out",
                    k,
                ],
            ),
        }
        let mut extensions = String::from(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n",
        );
        if !san.is_empty() {
            extensions.push_str(&format!("subjectAltName={san}\n"));
        }
        std::fs::write(&ext, extensions).unwrap();
        openssl(
            &self.dir,
            &[
                "req",
                "-new",
                "-key",
                k,
                "-subj",
                &format!("/CN={cn}"),
                "-out",
                csr.to_str().unwrap(),
            ],
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                csr.to_str().unwrap(),
                "-CA",
                self.cert.to_str().unwrap(),
                "-CAkey",
                self.key.to_str().unwrap(),
                "-CAserial",
                self.dir
                    .join(format!("{}.srl", self.name))
                    .to_str()
                    .unwrap(),
                "-CAcreateserial",
                "-days",
                "3",
                "-extfile",
                ext.to_str().unwrap(),
                "-out",
                cert.to_str().unwrap(),
            ],
        );
        Issued { cert, key }
    }
}

/// `openssl rehash`-style links in `dir` (`<hash>.0` to each `*.pem`
/// given), as `c_rehash` makes them.
pub fn rehash_link(dir: &Path, cert: &Path) {
    let out = Command::new("openssl")
        .args(["x509", "-hash", "-noout", "-in"])
        .arg(cert)
        .output()
        .unwrap();
    let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
    std::os::unix::fs::symlink(cert.file_name().unwrap(), dir.join(format!("{hash}.0"))).unwrap();
}

/// A Patroni REST API over HTTPS: `openssl s_server -WWW` serving the
/// file `cluster` of its own directory, so `GET /cluster` answers what
/// [`TlsPatroni::set`] wrote (`HTTP/1.0 200 ok`, then the body, then close,
/// as Patroni does). With `client_ca`, a client certificate signed by it
/// is required (Patroni's `verify_client: required`).
pub struct TlsPatroni {
    pub port: u16,
    dir: PathBuf,
    child: std::process::Child,
}

impl TlsPatroni {
    pub fn start(dir: &Path, server: &Issued, client_ca: Option<&Path>, body: &str) -> TlsPatroni {
        let port = super::free_port();
        TlsPatroni::start_on(port, dir, server, client_ca, body)
    }

    pub fn start_on(
        port: u16,
        dir: &Path,
        server: &Issued,
        client_ca: Option<&Path>,
        body: &str,
    ) -> TlsPatroni {
        let www = dir.join(format!("www-{port}"));
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("cluster"), body).unwrap();
        let mut cmd = Command::new("openssl");
        cmd.args(["s_server", "-WWW", "-quiet", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(&server.cert)
            .arg("-key")
            .arg(&server.key)
            .current_dir(&www)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(ca) = client_ca {
            cmd.args(["-Verify", "1", "-verify_return_error", "-CAfile"])
                .arg(ca);
        }
        let child = cmd.spawn().expect("openssl s_server");
        let up = super::wait_until(std::time::Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "openssl s_server did not listen on {port}");
        TlsPatroni {
            port,
            dir: www,
            child,
        }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn set(&self, body: &str) {
        let tmp = self.dir.join("cluster.tmp");
        std::fs::write(&tmp, body).unwrap();
        std::fs::rename(&tmp, self.dir.join("cluster")).unwrap();
    }
}

impl Drop for TlsPatroni {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The HTTP status `curl` got for `url` trusting only `ca` ("000": no
/// answer, for example a failed handshake).
pub fn https_status(ca: &Path, url: &str) -> String {
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--cacert")
        .arg(ca)
        .arg(url)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

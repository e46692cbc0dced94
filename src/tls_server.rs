//! HTTPS on our own listeners (the admin interface, the health listener):
//! the `tls:` block of a listener turned into a rustls `ServerConfig`, and
//! [`ServerSession`], a non-blocking TLS layer for a connection the event
//! loop owns.
//!
//! rustls is sans-IO: the loop hands it the bytes a readable socket has
//! and takes the bytes it wants to send, so a handshake never blocks the
//! loop. A handshake is bounded in bytes here ([`MAX_HANDSHAKE_BYTES`]) and
//! in time by the caller's deadline ([`HANDSHAKE_TIMEOUT`]).

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection, SupportedCipherSuite};

use crate::tls;

/// Bytes a client may send before its handshake completes.
pub const MAX_HANDSHAKE_BYTES: usize = 64 * 1024;
/// Time a client has to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A listener's `tls:` block as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsConfig {
    pub cert: PathBuf,
    /// Default: the key in `cert`.
    pub key: Option<PathBuf>,
    /// `true`: TLS 1.3 only; `false`: 1.2 and 1.3.
    pub tls13_only: bool,
    /// IANA names; empty: every suite rustls offers.
    pub ciphers: Vec<String>,
    /// Require a client certificate signed by one of these CAs.
    pub client_ca: Option<PathBuf>,
}

/// A built server configuration, shared by every connection of a
/// listener. Two handles are equal only when they are the same build (a
/// reload builds a new one, which new connections then use).
#[derive(Clone)]
pub struct ServerTlsHandle(pub Arc<ServerConfig>);

impl ServerTlsHandle {
    pub fn new(config: Arc<ServerConfig>) -> ServerTlsHandle {
        ServerTlsHandle(config)
    }
}

impl PartialEq for ServerTlsHandle {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for ServerTlsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTlsHandle")
    }
}

/// The IANA name of a suite (rustls calls the TLS 1.3 ones `TLS13_…`).
pub fn iana_name(s: &SupportedCipherSuite) -> String {
    let name = s.suite().as_str().unwrap_or("unknown");
    match name.strip_prefix("TLS13_") {
        Some(rest) => format!("TLS_{rest}"),
        None => name.to_string(),
    }
}

/// Every suite name a `ciphers` list may hold.
pub fn cipher_names() -> Vec<String> {
    rustls::crypto::ring::DEFAULT_CIPHER_SUITES
        .iter()
        .map(iana_name)
        .collect()
}

/// Reads the files and builds the configuration; `path` is the key path
/// of the block. Errors name their key.
pub fn load_server(path: &str, cfg: &ServerTlsConfig) -> Result<Arc<ServerConfig>, Vec<String>> {
    let mut problems = Vec::new();
    let base = tls::provider();
    let mut suites = Vec::new();
    if cfg.ciphers.is_empty() {
        suites = base.cipher_suites.clone();
    }
    for (i, name) in cfg.ciphers.iter().enumerate() {
        match base
            .cipher_suites
            .iter()
            .find(|s| iana_name(s).eq_ignore_ascii_case(name.trim()))
        {
            Some(s) if suites.contains(s) => {
                problems.push(format!("{path}.ciphers[{i}]: {name:?} is listed twice"))
            }
            Some(s) => suites.push(*s),
            None => problems.push(format!(
                "{path}.ciphers[{i}]: unknown cipher suite {name:?}; valid names: {}",
                cipher_names().join(", ")
            )),
        }
    }
    let versions: &[&'static rustls::SupportedProtocolVersion] = if cfg.tls13_only {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS12, &rustls::version::TLS13]
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    if !suites
        .iter()
        .any(|s| versions.iter().any(|v| s.version() == *v))
    {
        return Err(vec![format!(
            "{path}.ciphers: no suite for the allowed TLS versions (TLS 1.3 suites are TLS_AES_*, TLS_CHACHA20_*)"
        )]);
    }
    let identity = match tls::load_identity(path, "cert", &cfg.cert, "key", cfg.key.as_deref()) {
        Ok(id) => Some(id),
        Err(e) => {
            problems.push(e);
            None
        }
    };
    let verifier = match &cfg.client_ca {
        None => None,
        Some(f) => match tls::read_roots(f) {
            Ok(roots) => {
                let mut store = RootCertStore::empty();
                store.add_parsable_certificates(roots);
                match WebPkiClientVerifier::builder_with_provider(Arc::new(store), base.clone())
                    .build()
                {
                    Ok(v) => Some(v),
                    Err(e) => {
                        problems.push(format!("{path}.client_ca: {}: {e}", f.display()));
                        None
                    }
                }
            }
            Err(e) => {
                problems.push(format!("{path}.client_ca: {e}"));
                None
            }
        },
    };
    let Some(identity) = identity else {
        return Err(problems);
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let provider = Arc::new(CryptoProvider {
        cipher_suites: suites,
        ..(*base).clone()
    });
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| vec![format!("{path}: {e}")])?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(identity.chain, identity.key)
        .map_err(|e| vec![format!("{path}.cert: {e}")])?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What a read from the socket gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// Nothing more for now (the socket would block).
    Blocked,
    /// The peer closed (cleanly or not).
    Closed,
}

/// A TLS server connection driven by the loop's readiness events.
pub struct ServerSession {
    conn: ServerConnection,
    /// Bytes received while the handshake was running.
    handshake_bytes: usize,
}

impl ServerSession {
    pub fn new(config: Arc<ServerConfig>) -> Result<ServerSession, rustls::Error> {
        Ok(ServerSession {
            conn: ServerConnection::new(config)?,
            handshake_bytes: 0,
        })
    }

    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Whether rustls has bytes for the socket.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Reads what the socket has, until it would block; decrypted bytes go
    /// to `plain`. An error means the connection must be closed (after
    /// [`flush`](Self::flush) to send the alert rustls queued).
    pub fn read(&mut self, sock: &mut impl Read, plain: &mut Vec<u8>) -> io::Result<Progress> {
        loop {
            let n = match self.conn.read_tls(sock) {
                Ok(0) => {
                    self.take_plain(plain)?;
                    return Ok(Progress::Closed);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Progress::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if self.conn.is_handshaking() {
                self.handshake_bytes += n;
                if self.handshake_bytes > MAX_HANDSHAKE_BYTES {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("TLS handshake over {MAX_HANDSHAKE_BYTES} bytes"),
                    ));
                }
            }
            self.conn
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            self.take_plain(plain)?;
        }
    }

    fn take_plain(&mut self, plain: &mut Vec<u8>) -> io::Result<()> {
        let mut buf = [0u8; 4096];
        loop {
            match self.conn.reader().read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => plain.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                // The peer closed without close_notify: what came is kept.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Queues `data` for the peer (encrypted on [`flush`](Self::flush)).
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.conn.writer().write_all(data)
    }

    /// Queues a close_notify.
    pub fn close(&mut self) {
        self.conn.send_close_notify();
    }

    /// Writes what rustls has for the socket until it would block. True
    /// when nothing is left.
    pub fn flush(&mut self, sock: &mut impl Write) -> io::Result<bool> {
        while self.conn.wants_write() {
            match self.conn.write_tls(sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// A [`ServerSession`] over a non-blocking socket, with the `read` /
/// `write` shape of a plain socket: `read` gives decrypted bytes (or
/// `WouldBlock`, `Ok(0)` at the end), `write` takes plaintext. The socket
/// itself is passed in on every call, so the caller keeps owning it (and
/// its registration).
pub struct TlsStream {
    session: ServerSession,
    plain: Vec<u8>,
    taken: usize,
    eof: bool,
}

/// Plaintext taken per `write`, so that a slow reader pushes back.
const WRITE_CHUNK: usize = 16 * 1024;

impl TlsStream {
    pub fn new(config: Arc<ServerConfig>) -> Result<TlsStream, rustls::Error> {
        Ok(TlsStream {
            session: ServerSession::new(config)?,
            plain: Vec::new(),
            taken: 0,
            eof: false,
        })
    }

    pub fn is_handshaking(&self) -> bool {
        self.session.is_handshaking()
    }

    pub fn read<S: Read + Write>(&mut self, sock: &mut S, buf: &mut [u8]) -> io::Result<usize> {
        if self.taken == self.plain.len() && !self.eof {
            self.plain.clear();
            self.taken = 0;
            match self.session.read(sock, &mut self.plain) {
                Ok(Progress::Blocked) => {}
                Ok(Progress::Closed) => self.eof = true,
                Err(e) => {
                    // Send the alert rustls queued, if the socket takes it.
                    let _ = self.session.flush(sock);
                    return Err(e);
                }
            }
            // Handshake messages for the peer.
            self.session.flush(sock)?;
        }
        let n = buf.len().min(self.plain.len() - self.taken);
        if n > 0 {
            buf[..n].copy_from_slice(&self.plain[self.taken..self.taken + n]);
            self.taken += n;
            return Ok(n);
        }
        if self.eof {
            Ok(0)
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    /// Takes up to a chunk of `buf` once the bytes queued before are on
    /// the wire.
    pub fn write<S: Write>(&mut self, sock: &mut S, buf: &[u8]) -> io::Result<usize> {
        if !self.session.flush(sock)? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(WRITE_CHUNK);
        self.session.write(&buf[..n])?;
        self.session.flush(sock)?;
        Ok(n)
    }

    /// True when everything queued is on the wire.
    pub fn flush<S: Write>(&mut self, sock: &mut S) -> io::Result<bool> {
        self.session.flush(sock)
    }

    /// Queues close_notify and sends what the socket takes.
    pub fn close<S: Write>(&mut self, sock: &mut S) {
        self.session.close();
        let _ = self.session.flush(sock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cipher_names_are_iana() {
        let names = cipher_names();
        assert!(
            names.contains(&"TLS_AES_128_GCM_SHA256".to_string()),
            "{names:?}"
        );
        assert!(names.contains(&"TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".to_string()));
        assert!(names.iter().all(|n| n.starts_with("TLS_")));
    }

    #[test]
    fn unknown_ciphers_list_the_valid_ones() {
        let cfg = ServerTlsConfig {
            cert: "/nonexistent".into(),
            key: None,
            tls13_only: false,
            ciphers: vec!["TLS_RSA_WITH_RC4_128_SHA".into()],
            client_ca: None,
        };
        let e = load_server("admin.tls", &cfg).unwrap_err();
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with(
                "admin.tls.ciphers[0]: unknown cipher suite \"TLS_RSA_WITH_RC4_128_SHA\"; valid names: TLS_AES_256_GCM_SHA384, "
            ),
            "{e:?}"
        );
    }

    #[test]
    fn tls13_only_needs_a_tls13_suite() {
        let cfg = ServerTlsConfig {
            cert: "/nonexistent".into(),
            key: None,
            tls13_only: true,
            ciphers: vec!["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".into()],
            client_ca: None,
        };
        let e = load_server("admin.tls", &cfg).unwrap_err();
        assert!(e[0].starts_with("admin.tls.ciphers: no suite"), "{e:?}");
    }
}

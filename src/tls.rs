//! TLS material and policy: PEM files read and checked, rustls client
//! configurations built, TLS failures put into words.
//!
//! Everything that reads a file is here, called from `config::load` (so
//! `-t`, start-up and SIGHUP check the same things) and never from the
//! event loop. Errors are strings that start with the key path they
//! concern, as the rest of the configuration's errors do.
//!
//! Roots are always explicit: the configured CA file or directory, else the
//! system's PEM bundle. Nothing here, nor in ureq's configuration, relies on
//! webpki-roots or a platform verifier (Debian's ureq panics on both).

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore,
    SignatureScheme,
};

/// Where the system's CA bundle usually is (Debian/Ubuntu, RHEL/Fedora,
/// Alpine/BSD), tried in this order when no CA is configured.
pub const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// Largest PEM file read (a full system bundle is about 200 KiB).
const MAX_PEM_BYTES: u64 = 16 * 1024 * 1024;

/// The crypto provider of every TLS connection: rustls with ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A cluster's `tls:` block as written in the file (paths and flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsConfig {
    pub ca_cert: Option<PathBuf>,
    pub ca_dir: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub skip_verify: bool,
    pub verify_hostname: bool,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
}

impl Default for ClientTlsConfig {
    fn default() -> Self {
        ClientTlsConfig {
            ca_cert: None,
            ca_dir: None,
            client_cert: None,
            client_key: None,
            skip_verify: false,
            verify_hostname: true,
            username: None,
            password_file: None,
        }
    }
}

/// A value that must never reach a log line or the admin interface.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A client certificate chain and its key, checked to belong together.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// The key as PEM again, with the label of its kind.
    pub fn key_pem(&self) -> Secret {
        let label = match &self.key {
            PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
            PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
            _ => "PRIVATE KEY",
        };
        let b64 = base64(self.key.secret_der());
        let mut out = format!("-----BEGIN {label}-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str(&format!("-----END {label}-----\n"));
        Secret(out)
    }
}

impl PartialEq for Identity {
    fn eq(&self, other: &Self) -> bool {
        self.chain == other.chain && self.key == other.key
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Identity({} certificates, key <redacted>)",
            self.chain.len()
        )
    }
}

/// What an updater needs to talk to one cluster's Patroni: the files'
/// contents, read and checked. Compared by content, so a reload that
/// finds rotated certificates restarts the updater.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientMaterial {
    /// Trust anchors (DER), never empty unless `skip_verify`.
    pub roots: Vec<CertificateDer<'static>>,
    /// Where the roots came from, for logs.
    pub roots_from: String,
    pub identity: Option<Identity>,
    pub skip_verify: bool,
    pub verify_hostname: bool,
    /// The whole `Authorization` header value (`Basic …`).
    pub authorization: Option<Secret>,
}

/// Reads and checks everything `cfg` names. `path` is the key path of the
/// block (`clusters.main.tls`); `https` says whether any host needs TLS
/// (only then are the system roots needed).
pub fn load_client(
    path: &str,
    cfg: &ClientTlsConfig,
    https: bool,
) -> Result<ClientMaterial, Vec<String>> {
    let mut problems = Vec::new();
    let mut roots = Vec::new();
    let mut from = Vec::new();
    if let Some(f) = &cfg.ca_cert {
        match read_roots(f) {
            Ok(certs) => {
                roots.extend(certs);
                from.push(f.display().to_string());
            }
            Err(e) => problems.push(format!("{path}.ca_cert: {e}")),
        }
    }
    if let Some(d) = &cfg.ca_dir {
        match read_ca_dir(d) {
            Ok(certs) => {
                roots.extend(certs);
                from.push(d.display().to_string());
            }
            Err(e) => problems.push(format!("{path}.ca_dir: {e}")),
        }
    }
    if cfg.ca_cert.is_none() && cfg.ca_dir.is_none() && https && !cfg.skip_verify {
        match system_roots() {
            Ok((f, certs)) => {
                roots = certs;
                from.push(format!("{f} (system store)"));
            }
            Err(e) => problems.push(format!(
                "{path}: no ca_cert or ca_dir, and no system CA bundle: {e}"
            )),
        }
    }
    dedup(&mut roots);

    let identity = match (&cfg.client_cert, &cfg.client_key) {
        (None, None) => None,
        (None, Some(_)) => {
            problems.push(format!("{path}.client_key: given without client_cert"));
            None
        }
        (Some(cert), key) => {
            match load_identity(path, "client_cert", cert, "client_key", key.as_deref()) {
                Ok(id) => Some(id),
                Err(e) => {
                    problems.push(e);
                    None
                }
            }
        }
    };

    let authorization = match (&cfg.username, &cfg.password_file) {
        (None, None) => None,
        (Some(_), None) => {
            problems.push(format!("{path}.password_file: missing; username needs it"));
            None
        }
        (None, Some(_)) => {
            problems.push(format!("{path}.username: missing; password_file needs it"));
            None
        }
        (Some(user), Some(file)) => match read_password(file) {
            Ok(_) if user.contains(':') || user.is_empty() => {
                problems.push(format!(
                    "{path}.username: must be non-empty and contain no ':' (HTTP basic auth)"
                ));
                None
            }
            Ok(pass) => Some(Secret(format!(
                "Basic {}",
                base64(format!("{user}:{pass}").as_bytes())
            ))),
            Err(e) => {
                problems.push(format!("{path}.password_file: {e}"));
                None
            }
        },
    };

    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(ClientMaterial {
        roots,
        roots_from: from.join(", "),
        identity,
        skip_verify: cfg.skip_verify,
        verify_hostname: cfg.verify_hostname,
        authorization,
    })
}

/// Why a file cannot be read, in the words of the error messages.
fn read_file(f: &Path) -> Result<Vec<u8>, String> {
    let shown = f.display();
    let meta = std::fs::metadata(f).map_err(|e| format!("{shown}: {}", io_words(&e)))?;
    if meta.is_dir() {
        return Err(format!("{shown}: is a directory, expected a file"));
    }
    if meta.len() > MAX_PEM_BYTES {
        return Err(format!("{shown}: larger than {MAX_PEM_BYTES} bytes"));
    }
    std::fs::read(f).map_err(|e| format!("{shown}: {}", io_words(&e)))
}

fn io_words(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "no such file".to_string(),
        io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => e.to_string(),
    }
}

fn pem_words(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line".to_string(),
        pem::Error::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed".to_string(),
        pem::Error::Base64Decode(_) => "a PEM section is not valid base64".to_string(),
        other => other.to_string(),
    }
}

/// Every certificate in a PEM file; none is an error.
fn read_certs(f: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read_file(f)?;
    certs_in(&bytes).map_err(|e| format!("{}: {e}", f.display()))
}

fn certs_in(bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut out = Vec::new();
    for c in CertificateDer::pem_slice_iter(bytes) {
        out.push(c.map_err(|e| pem_words(&e))?);
    }
    if out.is_empty() {
        return Err("no certificate in the file (expected PEM \"BEGIN CERTIFICATE\")".to_string());
    }
    Ok(out)
}

/// A PEM file of CA certificates, each checked to be usable as one.
pub(crate) fn read_roots(f: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = read_certs(f)?;
    check_roots(f, &certs)?;
    Ok(certs)
}

/// Every certificate must be usable as a trust anchor.
fn check_roots(f: &Path, certs: &[CertificateDer<'static>]) -> Result<(), String> {
    let mut store = RootCertStore::empty();
    for (i, c) in certs.iter().enumerate() {
        store
            .add(c.clone())
            .map_err(|e| format!("{}: certificate {} cannot be a CA: {e}", f.display(), i + 1))?;
    }
    Ok(())
}

/// A CA directory as OpenSSL's `-CApath` or the Perl `PatroniSSLCAPath`:
/// every regular file holding PEM certificates. `c_rehash` links
/// (`<hash>.0` pointing at a file of the directory) and a bundle of the
/// same certificates do not load anything twice; files without a
/// certificate (a README, CRLs) are skipped.
fn read_ca_dir(d: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = d.display();
    let entries = std::fs::read_dir(d).map_err(|e| format!("{shown}: {}", io_words(&e)))?;
    let mut files: Vec<PathBuf> = Vec::new();
    for e in entries {
        let e = e.map_err(|e| format!("{shown}: {e}"))?;
        files.push(e.path());
    }
    // Hundreds of files at most, read once per load.
    crate::order::sort_short_by(&mut files, |a, b| a.cmp(b));
    let mut seen_files = HashSet::new();
    let mut out = Vec::new();
    for f in files {
        // metadata() follows links: a dangling link or a subdirectory is skipped.
        let Ok(meta) = std::fs::metadata(&f) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let real = std::fs::canonicalize(&f).unwrap_or_else(|_| f.clone());
        if !seen_files.insert(real) {
            continue;
        }
        let Ok(bytes) = read_file(&f) else {
            continue;
        };
        let Ok(certs) = certs_in(&bytes) else {
            continue;
        };
        check_roots(&f, &certs)?;
        out.extend(certs);
    }
    dedup(&mut out);
    if out.is_empty() {
        return Err(format!("{shown}: no PEM certificate in the directory"));
    }
    Ok(out)
}

fn dedup(certs: &mut Vec<CertificateDer<'static>>) {
    let mut seen = HashSet::new();
    certs.retain(|c| seen.insert(c.as_ref().to_vec()));
}

fn system_roots() -> Result<(&'static str, Vec<CertificateDer<'static>>), String> {
    let mut why = Vec::new();
    for f in SYSTEM_BUNDLES {
        match read_certs(Path::new(f)) {
            Ok(certs) => {
                // A bundle may hold a certificate webpki cannot use; skip it.
                let mut store = RootCertStore::empty();
                let usable: Vec<_> = certs
                    .into_iter()
                    .filter(|c| store.add(c.clone()).is_ok())
                    .collect();
                if !usable.is_empty() {
                    return Ok((f, usable));
                }
                why.push(format!("{f}: no usable certificate"));
            }
            Err(e) => why.push(e),
        }
    }
    Err(why.join("; "))
}

/// A certificate chain and its key (from the key file, else from the
/// certificate file itself), checked to match. `cert_key` and `key_key`
/// name the keys of the block, for the errors.
pub(crate) fn load_identity(
    path: &str,
    cert_key: &str,
    cert: &Path,
    key_key: &str,
    key: Option<&Path>,
) -> Result<Identity, String> {
    let chain = read_certs(cert).map_err(|e| format!("{path}.{cert_key}: {e}"))?;
    let key_name = key_key;
    let (key_path, key_key) = match key {
        Some(k) => (k, key_key),
        None => (cert, cert_key),
    };
    let bytes = read_file(key_path).map_err(|e| format!("{path}.{key_key}: {e}"))?;
    let key = match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(k) => k,
        Err(pem::Error::NoItemsFound) => {
            let encrypted = String::from_utf8_lossy(&bytes).contains("ENCRYPTED");
            let hint = if encrypted {
                "the key is encrypted; give it without a passphrase".to_string()
            } else if key.is_none() {
                format!("no private key in the file; set {key_name}")
            } else {
                "no private key in the file (expected PKCS#1, PKCS#8 or SEC1 PEM)".to_string()
            };
            return Err(format!("{path}.{key_key}: {}: {hint}", key_path.display()));
        }
        Err(e) => {
            return Err(format!(
                "{path}.{key_key}: {}: {}",
                key_path.display(),
                pem_words(&e)
            ))
        }
    };
    match CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider()) {
        Ok(_) => Ok(Identity { chain, key }),
        Err(rustls::Error::InconsistentKeys(_)) => Err(format!(
            "{path}.{key_key}: {} does not match the certificate in {}",
            key_path.display(),
            cert.display()
        )),
        Err(e) => Err(format!(
            "{path}.{key_key}: {}: cannot use the key: {e}",
            key_path.display()
        )),
    }
}

/// The first line of the file, without its line end; empty is an error.
fn read_password(f: &Path) -> Result<String, String> {
    let bytes = read_file(f)?;
    let text = String::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8", f.display()))?;
    let pass = text.lines().next().unwrap_or("").to_string();
    if pass.is_empty() {
        return Err(format!(
            "{}: empty; the password is its first line",
            f.display()
        ));
    }
    Ok(pass)
}

/// Standard base64 with padding (RFC 4648), for the basic auth header.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Client configuration for `verify_hostname: false`.

/// A rustls client configuration that verifies the chain against `m.roots`
/// but accepts a certificate whatever names it lists: for Patroni members
/// that advertise a bare IP their certificate does not carry. ureq's
/// `TlsConfig` cannot express this (verification is all or nothing), so
/// these hosts are fetched by the `https` module.
pub fn no_hostname_config(m: &ClientMaterial) -> Result<Arc<ClientConfig>, String> {
    let provider = provider();
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(m.roots.iter().cloned());
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
        .build()
        .map_err(|e| format!("building the certificate verifier: {e}"))?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoHostnameVerifier { inner }));
    let config = match &m.identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
            .map_err(|e| format!("client certificate: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// webpki's verifier, with a name mismatch forgiven. webpki checks the
/// chain to a trust anchor (and validity dates, key usage) before the
/// name, so a `NotValidForName` error means everything else passed.
#[derive(Debug)]
struct NoHostnameVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for NoHostnameVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

// ---------------------------------------------------------------------------
// Failures in words.

/// A TLS failure: a stable cause (to log once per cause) and a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub cause: &'static str,
    pub words: String,
}

/// Puts a rustls error into words; `has_cert` says whether we sent a
/// client certificate (a refused handshake means different things).
pub fn describe(e: &rustls::Error, has_cert: bool) -> Failure {
    use rustls::Error as E;
    use CertificateError as C;
    let (cause, words): (&'static str, String) = match e {
        E::InvalidCertificate(c) => match c {
            C::UnknownIssuer => (
                "unknown issuer",
                "unknown issuer: the server's certificate is not signed by a trusted CA \
                 (check ca_cert / ca_dir)"
                    .into(),
            ),
            C::Expired | C::ExpiredContext { .. } => {
                ("expired", "the server's certificate has expired".into())
            }
            C::NotValidYet | C::NotValidYetContext { .. } => (
                "not yet valid",
                "the server's certificate is not valid yet (check the clocks)".into(),
            ),
            C::NotValidForName | C::NotValidForNameContext { .. } => (
                "name mismatch",
                "name mismatch: the server's certificate does not list the host name or IP \
                 of the URL (add it to the certificate's SAN, or set verify_hostname: false)"
                    .into(),
            ),
            C::Revoked => ("revoked", "the server's certificate is revoked".into()),
            C::BadSignature => (
                "bad signature",
                "the server's certificate has a bad signature".into(),
            ),
            C::InvalidPurpose => (
                "invalid purpose",
                "the server's certificate is not for TLS server use".into(),
            ),
            other => (
                "bad certificate",
                format!("bad server certificate: {other:?}"),
            ),
        },
        E::AlertReceived(a) => match a {
            AlertDescription::CertificateRequired => (
                "client certificate required",
                "handshake refused: the server requires a client certificate and none was sent \
                 (set client_cert and client_key)"
                    .into(),
            ),
            AlertDescription::HandshakeFailure if !has_cert => (
                "handshake refused",
                "handshake refused by the server; no client certificate was sent, \
                 and the server may require one"
                    .into(),
            ),
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied => (
                "client certificate refused",
                format!("the server refused our client certificate ({a:?})"),
            ),
            other => (
                "handshake refused",
                format!("handshake refused by the server ({other:?})"),
            ),
        },
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => (
            "not TLS",
            "the server does not speak TLS here (is the URL http://?)".into(),
        ),
        E::PeerIncompatible(p) => (
            "incompatible",
            format!("no TLS version or cipher in common with the server ({p:?})"),
        ),
        other => ("tls error", format!("TLS error: {other}")),
    };
    Failure { cause, words }
}

/// The rustls error inside an I/O error, if that is what it carries.
pub fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o, "{i:?}");
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret("Basic dXNlcjpodW50ZXIy".into());
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
    }

    #[test]
    fn missing_files_name_the_key_path() {
        let cfg = ClientTlsConfig {
            ca_cert: Some("/nonexistent/ca.pem".into()),
            client_cert: Some("/nonexistent/c.pem".into()),
            ..Default::default()
        };
        let e = load_client("clusters.main.tls", &cfg, true).unwrap_err();
        assert_eq!(
            e,
            [
                "clusters.main.tls.ca_cert: /nonexistent/ca.pem: no such file",
                "clusters.main.tls.client_cert: /nonexistent/c.pem: no such file",
            ]
        );
    }

    #[test]
    fn a_file_without_certificates_is_refused() {
        let dir = std::env::temp_dir().join(format!("pp-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("empty.pem");
        std::fs::write(&f, "not a certificate\n").unwrap();
        let e = read_certs(&f).unwrap_err();
        assert!(e.ends_with("no certificate in the file (expected PEM \"BEGIN CERTIFICATE\")"));
        let e = read_ca_dir(&dir).unwrap_err();
        assert!(e.ends_with("no PEM certificate in the directory"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn auth_needs_both_halves() {
        let cfg = ClientTlsConfig {
            username: Some("u".into()),
            ..Default::default()
        };
        let e = load_client("clusters.a.tls", &cfg, false).unwrap_err();
        assert_eq!(
            e,
            ["clusters.a.tls.password_file: missing; username needs it"]
        );
    }

    #[test]
    fn failures_have_words() {
        let f = describe(
            &rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
            true,
        );
        assert_eq!(f.cause, "unknown issuer");
        let f = describe(
            &rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
            false,
        );
        assert!(f.words.contains("none was sent"), "{}", f.words);
    }
}

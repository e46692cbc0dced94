//! The configuration file: YAML in, a validated [`Config`] out.
//!
//! Two stages. serde (with `deny_unknown_fields` everywhere) checks the shape
//! and reports the first structural problem with its key path, which
//! serde_yaml provides (`clusters.main.ports.rw: unknown field `listn``).
//! Then [`validate`] checks meaning and collects *every* problem, each
//! prefixed by its key path, so an operator fixes a file in one round.
//!
//! The `patroni_proxy.yaml` format of the older tool is a subset of this one
//! and loads unchanged, its `tls:` block included. [`parse`] does no I/O;
//! [`load`] reads the file and then the TLS material it names (see
//! [`crate::tls`]), so `-t`, start-up and SIGHUP check the same things.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use log::LevelFilter;
use serde::Deserialize;

use crate::access::{Allow, Network};
use crate::config_guard;
use crate::error::Error;
use crate::policy::{self, FallbackReturn, LagRules, PortPolicy};
use crate::tls::{self, ClientMaterial, ClientTlsConfig};
use crate::tls_server::{self, ServerTlsConfig, ServerTlsHandle};
use crate::topology::PortRole;

/// Default admin HTTP address, as in the older tool.
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:8009";

/// Upper bound of a configured duration, so typos like `30000` minutes'
/// worth of seconds are caught.
const MAX_SECONDS: f64 = 86_400.0;

/// The validated configuration. Everything here has a value: defaults are
/// filled in by [`validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub cluster_update_interval: Duration,
    /// The admin interface's address (`listen_address` or `admin.listen`).
    pub listen_address: SocketAddr,
    /// `admin.tls` as written; `admin_tls_config` is what [`load`] built.
    pub admin_tls: Option<ServerTlsConfig>,
    pub admin_tls_config: Option<ServerTlsHandle>,
    /// `admin.allow`: networks per route class.
    pub admin_allow: Allow,
    pub log_level: LevelFilter,
    pub connect_timeout: Duration,
    pub api_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// `None`: a topology never goes stale (keep routing on the last one).
    pub topology_ttl: Option<Duration>,
    pub max_connections: usize,
    pub buffer_size: usize,
    pub listen_backlog: u32,
    pub tcp_keepalive: Option<Keepalive>,
    /// `TCP_USER_TIMEOUT` on backend sockets; `None`: the kernel's.
    pub tcp_user_timeout: Option<Duration>,
    /// Bulk transfers go through kernel pipes (`splice(2)`).
    pub splice: bool,
    /// Replay a PostgreSQL start-up that a server going away refuses.
    pub startup_replay: bool,
    /// Sorted by name.
    pub clusters: Vec<ClusterConfig>,
    pub health: HealthConfig,
}

/// `health:`: the listeners that answer load balancers' checks.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HealthConfig {
    /// HTTP, read-only routes (Patroni-compatible checks, `/metrics`).
    pub listen: Option<SocketAddr>,
    /// HAProxy `agent-check`: one line in, one line out.
    pub agent_listen: Option<SocketAddr>,
    /// `(cluster, member)` that `GET /<endpoint>` answers for.
    pub member: Option<(String, String)>,
    /// `health.tls` as written; `tls_config` is what [`load`] built. The
    /// agent port stays plain TCP (HAProxy's agent-check has no TLS).
    pub tls: Option<ServerTlsConfig>,
    pub tls_config: Option<ServerTlsHandle>,
    /// Who may ask (every health route is a read route).
    pub allow: Allow,
}

/// TCP keepalive probes, set on client and backend sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub idle_secs: u32,
    pub interval_secs: u32,
    pub count: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    pub name: String,
    /// Base URLs without a trailing slash; `/cluster` is appended.
    pub hosts: Vec<String>,
    /// Sorted by name.
    pub ports: Vec<PortConfig>,
    /// The `tls:` block as written.
    pub tls: Option<ClientTlsConfig>,
    /// What the block names, read and checked by [`load`]; also set when
    /// a host is https:// without a block (system roots). `None` after
    /// [`parse`] alone.
    pub tls_material: Option<Arc<ClientMaterial>>,
}

impl ClusterConfig {
    fn uses_https(&self) -> bool {
        self.hosts.iter().any(|h| {
            h.get(..8)
                .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PortConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub roles: Vec<PortRole>,
    /// Dial this port on the member's host; `None`: the member's own port.
    pub host_port: Option<u16>,
    pub max_lag_in_bytes: Option<u64>,
    /// How long a client may wait for a routable member. Zero: refuse at once.
    pub backend_wait_timeout: Duration,
    /// Lag grace and hysteresis, preference, fallback.
    pub policy: PortPolicy,
    /// Held clients beyond this are refused at once; `None`: no cap.
    pub max_waiting: Option<usize>,
    /// Pre-connected backend sockets kept per routable member; 0: off.
    pub preconnect: usize,
    /// A pre-connected socket older than this is closed unused.
    pub preconnect_max_age: Duration,
}

impl Config {
    /// Things that work but that the operator should hear about, logged at
    /// start-up and on every reload (and printed by `-t`).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for c in &self.clusters {
            let Some(t) = &c.tls else { continue };
            if t.skip_verify {
                out.push(format!(
                    "clusters.{}.tls.skip_verify: certificate verification is OFF; anyone on \
                     the path to Patroni can impersonate it and steer clients",
                    c.name
                ));
            }
            if t.username.is_some()
                && c.hosts
                    .iter()
                    .any(|h| !h.to_ascii_lowercase().starts_with("https://"))
            {
                out.push(format!(
                    "clusters.{}.tls.username: the password is sent over plain http:// to some hosts",
                    c.name
                ));
            }
        }
        out
    }

    /// Every listening address in the file, with the port's display name.
    pub fn ports(&self) -> impl Iterator<Item = (&ClusterConfig, &PortConfig)> {
        self.clusters
            .iter()
            .flat_map(|c| c.ports.iter().map(move |p| (c, p)))
    }
}

/// `level` raised by `by` steps (each `-v` on the command line).
pub fn raise_level(level: LevelFilter, by: u8) -> LevelFilter {
    const ORDER: [LevelFilter; 6] = [
        LevelFilter::Off,
        LevelFilter::Error,
        LevelFilter::Warn,
        LevelFilter::Info,
        LevelFilter::Debug,
        LevelFilter::Trace,
    ];
    let i = ORDER.iter().position(|l| *l == level).unwrap_or(3);
    ORDER[(i + usize::from(by)).min(ORDER.len() - 1)]
}

// ---------------------------------------------------------------------------
// The file as serde sees it.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    cluster_update_interval: Option<f64>,
    listen_address: Option<String>,
    admin: Option<RawAdmin>,
    log_level: Option<String>,
    connect_timeout: Option<f64>,
    api_timeout: Option<f64>,
    shutdown_timeout: Option<f64>,
    topology_ttl: Option<f64>,
    max_connections: Option<u64>,
    buffer_size: Option<u64>,
    listen_backlog: Option<u32>,
    tcp_keepalive: Option<RawKeepalive>,
    tcp_user_timeout: Option<f64>,
    splice: Option<bool>,
    startup_replay: Option<bool>,
    clusters: BTreeMap<String, RawCluster>,
    health: Option<RawHealth>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    listen: Option<String>,
    agent_listen: Option<String>,
    member: Option<String>,
    tls: Option<RawServerTls>,
    allow: Option<RawAllow>,
}

/// The admin listener: where, HTTPS, who may call what.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
    tls: Option<RawServerTls>,
    allow: Option<RawAllow>,
}

/// A listener's `tls:` block (the knobs patroniglue offers).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServerTls {
    cert: PathBuf,
    key: Option<PathBuf>,
    /// `"1.2"` or `"1.3"`; unquoted YAML makes it a number.
    min_version: Option<serde_yaml::Value>,
    ciphers: Option<Vec<String>>,
    client_ca: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllow {
    read: Option<Vec<String>>,
    action: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeepalive {
    enabled: Option<bool>,
    idle: Option<u32>,
    interval: Option<u32>,
    count: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    hosts: Vec<String>,
    ports: BTreeMap<String, RawPort>,
    tls: Option<RawTls>,
}

/// The older tool's `tls:` block (`ca_cert`, `client_cert`, `client_key`,
/// `skip_verify`) plus what real deployments need.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_cert: Option<PathBuf>,
    ca_dir: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    skip_verify: Option<bool>,
    verify_hostname: Option<bool>,
    username: Option<String>,
    password_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    listen: String,
    roles: Vec<String>,
    host_port: Option<u16>,
    max_lag_in_bytes: Option<u64>,
    backend_wait_timeout: Option<f64>,
    max_lag_in_bytes_close: Option<u64>,
    lag_grace: Option<f64>,
    lag_return_percent: Option<u64>,
    lag_return_polls: Option<u64>,
    prefer: Option<Vec<String>>,
    fallback: Option<Vec<String>>,
    fallback_return: Option<String>,
    max_waiting: Option<u64>,
    preconnect: Option<u64>,
    preconnect_max_age: Option<f64>,
}

/// Reads and validates the file at `path`.
pub fn load(path: &Path) -> Result<Config, Error> {
    let file = path.display().to_string();
    let text = read_capped(path).map_err(|e| Error::Config {
        file: file.clone(),
        problems: vec![format!("cannot read: {e}")],
    })?;
    let mut config = parse(&text).map_err(|problems| Error::Config {
        file: file.clone(),
        problems,
    })?;
    load_tls(&mut config).map_err(|problems| Error::Config { file, problems })?;
    Ok(config)
}

/// Builds the admin and health listeners' TLS configurations from their
/// files.
fn load_admin_tls(config: &mut Config) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    if let Some(t) = &config.admin_tls {
        match tls_server::load_server("admin.tls", t) {
            Ok(c) => config.admin_tls_config = Some(ServerTlsHandle::new(c)),
            Err(p) => problems.extend(p),
        }
    }
    if let Some(t) = &config.health.tls {
        match tls_server::load_server("health.tls", t) {
            Ok(c) => config.health.tls_config = Some(ServerTlsHandle::new(c)),
            Err(p) => problems.extend(p),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Reads and checks the TLS material of every cluster that has a `tls:`
/// block or an https:// host.
pub fn load_tls(config: &mut Config) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    if let Err(p) = load_admin_tls(config) {
        problems.extend(p);
    }
    for c in &mut config.clusters {
        let https = c.uses_https();
        if c.tls.is_none() && !https {
            continue;
        }
        let block = c.tls.clone().unwrap_or_default();
        match tls::load_client(&format!("clusters.{}.tls", c.name), &block, https) {
            Ok(m) => c.tls_material = Some(Arc::new(m)),
            Err(p) => problems.extend(p),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Reads at most one byte more than the cap, so a huge file (or a FIFO that
/// never ends) costs nothing; [`config_guard::precheck`] reports the size.
fn read_capped(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(config_guard::MAX_CONFIG_BYTES as u64 + 1)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// Parses and validates YAML text; the error lists every problem found.
/// No message quotes a password that was in the text.
pub fn parse(text: &str) -> Result<Config, Vec<String>> {
    parse_unredacted(text).map_err(|ps| ps.iter().map(|p| config_guard::redact(p)).collect())
}

fn parse_unredacted(text: &str) -> Result<Config, Vec<String>> {
    config_guard::precheck(text).map_err(|e| vec![e])?;
    config_guard::duplicate_keys(text).map_err(|e| vec![e])?;
    let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| vec![e.to_string()])?;
    validate(raw)
}

/// Collects problems with their key paths while building the typed config.
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, path: &str, msg: impl std::fmt::Display) {
        self.0.push(format!("{path}: {msg}"));
    }

    /// A duration in seconds within `min..=MAX_SECONDS` (`min` itself is
    /// allowed only when `allow_zero`).
    fn seconds(&mut self, path: &str, v: Option<f64>, default: f64, allow_zero: bool) -> Duration {
        let v = v.unwrap_or(default);
        let ok =
            v.is_finite() && v <= MAX_SECONDS && if allow_zero { v >= 0.0 } else { v >= 0.001 };
        if ok {
            Duration::from_secs_f64(v)
        } else {
            let low = if allow_zero { "0" } else { "0.001" };
            self.add(
                path,
                format!("{v} seconds is out of range; expected {low} to {MAX_SECONDS}"),
            );
            Duration::from_secs_f64(default)
        }
    }
}

fn validate(raw: RawConfig) -> Result<Config, Vec<String>> {
    let mut p = Problems(Vec::new());

    let interval = p.seconds(
        "cluster_update_interval",
        raw.cluster_update_interval,
        3.0,
        false,
    );
    if interval < Duration::from_millis(100) {
        p.add("cluster_update_interval", "must be at least 0.1 seconds");
    }
    let (admin_listen, admin_key) = match (
        &raw.listen_address,
        raw.admin.as_ref().and_then(|a| a.listen.as_ref()),
    ) {
        (Some(_), Some(_)) => {
            p.add(
                "admin.listen",
                "listen_address gives the same; keep one of them",
            );
            (raw.listen_address.as_deref(), "listen_address")
        }
        (Some(l), None) => (Some(l.as_str()), "listen_address"),
        (None, Some(l)) => (Some(l.as_str()), "admin.listen"),
        (None, None) => (None, "listen_address"),
    };
    let listen_address = match parse_listen(admin_listen.unwrap_or(DEFAULT_ADMIN_ADDRESS)) {
        Ok(a) => a,
        Err(e) => {
            p.add(admin_key, e);
            DEFAULT_ADMIN_ADDRESS
                .parse()
                .expect("default admin address parses")
        }
    };
    let (admin_tls, admin_allow) = match raw.admin {
        Some(a) => (
            a.tls.map(|t| server_tls(&mut p, "admin.tls", t)),
            allow(&mut p, "admin.allow", a.allow),
        ),
        None => (None, Allow::default()),
    };
    let log_level = match raw
        .log_level
        .as_deref()
        .unwrap_or("info")
        .to_ascii_lowercase()
        .as_str()
    {
        "off" => LevelFilter::Off,
        "error" => LevelFilter::Error,
        "warn" | "warning" => LevelFilter::Warn,
        "info" => LevelFilter::Info,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        other => {
            p.add(
                "log_level",
                format!("unknown level {other:?}; expected off, error, warn, info, debug or trace"),
            );
            LevelFilter::Info
        }
    };
    let connect_timeout = p.seconds("connect_timeout", raw.connect_timeout, 3.0, false);
    let api_timeout = p.seconds("api_timeout", raw.api_timeout, 2.0, false);
    let shutdown_timeout = p.seconds("shutdown_timeout", raw.shutdown_timeout, 30.0, true);
    let ttl = p.seconds("topology_ttl", raw.topology_ttl, 30.0, true);
    let topology_ttl = (!ttl.is_zero()).then_some(ttl);

    let max_connections = raw.max_connections.unwrap_or(10_000);
    if !(1..=1_000_000).contains(&max_connections) {
        p.add(
            "max_connections",
            format!("{max_connections} is out of range; expected 1 to 1000000"),
        );
    }
    let buffer_size = raw.buffer_size.unwrap_or(32 * 1024);
    if !(1024..=1024 * 1024).contains(&buffer_size) {
        p.add(
            "buffer_size",
            format!("{buffer_size} bytes is out of range; expected 1024 to 1048576"),
        );
    }
    let listen_backlog = raw.listen_backlog.unwrap_or(1024);
    if !(1..=65_535).contains(&listen_backlog) {
        p.add(
            "listen_backlog",
            format!("{listen_backlog} is out of range; expected 1 to 65535"),
        );
    }
    let tcp_keepalive = keepalive(&mut p, raw.tcp_keepalive);
    let user_timeout = p.seconds("tcp_user_timeout", raw.tcp_user_timeout, 30.0, true);

    let mut clusters = Vec::new();
    for (cname, rc) in raw.clusters {
        clusters.push(cluster(&mut p, cname, rc));
    }
    check_listen_clashes(&mut p, listen_address, &clusters);
    let health = health(&mut p, raw.health, listen_address, &clusters);

    if p.0.is_empty() {
        Ok(Config {
            cluster_update_interval: interval,
            listen_address,
            admin_tls,
            admin_tls_config: None,
            admin_allow,
            log_level,
            connect_timeout,
            api_timeout,
            shutdown_timeout,
            topology_ttl,
            max_connections: max_connections as usize,
            buffer_size: buffer_size as usize,
            listen_backlog,
            tcp_keepalive,
            tcp_user_timeout: (!user_timeout.is_zero()).then_some(user_timeout),
            splice: raw.splice.unwrap_or(true),
            startup_replay: raw.startup_replay.unwrap_or(true),
            clusters,
            health,
        })
    } else {
        Err(p.0)
    }
}

/// A listener's `tls:` block, checked for meaning (the files are read by
/// [`load`]).
fn server_tls(p: &mut Problems, path: &str, t: RawServerTls) -> ServerTlsConfig {
    let tls13_only = match &t.min_version {
        None => false,
        Some(v) => {
            let text = match v {
                serde_yaml::Value::String(s) => s.clone(),
                serde_yaml::Value::Number(n) => n.to_string(),
                other => format!("{other:?}"),
            };
            match text.trim().trim_start_matches("TLSv") {
                "1.2" => false,
                "1.3" => true,
                "1" | "1.0" | "1.1" => {
                    p.add(
                        &format!("{path}.min_version"),
                        format!("TLS {text} is not offered (rustls speaks 1.2 and 1.3); expected \"1.2\" or \"1.3\""),
                    );
                    false
                }
                _ => {
                    p.add(
                        &format!("{path}.min_version"),
                        format!("{text:?}: expected \"1.2\" or \"1.3\""),
                    );
                    false
                }
            }
        }
    };
    ServerTlsConfig {
        cert: t.cert,
        key: t.key,
        tls13_only,
        ciphers: t.ciphers.unwrap_or_default(),
        client_ca: t.client_ca,
    }
}

/// An `allow:` block: networks per route class; a missing class is open.
fn allow(p: &mut Problems, path: &str, raw: Option<RawAllow>) -> Allow {
    let Some(raw) = raw else {
        return Allow::default();
    };
    let mut list = |class: &str, v: Option<Vec<String>>| {
        v.map(|nets| {
            nets.iter()
                .enumerate()
                .filter_map(|(i, n)| {
                    Network::parse(n)
                        .map_err(|e| p.add(&format!("{path}.{class}[{i}]"), e))
                        .ok()
                })
                .collect()
        })
    };
    Allow {
        read: list("read", raw.read),
        action: list("action", raw.action),
    }
}

fn keepalive(p: &mut Problems, raw: Option<RawKeepalive>) -> Option<Keepalive> {
    let raw = raw.unwrap_or(RawKeepalive {
        enabled: None,
        idle: None,
        interval: None,
        count: None,
    });
    let mut field = |name: &str, v: Option<u32>, default: u32, max: u32| {
        let v = v.unwrap_or(default);
        if !(1..=max).contains(&v) {
            p.add(
                &format!("tcp_keepalive.{name}"),
                format!("{v} is out of range; expected 1 to {max}"),
            );
        }
        v
    };
    let ka = Keepalive {
        idle_secs: field("idle", raw.idle, 60, 32_767),
        interval_secs: field("interval", raw.interval, 10, 32_767),
        count: field("count", raw.count, 6, 127),
    };
    raw.enabled.unwrap_or(true).then_some(ka)
}

fn cluster(p: &mut Problems, name: String, rc: RawCluster) -> ClusterConfig {
    let path = format!("clusters.{name}");
    if rc.hosts.is_empty() {
        p.add(
            &format!("{path}.hosts"),
            "is empty; list at least one Patroni REST API URL",
        );
    }
    let mut hosts: Vec<String> = Vec::new();
    for (i, h) in rc.hosts.iter().enumerate() {
        let hp = format!("{path}.hosts[{i}]");
        match check_api_url(h) {
            Ok(url) => {
                if hosts.iter().any(|o| o.eq_ignore_ascii_case(&url)) {
                    p.add(&hp, format!("{h:?} is listed twice"));
                } else {
                    hosts.push(url);
                }
            }
            Err(e) => p.add(&hp, e),
        }
    }
    if rc.ports.is_empty() {
        p.add(
            &format!("{path}.ports"),
            "is empty; define at least one port",
        );
    }
    let mut ports = Vec::new();
    for (pname, rp) in rc.ports {
        let pp = format!("{path}.ports.{pname}");
        let listen = match parse_listen(&rp.listen) {
            Ok(a) => a,
            Err(e) => {
                p.add(&format!("{pp}.listen"), e);
                continue;
            }
        };
        if rp.roles.is_empty() {
            p.add(
                &format!("{pp}.roles"),
                "is empty; expected one or more of leader, sync, async, any",
            );
        }
        let roles = role_list(p, &format!("{pp}.roles"), &rp.roles);
        let policy = port_policy(p, &pp, &rp, &roles);
        if let Some(n) = rp.max_waiting.filter(|n| *n > 1_000_000) {
            p.add(
                &format!("{pp}.max_waiting"),
                format!("{n} is out of range; expected 0 to 1000000"),
            );
        }
        if rp.host_port == Some(0) {
            p.add(
                &format!("{pp}.host_port"),
                "0 is not a usable port; omit the key to use each member's own port",
            );
        }
        let wait_path = format!("{pp}.backend_wait_timeout");
        let backend_wait_timeout = p.seconds(&wait_path, rp.backend_wait_timeout, 10.0, true);
        let preconnect = rp.preconnect.unwrap_or(0);
        if preconnect > MAX_PRECONNECT as u64 {
            p.add(
                &format!("{pp}.preconnect"),
                format!("{preconnect} is out of range; expected 0 to {MAX_PRECONNECT}"),
            );
        }
        let age_path = format!("{pp}.preconnect_max_age");
        let preconnect_max_age = p.seconds(&age_path, rp.preconnect_max_age, 20.0, false);
        ports.push(PortConfig {
            name: pname,
            listen,
            roles,
            host_port: rp.host_port,
            max_lag_in_bytes: rp.max_lag_in_bytes,
            backend_wait_timeout,
            policy,
            max_waiting: rp.max_waiting.map(|n| n as usize),
            preconnect: preconnect.min(MAX_PRECONNECT as u64) as usize,
            preconnect_max_age,
        });
    }
    let tls = rc.tls.map(|t| {
        let tp = format!("{path}.tls");
        if t.skip_verify == Some(true) && t.verify_hostname == Some(false) {
            p.add(
                &format!("{tp}.verify_hostname"),
                "has no effect with skip_verify: true; remove one of them",
            );
        }
        for (key, v) in [
            ("ca_cert", &t.ca_cert),
            ("ca_dir", &t.ca_dir),
            ("client_cert", &t.client_cert),
            ("client_key", &t.client_key),
            ("password_file", &t.password_file),
        ] {
            if v.as_ref().is_some_and(|f| f.as_os_str().is_empty()) {
                p.add(
                    &format!("{tp}.{key}"),
                    "is empty; give a path or omit the key",
                );
            }
        }
        ClientTlsConfig {
            ca_cert: t.ca_cert,
            ca_dir: t.ca_dir,
            client_cert: t.client_cert,
            client_key: t.client_key,
            skip_verify: t.skip_verify.unwrap_or(false),
            verify_hostname: t.verify_hostname.unwrap_or(true),
            username: t.username,
            password_file: t.password_file,
        }
    });
    ClusterConfig {
        name,
        hosts,
        ports,
        tls,
        tls_material: None,
    }
}

/// Role names at `path`, each checked; duplicates are errors.
fn role_list(p: &mut Problems, path: &str, names: &[String]) -> Vec<PortRole> {
    let mut roles = Vec::new();
    for (i, r) in names.iter().enumerate() {
        match PortRole::parse(r) {
            Some(role) if roles.contains(&role) => p.add(
                &format!("{path}[{i}]"),
                format!("role {r:?} is listed twice"),
            ),
            Some(role) => roles.push(role),
            None => p.add(
                &format!("{path}[{i}]"),
                format!("unknown role {r:?}; expected leader, sync, async, any or standby_leader"),
            ),
        }
    }
    roles
}

/// The lag, preference and fallback keys of the port at `pp`.
fn port_policy(p: &mut Problems, pp: &str, rp: &RawPort, roles: &[PortRole]) -> PortPolicy {
    let lag_only = [
        (
            "max_lag_in_bytes_close",
            rp.max_lag_in_bytes_close.is_some(),
        ),
        ("lag_grace", rp.lag_grace.is_some()),
        ("lag_return_percent", rp.lag_return_percent.is_some()),
        ("lag_return_polls", rp.lag_return_polls.is_some()),
    ];
    let lag = match rp.max_lag_in_bytes {
        None => {
            for (key, _) in lag_only.iter().filter(|(_, set)| *set) {
                p.add(&format!("{pp}.{key}"), "needs max_lag_in_bytes on the port");
            }
            None
        }
        Some(max) => {
            if let Some(c) = rp.max_lag_in_bytes_close.filter(|c| *c < max) {
                p.add(
                    &format!("{pp}.max_lag_in_bytes_close"),
                    format!("{c} is under max_lag_in_bytes ({max})"),
                );
            }
            let grace = p.seconds(&format!("{pp}.lag_grace"), rp.lag_grace, 0.0, true);
            let mut ranged = |key: &str, v: Option<u64>, default: u64, lo: u64, hi: u64| {
                let v = v.unwrap_or(default);
                if !(lo..=hi).contains(&v) {
                    p.add(
                        &format!("{pp}.{key}"),
                        format!("{v} is out of range; expected {lo} to {hi}"),
                    );
                }
                v.clamp(lo, hi)
            };
            let percent = ranged(
                "lag_return_percent",
                rp.lag_return_percent,
                policy::DEFAULT_RETURN_PERCENT.into(),
                0,
                100,
            );
            let polls = ranged(
                "lag_return_polls",
                rp.lag_return_polls,
                policy::DEFAULT_RETURN_POLLS.into(),
                1,
                1000,
            );
            Some(LagRules::new(
                max,
                rp.max_lag_in_bytes_close,
                grace,
                percent as u8,
                polls as u32,
            ))
        }
    };
    let prefer = role_list(
        p,
        &format!("{pp}.prefer"),
        rp.prefer.as_deref().unwrap_or_default(),
    );
    for (i, r) in prefer.iter().enumerate() {
        if !roles.contains(r) && !roles.contains(&PortRole::Any) {
            p.add(
                &format!("{pp}.prefer[{i}]"),
                format!("{} is not one of the port's roles", r.as_str()),
            );
        }
    }
    let fallback = role_list(
        p,
        &format!("{pp}.fallback"),
        rp.fallback.as_deref().unwrap_or_default(),
    );
    for (i, r) in fallback.iter().enumerate() {
        if roles.contains(r) || roles.contains(&PortRole::Any) {
            p.add(
                &format!("{pp}.fallback[{i}]"),
                format!("{} is already served by the port's roles", r.as_str()),
            );
        }
    }
    let fallback_return = match rp
        .fallback_return
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("keep") => FallbackReturn::Keep,
        Some("close") => FallbackReturn::Close,
        Some(other) => {
            p.add(
                &format!("{pp}.fallback_return"),
                format!("unknown value {other:?}; expected keep or close"),
            );
            FallbackReturn::Keep
        }
    };
    if rp.fallback_return.is_some() && fallback.is_empty() {
        p.add(
            &format!("{pp}.fallback_return"),
            "needs fallback on the port",
        );
    }
    PortPolicy {
        lag,
        prefer,
        fallback,
        fallback_return,
    }
}

/// Accepts `http://host[:port][/path]` or `https://…`, returns it without a
/// trailing slash.
fn check_api_url(url: &str) -> Result<String, String> {
    let trimmed = url.trim();
    let lower = trimmed.to_ascii_lowercase();
    let rest = if let Some(r) = lower.strip_prefix("http://") {
        r
    } else if let Some(r) = lower.strip_prefix("https://") {
        r
    } else {
        return Err(format!(
            "{:?} is not an http:// or https:// URL",
            config_guard::redact(url)
        ));
    };
    let shown = config_guard::redact(trimmed);
    let authority = rest.split('/').next().unwrap_or("");
    config_guard::check_authority(authority, &shown)?;
    if rest.contains(['?', '#', ' ']) {
        return Err(format!(
            "{shown:?} must not contain a query, fragment or spaces"
        ));
    }
    Ok(trimmed.trim_end_matches('/').to_string())
}

/// A listening address must be a literal `ip:port` (no DNS at start-up).
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an ip:port address (IPv6 as [::1]:6432)"))?;
    if addr.port() == 0 {
        return Err(format!("{s:?} has port 0; give a fixed port"));
    }
    Ok(addr)
}

/// Two addresses clash when they share a port and either is the same IP or
/// one of them is a wildcard (the kernel refuses the second bind). An
/// IPv4-mapped IPv6 address (`[::ffff:127.0.0.1]`) is the IPv4 address.
pub fn addresses_clash(a: SocketAddr, b: SocketAddr) -> bool {
    let (ia, ib) = (a.ip().to_canonical(), b.ip().to_canonical());
    a.port() == b.port() && (ia == ib || ia.is_unspecified() || ib.is_unspecified())
}

/// Most ports one file may define: what the poll's token range for
/// listeners holds (`proxy::token` asserts it at compile time).
pub const MAX_PORTS: usize = 65_520;

/// Most pre-connected sockets a port keeps per member (`preconnect`).
pub const MAX_PRECONNECT: usize = 64;

/// Every listening address against every other, in linear time: by exact
/// (canonical) address, by port for wildcards.
fn check_listen_clashes(p: &mut Problems, admin: SocketAddr, clusters: &[ClusterConfig]) {
    use std::collections::HashMap;
    let count: usize = clusters.iter().map(|c| c.ports.len()).sum();
    if count > MAX_PORTS {
        p.add(
            "clusters",
            format!("{count} ports are defined; at most {MAX_PORTS} can listen"),
        );
    }
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    // The first path seen per exact address, per port, and per wildcard port.
    let mut exact: HashMap<SocketAddr, String> = HashMap::new();
    let mut by_port: HashMap<u16, String> = HashMap::new();
    let mut wildcard: HashMap<u16, String> = HashMap::new();
    let mut add = |p: &mut Problems, path: String, written: SocketAddr| {
        let addr = canonical(written);
        let other = exact
            .get(&addr)
            .or_else(|| wildcard.get(&addr.port()))
            .or_else(|| {
                addr.ip()
                    .is_unspecified()
                    .then(|| by_port.get(&addr.port()))
                    .flatten()
            });
        if let Some(other) = other {
            p.add(&path, format!("{written} clashes with {other}"));
        }
        exact.entry(addr).or_insert_with(|| path.clone());
        by_port.entry(addr.port()).or_insert_with(|| path.clone());
        if addr.ip().is_unspecified() {
            wildcard.entry(addr.port()).or_insert(path);
        }
    };
    add(p, "listen_address".to_string(), admin);
    for c in clusters {
        for port in &c.ports {
            let path = format!("clusters.{}.ports.{}.listen", c.name, port.name);
            add(p, path, port.listen);
        }
    }
}

/// The `health:` section: addresses that clash with nothing else, and a
/// `member` of the form `cluster/member` naming a configured cluster.
fn health(
    p: &mut Problems,
    raw: Option<RawHealth>,
    admin: SocketAddr,
    clusters: &[ClusterConfig],
) -> HealthConfig {
    let Some(raw) = raw else {
        return HealthConfig::default();
    };
    let mut taken: Vec<(String, SocketAddr)> = vec![("listen_address".into(), admin)];
    for c in clusters {
        for port in &c.ports {
            taken.push((
                format!("clusters.{}.ports.{}.listen", c.name, port.name),
                port.listen,
            ));
        }
    }
    let mut addr = |key: &str, v: Option<String>| {
        let path = format!("health.{key}");
        let a = match parse_listen(v.as_deref()?) {
            Ok(a) => a,
            Err(e) => {
                p.add(&path, e);
                return None;
            }
        };
        if let Some((other, _)) = taken.iter().find(|(_, t)| addresses_clash(*t, a)) {
            p.add(&path, format!("{a} clashes with {other}"));
        }
        taken.push((path, a));
        Some(a)
    };
    let listen = addr("listen", raw.listen);
    let agent_listen = addr("agent_listen", raw.agent_listen);
    let member = raw.member.and_then(|m| match m.split_once('/') {
        Some((c, n)) if !n.is_empty() && clusters.iter().any(|cl| cl.name == c) => {
            Some((c.to_string(), n.to_string()))
        }
        Some((c, n)) if !n.is_empty() => {
            p.add("health.member", format!("no cluster {c:?} is configured"));
            None
        }
        _ => {
            p.add("health.member", format!("{m:?} is not <cluster>/<member>"));
            None
        }
    });
    let tls = raw.tls.map(|t| server_tls(p, "health.tls", t));
    if raw.allow.as_ref().is_some_and(|a| a.action.is_some()) {
        p.add(
            "health.allow.action",
            "the health listener serves only read routes; use health.allow.read",
        );
    }
    let allow = allow(p, "health.allow", raw.allow);
    if tls.is_some() && listen.is_none() {
        p.add("health.tls", "needs health.listen");
    }
    HealthConfig {
        listen,
        agent_listen,
        member,
        tls,
        tls_config: None,
        allow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_section() {
        let base = "clusters:\n  main:\n    hosts: [\"http://127.0.0.1:8008\"]\n    ports:\n      rw: {listen: \"127.0.0.1:5432\", roles: [leader]}\n";
        let c = parse(base).unwrap();
        assert_eq!(c.health, HealthConfig::default());
        let c = parse(&format!(
            "{base}health: {{listen: \"0.0.0.0:8010\", agent_listen: \"127.0.0.1:8011\", member: main/node1}}\n"
        ))
        .unwrap();
        assert_eq!(c.health.listen, Some("0.0.0.0:8010".parse().unwrap()));
        assert_eq!(
            c.health.agent_listen,
            Some("127.0.0.1:8011".parse().unwrap())
        );
        assert_eq!(c.health.member, Some(("main".into(), "node1".into())));
        let e = errors(&format!(
            "{base}health: {{listen: \"0.0.0.0:5432\", agent_listen: nope, member: other/x}}\n"
        ));
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0]
            .starts_with("health.listen: 0.0.0.0:5432 clashes with clusters.main.ports.rw.listen"));
        assert!(e[1].starts_with("health.agent_listen: "));
        assert_eq!(e[2], "health.member: no cluster \"other\" is configured");
        assert!(
            errors(&format!("{base}health: {{member: x}}\n"))[0].contains("not <cluster>/<member>")
        );
        assert!(
            errors(&format!("{base}health: {{lissen: x}}\n"))[0].contains("unknown field `lissen`")
        );
    }

    /// The older patroni_proxy's format; also used by the CLI test.
    const OLD_FORMAT: &str = include_str!("../tests/fixtures/patroni_proxy.yaml");

    fn errors(yaml: &str) -> Vec<String> {
        parse(yaml).expect_err("config should be rejected")
    }

    #[test]
    fn old_patroni_proxy_format_loads_unchanged() {
        let c = parse(OLD_FORMAT).unwrap();
        assert_eq!(c.cluster_update_interval, Duration::from_secs(3));
        assert_eq!(c.listen_address, "127.0.0.1:8009".parse().unwrap());
        let cl = &c.clusters[0];
        assert_eq!(cl.name, "my_cluster");
        assert_eq!(
            cl.hosts,
            ["http://192.168.1.1:8008", "http://192.168.1.2:8008"]
        );
        let master = &cl.ports[0];
        assert_eq!(master.name, "master");
        assert_eq!(master.roles, [PortRole::Leader]);
        assert_eq!(master.host_port, Some(5432));
        let replicas = &cl.ports[1];
        assert_eq!(replicas.roles, [PortRole::Sync, PortRole::Async]);
        assert_eq!(replicas.max_lag_in_bytes, Some(16_777_216));
    }

    #[test]
    fn old_format_tls_block_parses_unchanged() {
        let c = parse(include_str!("../tests/fixtures/patroni_proxy_tls.yaml")).unwrap();
        let t = c.clusters[0].tls.as_ref().unwrap();
        assert_eq!(
            t.ca_cert.as_deref(),
            Some(Path::new("/etc/patroni-proxy/ca.pem"))
        );
        assert_eq!(
            t.client_key.as_deref(),
            Some(Path::new("/etc/patroni-proxy/client.key"))
        );
        assert!(!t.skip_verify);
        assert!(t.verify_hostname, "verification is on by default");
        assert!(c.clusters[0].tls_material.is_none(), "parse reads no file");
        let e = errors("clusters:\n  a:\n    hosts: [\"https://x\"]\n    tls: {skip_verify: true, verify_hostname: false}\n    ports:\n      p: {listen: \"127.0.0.1:1\", roles: [leader]}\n");
        assert_eq!(
            e,
            ["clusters.a.tls.verify_hostname: has no effect with skip_verify: true; remove one of them"]
        );
    }

    #[test]
    fn admin_block_gives_listen_tls_and_allow() {
        let c = parse(
            "admin:\n  listen: 127.0.0.1:9000\n  tls: {cert: /c.pem, min_version: 1.3, ciphers: [TLS_AES_128_GCM_SHA256]}\n  allow: {action: [127.0.0.0/8, \"::1\"]}\nclusters: {}\n",
        )
        .unwrap();
        assert_eq!(c.listen_address, "127.0.0.1:9000".parse().unwrap());
        let t = c.admin_tls.unwrap();
        assert!(t.tls13_only);
        assert_eq!(t.ciphers, ["TLS_AES_128_GCM_SHA256"]);
        assert!(c.admin_allow.read.is_none());
        assert_eq!(c.admin_allow.action.as_ref().unwrap().len(), 2);
        let e = errors(
            "listen_address: 127.0.0.1:1\nadmin:\n  listen: 127.0.0.1:2\n  tls: {cert: /c, min_version: \"1.1\"}\n  allow: {read: [10.0.0.1/8]}\nclusters: {}\n",
        );
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].starts_with("admin.listen: listen_address gives the same"));
        assert!(e[1].starts_with("admin.tls.min_version: TLS 1.1 is not offered"));
        assert!(e[2].starts_with("admin.allow.read[0]: \"10.0.0.1/8\" has host bits set"));
    }

    #[test]
    fn defaults_are_filled_in() {
        let c = parse("clusters: {}").unwrap();
        assert_eq!(c.listen_address, DEFAULT_ADMIN_ADDRESS.parse().unwrap());
        assert_eq!(c.cluster_update_interval, Duration::from_secs(3));
        assert_eq!(c.connect_timeout, Duration::from_secs(3));
        assert_eq!(c.api_timeout, Duration::from_secs(2));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.topology_ttl, Some(Duration::from_secs(30)));
        assert_eq!(c.max_connections, 10_000);
        assert_eq!(c.log_level, LevelFilter::Info);
        assert_eq!(
            c.tcp_keepalive,
            Some(Keepalive {
                idle_secs: 60,
                interval_secs: 10,
                count: 6
            })
        );
    }

    #[test]
    fn host_port_is_optional_and_wait_has_a_default() {
        let c = parse(
            "clusters:\n  c:\n    hosts: [\"http://127.0.0.1:8008/\"]\n    ports:\n      rw: {listen: \"127.0.0.1:7000\", roles: [leader]}\n",
        )
        .unwrap();
        let port = &c.clusters[0].ports[0];
        assert_eq!(port.host_port, None);
        assert_eq!(port.backend_wait_timeout, Duration::from_secs(10));
        assert_eq!(
            c.clusters[0].hosts,
            ["http://127.0.0.1:8008"],
            "trailing slash trimmed"
        );
    }

    #[test]
    fn unknown_role_names_the_key_path() {
        let e = errors(
            "clusters:\n  main:\n    hosts: [\"http://a:8008\"]\n    ports:\n      rw: {listen: \"127.0.0.1:6432\", roles: [leeder]}\n",
        );
        assert_eq!(
            e,
            [
                r#"clusters.main.ports.rw.roles[0]: unknown role "leeder"; expected leader, sync, async, any or standby_leader"#
            ]
        );
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let e = errors("clusters: {}\nfoo: 1\n");
        assert!(e[0].contains("unknown field `foo`"), "{e:?}");
        let e = errors(
            "clusters:\n  main:\n    hosts: [\"http://a:8008\"]\n    ports:\n      rw: {listn: \"127.0.0.1:6432\", roles: [leader]}\n",
        );
        assert!(
            e[0].starts_with("clusters.main.ports.rw: unknown field `listn`"),
            "{e:?}"
        );
    }

    #[test]
    fn wildcard_listen_clashes_with_specific_address() {
        let e = errors(
            "clusters:\n  a:\n    hosts: [\"http://a:8008\"]\n    ports:\n      p1: {listen: \"0.0.0.0:6432\", roles: [leader]}\n  b:\n    hosts: [\"http://b:8008\"]\n    ports:\n      p2: {listen: \"127.0.0.1:6432\", roles: [leader]}\n",
        );
        assert_eq!(e, ["clusters.b.ports.p2.listen: 127.0.0.1:6432 clashes with clusters.a.ports.p1.listen"]);
    }

    #[test]
    fn listen_clashing_with_admin_address_is_rejected() {
        let e = errors(
            "listen_address: 127.0.0.1:7000\nclusters:\n  a:\n    hosts: [\"http://a:8008\"]\n    ports:\n      p: {listen: \"[::]:7000\", roles: [any]}\n",
        );
        assert_eq!(
            e,
            ["clusters.a.ports.p.listen: [::]:7000 clashes with listen_address"]
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let e = errors(
            "cluster_update_interval: 0\nmax_connections: 0\nclusters:\n  a:\n    hosts: []\n    ports:\n      p: {listen: \"localhost:1\", roles: []}\n  b:\n    hosts: [\"ftp://x\", \"http://\"]\n    ports: {}\n",
        );
        let want = [
            "cluster_update_interval: 0 seconds is out of range",
            "max_connections: 0 is out of range",
            "clusters.a.hosts: is empty",
            "clusters.a.ports.p.listen: \"localhost:1\" is not an ip:port",
            "clusters.b.hosts[0]: \"ftp://x\" is not an http:// or https:// URL",
            "clusters.b.hosts[1]: \"http://\" has no host",
            "clusters.b.ports: is empty",
        ];
        for w in want {
            assert!(
                e.iter().any(|m| m.starts_with(w)),
                "missing {w:?} in {e:#?}"
            );
        }
    }

    #[test]
    fn absurd_durations_are_rejected() {
        for key in [
            "cluster_update_interval: 100000",
            "connect_timeout: -1",
            "api_timeout: .nan",
        ] {
            let e = errors(&format!("{key}\nclusters: {{}}\n"));
            assert!(e[0].contains("out of range"), "{key}: {e:?}");
        }
        let e = errors("cluster_update_interval: 0.01\nclusters: {}\n");
        assert_eq!(e, ["cluster_update_interval: must be at least 0.1 seconds"]);
    }

    #[test]
    fn duplicate_hosts_and_roles_are_rejected() {
        let e = errors(
            "clusters:\n  a:\n    hosts: [\"http://x:8008\", \"HTTP://X:8008/\"]\n    ports:\n      p: {listen: \"127.0.0.1:1\", roles: [sync, sync]}\n",
        );
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].starts_with("clusters.a.hosts[1]"));
        assert!(e[1].starts_with("clusters.a.ports.p.roles[1]: role \"sync\" is listed twice"));
    }

    #[test]
    fn keepalive_can_be_disabled_or_tuned() {
        let c = parse("tcp_keepalive: {enabled: false}\nclusters: {}").unwrap();
        assert_eq!(c.tcp_keepalive, None);
        let c = parse("tcp_keepalive: {idle: 5, interval: 2, count: 3}\nclusters: {}").unwrap();
        assert_eq!(
            c.tcp_keepalive,
            Some(Keepalive {
                idle_secs: 5,
                interval_secs: 2,
                count: 3
            })
        );
        let e = errors("tcp_keepalive: {idle: 0}\nclusters: {}");
        assert_eq!(
            e,
            ["tcp_keepalive.idle: 0 is out of range; expected 1 to 32767"]
        );
    }

    #[test]
    fn ttl_zero_disables_staleness() {
        assert_eq!(
            parse("topology_ttl: 0\nclusters: {}").unwrap().topology_ttl,
            None
        );
    }

    fn port(keys: &str) -> String {
        format!("clusters:\n  c:\n    hosts: [\"http://x\"]\n    ports:\n      p: {{listen: \"127.0.0.1:1\", {keys}}}\n")
    }

    #[test]
    fn routing_policy_defaults_keep_old_configs_meaning() {
        let c = parse(OLD_FORMAT).unwrap();
        assert_eq!(c.clusters[0].ports[0].policy, PortPolicy::default());
        let lag = c.clusters[0].ports[1].policy.lag.unwrap();
        assert_eq!(lag.max, 16_777_216);
        assert_eq!(
            lag.grace,
            Duration::ZERO,
            "sessions closed at once, as before"
        );
        assert_eq!(lag.close_max, None);
        assert_eq!(lag.return_mark, 13_421_772, "80 % of the limit");
        assert_eq!(lag.return_polls, 3);
    }

    #[test]
    fn user_timeout_and_max_waiting() {
        let c = parse("clusters: {}").unwrap();
        assert_eq!(c.tcp_user_timeout, Some(Duration::from_secs(30)));
        let c = parse("tcp_user_timeout: 0\nclusters: {}").unwrap();
        assert_eq!(c.tcp_user_timeout, None);
        let c = parse(&port("roles: [leader], max_waiting: 5")).unwrap();
        assert_eq!(c.clusters[0].ports[0].max_waiting, Some(5));
        assert_eq!(
            parse(&port("roles: [leader]")).unwrap().clusters[0].ports[0].max_waiting,
            None
        );
        let e = errors(&port("roles: [leader], max_waiting: 2000000"));
        assert_eq!(
            e,
            ["clusters.c.ports.p.max_waiting: 2000000 is out of range; expected 0 to 1000000"]
        );
    }

    #[test]
    fn preconnect_keys_load_and_are_bounded() {
        let c = parse(&port("roles: [leader]")).unwrap();
        let p = &c.clusters[0].ports[0];
        assert_eq!(
            (p.preconnect, p.preconnect_max_age),
            (0, Duration::from_secs(20))
        );
        let c = parse(&port(
            "roles: [leader], preconnect: 64, preconnect_max_age: 1.5",
        ))
        .unwrap();
        let p = &c.clusters[0].ports[0];
        assert_eq!(
            (p.preconnect, p.preconnect_max_age),
            (64, Duration::from_millis(1500))
        );
        assert_eq!(
            errors(&port("roles: [leader], preconnect: 65, preconnect_max_age: 0")),
            [
                "clusters.c.ports.p.preconnect: 65 is out of range; expected 0 to 64",
                "clusters.c.ports.p.preconnect_max_age: 0 seconds is out of range; expected 0.001 to 86400"
            ]
        );
    }

    #[test]
    fn routing_policy_keys_load() {
        let c = parse(&port(
            "roles: [sync, async], max_lag_in_bytes: 1000, max_lag_in_bytes_close: 5000, lag_grace: 30, lag_return_percent: 50, lag_return_polls: 2, prefer: [sync], fallback: [leader], fallback_return: close",
        ))
        .unwrap();
        let pol = &c.clusters[0].ports[0].policy;
        assert_eq!(
            pol.lag,
            Some(LagRules::new(
                1000,
                Some(5000),
                Duration::from_secs(30),
                50,
                2
            ))
        );
        assert_eq!(pol.prefer, [PortRole::Sync]);
        assert_eq!(pol.fallback, [PortRole::Leader]);
        assert_eq!(pol.fallback_return, FallbackReturn::Close);
    }

    #[test]
    fn routing_policy_problems_name_their_keys() {
        let e = errors(&port(
            "roles: [async], lag_grace: 5, lag_return_polls: 2, prefer: [sync], fallback: [async, lead], fallback_return: close",
        ));
        let p = "clusters.c.ports.p";
        assert_eq!(
            e,
            [
                format!("{p}.lag_grace: needs max_lag_in_bytes on the port"),
                format!("{p}.lag_return_polls: needs max_lag_in_bytes on the port"),
                format!("{p}.prefer[0]: sync is not one of the port's roles"),
                format!("{p}.fallback[1]: unknown role \"lead\"; expected leader, sync, async, any or standby_leader"),
                format!("{p}.fallback[0]: async is already served by the port's roles"),
            ]
        );
        let e = errors(&port(
            "roles: [any], max_lag_in_bytes: 1000, max_lag_in_bytes_close: 999, lag_grace: -1, lag_return_percent: 101, lag_return_polls: 0, fallback: [leader], fallback_return: later",
        ));
        assert_eq!(
            e,
            [
                format!("{p}.max_lag_in_bytes_close: 999 is under max_lag_in_bytes (1000)"),
                format!("{p}.lag_grace: -1 seconds is out of range; expected 0 to 86400"),
                format!("{p}.lag_return_percent: 101 is out of range; expected 0 to 100"),
                format!("{p}.lag_return_polls: 0 is out of range; expected 1 to 1000"),
                format!("{p}.fallback[0]: leader is already served by the port's roles"),
                format!("{p}.fallback_return: unknown value \"later\"; expected keep or close"),
            ]
        );
        let e = errors(&port("roles: [leader], fallback_return: keep"));
        assert_eq!(
            e,
            [format!("{p}.fallback_return: needs fallback on the port")]
        );
    }

    #[test]
    fn structural_errors_carry_their_path() {
        let e = errors("clusters:\n  a:\n    hosts: [\"http://x\"]\n    ports:\n      p: {listen: \"127.0.0.1:1\", roles: [leader], host_port: 70000}\n");
        assert!(
            e[0].starts_with("clusters.a.ports.p.host_port: invalid value"),
            "{e:?}"
        );
        assert!(!errors("clusters: [").is_empty());
        assert!(!errors("").is_empty(), "an empty file lacks `clusters`");
    }

    const ONE_PORT: &str = "    hosts: [\"http://a:8008\"]\n    ports:\n      p: {listen: \"127.0.0.1:7000\", roles: [leader]}\n";

    #[test]
    fn a_port_or_cluster_written_twice_is_rejected_with_its_path() {
        let e = errors(
            "clusters:\n  main:\n    hosts: [\"http://a:8008\"]\n    ports:\n      rw: {listen: \"127.0.0.1:7000\", roles: [leader]}\n      rw: {listen: \"127.0.0.1:7001\", roles: [leader]}\n",
        );
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("clusters.main.ports: duplicate entry with key \"rw\""),
            "{e:?}"
        );
        let e = errors(&format!(
            "clusters:\n  main:\n{ONE_PORT}  main:\n{ONE_PORT}"
        ));
        assert!(
            e[0].starts_with("clusters: duplicate entry with key \"main\""),
            "{e:?}"
        );
        // Inside a struct too (serde's own words, also with the path).
        let e = errors("tcp_keepalive: {idle: 5, idle: 6}\nclusters: {}\n");
        assert!(e[0].starts_with("tcp_keepalive: duplicate entry"), "{e:?}");
    }

    #[test]
    fn credentials_in_api_urls_are_rejected_and_never_shown() {
        let e = errors(
            "clusters:\n  a:\n    hosts: [\"http://admin:s3cret@h:8008\"]\n    ports:\n      p: {listen: \"127.0.0.1:1\", roles: [leader]}\n",
        );
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("tls.username and tls.password_file"), "{e:?}");
        assert!(e[0].contains("http://***@h:8008"), "{e:?}");
        // Structural errors quote values; the password is masked there too.
        let e = errors("clusters:\n  a:\n    hosts: \"http://admin:s3cret@h\"\n    ports: {}\n");
        assert!(!e.iter().any(|m| m.contains("s3cret")), "{e:?}");
        let e = errors("clusters: {a: {hosts: [\"http://u:s3/cret@h\"], ports: {}}}");
        assert!(e[0].contains("carries credentials"), "{e:?}");
        assert!(!e.iter().any(|m| m.contains("s3")), "{e:?}");
        assert!(
            !errors("clusters: {a: {hosts: [\"ftp://u:s3cret@h\"], ports: {}}}")
                .iter()
                .any(|m| m.contains("s3cret"))
        );
    }

    #[test]
    fn a_host_url_port_out_of_range_is_rejected() {
        let e = errors(
            "clusters:\n  a:\n    hosts: [\"http://h:99999\"]\n    ports:\n      p: {listen: \"127.0.0.1:1\", roles: [leader]}\n",
        );
        assert_eq!(
            e,
            ["clusters.a.hosts[0]: \"http://h:99999\" has port \"99999\"; expected a number from 1 to 65535"]
        );
    }

    #[test]
    fn an_ipv4_mapped_address_clashes_with_the_ipv4_address() {
        let e = errors(
            "clusters:\n  a:\n    hosts: [\"http://a:8008\"]\n    ports:\n      p1: {listen: \"127.0.0.1:6432\", roles: [leader]}\n      p2: {listen: \"[::ffff:127.0.0.1]:6432\", roles: [any]}\n",
        );
        assert_eq!(
            e,
            ["clusters.a.ports.p2.listen: [::ffff:127.0.0.1]:6432 clashes with clusters.a.ports.p1.listen"]
        );
        let e = errors(
            "listen_address: \"[::ffff:127.0.0.1]:7000\"\nclusters:\n  a:\n    hosts: [\"http://a:8008\"]\n    ports:\n      p: {listen: \"127.0.0.1:7000\", roles: [any]}\n",
        );
        assert_eq!(
            e,
            ["clusters.a.ports.p.listen: 127.0.0.1:7000 clashes with listen_address"]
        );
    }

    /// A 1 MiB file cannot hold this many ports; the check stands should
    /// the size cap ever be raised.
    #[test]
    fn more_ports_than_the_listener_limit_are_rejected() {
        let ports = (0..=MAX_PORTS)
            .map(|i| PortConfig {
                name: format!("p{i}"),
                listen: SocketAddr::from((
                    [127, 0, 1, (i / 60_000) as u8],
                    1 + (i % 60_000) as u16,
                )),
                roles: vec![PortRole::Any],
                host_port: None,
                max_lag_in_bytes: None,
                backend_wait_timeout: Duration::ZERO,
                policy: PortPolicy::default(),
                max_waiting: None,
                preconnect: 0,
                preconnect_max_age: Duration::from_secs(20),
            })
            .collect();
        let clusters = [ClusterConfig {
            name: "a".into(),
            hosts: vec!["http://a:8008".into()],
            ports,
            tls: None,
            tls_material: None,
        }];
        let mut p = Problems(Vec::new());
        let started = std::time::Instant::now();
        check_listen_clashes(&mut p, DEFAULT_ADMIN_ADDRESS.parse().unwrap(), &clusters);
        assert_eq!(
            p.0,
            [format!(
                "clusters: {} ports are defined; at most {MAX_PORTS} can listen",
                MAX_PORTS + 1
            )]
        );
        // 65,521 listen addresses against each other, in linear time.
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}

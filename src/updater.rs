//! One blocking thread per cluster that polls Patroni's `GET /cluster`.
//!
//! The thread owns everything that may block: HTTP (ureq, with explicit
//! timeouts and no proxy taken from the environment) and DNS resolution of
//! member hosts (through [`crate::dns`]: in parallel, at most `api_timeout`
//! per poll, so unresolvable names cannot make polls go stale). It sends each poll's outcome to the event loop as an
//! [`Update`] and then calls the loop's wake function (send, then wake: the
//! loop drains the channel on every wake-up, and wake-ups coalesce).
//!
//! Polling rhythm: every `interval`, measured from the start of one poll to
//! the start of the next; every [`FAST_POLL`] while the cluster has no leader
//! and for [`FAST_WINDOW`] after any change, so a failover or switchover is
//! seen within a fraction of a second of Patroni showing it. A
//! [`UpdaterCommand::RefreshNow`] polls at once.
//!
//! Hosts are tried in configuration order until one answers with a usable
//! body; a host that failed is tried after the others for [`HOST_PENALTY`],
//! so a hung first host does not cost a timeout on every poll.
//!
//! With a health listener configured ([`Settings::read_config`]), the
//! thread also reads `GET /config` for `maximum_lag_on_failover` (what
//! `/readiness` without `lag=` compares with): from the host that just
//! answered `/cluster`, after that poll's update went, on the first good
//! poll and then every [`CONFIG_INTERVAL`]. The value travels in the
//! topology of the next poll, which follows at once when it changed.
//!
//! HTTPS: ureq with rustls (ring), the roots always given explicitly from
//! the cluster's [`ClientMaterial`]; hosts with `verify_hostname: false`
//! go through [`crate::https`] instead, as ureq cannot take a verifier of
//! our own. A TLS failure is logged once per host and cause (not on every
//! poll) and counted (`Update::tls_failures`).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::dns;
use crate::health::{self, DEFAULT_MAXIMUM_LAG_ON_FAILOVER};
use crate::https;
use crate::logging::debug;
use crate::patroni;
use crate::tls::{self, ClientMaterial};
use crate::topology::{self, Topology};

/// Poll period while the cluster has no leader or just changed.
pub const FAST_POLL: Duration = Duration::from_millis(250);
/// How long to keep polling fast after a change.
pub const FAST_WINDOW: Duration = Duration::from_secs(5);
/// How long a failed host goes to the back of the line.
pub const HOST_PENALTY: Duration = Duration::from_secs(10);
/// ureq's input and output buffers per connection, and the largest
/// response header accepted.
const POLL_BUFFER: usize = 16 * 1024;
/// Largest `/cluster` body accepted (a 100-member cluster is about 60 KiB).
pub const MAX_BODY_BYTES: u64 = 4 * 1024 * 1024;
/// How often a failure that persists is logged again at warn level.
const FAILURE_REMINDER: Duration = Duration::from_secs(60);
/// How often `GET /config` is read (for `maximum_lag_on_failover`), when
/// [`Settings::read_config`]; a failed read is retried as late.
pub const CONFIG_INTERVAL: Duration = Duration::from_secs(30);

/// A message from an updater thread to the event loop.
#[derive(Debug)]
pub struct Update {
    /// Which updater instance sent it (a reload may replace one).
    pub updater: u64,
    pub cluster: String,
    pub outcome: Result<Polled, PollFailure>,
    /// The `RefreshNow` requests this poll answers.
    pub requests: Vec<u64>,
    /// How long the poll took, every host tried included.
    pub took: Duration,
    /// Hosts whose request failed in TLS during this poll.
    pub tls_failures: u64,
}

/// A successful poll.
#[derive(Debug)]
pub struct Polled {
    /// The host that answered.
    pub host: String,
    /// The new topology, or `None` when it equals the last one sent.
    pub topology: Option<Topology>,
}

/// A failed poll: what went wrong with the last host tried (which decides
/// the kind), and every host's failure in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollFailure {
    pub kind: PollError,
    /// `host: error` per host tried, joined by `; `.
    pub message: String,
}

/// Why a request to a Patroni host failed, as `/metrics` counts it: set
/// where the failure happens, never read back from the wording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollError {
    /// No connection, a failed TLS handshake, or the connection broke or
    /// closed before a whole answer.
    Connect,
    /// No whole answer within `api_timeout`.
    Timeout,
    /// An HTTP status other than 200.
    Status,
    /// An answer that is not a usable `/cluster` document: not HTTP, too
    /// large, not JSON, no members.
    Body,
}

impl PollError {
    pub const ALL: [PollError; 4] = [
        PollError::Connect,
        PollError::Timeout,
        PollError::Status,
        PollError::Body,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            PollError::Connect => "connect",
            PollError::Timeout => "timeout",
            PollError::Status => "http_status",
            PollError::Body => "body",
        }
    }
}

/// A message from the event loop to an updater thread.
#[derive(Debug)]
pub enum UpdaterCommand {
    /// Poll now; the answering `Update` carries this request id.
    RefreshNow(u64),
    Shutdown,
}

/// What an updater needs to know; a change of any of it restarts the thread.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub hosts: Vec<String>,
    pub interval: Duration,
    pub api_timeout: Duration,
    /// Compared by content: rotated certificates restart the updater.
    pub tls: Option<Arc<ClientMaterial>>,
    /// Read `GET /config` too: a health listener answers `/readiness`
    /// with the cluster's `maximum_lag_on_failover`.
    pub read_config: bool,
}

/// Why a fetch failed: TLS failures are logged and counted apart.
#[derive(Debug)]
enum FetchFailure {
    Tls(tls::Failure),
    Other(PollError, String),
}

impl FetchFailure {
    fn kind(&self) -> PollError {
        match self {
            FetchFailure::Tls(_) => PollError::Connect,
            FetchFailure::Other(k, _) => *k,
        }
    }
}

impl std::fmt::Display for FetchFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchFailure::Tls(t) => write!(f, "TLS: {}", t.words),
            FetchFailure::Other(_, s) => f.write_str(s),
        }
    }
}

/// The event loop's wake function (a `mio::Waker` behind a closure).
pub type Wake = Arc<dyn Fn() + Send + Sync>;

/// The loop's handle on one updater thread.
pub struct Handle {
    pub id: u64,
    pub settings: Settings,
    commands: Sender<UpdaterCommand>,
    thread: JoinHandle<()>,
}

impl Handle {
    /// Starts the thread; it polls at once.
    pub fn spawn(
        id: u64,
        cluster: &str,
        settings: Settings,
        updates: Sender<Update>,
        wake: Wake,
    ) -> std::io::Result<Handle> {
        let (commands, rx) = std::sync::mpsc::channel();
        let mut worker = Worker::new(id, cluster.to_string(), settings.clone(), updates, wake);
        let thread = std::thread::Builder::new()
            .name(format!("updater-{cluster}"))
            .spawn(move || worker.run(rx))?;
        Ok(Handle {
            id,
            settings,
            commands,
            thread,
        })
    }

    /// Asks for a poll now. False when the thread is gone.
    pub fn refresh(&self, request: u64) -> bool {
        self.commands
            .send(UpdaterCommand::RefreshNow(request))
            .is_ok()
    }

    /// True when the thread has ended (it only ends on `Shutdown`, so this
    /// means it panicked).
    pub fn is_dead(&self) -> bool {
        self.thread.is_finished()
    }

    /// Tells the thread to stop. It is not joined: it may be inside an HTTP
    /// request for up to `api_timeout`, and nothing waits on it.
    pub fn stop(self) {
        let _ = self.commands.send(UpdaterCommand::Shutdown);
    }
}

struct Worker {
    id: u64,
    cluster: String,
    settings: Settings,
    updates: Sender<Update>,
    wake: Wake,
    agent: ureq::Agent,
    /// For `verify_hostname: false`: our own rustls configuration.
    no_hostname: Option<Arc<rustls::ClientConfig>>,
    /// The TLS failure cause last logged per host (cleared on success).
    tls_logged: HashMap<String, &'static str>,
    /// TLS failures of the current poll, sent with its `Update`.
    tls_failures: u64,
    /// Last topology sent to the loop.
    last: Option<Topology>,
    last_skipped: Vec<String>,
    fast_until: Option<Instant>,
    /// When each host last failed.
    failed_at: HashMap<String, Instant>,
    dns: dns::Dns,
    /// Address problems logged, so each is logged when it starts.
    complaints: HashSet<String>,
    /// First failure of the current run of failures, and the last warn.
    failing_since: Option<(Instant, Instant)>,
    /// `maximum_lag_on_failover` from the last good `/config`.
    max_lag: Option<i64>,
    /// When `/config` was last asked for, and whether that failed.
    config_asked: Option<(Instant, bool)>,
}

/// Whether a new answer opens the fast-poll window: a routing change after
/// the first answer. Lag figures alone move on every poll of a busy cluster.
fn starts_fast_polling(last: Option<&Topology>, new: &Topology) -> bool {
    last.is_some_and(|old| !topology::same_routing(old, new))
}

impl Worker {
    fn new(
        id: u64,
        cluster: String,
        settings: Settings,
        updates: Sender<Update>,
        wake: Wake,
    ) -> Worker {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(tls_config(settings.tls.as_deref()))
            .timeout_global(Some(settings.api_timeout))
            .timeout_connect(Some(settings.api_timeout))
            .http_status_as_error(false)
            // Patroni's API is reached directly; HTTP_PROXY must not hijack it.
            .proxy(None)
            .max_redirects(0)
            // Patroni closes the connection after each answer, so every
            // poll opens a new one, and ureq allocates and zero-fills these
            // buffers for each (128 KiB apiece by default, twice over with
            // TLS): most of a poll's CPU. A body is read through them in
            // pieces, so they bound only the header (a few hundred bytes).
            .input_buffer_size(POLL_BUFFER)
            .output_buffer_size(POLL_BUFFER)
            .max_response_header_size(POLL_BUFFER)
            .user_agent(concat!("patroni-proxy/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let no_hostname = settings
            .tls
            .as_deref()
            .filter(|m| !m.verify_hostname && !m.skip_verify)
            .and_then(|m| match tls::no_hostname_config(m) {
                Ok(c) => Some(c),
                Err(e) => {
                    // Only if rustls refuses material the config check passed.
                    warn!("cluster={cluster} {e}; verifying host names after all");
                    None
                }
            });
        if let Some(m) = settings.tls.as_deref() {
            if !m.roots_from.is_empty() {
                debug!(
                    "cluster={cluster} TLS: {} trusted CA certificates from {}",
                    m.roots.len(),
                    m.roots_from
                );
            }
        }
        Worker {
            id,
            cluster,
            settings,
            updates,
            wake,
            agent,
            no_hostname,
            tls_logged: HashMap::new(),
            tls_failures: 0,
            last: None,
            last_skipped: Vec::new(),
            fast_until: None,
            failed_at: HashMap::new(),
            dns: dns::Dns::new(Arc::new(dns::system_lookup)),
            complaints: HashSet::new(),
            failing_since: None,
            max_lag: None,
            config_asked: None,
        }
    }

    fn run(&mut self, commands: Receiver<UpdaterCommand>) {
        let mut requests = Vec::new();
        loop {
            let started = Instant::now();
            let outcome = self.poll_once();
            let answered = outcome.as_ref().ok().map(|p| p.host.clone());
            let update = Update {
                updater: self.id,
                cluster: self.cluster.clone(),
                outcome,
                requests: std::mem::take(&mut requests),
                took: started.elapsed(),
                tls_failures: std::mem::take(&mut self.tls_failures),
            };
            if self.updates.send(update).is_err() {
                return; // the loop is gone
            }
            (self.wake)();
            // After the update went, so a slow `/config` never delays one;
            // a new value goes with the next poll, at once.
            let new_max_lag = answered.is_some_and(|host| self.read_config(&host));

            let wait = if new_max_lag {
                Duration::ZERO
            } else {
                (started + self.period()).saturating_duration_since(Instant::now())
            };
            match commands.recv_timeout(wait) {
                Ok(UpdaterCommand::RefreshNow(id)) => {
                    requests.push(id);
                    // Collect requests that arrived together: one poll answers all.
                    while let Ok(cmd) = commands.try_recv() {
                        match cmd {
                            UpdaterCommand::RefreshNow(id) => requests.push(id),
                            UpdaterCommand::Shutdown => return,
                        }
                    }
                }
                Ok(UpdaterCommand::Shutdown) | Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    fn period(&self) -> Duration {
        let leaderless = self.last.as_ref().is_some_and(|t| t.leader().is_none());
        let recent_change = self.fast_until.is_some_and(|t| Instant::now() < t);
        if leaderless || recent_change {
            FAST_POLL.min(self.settings.interval)
        } else {
            self.settings.interval
        }
    }

    /// Tries the hosts until one answers; resolves member addresses.
    fn poll_once(&mut self) -> Result<Polled, PollFailure> {
        let now = Instant::now();
        // Hosts in penalty go last, config order otherwise kept.
        let (penalised, fresh): (Vec<&String>, Vec<&String>) =
            self.settings.hosts.iter().partition(|h| {
                self.failed_at
                    .get(*h)
                    .is_some_and(|t| now.duration_since(*t) < HOST_PENALTY)
            });
        let order: Vec<String> = fresh.into_iter().chain(penalised).cloned().collect();

        let mut errors = Vec::new();
        let mut kind = PollError::Connect;
        for host in order {
            match self.fetch(&host) {
                Ok(parsed) => {
                    self.failed_at.remove(&host);
                    if self.tls_logged.remove(&host).is_some() {
                        info!("cluster={} host={host} TLS works again", self.cluster);
                    }
                    if parsed.skipped != self.last_skipped {
                        for s in &parsed.skipped {
                            warn!(
                                "cluster={} host={host} skipped malformed member {s}",
                                self.cluster
                            );
                        }
                        self.last_skipped = parsed.skipped;
                    }
                    let mut topology = parsed.topology;
                    topology.maximum_lag_on_failover = self.max_lag;
                    self.resolve(&mut topology);
                    self.recovered(&host, &errors);
                    let changed = self.last.as_ref() != Some(&topology);
                    if changed {
                        // Every change goes to the loop (lag policies need each
                        // poll's figures), but only a routing change -- not the
                        // first answer, not lag moving -- makes the polling fast.
                        if starts_fast_polling(self.last.as_ref(), &topology) {
                            self.fast_until = Some(Instant::now() + FAST_WINDOW);
                        }
                        self.last = Some(topology.clone());
                    }
                    return Ok(Polled {
                        host,
                        topology: changed.then_some(topology),
                    });
                }
                Err(e) => {
                    if let FetchFailure::Tls(t) = &e {
                        self.tls_failures += 1;
                        if self.tls_logged.get(&host) != Some(&t.cause) {
                            warn!(
                                "cluster={} host={host} TLS failure: {}",
                                self.cluster, t.words
                            );
                            self.tls_logged.insert(host.clone(), t.cause);
                        }
                    }
                    debug!("cluster={} host={host} poll failed: {e}", self.cluster);
                    self.failed_at.insert(host.clone(), Instant::now());
                    errors.push(format!("{host}: {e}"));
                    kind = e.kind();
                }
            }
        }
        let message = if errors.is_empty() {
            "no hosts configured".to_string()
        } else {
            errors.join("; ")
        };
        self.failing(&message);
        Err(PollFailure { kind, message })
    }

    fn fetch(&self, host: &str) -> Result<patroni::Parsed, FetchFailure> {
        let (status, body) = self.get(host, "/cluster")?;
        answer(status, &body)
    }

    /// Reads `maximum_lag_on_failover` from `host`'s `GET /config` when
    /// [`Settings::read_config`] and [`CONFIG_INTERVAL`] has passed since
    /// the last try; true when the value changed. A failure is logged when
    /// it starts and keeps the last value (none: Patroni's 1 MiB default).
    fn read_config(&mut self, host: &str) -> bool {
        let due = self
            .config_asked
            .is_none_or(|(at, _)| at.elapsed() >= CONFIG_INTERVAL);
        if !self.settings.read_config || !due {
            return false;
        }
        let read = self.get(host, "/config").and_then(|(status, body)| {
            status_ok(status)?;
            health::maximum_lag_on_failover(&body)
                .map_err(|e| FetchFailure::Other(PollError::Body, e))
        });
        let failed_before = self.config_asked.is_some_and(|(_, failed)| failed);
        self.config_asked = Some((Instant::now(), read.is_err()));
        match read {
            Ok(v) => {
                if failed_before {
                    info!(
                        "cluster={} host={host} GET /config works again",
                        self.cluster
                    );
                }
                if self.max_lag == Some(v) {
                    return false;
                }
                info!(
                    "cluster={} maximum_lag_on_failover {v} (GET /config of {host}), for /readiness",
                    self.cluster
                );
                self.max_lag = Some(v);
                true
            }
            Err(e) => {
                if !failed_before {
                    let keeps = match self.max_lag {
                        Some(v) => format!("the last value read, {v}"),
                        None => format!("Patroni's default, {DEFAULT_MAXIMUM_LAG_ON_FAILOVER}"),
                    };
                    warn!(
                        "cluster={} host={host} GET /config failed: {e}; /readiness uses maximum_lag_on_failover {keeps}; retrying every {}s",
                        self.cluster,
                        CONFIG_INTERVAL.as_secs()
                    );
                }
                false
            }
        }
    }

    /// `GET path` on `host` with the cluster's TLS, credentials and
    /// `api_timeout`: the status and the body.
    fn get(&self, host: &str, path: &str) -> Result<(u16, Vec<u8>), FetchFailure> {
        let material = self.settings.tls.as_deref();
        let authorization = material.and_then(|m| m.authorization.as_ref());
        let has_cert = material.is_some_and(|m| m.identity.is_some());
        let https = host
            .get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("https://"));
        let (status, body) = match (&self.no_hostname, https) {
            (Some(config), true) => https::get(
                config.clone(),
                host,
                path,
                authorization.map(|a| a.expose()),
                self.settings.api_timeout,
                MAX_BODY_BYTES,
            )
            .map_err(|e| match e {
                https::FetchError::Tls(t) => FetchFailure::Tls(tls::describe(&t, has_cert)),
                https::FetchError::Connect(s) => FetchFailure::Other(PollError::Connect, s),
                https::FetchError::Timeout(s) => FetchFailure::Other(PollError::Timeout, s),
                https::FetchError::Answer(s) => FetchFailure::Other(PollError::Body, s),
            })?,
            _ => {
                let url = format!("{host}{path}");
                let mut req = self.agent.get(&url);
                if let Some(a) = authorization {
                    req = req.header("Authorization", a.expose());
                }
                let mut resp = req.call().map_err(|e| ureq_failure(e, has_cert))?;
                let status = resp.status().as_u16();
                let body = resp
                    .body_mut()
                    .with_config()
                    .limit(MAX_BODY_BYTES)
                    .read_to_vec()
                    .map_err(|e| match ureq_failure(e, has_cert) {
                        FetchFailure::Other(k, s) => {
                            FetchFailure::Other(k, format!("reading body: {s}"))
                        }
                        tls => tls,
                    })?;
                (status, body)
            }
        };
        Ok((status, body))
    }

    /// Fills in `ip` for every member with a host: IP literals (IPv6 with or
    /// without brackets) directly, names through [`dns::Dns`] (in parallel,
    /// cached, waiting at most `api_timeout`). Logs a name that cannot be
    /// resolved, and an address that cannot be routed, when it starts.
    fn resolve(&mut self, topo: &mut Topology) {
        let mut names = Vec::new();
        for m in &mut topo.members {
            let Some(host) = m.host.as_deref() else {
                continue;
            };
            let literal = host.trim_start_matches('[').trim_end_matches(']');
            match literal.parse::<IpAddr>() {
                Ok(ip) => m.ip = Some(ip),
                Err(_) => names.push(host.to_string()),
            }
        }
        let answers = if names.is_empty() {
            HashMap::new()
        } else {
            self.dns
                .resolve(names.iter().map(String::as_str), self.settings.api_timeout)
        };
        let mut complaints = HashSet::new();
        for m in &mut topo.members {
            let Some(host) = m.host.as_deref() else {
                continue;
            };
            let problem = match answers.get(host) {
                Some(dns::Answer::Ip(ip)) => {
                    m.ip = Some(*ip);
                    None
                }
                Some(dns::Answer::Failed(e)) => Some(format!("cannot resolve host {host:?}: {e}")),
                Some(dns::Answer::Pending) => Some(format!(
                    "host {host:?} not resolved within {:?}; still trying",
                    self.settings.api_timeout
                )),
                None => None,
            };
            let problem = problem.or_else(|| {
                let ip = m.ip?;
                crate::topology::unroutable(ip).map(|why| {
                    format!("host {host:?} has address {ip}, which is {why}; not routable")
                })
            });
            if let Some(p) = problem {
                let line = format!("member={} {p}", m.name);
                if !self.complaints.contains(&line) {
                    warn!("cluster={} {line}", self.cluster);
                }
                complaints.insert(line);
            }
        }
        self.complaints = complaints;
    }

    fn failing(&mut self, msg: &str) {
        let now = Instant::now();
        match self.failing_since {
            None => {
                warn!("cluster={} Patroni API unreachable: {msg}", self.cluster);
                self.failing_since = Some((now, now));
            }
            Some((since, last_warn)) if now.duration_since(last_warn) >= FAILURE_REMINDER => {
                warn!(
                    "cluster={} Patroni API still unreachable after {}s: {msg}",
                    self.cluster,
                    now.duration_since(since).as_secs()
                );
                self.failing_since = Some((since, now));
            }
            Some(_) => {}
        }
    }

    fn recovered(&mut self, host: &str, errors: &[String]) {
        if let Some((since, _)) = self.failing_since.take() {
            info!(
                "cluster={} Patroni API reachable again via {host} after {:.1}s",
                self.cluster,
                since.elapsed().as_secs_f64()
            );
        } else if !errors.is_empty() {
            debug!(
                "cluster={} answered by {host} after: {}",
                self.cluster,
                errors.join("; ")
            );
        }
    }
}

/// ureq's TLS settings: rustls, roots always explicit (an empty set when
/// the cluster has no https host, so nothing falls back to ureq's
/// defaults), the client certificate, `skip_verify`.
fn tls_config(m: Option<&ClientMaterial>) -> ureq::tls::TlsConfig {
    let roots: Vec<ureq::tls::Certificate<'static>> = m
        .map(|m| {
            m.roots
                .iter()
                .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
                .collect()
        })
        .unwrap_or_default();
    let client_cert = m.and_then(|m| m.identity.as_ref()).and_then(|id| {
        let chain: Vec<ureq::tls::Certificate<'static>> = id
            .chain
            .iter()
            .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
            .collect();
        // ureq takes a key as PEM (its key kind type is not public).
        match ureq::tls::PrivateKey::from_pem(id.key_pem().expose().as_bytes()) {
            Ok(key) => Some(ureq::tls::ClientCert::new_with_certs(&chain, key)),
            Err(e) => {
                warn!("the client key cannot be handed to ureq ({e}); sending no certificate");
                None
            }
        }
    });
    ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(tls::provider())
        .root_certs(ureq::tls::RootCerts::new_with_certs(&roots))
        .client_cert(client_cert)
        .disable_verification(m.is_some_and(|m| m.skip_verify))
        .build()
}

/// What a host's answer says: its `/cluster` document, or why not.
fn answer(status: u16, body: &[u8]) -> Result<patroni::Parsed, FetchFailure> {
    status_ok(status)?;
    patroni::parse(body).map_err(|e| FetchFailure::Other(PollError::Body, e))
}

/// 200, or the failure in words with a hint for the usual mistakes.
fn status_ok(status: u16) -> Result<(), FetchFailure> {
    if status == 200 {
        return Ok(());
    }
    let hint = match status {
        401 => " (check username and password_file)",
        403 => " (forbidden: check Patroni's allowlist and client certificate)",
        _ => "",
    };
    Err(FetchFailure::Other(
        PollError::Status,
        format!("HTTP status {status}{hint}"),
    ))
}

/// A ureq error, with the rustls error inside it (if any) put into words.
fn ureq_failure(e: ureq::Error, has_cert: bool) -> FetchFailure {
    let inner = match &e {
        ureq::Error::Rustls(t) => Some(t),
        ureq::Error::Io(io) => tls::rustls_error(io),
        _ => None,
    };
    if let Some(t) = inner {
        return FetchFailure::Tls(tls::describe(t, has_cert));
    }
    let kind = match &e {
        ureq::Error::Timeout(_) => PollError::Timeout,
        ureq::Error::Io(io) if https::is_timeout(io) => PollError::Timeout,
        ureq::Error::Protocol(_)
        | ureq::Error::LargeResponseHeader(..)
        | ureq::Error::BodyExceedsLimit(_) => PollError::Body,
        _ => PollError::Connect,
    };
    FetchFailure::Other(kind, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::tests::member;

    fn cluster(replica_lag: Option<u64>, replica_role: &str) -> Topology {
        Topology {
            members: vec![
                member("m1", "leader", "running", None),
                member("m2", replica_role, "streaming", replica_lag),
            ],
            ..Topology::default()
        }
    }

    /// A worker for `hosts`, with a short `api_timeout`.
    fn worker(hosts: Vec<String>) -> Worker {
        let settings = Settings {
            hosts,
            interval: Duration::from_secs(1),
            api_timeout: Duration::from_millis(300),
            tls: None,
            read_config: false,
        };
        let (tx, _) = std::sync::mpsc::channel();
        Worker::new(1, "c".into(), settings, tx, Arc::new(|| {}))
    }

    /// A loopback HTTP host that answers every request with `answer`
    /// (`None`: accepts and says nothing, keeping the connection).
    fn host(answer: Option<&str>) -> String {
        use std::io::{Read, Write};
        let answer = answer.map(str::to_string);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            for mut c in l.incoming().flatten() {
                let mut buf = [0u8; 4096];
                let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = c.read(&mut buf);
                match &answer {
                    Some(a) => {
                        let _ = c.write_all(a.as_bytes());
                    }
                    None => kept.push(c),
                }
            }
        });
        url
    }

    /// A host that sends a head and part of the body, then stalls.
    fn stalled_body() -> String {
        use std::io::Write;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            for mut c in l.incoming().flatten() {
                let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 99\r\n\r\n{");
                kept.push(c);
            }
        });
        url
    }

    /// A port nothing listens on. It is below the ephemeral range, so the
    /// listeners these tests bind to port 0 (and client sockets) never take
    /// it: a freed ephemeral port could be handed straight to the next
    /// mock host, and the "refused" host would answer.
    fn refused() -> String {
        use std::sync::atomic::{AtomicU16, Ordering};
        static NEXT: AtomicU16 = AtomicU16::new(0);
        let base = 12_000 + (std::process::id() % 500) as u16 * 16;
        let _ = NEXT.compare_exchange(0, base, Ordering::SeqCst, Ordering::SeqCst);
        for _ in 0..4_000 {
            let p = NEXT.fetch_add(1, Ordering::SeqCst);
            if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
                return format!("http://127.0.0.1:{p}");
            }
        }
        panic!("no free port below the ephemeral range");
    }

    fn failure(hosts: Vec<String>) -> PollFailure {
        worker(hosts).poll_once().unwrap_err()
    }

    #[test]
    fn poll_errors_carry_their_kind_from_where_they_happen() {
        let ok = "HTTP/1.0 200 OK\r\n\r\n";
        for (hosts, want) in [
            (vec![refused()], PollError::Connect),
            (vec![host(Some(""))], PollError::Connect),
            (vec![host(None)], PollError::Timeout),
            (
                vec![host(Some("HTTP/1.0 503 Service Unavailable\r\n\r\nno"))],
                PollError::Status,
            ),
            (
                vec![host(Some("HTTP/1.0 401 Unauthorized\r\n\r\n"))],
                PollError::Status,
            ),
            (vec![host(Some(&format!("{ok}not json")))], PollError::Body),
            (
                vec![host(Some(&format!("{ok}{{\"scope\": \"c\"}}")))],
                PollError::Body,
            ),
            (
                vec![host(Some("SSH-2.0-OpenSSH_9.2\r\n\r\n"))],
                PollError::Body,
            ),
        ] {
            let f = failure(hosts);
            assert_eq!(f.kind, want, "{}", f.message);
        }
    }

    #[test]
    fn the_last_host_tried_decides_the_kind() {
        let status = host(Some("HTTP/1.0 500 Oops\r\n\r\n"));
        let f = failure(vec![host(None), status.clone()]);
        assert_eq!(f.kind, PollError::Status, "{}", f.message);
        assert!(f.message.contains("; "), "both hosts: {}", f.message);
        let f = failure(vec![status, refused()]);
        assert_eq!(f.kind, PollError::Connect, "{}", f.message);
        assert_eq!(failure(Vec::new()).kind, PollError::Connect);
        // Words of one kind in a message of another do not mislead.
        let f = failure(vec![stalled_body()]);
        assert_eq!(f.kind, PollError::Timeout, "{}", f.message);
        assert!(f.message.contains("reading body"), "{}", f.message);
        let f = failure(vec![refused() + "/timeout"]);
        assert_eq!(f.kind, PollError::Connect, "{}", f.message);
    }

    #[test]
    fn ureq_errors_map_to_kinds_whatever_their_wording() {
        use std::io::{Error as IoError, ErrorKind};
        for (e, want) in [
            (
                ureq::Error::Timeout(ureq::Timeout::Global),
                PollError::Timeout,
            ),
            (
                ureq::Error::Timeout(ureq::Timeout::Connect),
                PollError::Timeout,
            ),
            (
                ureq::Error::Io(IoError::new(ErrorKind::WouldBlock, "x")),
                PollError::Timeout,
            ),
            (
                ureq::Error::Io(IoError::new(ErrorKind::ConnectionReset, "timeout")),
                PollError::Connect,
            ),
            (ureq::Error::HostNotFound, PollError::Connect),
            (ureq::Error::ConnectionFailed, PollError::Connect),
            (ureq::Error::BodyExceedsLimit(9), PollError::Body),
            (
                ureq::Error::Rustls(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer,
                )),
                PollError::Connect,
            ),
        ] {
            let shown = e.to_string();
            assert_eq!(ureq_failure(e, false).kind(), want, "{shown}");
        }
        assert!(matches!(
            ureq_failure(ureq::Error::Rustls(rustls::Error::DecryptError), false),
            FetchFailure::Tls(_)
        ));
    }

    #[test]
    fn answers_are_judged_by_status_then_body() {
        let f = |status, body: &[u8]| answer(status, body).map(|_| ()).unwrap_err().kind();
        assert_eq!(f(503, b"{}"), PollError::Status);
        assert_eq!(f(200, b"HTTP status 503"), PollError::Body);
        assert_eq!(f(200, b"[]"), PollError::Body);
        assert!(answer(200, br#"{"members": []}"#).is_ok());
    }

    #[test]
    fn every_kind_has_its_own_label() {
        let names: HashSet<&str> = PollError::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), PollError::ALL.len());
        for (i, k) in PollError::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "ALL is in index order");
        }
    }

    #[test]
    fn config_is_read_when_due_and_a_failure_keeps_the_last_value() {
        let mut w = worker(Vec::new());
        let good = host(Some(
            "HTTP/1.0 200 OK\r\n\r\n{\"maximum_lag_on_failover\": 5, \"ttl\": 30}",
        ));
        assert!(!w.read_config(&good), "no health listener: never asked");
        assert_eq!((w.max_lag, w.config_asked), (None, None));
        w.settings.read_config = true;
        assert!(w.read_config(&good), "a new value");
        assert_eq!(w.max_lag, Some(5));
        assert!(!w.read_config(&refused()), "not due yet");
        let overdue = || Some((Instant::now() - CONFIG_INTERVAL, false));
        w.config_asked = overdue();
        assert!(!w.read_config(&good), "the same value");
        w.config_asked = overdue();
        assert!(!w.read_config(&refused()));
        assert_eq!(w.max_lag, Some(5), "a failure keeps the last value");
        assert!(w.config_asked.is_some_and(|(_, failed)| failed));
        // The value goes with the topology of the next poll.
        let cluster = host(Some("HTTP/1.0 200 OK\r\n\r\n{\"members\": []}"));
        w.settings.hosts = vec![cluster];
        let polled = w.poll_once().unwrap();
        assert_eq!(polled.topology.unwrap().maximum_lag_on_failover, Some(5));
    }

    #[test]
    fn lag_moving_does_not_start_fast_polling() {
        let before = cluster(Some(100), "replica");
        assert!(!starts_fast_polling(None, &before), "first answer");
        assert!(!starts_fast_polling(
            Some(&before),
            &cluster(Some(200), "replica")
        ));
        assert!(!starts_fast_polling(
            Some(&before),
            &cluster(None, "replica")
        ));
        assert!(starts_fast_polling(
            Some(&before),
            &cluster(Some(100), "sync_standby")
        ));
    }
}

//! The health listeners: `health.listen`, an HTTP [`Front`] with the
//! read-only route table (`Route::HEALTH`: the Patroni-compatible checks,
//! `/health`, `/metrics`, `/`), and `health.agent_listen`, HAProxy's
//! agent-check protocol (one line in, one line out, close).
//!
//! The answers themselves are `crate::health` (pure); this room finds the
//! cluster's last topology and its age, the member a `/<endpoint>` check is
//! about, and counts what it answered. The HTTP listener is a [`Front`] like
//! the admin one, so it gets whatever that machinery gains (TLS).

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry};
use slab::Slab;

use super::admin::{Accepted, Front, Step, ACCEPT_BATCH, ADMIN_IDLE};
use super::ports::bind;
use super::sys;
use super::timer::Timer;
use super::{token, Proxy};
use crate::access::RouteClass;
use crate::admin::{Request, Response, Route};
use crate::config::{Config, HealthConfig};
use crate::error::Result;
use crate::health::{self, Method, Target, View};

/// An agent connection must send its line within this.
pub const AGENT_IDLE: Duration = Duration::from_secs(2);
/// Most agent connections at once (the rest wait in the backlog).
pub const MAX_AGENT_CONNS: usize = 256;

/// Both health listeners (each optional).
#[derive(Default)]
pub struct Health {
    pub front: Option<Front>,
    pub agent: Option<AgentPort>,
}

/// Sockets bound for a reload before it commits.
pub struct Rebind {
    listen: Option<Option<(TcpListener, SocketAddr)>>,
    agent: Option<Option<(TcpListener, SocketAddr)>>,
}

impl Health {
    /// Binds and registers what `cfg` asks for.
    pub fn new(cfg: &HealthConfig, backlog: u32, registry: &Registry) -> Result<Health> {
        let mut h = Health::default();
        let re = Health::bind_changes(&HealthConfig::default(), cfg, backlog)?;
        h.apply(re, registry);
        h.configure(cfg);
        Ok(h)
    }

    /// Binds the listeners whose address changes from `old` to `new`
    /// (nothing is touched until [`Health::apply`]).
    pub fn bind_changes(old: &HealthConfig, new: &HealthConfig, backlog: u32) -> Result<Rebind> {
        let one = |o: Option<SocketAddr>, n: Option<SocketAddr>| -> Result<_> {
            if o == n {
                return Ok(None);
            }
            Ok(Some(match n {
                Some(a) => Some((bind(a, backlog)?, a)),
                None => None,
            }))
        };
        Ok(Rebind {
            listen: one(old.listen, new.listen)?,
            agent: one(old.agent_listen, new.agent_listen)?,
        })
    }

    /// Swaps in what [`Health::bind_changes`] bound.
    pub fn apply(&mut self, re: Rebind, registry: &Registry) {
        if let Some(listen) = re.listen {
            if let Some(mut f) = self.front.take() {
                f.shutdown(registry);
            }
            self.front = listen.and_then(|(sock, addr)| {
                match Front::new(
                    sock,
                    addr,
                    registry,
                    token::HEALTH_LISTENER,
                    token::health,
                    &Route::HEALTH,
                ) {
                    Ok(f) => {
                        info!("health checks listening on {addr}");
                        Some(f)
                    }
                    Err(e) => {
                        log::error!("registering the health listener on {addr}: {e}");
                        None
                    }
                }
            });
        }
        if let Some(agent) = re.agent {
            if let Some(mut a) = self.agent.take() {
                a.shutdown(registry);
            }
            self.agent = agent.and_then(|(mut sock, addr)| {
                match registry.register(&mut sock, token::AGENT_LISTENER, Interest::READABLE) {
                    Ok(()) => {
                        info!("agent checks listening on {addr}");
                        Some(AgentPort {
                            listener: sock,
                            accept_ready: false,
                            conns: Slab::new(),
                            closed: Vec::new(),
                            next_id: 1,
                        })
                    }
                    Err(e) => {
                        log::error!("registering the agent listener on {addr}: {e}");
                        None
                    }
                }
            });
        }
    }

    /// Sets the health listener's HTTPS and access rules (at start-up and
    /// on every reload, so a rotated certificate takes effect; open
    /// connections keep what they started with).
    pub fn configure(&mut self, cfg: &HealthConfig) {
        if let Some(f) = &mut self.front {
            f.configure(cfg.tls_config.clone(), cfg.allow.clone());
            if cfg.tls_config.is_some() {
                info!("health listener serves HTTPS only");
            }
        }
    }

    /// Live connections, for timer compaction.
    pub fn conns(&self) -> usize {
        self.front.as_ref().map_or(0, |f| f.conns.len())
            + self.agent.as_ref().map_or(0, |a| a.conns.len())
    }
}

/// The agent-check listener and its connections.
pub struct AgentPort {
    listener: TcpListener,
    pub accept_ready: bool,
    pub conns: Slab<AgentConn>,
    closed: Vec<usize>,
    next_id: u64,
}

impl AgentPort {
    fn shutdown(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.listener);
        for (_, mut c) in std::mem::take(&mut self.conns) {
            let _ = registry.deregister(&mut c.sock);
        }
        self.closed.clear();
    }

    fn accept(&mut self, registry: &Registry, now: Instant) -> Vec<(usize, u64, Instant)> {
        let mut out = Vec::new();
        while self.accept_ready && self.conns.len() < MAX_AGENT_CONNS {
            match self.listener.accept() {
                Ok((mut sock, _)) => {
                    let entry = self.conns.vacant_entry();
                    let key = entry.key();
                    if registry
                        .register(
                            &mut sock,
                            token::agent(key),
                            Interest::READABLE | Interest::WRITABLE,
                        )
                        .is_err()
                    {
                        continue;
                    }
                    let id = self.next_id;
                    self.next_id += 1;
                    let deadline = now + AGENT_IDLE;
                    entry.insert(AgentConn {
                        id,
                        sock,
                        deadline,
                        input: Vec::new(),
                        output: Vec::new(),
                        written: 0,
                        readable: false,
                        writable: false,
                        writing: false,
                        closed: false,
                    });
                    out.push((key, id, deadline));
                }
                Err(e) => match sys::accept_error(&e) {
                    sys::AcceptError::WouldBlock => self.accept_ready = false,
                    sys::AcceptError::Retry => {}
                    sys::AcceptError::Pause => {
                        warn!("agent accept failed: {e}");
                        break;
                    }
                },
            }
        }
        out
    }

    fn close(&mut self, key: usize) {
        if let Some(c) = self.conns.get_mut(key) {
            if !c.closed {
                c.closed = true;
                self.closed.push(key);
            }
        }
    }

    fn reap(&mut self, registry: &Registry) {
        for key in self.closed.drain(..) {
            if let Some(mut c) = self.conns.try_remove(key) {
                let _ = registry.deregister(&mut c.sock);
            }
        }
    }
}

/// One agent-check connection: read a line, write a line, close.
pub struct AgentConn {
    pub id: u64,
    sock: TcpStream,
    pub deadline: Instant,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    readable: bool,
    writable: bool,
    writing: bool,
    closed: bool,
}

/// What the loop must do after an agent event.
enum AgentStep {
    Nothing,
    /// The request line (without its newline).
    Line(Vec<u8>),
    Close,
}

impl AgentConn {
    fn on_event(&mut self, ev: Option<&Event>) -> AgentStep {
        if let Some(ev) = ev {
            let hint = ev.is_error() || ev.is_read_closed() || ev.is_write_closed();
            self.readable |= ev.is_readable() || hint;
            self.writable |= ev.is_writable() || hint;
        }
        if self.writing {
            return self.write();
        }
        let mut chunk = [0u8; 512];
        while self.readable {
            match self.sock.read(&mut chunk) {
                // The peer finished sending: what it sent is the line.
                Ok(0) => return AgentStep::Line(std::mem::take(&mut self.input)),
                Ok(n) => {
                    self.input.extend_from_slice(&chunk[..n]);
                    if let Some(i) = self.input.iter().position(|&b| b == b'\n') {
                        self.input.truncate(i);
                        return AgentStep::Line(std::mem::take(&mut self.input));
                    }
                    if self.input.len() > health::MAX_AGENT_LINE {
                        return AgentStep::Line(std::mem::take(&mut self.input));
                    }
                }
                Err(e) => match sys::classify(&e) {
                    sys::IoError::WouldBlock => self.readable = false,
                    sys::IoError::Interrupted => {}
                    sys::IoError::Failed => return AgentStep::Close,
                },
            }
        }
        AgentStep::Nothing
    }

    fn respond(&mut self, line: String) -> AgentStep {
        self.output = line.into_bytes();
        self.written = 0;
        self.writing = true;
        self.write()
    }

    fn write(&mut self) -> AgentStep {
        while self.writable && self.written < self.output.len() {
            match self.sock.write(&self.output[self.written..]) {
                Ok(0) => return AgentStep::Close,
                Ok(n) => self.written += n,
                Err(e) => match sys::classify(&e) {
                    sys::IoError::WouldBlock => self.writable = false,
                    sys::IoError::Interrupted => {}
                    sys::IoError::Failed => return AgentStep::Close,
                },
            }
        }
        if self.written == self.output.len() {
            let _ = self.sock.shutdown(Shutdown::Write);
            return AgentStep::Close;
        }
        AgentStep::Nothing
    }

    fn local_ip(&self) -> Option<IpAddr> {
        self.sock.local_addr().ok().map(|a| a.ip())
    }
}

/// The `(cluster, member)` of a check, or the error answer.
fn resolve(
    target: &Target,
    local: Option<IpAddr>,
    cfg: &HealthConfig,
    proxy: &Proxy,
) -> std::result::Result<(String, String), (u16, String)> {
    match target {
        Target::Member { cluster, member } => Ok((cluster.clone(), member.clone())),
        Target::Local => {
            let configured = cfg.member.as_ref().map(|(c, m)| (c.as_str(), m.as_str()));
            let Some(local) = local else {
                return Err((
                    400,
                    "the local address of this connection is unknown".into(),
                ));
            };
            health::local_member(
                configured,
                local,
                proxy
                    .clusters
                    .iter()
                    .map(|(n, c)| (n.as_str(), c.topology.as_ref())),
            )
        }
    }
}

impl Proxy {
    /// The answer to one check (`GET /main/node1/replica?lag=1MB`, or an
    /// agent line).
    fn check(&self, method: Method, target: &str, local: Option<IpAddr>) -> health::Answer {
        let error = |status: u16, why: String| {
            let body = format!(
                "{{\"status\":{status},\"reason\":{}}}\n",
                serde_json::Value::from(why.as_str())
            );
            health::Answer {
                status,
                reason: why,
                draining: false,
                body,
            }
        };
        let check =
            match health::parse_target(target, |c| self.clusters.iter().any(|(n, _)| n == c)) {
                Ok(c) => c,
                Err(e) => return error(400, e),
            };
        let (cluster, member) = match resolve(&check.target, local, &self.config.health, self) {
            Ok(cm) => cm,
            Err((status, why)) => return error(status, why),
        };
        let now = Instant::now();
        let state = self.clusters.iter().find(|(n, _)| **n == cluster);
        let view = state.map(|(_, c)| View {
            topology: c.topology.as_ref().filter(|_| c.last_success.is_some()),
            age: c
                .last_success
                .map_or(Duration::MAX, |t| now.saturating_duration_since(t)),
            ttl: self.config.topology_ttl,
        });
        health::decide(
            method,
            &check.endpoint,
            &check.query,
            &cluster,
            &member,
            view.as_ref(),
        )
    }

    /// `GET /health`: 200 when every cluster is fresh and every port has a
    /// routable member; otherwise 503 with the list of what is wrong.
    pub(super) fn health_summary(&self) -> Response {
        let now = Instant::now();
        let mut problems: Vec<serde_json::Value> = Vec::new();
        for (name, c) in self.clusters.iter() {
            let why = match (c.last_success, self.config.topology_ttl) {
                (None, _) => Some("no successful /cluster poll yet".to_string()),
                (Some(t), Some(ttl)) if now.saturating_duration_since(t) > ttl => Some(format!(
                    "topology is stale: last good poll {:.1} s ago, topology_ttl {} s",
                    now.saturating_duration_since(t).as_secs_f64(),
                    ttl.as_secs_f64()
                )),
                _ => None,
            };
            if let Some(why) = why {
                problems.push(serde_json::json!({"cluster": name, "problem": why}));
            }
        }
        for (_, l) in self.listeners.iter() {
            let routable = l.backends.list.iter().any(|b| !b.draining);
            if !routable {
                problems.push(serde_json::json!({
                    "cluster": l.cluster, "port": l.port_name(),
                    "problem": "no routable member",
                }));
            }
        }
        let status = if problems.is_empty() { 200 } else { 503 };
        let mut body =
            serde_json::to_vec(&serde_json::json!({"status": status, "problems": problems}))
                .unwrap_or_default();
        body.push(b'\n');
        Response::json(status, body)
    }

    pub(super) fn accept_health(&mut self) {
        let now = self.now;
        for _ in 0..ACCEPT_BATCH {
            let Some(f) = self.health.front.as_mut() else {
                break;
            };
            match f.accept_one(self.poll.registry(), now) {
                Accepted::Conn(key, id, deadline) => {
                    self.timers.add(deadline, Timer::Health(key, id));
                    self.health_event(key, None);
                }
                Accepted::Done => break,
                Accepted::Paused(wait) => {
                    // accept_one checks the clock; the timer only wakes us.
                    self.timers.add(now + wait, Timer::HealthAcceptResume);
                    break;
                }
            }
        }
        if let Some(a) = self.health.agent.as_mut() {
            for (key, id, deadline) in a.accept(self.poll.registry(), now) {
                self.timers.add(deadline, Timer::Agent(key, id));
            }
        }
    }

    pub(super) fn reap_health(&mut self) {
        if let Some(f) = self.health.front.as_mut() {
            self.stats.tls_handshake_failures[1] += f.reap(self.poll.registry());
        }
        if let Some(a) = self.health.agent.as_mut() {
            a.reap(self.poll.registry());
        }
    }

    pub(super) fn health_event(&mut self, key: usize, ev: Option<&Event>) {
        let Some(f) = self.health.front.as_mut() else {
            return;
        };
        let Some(c) = f.conns.get_mut(key) else {
            return;
        };
        let step = match ev {
            Some(ev) => c.on_event(ev),
            None => c.advance(),
        };
        match step {
            Step::Nothing => {}
            Step::Close => f.close(key),
            Step::Route(req) => {
                let local = c.local_addr().map(|a| a.ip());
                let resp = if f.allow.allows(RouteClass::Read, c.peer) {
                    self.health_route(&req, local)
                } else {
                    info!("health: request refused to {} (health.allow)", c.peer);
                    Response::text(403, "forbidden by health.allow\n").head_only(req.head_only)
                };
                if let Some(c) = self
                    .health
                    .front
                    .as_mut()
                    .and_then(|f| f.conns.get_mut(key))
                {
                    c.respond(&resp);
                }
                self.health_event(key, None);
            }
        }
    }

    /// The health listener's routes (all read-only).
    fn health_route(&mut self, req: &Request, local: Option<IpAddr>) -> Response {
        let resp = match req.route {
            Route::Root => Response::text(200, "OK"),
            Route::Metrics => Response::metrics(self.metrics_text()),
            Route::Health => self.health_summary(),
            Route::Check => {
                let method = Method::parse(req.method).unwrap_or(Method::Get);
                let target = if req.query.is_empty() {
                    req.path.clone()
                } else {
                    format!("{}?{}", req.path, req.query)
                };
                let a = self.check(method, &target, local);
                self.stats.health_checks.add(0, a.status);
                Response::json(a.status, a.body.into_bytes())
            }
            // Not in the health table.
            Route::UpdateClusters | Route::Clusters => Response::text(404, "not found\n"),
        };
        resp.head_only(req.head_only)
    }

    pub(super) fn health_deadline(&mut self, key: usize, id: u64, now: Instant) {
        let Some(f) = self.health.front.as_mut() else {
            return;
        };
        let Some(c) = f.conns.get_mut(key) else {
            return;
        };
        if c.id != id || c.deadline > now {
            return;
        }
        if c.is_writing() {
            return f.close(key);
        }
        c.deadline = now + ADMIN_IDLE;
        self.timers.add(c.deadline, Timer::Health(key, id));
        c.respond(&Response::text(408, "request timeout\n"));
        self.health_event(key, None);
    }

    pub(super) fn agent_event(&mut self, key: usize, ev: Option<&Event>) {
        let Some(a) = self.health.agent.as_mut() else {
            return;
        };
        let Some(c) = a.conns.get_mut(key) else {
            return;
        };
        match c.on_event(ev) {
            AgentStep::Nothing => {}
            AgentStep::Close => a.close(key),
            AgentStep::Line(line) => {
                let local = c.local_ip();
                let parsed = if line.len() > health::MAX_AGENT_LINE {
                    Err("line too long".to_string())
                } else {
                    health::parse_agent_line(&line, |_| false)
                };
                let answer = match parsed {
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line);
                        let a = self.check(Method::Get, text.trim(), local);
                        self.stats.health_checks.add(1, a.status);
                        a.agent_line()
                    }
                    Err(e) => {
                        self.stats.health_checks.add(1, 400);
                        format!("down #{e}\n")
                    }
                };
                self.agent_respond(key, answer);
            }
        }
    }

    fn agent_respond(&mut self, key: usize, line: String) {
        let Some(a) = self.health.agent.as_mut() else {
            return;
        };
        if let Some(c) = a.conns.get_mut(key) {
            if let AgentStep::Close = c.respond(line) {
                a.close(key);
            }
        }
    }

    pub(super) fn agent_deadline(&mut self, key: usize, id: u64, now: Instant) {
        let Some(a) = self.health.agent.as_mut() else {
            return;
        };
        let Some(c) = a.conns.get(key) else {
            return;
        };
        if c.id != id || c.deadline > now {
            return;
        }
        if c.writing {
            return a.close(key);
        }
        if let Some(c) = a.conns.get_mut(key) {
            c.deadline = now + AGENT_IDLE;
        }
        self.timers.add(now + AGENT_IDLE, Timer::Agent(key, id));
        self.agent_respond(
            key,
            "down #no request line; set agent-send \"/<cluster>/<member>/<endpoint>\\n\"\n"
                .to_string(),
        );
    }

    /// Rebinds the health listeners a reload moved (bound before commit).
    pub(super) fn health_bind_changes(&self, new: &Config) -> Result<Rebind> {
        Health::bind_changes(&self.config.health, &new.health, new.listen_backlog)
    }

    pub(super) fn health_apply(&mut self, re: Rebind, new: &HealthConfig) {
        self.health.apply(re, self.poll.registry());
        self.health.configure(new);
    }
}

//! One configured port: its listening socket, what it routes to, and the
//! least-connections counters of its backends.
//!
//! The backend list is replaced on every topology change or reload by
//! [`Listener::set_backends`], which carries the counters of backends that
//! stay, so balancing is not reset by an unrelated change. A counter counts
//! the sessions of this port that are connecting to or connected to that
//! backend.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use mio::net::TcpListener;

use crate::config::{ClusterConfig, PortConfig};
use crate::topology::{pick_least, PortFilter, Route};

/// A member this port may route to.
#[derive(Debug, Clone)]
pub struct Backend {
    pub member: Rc<str>,
    pub addr: SocketAddr,
    pub active: u32,
    /// Routable, but takes no new clients (a leader being demoted).
    pub draining: bool,
}

/// Where a session goes: the member and the address dialled.
pub type Target = (Rc<str>, SocketAddr);

pub struct Listener {
    pub addr: SocketAddr,
    pub socket: TcpListener,
    pub cluster: String,
    /// `cluster:port`, for logs.
    pub label: String,
    pub filter: PortFilter,
    pub wait: Duration,
    pub backends: Vec<Backend>,
    /// Where the next tie-break starts.
    cursor: usize,
    /// The kernel said there are connections to accept; cleared on WouldBlock.
    pub accept_ready: bool,
}

impl Backend {
    pub fn is(&self, r: &Route) -> bool {
        *self.member == *r.member && self.addr == r.addr
    }
}

impl Listener {
    pub fn new(socket: TcpListener, cluster: &ClusterConfig, port: &PortConfig) -> Listener {
        let mut l = Listener {
            addr: port.listen,
            socket,
            cluster: String::new(),
            label: String::new(),
            filter: PortFilter {
                roles: Vec::new(),
                host_port: None,
                max_lag_in_bytes: None,
            },
            wait: Duration::ZERO,
            backends: Vec::new(),
            cursor: 0,
            accept_ready: false,
        };
        l.configure(cluster, port);
        l
    }

    /// Applies a (re)loaded port definition; the socket is kept.
    pub fn configure(&mut self, cluster: &ClusterConfig, port: &PortConfig) {
        self.cluster = cluster.name.clone();
        self.label = format!("{}:{}", cluster.name, port.name);
        self.filter = PortFilter {
            roles: port.roles.clone(),
            host_port: port.host_port,
            max_lag_in_bytes: port.max_lag_in_bytes,
        };
        self.wait = port.backend_wait_timeout;
    }

    /// Replaces the routable set, keeping counters of backends that stay.
    pub fn set_backends(&mut self, routable: &[Route]) {
        let old = std::mem::take(&mut self.backends);
        self.backends = routable
            .iter()
            .map(|r| match old.iter().find(|b| b.is(r)) {
                Some(b) => Backend {
                    draining: r.draining,
                    ..b.clone()
                },
                None => Backend {
                    member: Rc::from(r.member),
                    addr: r.addr,
                    active: 0,
                    draining: r.draining,
                },
            })
            .collect();
    }

    /// A backend that new clients can be sent to.
    pub fn has_open_backend(&self) -> bool {
        self.backends.iter().any(|b| !b.draining)
    }

    /// Least connections among backends whose address is not in `tried`;
    /// counts the pick.
    pub fn pick(&mut self, tried: &[SocketAddr]) -> Option<Target> {
        let i = pick_least(&self.backends, self.cursor, |b| {
            (!b.draining && !tried.contains(&b.addr)).then_some(b.active)
        })?;
        self.cursor = i + 1;
        let b = &mut self.backends[i];
        b.active += 1;
        Some((Rc::clone(&b.member), b.addr))
    }

    /// A session of this port left `target`.
    pub fn release(&mut self, target: &Target) {
        if let Some(b) = self
            .backends
            .iter_mut()
            .find(|b| b.member == target.0 && b.addr == target.1)
        {
            b.active = b.active.saturating_sub(1);
        }
    }
}

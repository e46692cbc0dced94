//! Read-only status rendering over borrowed views: the `/clusters` JSON
//! document now, and [`Proxy::stats`] for other renderers (`/metrics`).
//! Nothing here changes the loop's state.

use std::collections::HashMap;
use std::time::Instant;

use serde_json::{json, Value};
use slab::Slab;

use super::listener::Listener;
use super::stats::{ClusterStats, MemberStats, PortStats, ProxyStats};
use super::Proxy;
use crate::policy;

/// A read-only view of the counters, with the gauges counted from the
/// session table.
pub struct StatsView<'a> {
    proxy: &'a Proxy,
    /// Per listener slab key: (sessions, held).
    gauges: Vec<(usize, usize)>,
}

/// One port as a renderer sees it.
pub struct PortView<'a> {
    pub cluster: &'a str,
    pub port: &'a str,
    pub stats: &'a PortStats,
    /// The members the port routes to or has sessions on, with their
    /// counters, by slot.
    pub members: &'a Slab<MemberStats>,
    /// Open sessions now.
    pub sessions: usize,
    /// Of those, held: waiting for a routable member or for a retry.
    pub held: usize,
    /// Pre-connected sockets ready for a client.
    pub preconnected: usize,
}

impl<'a> StatsView<'a> {
    pub fn ports(&self) -> impl Iterator<Item = PortView<'a>> + '_ {
        self.proxy.listeners.iter().map(|(k, l)| {
            let (sessions, held) = self.gauges.get(k).copied().unwrap_or_default();
            PortView {
                cluster: &l.cluster,
                port: l.port_name(),
                stats: &l.stats,
                members: &l.backends.members,
                sessions,
                held,
                preconnected: self.proxy.warm.ready(k),
            }
        })
    }

    /// `(cluster, counters)` by cluster name.
    pub fn clusters(&self) -> impl Iterator<Item = (&'a str, &'a ClusterStats)> + '_ {
        self.proxy
            .clusters
            .iter()
            .map(|(name, c)| (name.as_str(), &c.stats))
    }

    pub fn proxy(&self) -> &'a ProxyStats {
        &self.proxy.stats
    }

    /// Open sessions, all ports.
    pub fn sessions(&self) -> usize {
        self.proxy.live_sessions()
    }
}

/// Most member x port cells `GET /clusters` renders per cluster; beyond,
/// members are listed without their per-port table, and ports with backend
/// counts instead of lists and without per-member stats, so one response
/// stays within a few MB and milliseconds of the loop.
pub const MAX_STATUS_CELLS: usize = 20_000;

impl Proxy {
    /// The counters, read-only.
    pub(super) fn stats(&self) -> StatsView<'_> {
        let mut gauges = vec![(0, 0); self.listeners.capacity()];
        for (_, s) in self.sessions.iter().filter(|(_, s)| !s.is_closed()) {
            if let Some(g) = gauges.get_mut(s.listener) {
                g.0 += 1;
                g.1 += usize::from(s.is_held());
            }
        }
        StatsView {
            proxy: self,
            gauges,
        }
    }

    /// `GET /clusters`: clusters, members, ports and their backends.
    pub(super) fn status_json(&self) -> Vec<u8> {
        let now = Instant::now();
        let view = self.stats();
        let mut port_stats: HashMap<(&str, &str), Value> = view
            .ports()
            .map(|p| ((p.cluster, p.port), render_port_stats(&p)))
            .collect();
        let cluster_stats: HashMap<&str, &ClusterStats> = view.clusters().collect();
        let mut clusters = serde_json::Map::new();
        for (name, c) in self.clusters.iter() {
            let listeners: Vec<(usize, &Listener)> = self
                .listeners
                .iter()
                .filter(|(_, l)| &l.cluster == name)
                .collect();
            // The same plan the port routes by, so this view and the routing
            // agree on what "routable" means; each port plans every member
            // once (linear), and the per-member table is left out where it
            // would exceed MAX_STATUS_CELLS.
            let count = c.topology.as_ref().map_or(0, |t| t.members.len());
            let detailed = count.saturating_mul(listeners.len()) <= MAX_STATUS_CELLS;
            type ByMember<'p> = HashMap<&'p str, Value>;
            let plans: Vec<(&Listener, ByMember)> = match (&c.topology, detailed) {
                (Some(t), true) => listeners
                    .iter()
                    .map(|(_, l)| {
                        let plan = policy::plan(t, &l.filter, &l.policy, &l.lag);
                        let mut by: ByMember = HashMap::with_capacity(count);
                        for r in &plan.routes {
                            by.insert(r.member, json!({
                                "routable": true, "addr": r.addr.to_string(),
                                "new_clients": r.hold.is_none(),
                                "hold": r.hold.map(|h| h.to_string()),
                            }));
                        }
                        for (m, why) in &plan.excluded {
                            by.insert(m, json!({
                                "routable": false, "reason": why.to_string(), "reason_label": why.label(),
                            }));
                        }
                        (*l, by)
                    })
                    .collect(),
                _ => Vec::new(),
            };
            let members: Vec<Value> = c
                .topology
                .iter()
                .flat_map(|t| t.members.iter())
                .map(|m| {
                    let ports = if detailed {
                        let mut ports = serde_json::Map::new();
                        for (l, by) in &plans {
                            let v = by
                                .get(m.name.as_str())
                                .cloned()
                                .unwrap_or_else(|| json!({"routable": false}));
                            ports.insert(l.port_name().to_string(), v);
                        }
                        Value::Object(ports)
                    } else {
                        json!(format!(
                            "left out: {count} members x {} ports exceed {MAX_STATUS_CELLS}; see each port's backends",
                            listeners.len()
                        ))
                    };
                    json!({
                        "name": m.name, "role": m.role.as_str(), "state": m.state,
                        "host": m.host, "port": m.port, "timeline": m.timeline,
                        "lag": m.lag, "replay_lag": m.replay_lag, "noloadbalance": m.noloadbalance,
                        "ports": ports,
                    })
                })
                .collect();
            let mut ports = serde_json::Map::new();
            for (lk, l) in &listeners {
                let (sessions, waiting) = view.gauges.get(*lk).copied().unwrap_or_default();
                let backends: Value = if detailed {
                    l.backends
                        .list
                        .iter()
                        .map(|b| {
                            json!({"member": &*b.member, "addr": b.addr.to_string(), "active": b.active, "draining": b.draining})
                        })
                        .collect()
                } else {
                    json!({
                        "count": l.backends.list.len(),
                        "active": l.backends.list.iter().map(|b| u64::from(b.active)).sum::<u64>(),
                    })
                };
                let stats = port_stats.remove(&(l.cluster.as_str(), l.port_name()));
                ports.insert(
                    l.port_name().to_string(),
                    json!({
                        "listen": l.addr.to_string(),
                        "roles": l.filter.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
                        "host_port": l.filter.host_port,
                        "max_lag_in_bytes": l.filter.max_lag_in_bytes,
                        "fallback_active": l.fallback_active,
                        "backends": backends,
                        "sessions": sessions,
                        "waiting": waiting,
                        "stats": if detailed { json!(stats) } else { json!("left out with the member table") },
                    }),
                );
            }
            let status = match (c.last_success, c.stale) {
                (None, _) => "no topology yet",
                (Some(_), true) => "stale",
                (Some(_), false) => "ok",
            };
            clusters.insert(
                name.clone(),
                json!({
                    "status": status,
                    "api_host": c.last_host,
                    "last_success_secs_ago": c.last_success.map(|t| now.duration_since(t).as_secs_f64()),
                    "last_error": c.last_error,
                    "scope": c.topology.as_ref().and_then(|t| t.scope.clone()),
                    "paused": c.topology.as_ref().is_some_and(|t| t.paused),
                    "leader": c.topology.as_ref().and_then(|t| t.leader()).map(|m| m.name.clone()),
                    "members": members,
                    "ports": ports,
                    "stats": cluster_stats.get(name.as_str()).map(|c| json!({
                        "polls": c.polls,
                        "poll_errors": c.poll_errors,
                        "tls_failures": c.tls_failures,
                        "leader_changes": c.leader_changes,
                    })),
                }),
            );
        }
        let doc = json!({
            "clusters": clusters,
            "sessions": view.sessions(),
            "buffers_in_use": self.pool.in_use(),
            "buffers_free": self.pool.free(),
            "pipes_in_use": self.pool.pipes_in_use(),
            "draining": self.drain_deadline.is_some(),
            "accept_pauses": view.proxy().accept_pauses,
            "startup_retries": view.proxy().startup_retries,
        });
        let mut out = serde_json::to_vec_pretty(&doc).unwrap_or_default();
        out.push(b'\n');
        out
    }
}

/// A port's counters: sessions by outcome, and per member bytes and connects.
/// (The maps are filled with `insert`, not `collect`: collecting into a map
/// sorts a vector first, a sort instantiated per call site, kilobytes in
/// the binary; the result is the same.)
fn render_port_stats(p: &PortView) -> Value {
    let by_reason = |b: &super::stats::ByReason| -> Value {
        let mut m = serde_json::Map::new();
        for (r, n) in b.iter().filter(|(_, n)| *n > 0) {
            m.insert(r.as_str().to_string(), json!(n));
        }
        m.into()
    };
    let mut members = serde_json::Map::new();
    for (_, m) in p.members.iter() {
        members.insert(
            m.member.to_string(),
            json!({
                "bytes_up": m.bytes_up, "bytes_down": m.bytes_down,
                "connects": m.connects, "connect_failures": m.connect_failures,
            }),
        );
    }
    json!({
        "accepted": p.stats.accepted,
        "refused": by_reason(&p.stats.refused),
        "closed": by_reason(&p.stats.closed),
        "lag_evictions": p.stats.lag_evictions,
        "lag_closes": p.stats.lag_closes,
        "lag_returns": p.stats.lag_returns,
        "fallbacks": p.stats.fallbacks,
        "preconnected": p.preconnected,
        "preconnect_hits": p.stats.preconnect_hits,
        "preconnect_misses": p.stats.preconnect_misses,
        "sessions": p.sessions,
        "held": p.held,
        "members": members,
    })
}

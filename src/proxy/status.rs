//! Read-only status rendering: the `/clusters` JSON document.

use super::*;

impl Proxy {
    /// `GET /clusters`: clusters, members, ports and their backends.
    pub(super) fn status_json(&self) -> Vec<u8> {
        let now = Instant::now();
        let mut per_listener: HashMap<usize, (usize, usize)> = HashMap::new();
        for (_, s) in self
            .sessions
            .iter()
            .filter(|(_, s)| s.phase != Phase::Closed)
        {
            let e = per_listener.entry(s.listener).or_default();
            e.0 += 1;
            if s.phase == Phase::Waiting {
                e.1 += 1;
            }
        }
        let mut clusters = serde_json::Map::new();
        for (name, c) in self.clusters.iter() {
            let listeners: Vec<(usize, &Listener)> = self
                .listeners
                .iter()
                .filter(|(_, l)| &l.cluster == name)
                .collect();
            let members: Vec<Value> = c
                .topology
                .iter()
                .flat_map(|t| t.members.iter().map(move |m| (t, m)))
                .map(|(t, m)| {
                    let mut ports = serde_json::Map::new();
                    for (_, l) in &listeners {
                        let v = match topology::eligibility(t, m, &l.filter) {
                            Ok(addr) => json!({"routable": true, "addr": addr.to_string()}),
                            Err(x) => json!({"routable": false, "reason": x.to_string()}),
                        };
                        ports.insert(port_name(l).to_string(), v);
                    }
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
                let (sessions, waiting) = per_listener.get(lk).copied().unwrap_or_default();
                let backends: Vec<Value> = l
                    .backends
                    .iter()
                    .map(|b| {
                        json!({"member": &*b.member, "addr": b.addr.to_string(), "active": b.active, "draining": b.draining})
                    })
                    .collect();
                ports.insert(
                    port_name(l).to_string(),
                    json!({
                        "listen": l.addr.to_string(),
                        "roles": l.filter.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
                        "host_port": l.filter.host_port,
                        "max_lag_in_bytes": l.filter.max_lag_in_bytes,
                        "backends": backends,
                        "sessions": sessions,
                        "waiting": waiting,
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
                }),
            );
        }
        let doc = json!({
            "clusters": clusters,
            "sessions": self.live_sessions(),
            "buffers_in_use": self.pool.in_use(),
            "buffers_free": self.pool.free(),
            "pipes_in_use": self.pool.pipes_in_use(),
            "draining": self.drain_deadline.is_some(),
        });
        let mut out = serde_json::to_vec_pretty(&doc).unwrap_or_default();
        out.push(b'\n');
        out
    }
}

pub(super) fn port_name(l: &Listener) -> &str {
    l.label.split_once(':').map_or(l.label.as_str(), |(_, p)| p)
}

//! `GET /metrics`: the counters of `stats.rs`, the gauges counted from the
//! session table and the topologies, in Prometheus text format.
//!
//! Read-only, like `status.rs`. One scrape allocates its output buffer
//! (nothing per session); label values are borrowed from the loop's state.
//! Every family is listed in man 5 (METRICS), and a test checks that list
//! against what is served.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::stats::{CloseReason, HealthChecks, MemberStats, PollError};
use super::status::PortView;
use super::sys;
use super::Proxy;
use crate::metrics::{Kind, ProcessStats, Writer};

const P: &str = "patroni_proxy_";

/// Reads one counter of a member.
type MemberCounter = fn(&MemberStats) -> u64;
/// Reads one number of a port.
type PortNumber = fn(&PortView) -> u64;

impl Proxy {
    pub(super) fn metrics_text(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let mut w = Writer::new(&mut out);
        let now = Instant::now();
        let view = self.stats();
        // One name per family, reused by its samples.
        let family = |w: &mut Writer, n: &str, k: Kind, help: &str| -> String {
            let name = format!("{P}{n}");
            w.family(&name, k, help);
            name
        };

        let f = family(
            &mut w,
            "build_info",
            Kind::Gauge,
            "Always 1; the version in a label.",
        );
        w.sample(&f, &[("version", env!("CARGO_PKG_VERSION"))], 1u64);

        // ---- ports -------------------------------------------------------
        let ports: Vec<_> = view.ports().collect();
        let f = family(
            &mut w,
            "port_sessions_accepted_total",
            Kind::Counter,
            "Client connections accepted.",
        );
        for p in &ports {
            w.sample(
                &f,
                &[("cluster", p.cluster), ("port", p.port)],
                p.stats.accepted,
            );
        }
        let f = family(
            &mut w,
            "port_sessions_refused_total",
            Kind::Counter,
            "Client connections that ended before they reached a backend, by reason.",
        );
        for p in &ports {
            for (r, n) in p.stats.refused.iter() {
                w.sample(
                    &f,
                    &[
                        ("cluster", p.cluster),
                        ("port", p.port),
                        ("reason", r.as_str()),
                    ],
                    n,
                );
            }
        }
        let f = family(
            &mut w,
            "port_sessions_current",
            Kind::Gauge,
            "Open client sessions, held ones included.",
        );
        for p in &ports {
            w.sample(&f, &[("cluster", p.cluster), ("port", p.port)], p.sessions);
        }
        let f = family(
            &mut w,
            "port_sessions_held",
            Kind::Gauge,
            "Clients waiting for a routable member or a retry.",
        );
        for p in &ports {
            w.sample(&f, &[("cluster", p.cluster), ("port", p.port)], p.held);
        }
        // The pre-connected sockets (`preconnect`), one family each.
        let pooled: [(&str, Kind, &str, PortNumber); 3] = [
            (
                "port_preconnected",
                Kind::Gauge,
                "Pre-connected backend sockets ready for a client (preconnect).",
                |p| p.preconnected as u64,
            ),
            (
                "port_preconnect_hits_total",
                Kind::Counter,
                "Backend connections served by a pre-connected socket.",
                |p| p.stats.preconnect_hits,
            ),
            (
                "port_preconnect_misses_total",
                Kind::Counter,
                "Backend connections of a preconnect port that found no pre-connected socket ready.",
                |p| p.stats.preconnect_misses,
            ),
        ];
        for (n, kind, help, get) in pooled {
            let f = family(&mut w, n, kind, help);
            for p in &ports {
                w.sample(&f, &[("cluster", p.cluster), ("port", p.port)], get(p));
            }
        }
        let f = family(
            &mut w,
            "port_held_wait_seconds",
            Kind::Histogram,
            "How long clients that had to wait waited before they reached a backend.",
        );
        for p in &ports {
            w.histogram(
                &f,
                &[("cluster", p.cluster), ("port", p.port)],
                &p.stats.held_wait,
            );
        }

        // ---- backends (port x member) ---------------------------------------
        let f = family(
            &mut w,
            "backend_sessions_current",
            Kind::Gauge,
            "Open sessions relayed to a member through a port.",
        );
        for p in &ports {
            for (_, m) in p.members {
                w.sample(
                    &f,
                    &[
                        ("cluster", p.cluster),
                        ("port", p.port),
                        ("member", &m.member),
                    ],
                    m.sessions,
                );
            }
        }
        // The per-member counters, one family each.
        let counters: [(&str, &str, MemberCounter); 4] = [
            (
                "backend_connects_total",
                "Backend connections established.",
                |m| m.connects,
            ),
            (
                "backend_connect_errors_total",
                "Backend connections that failed or timed out.",
                |m| m.connect_failures,
            ),
            (
                "backend_bytes_in_total",
                "Bytes relayed from clients to the member.",
                |m| m.bytes_up,
            ),
            (
                "backend_bytes_out_total",
                "Bytes relayed from the member to clients.",
                |m| m.bytes_down,
            ),
        ];
        for (n, help, get) in counters {
            let f = family(&mut w, n, Kind::Counter, help);
            for p in &ports {
                for (_, m) in p.members {
                    let labels = [
                        ("cluster", p.cluster),
                        ("port", p.port),
                        ("member", &*m.member),
                    ];
                    w.sample(&f, &labels, get(m));
                }
            }
        }
        let f = family(
            &mut w,
            "backend_sessions_closed_total",
            Kind::Counter,
            "Sessions on a member that ended while relaying, by reason.",
        );
        for p in &ports {
            for (_, m) in p.members {
                for r in CloseReason::ALL {
                    w.sample(
                        &f,
                        &[
                            ("cluster", p.cluster),
                            ("port", p.port),
                            ("member", &m.member),
                            ("reason", r.as_str()),
                        ],
                        m.closed.get(r),
                    );
                }
            }
        }

        // ---- members -------------------------------------------------------
        let f = family(
            &mut w,
            "member_info",
            Kind::Gauge,
            "Always 1; a member's Patroni role and state in labels.",
        );
        for (c, state) in self.clusters.iter() {
            for m in state.topology.iter().flat_map(|t| &t.members) {
                w.sample(
                    &f,
                    &[
                        ("cluster", c),
                        ("member", &m.name),
                        ("role", m.role.as_str()),
                        ("state", &m.state),
                    ],
                    1u64,
                );
            }
        }
        let f = family(
            &mut w,
            "member_lag_bytes",
            Kind::Gauge,
            "A replica's lag as Patroni publishes it (replay_lag, else lag); absent while unknown.",
        );
        for (c, state) in self.clusters.iter() {
            for m in state.topology.iter().flat_map(|t| &t.members) {
                if m.role.is_lock_holder() {
                    continue;
                }
                if let Some(lag) = m.effective_lag() {
                    w.sample(&f, &[("cluster", c), ("member", &m.name)], lag);
                }
            }
        }
        let f = family(
            &mut w,
            "member_routable",
            Kind::Gauge,
            "1 when a port sends new clients to the member.",
        );
        for (_, l) in self.listeners.iter() {
            let Some(t) = self.clusters.topology(&l.cluster) else {
                continue;
            };
            for m in &t.members {
                let routable = l
                    .backends
                    .list
                    .iter()
                    .any(|b| *b.member == *m.name && !b.draining);
                w.sample(
                    &f,
                    &[
                        ("cluster", &l.cluster),
                        ("port", l.port_name()),
                        ("member", &m.name),
                    ],
                    routable,
                );
            }
        }

        // ---- clusters ------------------------------------------------------
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let f = family(
            &mut w,
            "cluster_polls_total",
            Kind::Counter,
            "GET /cluster polls answered, successful or not.",
        );
        for (c, s) in self.clusters.iter() {
            w.sample(&f, &[("cluster", c)], s.stats.polls);
        }
        let f = family(
            &mut w,
            "cluster_poll_errors_total",
            Kind::Counter,
            "Polls in which no Patroni host gave a usable answer, by the last host's failure.",
        );
        for (c, s) in self.clusters.iter() {
            for e in PollError::ALL {
                w.sample(
                    &f,
                    &[("cluster", c), ("reason", e.as_str())],
                    s.stats.poll_errors_by[e as usize],
                );
            }
        }
        let f = family(
            &mut w,
            "cluster_poll_duration_seconds",
            Kind::Histogram,
            "How long a poll took, every host tried included.",
        );
        for (c, s) in self.clusters.iter() {
            w.histogram(&f, &[("cluster", c)], &s.stats.poll_duration);
        }
        let f = family(
            &mut w,
            "cluster_topology_age_seconds",
            Kind::Gauge,
            "Seconds since the last good poll; absent before the first.",
        );
        for (c, s) in self.clusters.iter() {
            if let Some(t) = s.last_success {
                w.sample(
                    &f,
                    &[("cluster", c)],
                    now.saturating_duration_since(t).as_secs_f64(),
                );
            }
        }
        let f = family(
            &mut w,
            "cluster_last_good_poll_timestamp_seconds",
            Kind::Gauge,
            "Unix time of the last good poll; absent before the first.",
        );
        for (c, s) in self.clusters.iter() {
            if let Some(t) = s.last_success {
                w.sample(
                    &f,
                    &[("cluster", c)],
                    wall - now.saturating_duration_since(t).as_secs_f64(),
                );
            }
        }
        let f = family(
            &mut w,
            "cluster_stale",
            Kind::Gauge,
            "1 while the topology is older than topology_ttl.",
        );
        for (c, s) in self.clusters.iter() {
            w.sample(&f, &[("cluster", c)], s.stale);
        }
        let f = family(
            &mut w,
            "cluster_leader_changes_total",
            Kind::Counter,
            "Times the leader became another member.",
        );
        for (c, s) in self.clusters.iter() {
            w.sample(&f, &[("cluster", c)], s.stats.leader_changes);
        }
        let f = family(
            &mut w,
            "cluster_tls_failures_total",
            Kind::Counter,
            "Requests to a Patroni host that failed in TLS (a poll may count several).",
        );
        for (c, s) in self.clusters.iter() {
            w.sample(&f, &[("cluster", c)], s.stats.tls_failures);
        }

        // ---- process-wide ----------------------------------------------------
        let ps = view.proxy();
        let f = family(
            &mut w,
            "accept_pauses_total",
            Kind::Counter,
            "Times accepting paused (no file descriptors).",
        );
        w.sample(&f, &[], ps.accept_pauses);
        let f = family(
            &mut w,
            "startup_retries_total",
            Kind::Counter,
            "Connection start-ups replayed to another backend.",
        );
        w.sample(&f, &[], ps.startup_retries);
        let f = family(
            &mut w,
            "tls_handshake_failures_total",
            Kind::Counter,
            "TLS handshakes that failed, by listener.",
        );
        for (i, l) in ["admin", "health"].iter().enumerate() {
            w.sample(&f, &[("listener", l)], ps.tls_handshake_failures[i]);
        }
        let f = family(
            &mut w,
            "health_checks_total",
            Kind::Counter,
            "Health checks answered, by listener and status class.",
        );
        for (i, l) in HealthChecks::LISTENERS.iter().enumerate() {
            for (j, class) in HealthChecks::CLASSES.iter().enumerate() {
                w.sample(
                    &f,
                    &[("listener", l), ("status", class)],
                    ps.health_checks.0[i][j],
                );
            }
        }
        let mut process = ProcessStats::read(sys::clock_ticks(), sys::page_size());
        process.open_fds = self.open_fds.get();
        process.write(&mut w);
        out
    }
}

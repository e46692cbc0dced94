//! The one integration-test binary. Every test drives the real
//! `patroni-proxy` executable against a mock Patroni API and greeting/echo
//! backends, on loopback only.

mod util;

/// HTTPS and access rules on the admin listener.
mod admin_tls;
/// packaging/patroni-proxy-callback, the Patroni callback.
mod callback;
/// Command line, `-t`, exit codes and configuration errors.
mod cli;
/// Admin interface, SIGHUP reload, SIGTERM drain.
mod control;
/// Topology changes while clients are connected: failover, split brain,
/// held clients, API outages.
mod failover;
/// Health listeners: Patroni-compatible checks, agent port, /health.
mod health;
/// Prometheus output, checked by promtool.
mod metrics;
/// Lag grace and hysteresis, preference, fallback, max_waiting.
mod policy;
/// Pre-connected backend sockets (`preconnect`): hand-over, refill, failover,
/// max age, servers that close them, a socket that dies after hand-over.
mod preconnect;
/// Role routing, balancing and eligibility rules, with real Patroni answers.
mod routing;
/// HTTPS to Patroni: CA, client certificates, verification modes, rotation.
mod tls;
/// Bytes on the wire: large transfers, half-close, concurrency, connect
/// failures and timeouts, connection and file-descriptor limits.
mod transport;

//! Counters: plain integers, kept where the loop already looks.
//!
//! - [`PortStats`] lives in its `Listener` (indexed by the listener's slab
//!   key, like the port): sessions accepted, refused and closed, by reason.
//! - [`MemberStats`] lives in the port too, one per member in the port's
//!   backend list or targeted by one of its sessions, at a fixed slot
//!   (`Target::slot`): bytes each way, connects and connect failures. It
//!   outlives the member's place in the backend list while sessions remain,
//!   so a session that ends after its member left is still counted; then it
//!   goes (`listener.rs`), and so do the member's series in `/metrics`.
//! - [`ClusterStats`] lives in its `ClusterState`: polls, failed polls and
//!   leader changes.
//! - [`ProxyStats`]: process-wide events (accept pauses, start-up retries).
//!
//! Nothing is allocated per session; a counter only ever grows (Prometheus
//! counter semantics). Gauges are not kept here, but for
//! `MemberStats::sessions`: the others (sessions now, sessions held) are
//! counted from the session table when read (`status.rs`).

use std::rc::Rc;

use crate::metrics::{Histogram, WAIT_BUCKETS};

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Normal end, the client closed first.
    Client,
    /// Normal end, the server closed first.
    Server,
    /// A read or write on the client socket failed.
    ClientError,
    /// A read or write on the backend socket failed.
    ServerError,
    /// The client left before it reached a backend.
    ClientLeft,
    /// Its member lost the role the port requires (demoted, stopped,
    /// tagged `noloadbalance`, split brain).
    RoleLost,
    /// Its member lags beyond `max_lag_in_bytes`, or its lag is unknown.
    Lag,
    /// Its member left the cluster or changed its address.
    Removed,
    /// A fallback member's session, once the port's own roles were back
    /// (`fallback_return: close`).
    FallbackReturn,
    /// Refused at once: `max_waiting` clients were already held.
    TooManyWaiting,
    /// Its port was removed or moved to another cluster by a reload.
    PortClosed,
    /// SIGTERM before it reached a backend.
    Shutdown,
    /// The cluster's topology went stale (`topology_ttl`).
    Stale,
    /// No routable member within `backend_wait_timeout`.
    NoMember,
    /// Every routable member failed to connect, until the wait ran out.
    ConnectFailed,
    /// Half-closed for longer than the fin timeout.
    FinTimeout,
}

impl CloseReason {
    pub const ALL: [CloseReason; 16] = [
        CloseReason::Client,
        CloseReason::Server,
        CloseReason::ClientError,
        CloseReason::ServerError,
        CloseReason::ClientLeft,
        CloseReason::RoleLost,
        CloseReason::Lag,
        CloseReason::Removed,
        CloseReason::FallbackReturn,
        CloseReason::TooManyWaiting,
        CloseReason::PortClosed,
        CloseReason::Shutdown,
        CloseReason::Stale,
        CloseReason::NoMember,
        CloseReason::ConnectFailed,
        CloseReason::FinTimeout,
    ];

    /// The label value, for status and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Client => "client",
            CloseReason::Server => "server",
            CloseReason::ClientError => "client_error",
            CloseReason::ServerError => "server_error",
            CloseReason::ClientLeft => "client_left",
            CloseReason::RoleLost => "role_lost",
            CloseReason::Lag => "lag",
            CloseReason::Removed => "removed",
            CloseReason::FallbackReturn => "fallback_return",
            CloseReason::TooManyWaiting => "too_many_waiting",
            CloseReason::PortClosed => "port_closed",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Stale => "stale",
            CloseReason::NoMember => "no_member",
            CloseReason::ConnectFailed => "connect_failed",
            CloseReason::FinTimeout => "fin_timeout",
        }
    }
}

/// One counter per [`CloseReason`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ByReason([u64; CloseReason::ALL.len()]);

impl ByReason {
    pub fn add(&mut self, r: CloseReason) {
        self.0[r as usize] += 1;
    }

    pub fn get(&self, r: CloseReason) -> u64 {
        self.0[r as usize]
    }

    /// `(reason, count)` for every reason, zeros included.
    pub fn iter(&self) -> impl Iterator<Item = (CloseReason, u64)> + '_ {
        CloseReason::ALL.iter().map(|r| (*r, self.get(*r)))
    }
}

/// The sessions of one port.
#[derive(Debug, Clone)]
pub struct PortStats {
    pub accepted: u64,
    /// Ended before they were relaying (never connected, or held for a
    /// retry when they ended), by reason.
    pub refused: ByReason,
    /// Ended while relaying, by reason.
    pub closed: ByReason,
    /// Members evicted for lag (no new clients).
    pub lag_evictions: u64,
    /// Times a member's sessions were closed for lag: with the eviction
    /// (`lag_grace` 0, or over `max_lag_in_bytes_close`) or after it.
    pub lag_closes: u64,
    /// Members back from a lag eviction.
    pub lag_returns: u64,
    /// Times new clients started going to the fallback roles.
    pub fallbacks: u64,
    /// Backend connections of a `preconnect` port served by a pooled
    /// socket, and those that found none ready.
    pub preconnect_hits: u64,
    pub preconnect_misses: u64,
    /// How long clients that had to wait waited before they reached a
    /// backend (seconds).
    pub held_wait: Histogram,
}

impl Default for PortStats {
    fn default() -> PortStats {
        PortStats {
            accepted: 0,
            refused: ByReason::default(),
            closed: ByReason::default(),
            lag_evictions: 0,
            lag_closes: 0,
            lag_returns: 0,
            fallbacks: 0,
            preconnect_hits: 0,
            preconnect_misses: 0,
            held_wait: Histogram::new(WAIT_BUCKETS),
        }
    }
}

/// One member as seen through one port.
#[derive(Debug, Clone)]
pub struct MemberStats {
    pub member: Rc<str>,
    /// Client to server.
    pub bytes_up: u64,
    /// Server to client.
    pub bytes_down: u64,
    /// Connects that succeeded.
    pub connects: u64,
    /// Connects that failed or timed out.
    pub connect_failures: u64,
    /// Sessions on this member that ended while relaying, by reason.
    pub closed: ByReason,
    /// Sessions of the port on this member now (connecting or connected):
    /// while any, the entry stays.
    pub sessions: u32,
}

impl MemberStats {
    pub fn new(member: Rc<str>) -> MemberStats {
        MemberStats {
            member,
            bytes_up: 0,
            bytes_down: 0,
            connects: 0,
            connect_failures: 0,
            closed: ByReason::default(),
            sessions: 0,
        }
    }
}

/// Why a poll failed (the last host's failure decides), as the updater
/// reports it.
pub use crate::updater::PollError;

/// Poll durations, from 1 ms to the longest sensible `api_timeout`.
pub const POLL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One cluster's updater.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterStats {
    /// Polls answered (successful or not).
    pub polls: u64,
    /// Polls in which no host gave a usable answer.
    pub poll_errors: u64,
    /// The same, by [`PollError`].
    pub poll_errors_by: [u64; PollError::ALL.len()],
    /// How long polls took (seconds), every host tried included.
    pub poll_duration: Histogram,
    /// Host requests that failed in TLS (a poll may count several).
    pub tls_failures: u64,
    /// Times the leader became a member other than the last one known.
    pub leader_changes: u64,
}

impl Default for ClusterStats {
    fn default() -> ClusterStats {
        ClusterStats {
            polls: 0,
            poll_errors: 0,
            poll_errors_by: [0; PollError::ALL.len()],
            poll_duration: Histogram::new(POLL_BUCKETS),
            tls_failures: 0,
            leader_changes: 0,
        }
    }
}

/// Process-wide events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Times accepting paused for lack of descriptors (or another accept
    /// failure).
    pub accept_pauses: u64,
    /// Start-ups replayed to another backend after a refusal or eviction.
    pub startup_retries: u64,
    /// TLS handshakes that failed, by listener (`admin`, `health`).
    pub tls_handshake_failures: [u64; 2],
    /// Health checks answered, by listener and status class.
    pub health_checks: HealthChecks,
}

/// Health checks answered: `[http, agent]` x `[2xx, 4xx, 5xx]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthChecks(pub [[u64; 3]; 2]);

impl HealthChecks {
    pub const LISTENERS: [&'static str; 2] = ["http", "agent"];
    pub const CLASSES: [&'static str; 3] = ["2xx", "4xx", "5xx"];

    /// Counts one answer with `status` on listener 0 (http) or 1 (agent).
    pub fn add(&mut self, listener: usize, status: u16) {
        let class = match status {
            200..=399 => 0,
            400..=499 => 1,
            _ => 2,
        };
        self.0[listener.min(1)][class] += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_counter_and_name() {
        let mut b = ByReason::default();
        for (i, r) in CloseReason::ALL.iter().enumerate() {
            for _ in 0..=i {
                b.add(*r);
            }
        }
        for (i, (r, n)) in b.iter().enumerate() {
            assert_eq!(n, i as u64 + 1, "{r:?}");
        }
        let mut names: Vec<&str> = CloseReason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), CloseReason::ALL.len());
    }
}

//! Counters: plain integers, kept where the loop already looks.
//!
//! - [`PortStats`] lives in its `Listener` (indexed by the listener's slab
//!   key, like the port): sessions accepted, refused and closed, by reason.
//! - [`MemberStats`] lives in the port too, one per member the port ever
//!   routed to, at a fixed index (`Target::slot`): bytes each way, connects
//!   and connect failures. It outlives the member's place in the backend
//!   list, so a session that ends after its member left is still counted.
//! - [`ClusterStats`] lives in its `ClusterState`: polls, failed polls and
//!   leader changes.
//! - [`ProxyStats`]: process-wide events (accept pauses, start-up retries).
//!
//! Nothing is allocated per session; a counter only ever grows (Prometheus
//! counter semantics). Gauges (sessions now, sessions held) are not kept
//! here: they are counted from the session table when read (`status.rs`).

use std::rc::Rc;

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
    pub const ALL: [CloseReason; 14] = [
        CloseReason::Client,
        CloseReason::Server,
        CloseReason::ClientError,
        CloseReason::ServerError,
        CloseReason::ClientLeft,
        CloseReason::RoleLost,
        CloseReason::Lag,
        CloseReason::Removed,
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
#[derive(Debug, Clone, Default)]
pub struct PortStats {
    pub accepted: u64,
    /// Ended before they were relaying (never connected, or held for a
    /// retry when they ended), by reason.
    pub refused: ByReason,
    /// Ended while relaying, by reason.
    pub closed: ByReason,
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
}

impl MemberStats {
    pub fn new(member: Rc<str>) -> MemberStats {
        MemberStats {
            member,
            bytes_up: 0,
            bytes_down: 0,
            connects: 0,
            connect_failures: 0,
        }
    }
}

/// The index of `member` in `members`, added if new. The index never
/// changes afterwards.
pub fn member_slot(members: &mut Vec<MemberStats>, member: &str) -> usize {
    match members.iter().position(|m| &*m.member == member) {
        Some(i) => i,
        None => {
            members.push(MemberStats::new(Rc::from(member)));
            members.len() - 1
        }
    }
}

/// One cluster's updater.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterStats {
    /// Polls answered (successful or not).
    pub polls: u64,
    /// Polls in which no host gave a usable answer.
    pub poll_errors: u64,
    /// Host requests that failed in TLS (a poll may count several).
    pub tls_failures: u64,
    /// Times the leader became a member other than the last one known.
    pub leader_changes: u64,
}

/// Process-wide events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Times accepting paused for lack of descriptors (or another accept
    /// failure).
    pub accept_pauses: u64,
    /// Start-ups replayed to another backend after a refusal or eviction.
    pub startup_retries: u64,
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

    #[test]
    fn member_slots_are_stable() {
        let mut m = Vec::new();
        assert_eq!(member_slot(&mut m, "a"), 0);
        assert_eq!(member_slot(&mut m, "b"), 1);
        m[0].bytes_up = 5;
        assert_eq!(member_slot(&mut m, "a"), 0);
        assert_eq!(m[0].bytes_up, 5);
    }
}

//! Patroni's `GET /cluster` answer to a topology, then every per-topology
//! step the event loop runs on it.
use patroni_proxy::topology::{self, PortFilter, PortRole};

fn main() {
    let filters: Vec<PortFilter> = [
        vec![PortRole::Leader],
        vec![PortRole::Sync, PortRole::Async],
        vec![PortRole::Any],
        vec![PortRole::StandbyLeader],
    ]
    .into_iter()
    .map(|roles| PortFilter {
        roles,
        host_port: None,
        max_lag_in_bytes: Some(1024),
    })
    .collect();
    afl::fuzz!(|data: &[u8]| {
        let Ok(parsed) = patroni_proxy::patroni::parse(data) else {
            return;
        };
        let mut t = parsed.topology;
        // As the updater would after resolving: literal IPs only.
        for m in &mut t.members {
            m.ip = m
                .host
                .as_deref()
                .and_then(|h| h.trim_matches(['[', ']']).parse().ok());
        }
        for f in &filters {
            let routes = topology::routable(&t, f);
            for r in &routes {
                assert!(topology::unroutable(r.addr.ip()).is_none());
            }
            let judged = topology::judge_all(&t, f)
                .filter(|(_, r)| r.is_ok())
                .count();
            assert_eq!(judged, routes.len());
        }
        let _ = topology::diff(None, &t);
        let _ = topology::diff(Some(&t), &t);
    });
}

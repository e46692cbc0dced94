//! Health-check requests and agent lines from load balancers: any target
//! parses or is refused, and every decision over real `/cluster` answers
//! is a status Patroni gives (200, 503) or one of ours (400, 404), with a
//! JSON body and a one-line agent answer.
use std::time::Duration;

use patroni_proxy::health::{decide, parse_agent_line, parse_target, Method, View};
use patroni_proxy::patroni;

const BODIES: [&str; 3] = [
    include_str!("../../fixtures/patroni-4.1.5/sync_quorum.json"),
    include_str!("../../fixtures/patroni-3.0.2/sync_on.json"),
    include_str!("../../fixtures/patroni-4.1.5/replica_stopped.json"),
];

fn main() {
    let topologies: Vec<_> = BODIES
        .iter()
        .map(|b| patroni::parse(b.as_bytes()).unwrap().topology)
        .collect();
    afl::fuzz!(|data: &[u8]| {
        let Some((&first, rest)) = data.split_first() else {
            return;
        };
        let method = [Method::Get, Method::Head, Method::Options][usize::from(first % 3)];
        let topo = &topologies[usize::from(first / 3) % topologies.len()];
        let view = View {
            topology: Some(topo),
            age: Duration::from_millis(u64::from(first) * 200),
            ttl: Some(Duration::from_secs(30)),
        };
        let text = String::from_utf8_lossy(rest);
        let is_cluster = |c: &str| c == "demo";
        if let Ok(check) = parse_target(&text, is_cluster) {
            let member = match &check.target {
                patroni_proxy::health::Target::Member { member, .. } => member.clone(),
                patroni_proxy::health::Target::Local => "node2".to_string(),
            };
            let a = decide(method, &check.endpoint, &check.query, "demo", &member, Some(&view));
            assert!(matches!(a.status, 200 | 404 | 503), "{}", a.status);
            assert!(a.body.ends_with("}\n"));
            let line = a.agent_line();
            assert!(line.ends_with('\n') && line.matches('\n').count() == 1, "{line:?}");
        }
        let _ = parse_agent_line(rest, is_cluster);
    });
}

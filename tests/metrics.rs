//! `/metrics`: what promtool, Prometheus' own linter, says of our output.

use std::io::Write;
use std::process::{Command, Stdio};

use patroni_proxy::metrics::{Histogram, Kind, ProcessStats, Writer, WAIT_BUCKETS};

/// `promtool check metrics` on `text`: its complaints (empty when clean).
pub fn promtool(text: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; tests/run installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        said
    } else {
        format!("promtool failed: {said}")
    }
}

#[test]
fn the_writer_satisfies_promtool() {
    let mut buf = Vec::new();
    let mut w = Writer::new(&mut buf);
    w.family(
        "patroni_proxy_sessions_accepted_total",
        Kind::Counter,
        "Client sessions accepted.",
    );
    for port in ["rw", "r\"o\\\n"] {
        w.sample(
            "patroni_proxy_sessions_accepted_total",
            &[("cluster", "main"), ("port", port)],
            3u64,
        );
    }
    w.family(
        "patroni_proxy_topology_age_seconds",
        Kind::Gauge,
        "Seconds since the last good poll.",
    );
    w.sample(
        "patroni_proxy_topology_age_seconds",
        &[("cluster", "main")],
        0.25,
    );
    let mut h = Histogram::new(WAIT_BUCKETS);
    h.observe(0.3);
    h.observe(12.0);
    w.family(
        "patroni_proxy_held_wait_seconds",
        Kind::Histogram,
        "How long held clients waited.",
    );
    w.histogram("patroni_proxy_held_wait_seconds", &[("port", "rw")], &h);
    ProcessStats::read(100.0, 4096).write(&mut w);
    let text = String::from_utf8(buf).unwrap();
    assert_eq!(promtool(&text), "", "{text}");
}

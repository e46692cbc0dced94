//! Prometheus text exposition format 0.0.4, written straight into a reused
//! buffer, and the standard `process_*` metrics from `/proc/self`.
//!
//! [`Writer`] is PURE: it formats into a `Vec<u8>` the caller keeps between
//! scrapes, so a scrape allocates nothing per sample once the buffer has
//! grown to size (labels are borrowed `&str`, numbers are formatted in
//! place). It enforces the conventions at the call site in debug builds:
//! valid names, counters ending in `_total`, a `# HELP` and `# TYPE` before
//! the first sample of every family.
//!
//! [`ProcessStats::read`] is the one piece with I/O: a few small procfs
//! reads, which never block on a disk (the libc constants it needs come
//! from `proxy::sys`). The open-descriptor count is [`OpenFds`]'s: one
//! `stat` on Linux 6.2 and later; older kernels can only list
//! `/proc/self/fd`, about 2 µs per descriptor in the kernel (18 ms of the
//! loop per scrape with 9,900 sessions held), so there a short-lived thread
//! counts and the scrape reads its last count.

use std::cell::Cell;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A sample value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Num {
    U(u64),
    F(f64),
}

impl From<u64> for Num {
    fn from(v: u64) -> Num {
        Num::U(v)
    }
}

impl From<usize> for Num {
    fn from(v: usize) -> Num {
        Num::U(v as u64)
    }
}

impl From<u32> for Num {
    fn from(v: u32) -> Num {
        Num::U(u64::from(v))
    }
}

impl From<bool> for Num {
    fn from(v: bool) -> Num {
        Num::U(u64::from(v))
    }
}

impl From<f64> for Num {
    fn from(v: f64) -> Num {
        Num::F(v)
    }
}

/// Writes one exposition into `out` (appending).
pub struct Writer<'a> {
    out: &'a mut Vec<u8>,
    /// The family whose header was written last (debug checks only).
    family: String,
}

impl<'a> Writer<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> Writer<'a> {
        Writer {
            out,
            family: String::new(),
        }
    }

    /// Starts a family: `# HELP` and `# TYPE`.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        debug_assert!(valid_name(name), "metric name {name:?}");
        debug_assert!(
            kind != Kind::Counter || name.ends_with("_total"),
            "counter {name} must end in _total"
        );
        if cfg!(debug_assertions) {
            self.family.clear();
            self.family.push_str(name);
        }
        self.out.extend_from_slice(b"# HELP ");
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b' ');
        for &b in help.as_bytes() {
            match b {
                b'\\' => self.out.extend_from_slice(b"\\\\"),
                b'\n' => self.out.extend_from_slice(b"\\n"),
                _ => self.out.push(b),
            }
        }
        self.out.extend_from_slice(b"\n# TYPE ");
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b' ');
        self.out.extend_from_slice(kind.as_str().as_bytes());
        self.out.push(b'\n');
    }

    /// One sample of the current family (histograms: [`Writer::histogram`]).
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Into<Num>) {
        self.write_sample(name, "", labels, None, value.into());
    }

    fn write_sample(
        &mut self,
        name: &str,
        suffix: &str,
        labels: &[(&str, &str)],
        le: Option<f64>,
        value: Num,
    ) {
        debug_assert!(
            name.starts_with(self.family.as_str()) && !self.family.is_empty(),
            "sample {name} outside its family {}",
            self.family
        );
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(suffix.as_bytes());
        if !labels.is_empty() || le.is_some() {
            self.out.push(b'{');
            for (i, (k, v)) in labels.iter().enumerate() {
                debug_assert!(valid_label(k), "label name {k:?}");
                if i > 0 {
                    self.out.push(b',');
                }
                self.out.extend_from_slice(k.as_bytes());
                self.out.extend_from_slice(b"=\"");
                escape_label(self.out, v);
                self.out.push(b'"');
            }
            if let Some(le) = le {
                if !labels.is_empty() {
                    self.out.push(b',');
                }
                self.out.extend_from_slice(b"le=\"");
                write_f64(self.out, le);
                self.out.push(b'"');
            }
            self.out.push(b'}');
        }
        self.out.push(b' ');
        match value {
            Num::U(v) => {
                let _ = write!(self.out, "{v}");
            }
            Num::F(v) => write_f64(self.out, v),
        }
        self.out.push(b'\n');
    }

    /// All samples of one histogram series.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        let mut cumulative = 0;
        for (i, &bound) in h.bounds.iter().enumerate() {
            cumulative += h.counts[i];
            self.write_sample(name, "_bucket", labels, Some(bound), Num::U(cumulative));
        }
        self.write_sample(
            name,
            "_bucket",
            labels,
            Some(f64::INFINITY),
            Num::U(h.count),
        );
        self.write_sample(name, "_sum", labels, None, Num::F(h.sum));
        self.write_sample(name, "_count", labels, None, Num::U(h.count));
    }
}

fn escape_label(out: &mut Vec<u8>, v: &str) {
    for &b in v.as_bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'"' => out.extend_from_slice(b"\\\""),
            b'\n' => out.extend_from_slice(b"\\n"),
            _ => out.push(b),
        }
    }
}

fn write_f64(out: &mut Vec<u8>, v: f64) {
    if v.is_nan() {
        out.extend_from_slice(b"NaN");
    } else if v == f64::INFINITY {
        out.extend_from_slice(b"+Inf");
    } else if v == f64::NEG_INFINITY {
        out.extend_from_slice(b"-Inf");
    } else {
        let _ = write!(out, "{v}");
    }
}

fn valid_name(n: &str) -> bool {
    let mut b = n.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

fn valid_label(n: &str) -> bool {
    let mut b = n.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
        && !n.starts_with("__")
}

/// A fixed-bucket histogram (seconds).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative).
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// Bucket bounds for client wait times, from a millisecond to a minute.
pub const WAIT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, secs: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| secs <= b) {
            self.counts[i] += 1;
        }
        self.sum += secs;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

/// The names of the families in an exposition (`# TYPE` lines), for tests
/// and the man page drift check.
pub fn family_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect()
}

/// How often, at most, a kernel without the `stat` count gets a counting
/// thread (the scrape between two counts shows the last one).
const FD_RECOUNT: Duration = Duration::from_secs(5);

/// `process_open_fds` without a cost that grows with the sessions in the
/// caller's thread.
#[derive(Debug)]
pub struct OpenFds {
    /// The last count of a counting thread.
    last: Arc<AtomicU64>,
    /// A counting thread is running.
    counting: Arc<AtomicBool>,
    /// When the last counting thread was started.
    started: Cell<Option<Instant>>,
}

impl OpenFds {
    /// Counts once, in this thread: at start-up the table is small.
    pub fn new() -> OpenFds {
        OpenFds {
            last: Arc::new(AtomicU64::new(stat_count().unwrap_or_else(list_count))),
            counting: Arc::new(AtomicBool::new(false)),
            started: Cell::new(None),
        }
    }

    /// The open descriptors now (Linux 6.2+), or as last counted.
    pub fn get(&self) -> u64 {
        if let Some(n) = stat_count() {
            return n;
        }
        let due = self.started.get().is_none_or(|t| t.elapsed() >= FD_RECOUNT);
        if due && !self.counting.swap(true, Ordering::AcqRel) {
            self.started.set(Some(Instant::now()));
            let (last, counting) = (Arc::clone(&self.last), Arc::clone(&self.counting));
            let spawned = std::thread::Builder::new()
                .name("fd-count".into())
                .spawn(move || {
                    last.store(list_count(), Ordering::Relaxed);
                    counting.store(false, Ordering::Release);
                });
            if spawned.is_err() {
                self.counting.store(false, Ordering::Release);
            }
        }
        self.last.load(Ordering::Relaxed)
    }
}

impl Default for OpenFds {
    fn default() -> OpenFds {
        OpenFds::new()
    }
}

/// The size of `/proc/self/fd`, which Linux 6.2 and later report as the
/// number of open descriptors (0 before).
fn stat_count() -> Option<u64> {
    std::fs::metadata("/proc/self/fd")
        .ok()
        .map(|m| m.len())
        .filter(|&n| n > 0)
}

/// The entries of `/proc/self/fd`, less the one this listing holds open.
fn list_count() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| (d.count() as u64).saturating_sub(1))
        .unwrap_or(0)
}

/// The standard `process_*` metrics.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ProcessStats {
    pub resident_memory_bytes: u64,
    pub virtual_memory_bytes: u64,
    pub cpu_seconds: f64,
    pub open_fds: u64,
    pub max_fds: u64,
    pub start_time_seconds: f64,
}

impl ProcessStats {
    /// Reads `/proc/self/{stat,limits}` and `/proc/stat` (boot time,
    /// once). `ticks` is `sysconf(_SC_CLK_TCK)`, `page_size` the page size
    /// (the caller asks libc). Missing pieces stay 0.
    pub fn read(ticks: f64, page_size: u64) -> ProcessStats {
        let mut s = ProcessStats::default();
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            if let Some(p) = parse_stat(&stat) {
                s.cpu_seconds = (p.utime + p.stime) as f64 / ticks;
                s.virtual_memory_bytes = p.vsize;
                s.resident_memory_bytes = p.rss_pages * page_size;
                s.start_time_seconds = boot_time() + p.starttime as f64 / ticks;
            }
        }
        if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
            s.max_fds = parse_max_fds(&limits).unwrap_or(0);
        }
        s
    }

    /// Writes the five families plus `process_virtual_memory_bytes`.
    pub fn write(&self, w: &mut Writer) {
        w.family(
            "process_cpu_seconds_total",
            Kind::Counter,
            "Total user and system CPU time spent in seconds.",
        );
        w.sample("process_cpu_seconds_total", &[], self.cpu_seconds);
        w.family(
            "process_resident_memory_bytes",
            Kind::Gauge,
            "Resident memory size in bytes.",
        );
        w.sample(
            "process_resident_memory_bytes",
            &[],
            self.resident_memory_bytes,
        );
        w.family(
            "process_virtual_memory_bytes",
            Kind::Gauge,
            "Virtual memory size in bytes.",
        );
        w.sample(
            "process_virtual_memory_bytes",
            &[],
            self.virtual_memory_bytes,
        );
        w.family(
            "process_open_fds",
            Kind::Gauge,
            "Number of open file descriptors.",
        );
        w.sample("process_open_fds", &[], self.open_fds);
        w.family(
            "process_max_fds",
            Kind::Gauge,
            "Maximum number of open file descriptors.",
        );
        w.sample("process_max_fds", &[], self.max_fds);
        w.family(
            "process_start_time_seconds",
            Kind::Gauge,
            "Start time of the process since unix epoch in seconds.",
        );
        w.sample("process_start_time_seconds", &[], self.start_time_seconds);
    }
}

#[derive(Debug, PartialEq)]
struct Stat {
    utime: u64,
    stime: u64,
    starttime: u64,
    vsize: u64,
    rss_pages: u64,
}

/// `/proc/<pid>/stat`: fields after the command name, which is in
/// parentheses and may itself contain spaces and parentheses.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); field n is f[n - 3].
    let n = |i: usize| f.get(i - 3).and_then(|s| s.parse::<u64>().ok());
    Some(Stat {
        utime: n(14)?,
        stime: n(15)?,
        starttime: n(22)?,
        vsize: n(23)?,
        rss_pages: n(24)?,
    })
}

fn parse_max_fds(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    if soft == "unlimited" {
        return Some(u64::MAX);
    }
    soft.parse().ok()
}

fn boot_time() -> f64 {
    static BOOT: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("btime "))
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_samples_and_escaping() {
        let mut buf = Vec::new();
        let mut w = Writer::new(&mut buf);
        w.family(
            "patroni_proxy_sessions_total",
            Kind::Counter,
            "Sessions \\ accepted\nby port.",
        );
        w.sample(
            "patroni_proxy_sessions_total",
            &[("port", "a\"b\\c\nd"), ("cluster", "demo")],
            7u64,
        );
        w.family("patroni_proxy_up", Kind::Gauge, "Up.");
        w.sample("patroni_proxy_up", &[], 1.5);
        w.sample("patroni_proxy_up", &[("x", "y")], f64::NAN);
        let text = String::from_utf8(buf).unwrap();
        assert_eq!(
            text,
            "# HELP patroni_proxy_sessions_total Sessions \\\\ accepted\\nby port.\n\
             # TYPE patroni_proxy_sessions_total counter\n\
             patroni_proxy_sessions_total{port=\"a\\\"b\\\\c\\nd\",cluster=\"demo\"} 7\n\
             # HELP patroni_proxy_up Up.\n\
             # TYPE patroni_proxy_up gauge\n\
             patroni_proxy_up 1.5\n\
             patroni_proxy_up{x=\"y\"} NaN\n"
        );
        assert_eq!(
            family_names(&text),
            ["patroni_proxy_sessions_total", "patroni_proxy_up"]
        );
    }

    #[test]
    fn histogram_is_cumulative_with_inf() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        for s in [0.05, 0.5, 0.7, 5.0] {
            h.observe(s);
        }
        let mut buf = Vec::new();
        let mut w = Writer::new(&mut buf);
        w.family("t_wait_seconds", Kind::Histogram, "Wait.");
        w.histogram("t_wait_seconds", &[("port", "rw")], &h);
        let text = String::from_utf8(buf).unwrap();
        assert!(text.contains("t_wait_seconds_bucket{port=\"rw\",le=\"0.1\"} 1\n"));
        assert!(text.contains("t_wait_seconds_bucket{port=\"rw\",le=\"1\"} 3\n"));
        assert!(text.contains("t_wait_seconds_bucket{port=\"rw\",le=\"+Inf\"} 4\n"));
        assert!(text.contains("t_wait_seconds_sum{port=\"rw\"} 6.25\n"));
        assert!(text.contains("t_wait_seconds_count{port=\"rw\"} 4\n"));
    }

    #[test]
    #[should_panic(expected = "must end in _total")]
    #[cfg(debug_assertions)]
    fn counters_must_end_in_total() {
        let mut buf = Vec::new();
        Writer::new(&mut buf).family("x_sessions", Kind::Counter, "x");
    }

    #[test]
    fn a_reused_buffer_does_not_grow_on_the_second_render() {
        let render = |buf: &mut Vec<u8>| {
            buf.clear();
            let mut w = Writer::new(buf);
            w.family("a_current", Kind::Gauge, "A.");
            for i in 0..1000u64 {
                w.sample("a_current", &[("member", "node1"), ("port", "rw")], i);
            }
        };
        let mut buf = Vec::new();
        render(&mut buf);
        let cap = buf.capacity();
        let ptr = buf.as_ptr();
        render(&mut buf);
        assert_eq!((buf.capacity(), buf.as_ptr()), (cap, ptr));
    }

    #[test]
    fn proc_parsing() {
        let stat =
            "1234 (pp (x) y) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 3 0 9000 104857600 2560 rest";
        assert_eq!(
            parse_stat(stat).unwrap(),
            Stat {
                utime: 250,
                stime: 50,
                starttime: 9000,
                vsize: 104857600,
                rss_pages: 2560
            }
        );
        assert_eq!(parse_stat("garbage"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(parse_max_fds(limits), Some(1024));
        let s = ProcessStats::read(100.0, 4096);
        assert!(s.resident_memory_bytes > 0 && s.max_fds > 0);
        // Whichever way the kernel offers, a count that sees stdio at least.
        assert!(OpenFds::new().get() >= 3);
        assert!(list_count() >= 3);
        if let Some(n) = stat_count() {
            assert!(n >= 3);
        }
        assert!(s.start_time_seconds > 1.5e9, "{}", s.start_time_seconds);
        let mut buf = Vec::new();
        s.write(&mut Writer::new(&mut buf));
        let text = String::from_utf8(buf).unwrap();
        assert_eq!(family_names(&text).len(), 6);
    }
}

//! Member host name lookups for an updater thread: parallel, bounded in
//! time and in threads.
//!
//! The system resolver (`getaddrinfo`) has no timeout of its own that we
//! control, and one unresolvable name can take many seconds. Names are
//! looked up by at most [`MAX_THREADS`] short-lived threads that take names
//! from a shared queue; [`Dns::resolve`] waits for the answers at most until
//! its deadline. A lookup that is still running then is not started again:
//! its answer lands in the cache when it comes, for the next poll. Answers,
//! failures included, are reused for [`CACHE_FOR`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most lookup threads alive at once, per updater.
pub const MAX_THREADS: usize = 8;
/// How long an answer (or a failure) is reused.
pub const CACHE_FOR: Duration = Duration::from_secs(30);

/// A lookup function: a name to its addresses (the system resolver, or a
/// stand-in in tests).
pub type Lookup = Arc<dyn Fn(&str) -> std::io::Result<Vec<IpAddr>> + Send + Sync>;

/// The answer for one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Ip(IpAddr),
    Failed(String),
    /// Not answered within the deadline (the lookup goes on).
    Pending,
}

/// What the lookup threads share.
struct Shared {
    queue: Mutex<VecDeque<String>>,
    threads: AtomicUsize,
    lookup: Lookup,
}

/// One updater's resolver and cache.
pub struct Dns {
    shared: Arc<Shared>,
    tx: Sender<(String, Result<IpAddr, String>)>,
    rx: Receiver<(String, Result<IpAddr, String>)>,
    cache: HashMap<String, (Result<IpAddr, String>, Instant)>,
    /// Queued or being looked up.
    pending: HashSet<String>,
}

/// The system resolver; a name with both families gives IPv4 first, as
/// PostgreSQL's connect_address is nearly always configured that way.
pub fn system_lookup(host: &str) -> std::io::Result<Vec<IpAddr>> {
    Ok((host, 0u16).to_socket_addrs()?.map(|a| a.ip()).collect())
}

fn pick(ips: &[IpAddr]) -> Option<IpAddr> {
    ips.iter().find(|ip| ip.is_ipv4()).or(ips.first()).copied()
}

impl Dns {
    pub fn new(lookup: Lookup) -> Dns {
        let (tx, rx) = channel();
        Dns {
            shared: Arc::new(Shared {
                queue: Mutex::new(VecDeque::new()),
                threads: AtomicUsize::new(0),
                lookup,
            }),
            tx,
            rx,
            cache: HashMap::new(),
            pending: HashSet::new(),
        }
    }

    /// Answers for `names`, waiting at most `timeout` for lookups.
    pub fn resolve<'a>(
        &mut self,
        names: impl IntoIterator<Item = &'a str>,
        timeout: Duration,
    ) -> HashMap<String, Answer> {
        let deadline = Instant::now() + timeout;
        self.collect_ready();
        let now = Instant::now();
        let mut out = HashMap::new();
        let mut waiting = HashSet::new();
        for name in names {
            if out.contains_key(name) || waiting.contains(name) {
                continue;
            }
            match self.cache.get(name) {
                Some((r, at)) if now.duration_since(*at) < CACHE_FOR => {
                    out.insert(name.to_string(), answer(r));
                    continue;
                }
                _ => {}
            }
            if self.pending.insert(name.to_string()) {
                self.shared
                    .queue
                    .lock()
                    .unwrap()
                    .push_back(name.to_string());
            }
            waiting.insert(name.to_string());
        }
        self.spawn_threads();
        while !waiting.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((name, r)) => {
                    if waiting.remove(&name) {
                        out.insert(name.clone(), answer(&r));
                    }
                    self.store(name, r);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        for name in waiting {
            // A stale answer beats none while the new lookup runs.
            let a = match self.cache.get(&name) {
                Some((Ok(ip), _)) => Answer::Ip(*ip),
                _ => Answer::Pending,
            };
            out.insert(name, a);
        }
        out
    }

    /// Lookup threads alive now.
    pub fn threads(&self) -> usize {
        self.shared.threads.load(Ordering::SeqCst)
    }

    fn collect_ready(&mut self) {
        while let Ok((name, r)) = self.rx.try_recv() {
            self.store(name, r);
        }
    }

    fn store(&mut self, name: String, r: Result<IpAddr, String>) {
        self.pending.remove(&name);
        self.cache.insert(name, (r, Instant::now()));
    }

    fn spawn_threads(&mut self) {
        let queued = self.shared.queue.lock().unwrap().len();
        let alive = self.shared.threads.load(Ordering::SeqCst);
        for _ in alive..MAX_THREADS.min(alive + queued) {
            self.shared.threads.fetch_add(1, Ordering::SeqCst);
            let shared = Arc::clone(&self.shared);
            let tx = self.tx.clone();
            let spawned = std::thread::Builder::new()
                .name("dns".into())
                .spawn(move || lookup_loop(&shared, &tx));
            if spawned.is_err() {
                // No thread: the names stay queued for the next poll.
                self.shared.threads.fetch_sub(1, Ordering::SeqCst);
                break;
            }
        }
    }
}

fn answer(r: &Result<IpAddr, String>) -> Answer {
    match r {
        Ok(ip) => Answer::Ip(*ip),
        Err(e) => Answer::Failed(e.clone()),
    }
}

/// Takes names until the queue is empty; ends when the updater is gone.
fn lookup_loop(shared: &Shared, tx: &Sender<(String, Result<IpAddr, String>)>) {
    loop {
        let next = shared.queue.lock().unwrap().pop_front();
        let Some(name) = next else { break };
        let r = match (shared.lookup)(&name) {
            Ok(ips) => pick(&ips).ok_or_else(|| "no addresses".to_string()),
            Err(e) => Err(e.to_string()),
        };
        if tx.send((name, r)).is_err() {
            break;
        }
    }
    shared.threads.fetch_sub(1, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names starting with `slow` hang for `hang`; `bad` fails; others are
    /// 127.0.0.1.
    fn fake(hang: Duration) -> Lookup {
        Arc::new(move |name: &str| {
            if name.starts_with("slow") {
                std::thread::sleep(hang);
                Ok(vec![IpAddr::from([127, 0, 0, 9])])
            } else if name.starts_with("bad") {
                Err(std::io::Error::other("no such host"))
            } else {
                Ok(vec!["::1".parse().unwrap(), IpAddr::from([127, 0, 0, 1])])
            }
        })
    }

    #[test]
    fn many_hanging_names_cost_one_deadline_and_few_threads() {
        let mut dns = Dns::new(fake(Duration::from_secs(3)));
        let names: Vec<String> = (0..100)
            .map(|i| format!("slow{i}"))
            .chain(["fast".to_string(), "bad".to_string()])
            .collect();
        let started = Instant::now();
        let got = dns.resolve(names.iter().map(String::as_str), Duration::from_millis(300));
        let took = started.elapsed();
        // One after another (as before) this was 100 x 3 s.
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert!(dns.threads() <= MAX_THREADS);
        assert_eq!(got["slow0"], Answer::Pending);
        // `fast` and `bad` may wait behind slow names in the queue; what is
        // certain is that nothing blocked beyond the deadline and that
        // the next poll does not start the same lookups again.
        let again = dns.resolve(names.iter().map(String::as_str), Duration::ZERO);
        assert_eq!(again["slow99"], Answer::Pending);
        assert!(dns.pending.len() <= names.len());
    }

    #[test]
    fn answers_prefer_ipv4_and_are_cached_failures_included() {
        let mut dns = Dns::new(fake(Duration::ZERO));
        let got = dns.resolve(["fast", "bad", "fast"], Duration::from_secs(10));
        assert_eq!(got["fast"], Answer::Ip(IpAddr::from([127, 0, 0, 1])));
        assert_eq!(got["bad"], Answer::Failed("no such host".into()));
        assert_eq!(dns.cache.len(), 2);
        // From the cache: no waiting even with a zero deadline.
        let got = dns.resolve(["fast", "bad"], Duration::ZERO);
        assert_eq!(got["fast"], Answer::Ip(IpAddr::from([127, 0, 0, 1])));
        assert_eq!(got["bad"], Answer::Failed("no such host".into()));
    }

    #[test]
    fn a_late_answer_is_used_by_the_next_poll() {
        let mut dns = Dns::new(fake(Duration::from_millis(200)));
        let got = dns.resolve(["slow"], Duration::ZERO);
        assert_eq!(got["slow"], Answer::Pending);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = dns.resolve(["slow"], Duration::from_millis(50));
            if got["slow"] == Answer::Ip(IpAddr::from([127, 0, 0, 9])) {
                break;
            }
            assert!(Instant::now() < deadline, "late answer never used");
        }
    }
}

//! Pre-connected backend sockets (`preconnect: N` on a port): TCP
//! connections the server has already accepted, kept for the next client so
//! that the server's per-connection work (PostgreSQL forks a backend) is done
//! before the client arrives.
//!
//! A socket's life: opened by a refill with the options of a session's
//! backend (`open_backend`), connected on its first writable event (the
//! session's connect check), then idle until `route` takes it for a client
//! of its port and member, re-registered under the session's token. It is
//! closed when the server closes it or says anything (PostgreSQL never
//! speaks first, so a byte is a refusal such as "too many clients"), when it
//! past its lifetime (`preconnect_max_age`; the first sockets of a group
//! get shorter ones, spread over that age, so that they are not all replaced
//! in the same turn), when its member stops taking new
//! clients on the port, when the port goes, and on drain.
//!
//! The refill runs at the end of a loop turn, and only when something
//! changed (`dirty`): a slab key freed while the event batch is handled is
//! never reused by a socket opened in the same batch, so a stale event can
//! not reach a new socket (see `mod.rs` on mio #219). A server that closes
//! pooled sockets at once, or a member that refuses connects, is tried again
//! only after [`BACKOFF`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry};
use slab::Slab;

use super::lifecycle::open_backend;
use super::session::{connect_state, Connect};
use super::token;
use super::Proxy;
use crate::logging::debug;

/// How long a member waits for its next pooled socket after a failed
/// connect, or after the server closed one within this time of its opening.
pub const BACKOFF: Duration = Duration::from_secs(1);

/// One pre-connected socket.
struct WarmSock {
    sock: TcpStream,
    listener: usize,
    addr: SocketAddr,
    opened: Instant,
    /// At most `preconnect_max_age` (see [`lifetime`]).
    lifetime: Duration,
    connected: bool,
}

impl WarmSock {
    /// When it is replaced: after its lifetime, or after `max_age` if a
    /// reload lowered it since.
    fn deadline(&self, max_age: Duration) -> Instant {
        self.opened + self.lifetime.min(max_age)
    }
}

/// The sockets of one port to one address, oldest first, and when the
/// next one may be opened.
#[derive(Debug, Default)]
struct Group {
    socks: VecDeque<usize>,
    retry_at: Option<Instant>,
}

/// The groups of one port.
#[derive(Debug, Default)]
struct Port {
    label: String,
    addrs: HashMap<SocketAddr, Group>,
}

/// Every pre-connected socket of the process.
#[derive(Default)]
pub struct Warm {
    socks: Slab<WarmSock>,
    /// By listener key.
    ports: HashMap<usize, Port>,
    /// A refill has something to do: a socket was taken or dropped, the
    /// topology or the configuration changed, or time passed.
    pub dirty: bool,
}

/// What a refill of one port aims at: `n` sockets to each of `addrs`, none
/// older than `max_age`.
pub struct Want<'a> {
    pub listener: usize,
    pub label: &'a str,
    pub addrs: &'a [SocketAddr],
    pub n: usize,
    pub max_age: Duration,
}

/// What a refill does to one group, decided from the sockets' deadlines
/// alone.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    /// Close these: past their deadline.
    expired: usize,
    /// Then close this many of the newest: more than wanted.
    extra: usize,
    /// Then open this many.
    open: usize,
}

fn plan(deadlines: &[Instant], n: usize, now: Instant, retry_at: Option<Instant>) -> Plan {
    let expired = deadlines.iter().filter(|d| **d <= now).count();
    let left = deadlines.len() - expired;
    let extra = left.saturating_sub(n);
    let open = if retry_at.is_some_and(|t| t > now) {
        0
    } else {
        n.saturating_sub(left)
    };
    Plan {
        expired,
        extra,
        open,
    }
}

/// The lifetime of the `i`th of `k` sockets opened in one refill. A group
/// filled from empty (start, a new member, after a topology change) would
/// otherwise have all its sockets expire, and be reopened, in the same
/// turn, every `max_age`: its first sockets live `max_age / k`,
/// `2 max_age / k`, … `max_age`, and their replacements the full age, so
/// that one socket is replaced every `max_age / k`. A replacement in a group
/// that still has sockets lives the full age.
fn lifetime(i: usize, k: usize, from_empty: bool, max_age: Duration) -> Duration {
    if !from_empty || i + 1 >= k {
        return max_age;
    }
    max_age.mul_f64((i + 1) as f64 / k as f64)
}

/// Whether a socket the server closed after `lived` should hold back the
/// next open: one closed at once means the server refuses us.
fn backs_off(lived: Duration) -> bool {
    lived < BACKOFF
}

/// What an idle socket's 1-byte `MSG_PEEK` means.
#[derive(Debug, PartialEq, Eq)]
enum Idle {
    /// Nothing to read (a spurious wake-up): still usable.
    Quiet,
    /// The server closed it, said something or it failed: drop it.
    Gone(&'static str),
}

fn idle_state(peeked: io::Result<usize>) -> Idle {
    match peeked {
        Ok(0) => Idle::Gone("closed by the server"),
        Ok(_) => Idle::Gone("the server spoke first (a refusal)"),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            Idle::Quiet
        }
        Err(_) => Idle::Gone("socket error"),
    }
}

fn peek(sock: &TcpStream) -> Idle {
    idle_state(sock.peek(&mut [0u8; 1]))
}

impl Warm {
    /// Open sockets (for the descriptor budget).
    pub fn len(&self) -> usize {
        self.socks.len()
    }

    /// Connected sockets of listener `lk`, ready for a client.
    pub fn ready(&self, lk: usize) -> usize {
        self.ports.get(&lk).map_or(0, |p| {
            p.addrs
                .values()
                .flat_map(|g| &g.socks)
                .filter(|k| self.socks.get(**k).is_some_and(|w| w.connected))
                .count()
        })
    }

    /// Whether listener `lk` has sockets or backoff state.
    pub fn has(&self, lk: usize) -> bool {
        self.ports.contains_key(&lk)
    }

    /// A readiness event on socket `key`.
    pub fn event(&mut self, key: usize, ev: &Event, now: Instant) {
        let Some(w) = self.socks.get_mut(key) else {
            return; // taken or dropped earlier in this batch
        };
        if !w.connected {
            match connect_state(&w.sock) {
                Connect::Pending => return,
                Connect::Failed(e) => {
                    return self.drop_sock(key, &format!("connect failed: {e}"), true)
                }
                Connect::Done => {
                    w.connected = true;
                    debug!("preconnect addr={} connected", w.addr);
                }
            }
        }
        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
            if let Idle::Gone(why) = peek(&w.sock) {
                let young = backs_off(now.saturating_duration_since(w.opened));
                self.drop_sock(key, why, young);
            }
        }
    }

    /// The oldest connected socket of port `lk` to `addr` that is younger
    /// than `max_age` and still quiet; the ones found too old or closed on
    /// the way are dropped.
    pub fn take(
        &mut self,
        lk: usize,
        addr: SocketAddr,
        max_age: Duration,
        now: Instant,
    ) -> Option<TcpStream> {
        loop {
            let g = self.ports.get_mut(&lk)?.addrs.get_mut(&addr)?;
            let socks = &self.socks;
            let pos = g.socks.iter().position(|k| socks[*k].connected)?;
            let key = g.socks[pos];
            let w = &self.socks[key];
            let lived = now.saturating_duration_since(w.opened);
            if now >= w.deadline(max_age) {
                self.drop_sock(key, "past its preconnect_max_age lifetime", false);
                continue;
            }
            if let Idle::Gone(why) = peek(&w.sock) {
                self.drop_sock(key, why, backs_off(lived));
                continue;
            }
            g.socks.remove(pos);
            let w = self.socks.remove(key);
            self.dirty = true;
            debug!(
                "preconnect addr={} taken after {} ms",
                w.addr,
                lived.as_millis()
            );
            return Some(w.sock);
        }
    }

    /// Closes socket `key`; `backoff`: hold back the next open to its
    /// address.
    fn drop_sock(&mut self, key: usize, why: &str, backoff: bool) {
        let Some(w) = self.socks.try_remove(key) else {
            return;
        };
        self.dirty = true;
        let port = self.ports.get_mut(&w.listener);
        let label = port.as_ref().map_or("?", |p| p.label.as_str());
        debug!(
            "preconnect port={label} addr={} closed: {why}{}",
            w.addr,
            if backoff { "; backing off" } else { "" }
        );
        if let Some(g) = port.and_then(|p| p.addrs.get_mut(&w.addr)) {
            g.socks.retain(|k| *k != key);
            if backoff {
                g.retry_at = Some(Instant::now() + BACKOFF);
            }
        }
    }

    /// Closes every socket of listener `lk` (a port removed).
    pub fn close_listener(&mut self, lk: usize) {
        if let Some(p) = self.ports.remove(&lk) {
            for k in p.addrs.values().flat_map(|g| &g.socks) {
                self.socks.try_remove(*k);
            }
            debug!("preconnect port={} closed its pooled sockets", p.label);
        }
    }

    /// Closes every socket (drain, exit).
    pub fn close_all(&mut self) {
        self.socks.clear();
        self.ports.clear();
    }

    /// Brings one port's sockets to what `want` says: closes those to
    /// addresses no longer wanted, too old or too many, and opens the
    /// missing ones with `open` (not before a group's backoff).
    pub fn refill(
        &mut self,
        want: &Want<'_>,
        now: Instant,
        registry: &Registry,
        mut open: impl FnMut(SocketAddr) -> io::Result<TcpStream>,
    ) {
        let lk = want.listener;
        if want.n == 0 {
            return self.close_listener(lk);
        }
        let port = self.ports.entry(lk).or_default();
        if port.label != want.label {
            port.label = want.label.to_string();
        }
        let wanted: HashSet<SocketAddr> = want.addrs.iter().copied().collect();
        let gone: Vec<SocketAddr> = port
            .addrs
            .keys()
            .filter(|a| !wanted.contains(a))
            .copied()
            .collect();
        for a in gone {
            if let Some(g) = self.ports.get_mut(&lk).and_then(|p| p.addrs.remove(&a)) {
                for k in g.socks {
                    self.socks.try_remove(k);
                }
                debug!(
                    "preconnect port={} addr={a} no longer wanted: closed its sockets",
                    want.label
                );
            }
        }
        for &addr in &wanted {
            let g = self
                .ports
                .get_mut(&lk)
                .expect("inserted above")
                .addrs
                .entry(addr)
                .or_default();
            let deadlines: Vec<Instant> = g
                .socks
                .iter()
                .map(|k| self.socks[*k].deadline(want.max_age))
                .collect();
            let p = plan(&deadlines, want.n, now, g.retry_at);
            let from_empty = p.expired == g.socks.len();
            for (k, _) in g.socks.iter().zip(&deadlines).filter(|(_, d)| **d <= now) {
                // A connect that never finished within the age: the
                // member is not answering.
                let w = self.socks.remove(*k);
                if !w.connected {
                    g.retry_at = Some(now + BACKOFF);
                }
                debug!(
                    "preconnect port={} addr={addr} closed: past its lifetime{}",
                    want.label,
                    if w.connected {
                        ""
                    } else {
                        " (never connected)"
                    }
                );
            }
            if p.expired > 0 {
                let socks = &self.socks;
                g.socks.retain(|k| socks.contains(*k));
            }
            for _ in 0..p.extra {
                if let Some(k) = g.socks.pop_back() {
                    self.socks.remove(k);
                }
            }
            for i in 0..p.open {
                if self.socks.len() >= token::MAX_WARM {
                    break;
                }
                let entry = self.socks.vacant_entry();
                let key = entry.key();
                // On loopback the connect is often over already, done or
                // refused: a refusal read here (it clears SO_ERROR) must
                // count now, or the socket would look pending for good.
                let opened = open(addr).and_then(|mut sock| {
                    let connected = match connect_state(&sock) {
                        Connect::Failed(e) => return Err(e),
                        c => matches!(c, Connect::Done),
                    };
                    registry.register(
                        &mut sock,
                        token::warm(key),
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    Ok((sock, connected))
                });
                match opened {
                    Ok((sock, connected)) => {
                        entry.insert(WarmSock {
                            sock,
                            listener: lk,
                            addr,
                            opened: now,
                            lifetime: lifetime(i, p.open, from_empty, want.max_age),
                            connected,
                        });
                        g.socks.push_back(key);
                        debug!("preconnect port={} addr={addr} opened", want.label);
                    }
                    Err(e) => {
                        debug!(
                            "preconnect port={} addr={addr} connect failed: {e}; backing off",
                            want.label
                        );
                        g.retry_at = Some(now + BACKOFF);
                        break;
                    }
                }
            }
        }
    }
}

impl Proxy {
    /// A readiness event on pre-connected socket `key`.
    pub(super) fn warm_event(&mut self, key: usize, ev: &Event) {
        self.warm.event(key, ev, self.now);
    }

    /// Refills the pre-connected sockets of every port, if anything changed.
    /// Runs at the end of a loop turn (see the module docs).
    pub(super) fn refill_warm(&mut self) {
        if !std::mem::take(&mut self.warm.dirty) {
            return;
        }
        let now = self.now;
        let stopping = self.drain_deadline.is_some();
        let keepalive = self.config.tcp_keepalive;
        let user_timeout = self.config.tcp_user_timeout;
        let Proxy {
            warm,
            listeners,
            clusters,
            poll,
            ..
        } = self;
        for (lk, l) in listeners.iter() {
            if l.preconnect == 0 && !warm.has(lk) {
                continue;
            }
            // A member that lost its role is gone from `backends` already;
            // one that takes no new clients gets no pooled socket either.
            let addrs: Vec<SocketAddr> = if stopping || clusters.is_stale(&l.cluster) {
                Vec::new()
            } else {
                l.backends
                    .list
                    .iter()
                    .filter(|b| !b.draining)
                    .map(|b| b.addr)
                    .collect()
            };
            let want = Want {
                listener: lk,
                label: &l.label,
                addrs: &addrs,
                n: l.preconnect,
                max_age: l.preconnect_max_age,
            };
            warm.refill(&want, now, poll.registry(), |a| {
                open_backend(a, keepalive.as_ref(), user_timeout)
            });
        }
        if self.warm.len() > self.warm_budgeted {
            self.check_fd_limit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_refill_expires_what_is_past_its_deadline_trims_the_newest_and_opens_the_rest() {
        let t0 = Instant::now();
        let now = t0 + ms(30_000);
        // Two past their deadline (one of them not the oldest), three not,
        // two wanted: two expire, one is extra.
        let deadlines = [
            t0 + ms(31_000),
            t0 + ms(30_000),
            t0 + ms(35_000),
            t0 + ms(10_000),
            t0 + ms(49_000),
        ];
        assert_eq!(
            plan(&deadlines, 2, now, None),
            Plan {
                expired: 2,
                extra: 1,
                open: 0
            }
        );
        // One alive, four wanted: three to open.
        assert_eq!(
            plan(&deadlines[4..], 4, now, None),
            Plan {
                expired: 0,
                extra: 0,
                open: 3
            }
        );
        // Nothing wanted: everything alive goes.
        assert_eq!(
            plan(&deadlines[2..], 0, now, None),
            Plan {
                expired: 1,
                extra: 2,
                open: 0
            }
        );
    }

    #[test]
    fn a_group_filled_from_empty_spreads_its_lifetimes_over_the_age() {
        let age = ms(20_000);
        let l: Vec<Duration> = (0..4).map(|i| lifetime(i, 4, true, age)).collect();
        assert_eq!(l, [ms(5_000), ms(10_000), ms(15_000), ms(20_000)]);
        // A replacement in a group that has sockets, or a single one, lives
        // the full age.
        assert_eq!(lifetime(0, 2, false, age), age);
        assert_eq!(lifetime(0, 1, true, age), age);
        // Never longer than the age, whatever the count.
        assert_eq!(lifetime(usize::MAX - 1, usize::MAX, true, age), age);
        assert!(lifetime(0, usize::MAX, true, age) <= age);
    }

    #[test]
    fn a_backoff_holds_back_opening_until_it_passes() {
        let t0 = Instant::now();
        let retry = Some(t0 + BACKOFF);
        assert_eq!(plan(&[], 2, t0, retry).open, 0);
        assert_eq!(plan(&[], 2, t0 + BACKOFF - ms(1), retry).open, 0);
        assert_eq!(plan(&[], 2, t0 + BACKOFF, retry).open, 2);
        // Expiry and trimming still happen during a backoff.
        let p = plan(&[t0 + ms(10)], 0, t0 + ms(10), retry);
        assert_eq!((p.expired, p.open), (1, 0));
        assert!(backs_off(ms(999)));
        assert!(!backs_off(BACKOFF));
    }

    #[test]
    fn any_byte_eof_or_error_on_an_idle_socket_means_it_is_gone() {
        assert_eq!(
            idle_state(Err(io::ErrorKind::WouldBlock.into())),
            Idle::Quiet
        );
        assert_eq!(
            idle_state(Err(io::ErrorKind::Interrupted.into())),
            Idle::Quiet
        );
        assert!(matches!(idle_state(Ok(0)), Idle::Gone(_)));
        assert!(matches!(idle_state(Ok(1)), Idle::Gone(_)));
        assert!(matches!(
            idle_state(Err(io::ErrorKind::ConnectionReset.into())),
            Idle::Gone(_)
        ));
    }

    /// Real loopback sockets through a real poll: open, take, expire, and
    /// close what is no longer wanted.
    #[test]
    fn refill_take_and_close_on_real_sockets() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr2 = other.local_addr().unwrap();
        let poll = mio::Poll::new().unwrap();
        let mut w = Warm::default();
        let t0 = Instant::now();
        let want = |addrs: &'static [SocketAddr]| Want {
            listener: 3,
            label: "c:p",
            addrs,
            n: 2,
            max_age: ms(20_000),
        };
        let both: &'static [SocketAddr] = Box::leak(Box::new([addr, addr2]));
        let open = |a| TcpStream::connect(a);
        w.refill(&want(both), t0, poll.registry(), open);
        assert_eq!(w.len(), 4);
        // Loopback connects are done by now (or at the next check).
        for (_, s) in w.socks.iter_mut() {
            s.connected = true;
        }
        assert_eq!(w.ready(3), 4);
        assert_eq!(w.ready(4), 0, "another port has none");
        let s = w.take(3, addr, ms(20_000), t0 + ms(10));
        assert!(s.is_some());
        assert!(w.dirty);
        assert_eq!(w.ready(3), 3);
        assert!(w.take(4, addr, ms(20_000), t0).is_none());
        // The member at addr2 is no longer wanted: its sockets close; addr
        // gets its second one back.
        let only: &'static [SocketAddr] = Box::leak(Box::new([addr]));
        w.refill(&want(only), t0 + ms(20), poll.registry(), open);
        assert_eq!(w.len(), 2);
        // Too old at take time: dropped on the way, nothing handed out.
        for (_, s) in w.socks.iter_mut() {
            s.connected = true;
        }
        assert!(w.take(3, addr, ms(20_000), t0 + ms(40_000)).is_none());
        assert_eq!(w.len(), 0);
        w.refill(&want(only), t0 + ms(40_000), poll.registry(), open);
        assert_eq!(w.len(), 2);
        w.close_listener(3);
        assert_eq!((w.len(), w.has(3)), (0, false));
        // Four opened together from empty are replaced one at a time.
        let four = Want { n: 4, ..want(only) };
        w.refill(&four, t0, poll.registry(), open);
        assert_eq!(w.len(), 4);
        w.refill(&four, t0 + ms(5_000), poll.registry(), open);
        assert_eq!(w.len(), 4);
        let mut deadlines: Vec<Instant> = w
            .socks
            .iter()
            .map(|(_, s)| s.deadline(ms(20_000)))
            .collect();
        deadlines.sort();
        let from_t0: Vec<Duration> = deadlines.iter().map(|d| *d - t0).collect();
        assert_eq!(from_t0, [ms(10_000), ms(15_000), ms(20_000), ms(25_000)]);
        // A reload that lowers the age caps the lifetimes at once.
        assert!(w.take(3, addr, ms(1_000), t0 + ms(6_000)).is_none());
        assert_eq!(w.len(), 0);
    }
}

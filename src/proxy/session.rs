//! A session: one client socket, one backend socket, one buffer per
//! direction, and the readiness we have been told about.
//!
//! Readiness model (edge-triggered, registered once with READABLE|WRITABLE):
//! an event sets `readable`/`writable` on its endpoint (close and error hints
//! count as readable and writable: the next syscall reports the truth); only
//! a `WouldBlock` or a short read/write clears them. A short read or write
//! clears the bit too: the kernel raises a new edge for every later arrival
//! of data or buffer space, so nothing is lost, and we save a syscall that
//! would only say `WouldBlock` (nginx does the same with EPOLLET).
//!
//! Backpressure: a direction stops reading while its buffer is full; the
//! source's `readable` bit stays set, so reading resumes as soon as the
//! buffer drains, without needing a new edge.
//!
//! Half-close: when a source reaches end of stream and its buffer is
//! flushed, the destination gets `shutdown(Write)`; the other direction keeps
//! flowing. The session ends when both directions are shut, or on an error.
//!
//! Buffers come from the pool only while bytes are in flight: an idle pair
//! holds none.
//!
//! Bulk: once a read fills a whole buffer and that buffer has drained, the
//! direction switches to a kernel pipe and `splice(2)` (socket -> pipe ->
//! socket, no copy through user space), and keeps it while it keeps moving
//! data; a pump that finds the direction idle, or its end of stream, gives
//! the pipe back. `splice` into a pipe says `WouldBlock` both for an empty
//! socket and for a full pipe, so only an empty pipe proves the socket is
//! drained; otherwise the pipe is marked full and reading resumes after the
//! next write, without losing the socket's edge.
//!
//! Start-up: until the login completes (ReadyForQuery) or needs the client
//! (a password request), the session keeps a copy of what the client sent
//! and holds the server's bytes back. If the server
//! refuses the start-up with SQLSTATE 57P03 (shutting down, starting up),
//! the loop drops that backend and retries, replaying the client's bytes and
//! swallowing the repeated `N` answer to an SSLRequest, so the client never
//! sees the refusal. Anything that is not a PostgreSQL start-up, a TLS or GSS
//! acceptance, or any other answer ends the examination at once; from then on
//! the session is a plain byte relay.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Instant;

use mio::event::Event;
use mio::net::TcpStream;
use mio::Registry;

use super::buffer::{Buffer, Pipe, Pool};
use super::listener::Target;
use super::sys;
use super::token::Side;
use crate::pgwire::{self, Answer};

/// One socket of the pair and what we know of it.
pub struct Endpoint {
    pub sock: TcpStream,
    pub readable: bool,
    pub writable: bool,
    /// The peer sent FIN (read returned 0).
    pub read_eof: bool,
    /// We sent FIN (`shutdown(Write)`).
    pub write_shut: bool,
    /// The poll hinted the peer closed or errored (EPOLLRDHUP/HUP/ERR): the
    /// end of stream may already be queued behind data, with no edge to
    /// come, so a short read must not clear `readable` (nginx's
    /// `pending_eof`).
    pub hup: bool,
}

impl Endpoint {
    pub fn new(sock: TcpStream) -> Endpoint {
        Endpoint {
            sock,
            readable: false,
            writable: false,
            read_eof: false,
            write_shut: false,
            hup: false,
        }
    }

    fn mark(&mut self, ev: &Event) {
        let hint = ev.is_error() || ev.is_read_closed() || ev.is_write_closed();
        self.hup |= ev.is_error() || ev.is_read_closed();
        self.readable |= ev.is_readable() || hint;
        self.writable |= ev.is_writable() || hint;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No routable backend yet; the client's bytes wait in `to_backend`.
    Waiting,
    /// Non-blocking connect in flight.
    Connecting,
    Streaming,
    Closed,
}

/// Result of a connect check.
pub enum Connect {
    Pending,
    Done,
    Failed(io::Error),
}

/// Result of pumping bytes.
#[derive(Debug)]
pub enum Pumped {
    /// Nothing more to do until the next event.
    Idle,
    /// The byte budget ran out with work left: run again soon.
    Budget,
    /// One direction is shut (the side that ended it first), the other
    /// still open.
    HalfClosed(Side),
    /// Both directions shut: the session is over.
    Finished,
    /// A socket failed.
    Failed(Side, io::Error),
    /// The backend refused the connection start-up because it is going away
    /// or not there yet (SQLSTATE 57P01-57P03), or closed without answering.
    Refused(String),
}

pub struct Session {
    /// Never reused; for logs and timer checks.
    pub id: u64,
    pub listener: usize,
    pub client_addr: SocketAddr,
    pub client: Endpoint,
    pub backend: Option<Endpoint>,
    pub target: Option<Target>,
    pub phase: Phase,
    /// Connect, wait or half-close deadline, depending on the phase.
    pub deadline: Option<Instant>,
    /// When the client started waiting for a routable backend.
    pub waiting_since: Option<Instant>,
    /// Addresses whose connect failed for this session.
    pub tried: Vec<SocketAddr>,
    pub to_backend: Slot,
    pub to_client: Slot,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// `(bytes_up, bytes_down)` already added to the member's counters.
    pub counted: (u64, u64),
    /// Which side ended its direction first (for the close reason).
    pub fin_by: Option<Side>,
    /// On the run queue already.
    pub queued: bool,
    /// The PostgreSQL start-up under way, until the server's first real
    /// answer; `None` afterwards or for traffic that is not PostgreSQL.
    pub startup: Option<Box<Startup>>,
    /// Waiting only to retry a refused start-up (not for a routable member).
    pub retry_pending: bool,
}

/// Largest client start-up kept for a replay.
const MAX_STARTUP_BYTES: usize = 8192;
/// An SSLRequest or GSSENCRequest is 8 bytes.
const ENCRYPTION_REQUEST_BYTES: usize = 8;

/// What a session keeps of its connection start-up so that a server that
/// refuses it with SQLSTATE 57P03 (shutting down, starting up) can be
/// replaced without the client noticing (see `pgwire`).
#[derive(Default)]
pub struct Startup {
    /// Every byte the client has sent.
    pub sent: Vec<u8>,
    /// `N` answers the client got to its encryption requests.
    pub answered: usize,
    /// `N` answers a new backend will repeat after a retry: not relayed.
    pub swallow: usize,
    /// The server's answer, held back until it is understood.
    pub reply: Vec<u8>,
    /// During a replay: how much of `sent` went to the new backend. Each
    /// encryption request goes alone and the rest only after its `N`, as
    /// PostgreSQL rejects data sent behind an SSLRequest before its answer.
    pub replayed: usize,
}

impl Session {
    pub fn new(
        id: u64,
        listener: usize,
        client: TcpStream,
        client_addr: SocketAddr,
        replay: bool,
    ) -> Session {
        Session {
            id,
            listener,
            client_addr,
            client: Endpoint::new(client),
            backend: None,
            target: None,
            phase: Phase::Waiting,
            deadline: None,
            waiting_since: None,
            tried: Vec::new(),
            to_backend: Slot::Empty,
            to_client: Slot::Empty,
            bytes_up: 0,
            bytes_down: 0,
            counted: (0, 0),
            fin_by: None,
            queued: false,
            startup: replay.then(Box::default),
            retry_pending: false,
        }
    }

    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Waiting for a routable member, or for a retry.
    pub fn is_held(&self) -> bool {
        self.phase == Phase::Waiting
    }

    pub fn mark(&mut self, side: Side, ev: &Event) {
        match side {
            Side::Client => self.client.mark(ev),
            Side::Backend => {
                if let Some(b) = self.backend.as_mut() {
                    b.mark(ev)
                }
            }
        }
    }

    /// Has the non-blocking connect finished? (mio's procedure: an error
    /// means failed; a peer address means connected; `NotConnected` means
    /// not yet.)
    pub fn check_connect(&mut self) -> Connect {
        let Some(b) = self.backend.as_mut() else {
            return Connect::Pending;
        };
        match b.sock.take_error() {
            Ok(Some(e)) | Err(e) => return Connect::Failed(e),
            Ok(None) => {}
        }
        match b.sock.peer_addr() {
            Ok(_) => Connect::Done,
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Connect::Pending,
            Err(e) => Connect::Failed(e),
        }
    }

    /// Drops the backend socket (failed connect or re-route).
    pub fn drop_backend(&mut self, registry: &Registry) {
        if let Some(mut b) = self.backend.take() {
            let _ = registry.deregister(&mut b.sock);
        }
    }

    /// Moves bytes both ways, up to `budget` bytes per direction.
    pub fn pump(&mut self, pool: &mut Pool, budget: usize) -> Pumped {
        let connected = self.phase == Phase::Streaming;
        // While a replay waits for the new backend's `N`, the client's bytes
        // stay in its socket (still marked readable): queued behind the
        // replayed SSLRequest they would reach the server too early.
        let paused = self.replaying();
        let tap = self.startup.as_deref_mut().map(|st| &mut st.sent);
        let Some(backend) = self.backend.as_mut().filter(|_| connected) else {
            if paused {
                return Pumped::Idle;
            }
            // Waiting or connecting: only collect what the client sends.
            let r = transfer(
                &mut self.client,
                None,
                &mut self.to_backend,
                pool,
                budget,
                tap,
            );
            self.check_startup_bytes(pool);
            return match r {
                Ok((n, _)) => {
                    self.bytes_up += n as u64;
                    Pumped::Idle
                }
                Err(e) => Pumped::Failed(Side::Client, e.error),
            };
        };
        let mut up = (0, false);
        if !paused {
            up = match transfer(
                &mut self.client,
                Some(backend),
                &mut self.to_backend,
                pool,
                budget,
                tap,
            ) {
                Ok(r) => r,
                Err(e) => return Pumped::Failed(e.side, e.error),
            };
        }
        // During the start-up the server's first answer is examined before
        // anything of it reaches the client.
        let mut examining = false;
        if let Some(st) = self.startup.as_deref_mut() {
            match first_answer(st, backend, &mut self.client, &mut self.to_backend, pool) {
                Ok(FirstAnswer::Pending) => examining = true,
                Ok(FirstAnswer::Understood) => {
                    let st = self.startup.take().expect("checked above");
                    disengage(&st, &mut self.to_client, pool);
                }
                Ok(FirstAnswer::Refused(why)) => return Pumped::Refused(why),
                // first_answer reads the backend as its source: flip sides.
                Err(e) => return Pumped::Failed(e.side.flip(), e.error),
            }
        }
        let Some(backend) = self.backend.as_mut() else {
            return Pumped::Idle;
        };
        // A replay may have queued the rest of the start-up, or just ended:
        // send what is queued, and what the client sent meanwhile, now.
        let still = self.startup.as_ref().is_some_and(|st| st.swallow > 0);
        let resumed = paused && !still;
        if (!self.to_backend.is_empty() && backend.writable) || resumed {
            // Still waiting for the N: flush only, the client's bytes wait.
            let readable = self.client.readable;
            self.client.readable &= !still;
            let tap = self.startup.as_deref_mut().map(|st| &mut st.sent);
            let more = transfer(
                &mut self.client,
                Some(&mut *backend),
                &mut self.to_backend,
                pool,
                budget,
                tap,
            );
            if still {
                self.client.readable = readable;
            }
            match more {
                Ok(r) => up = (up.0 + r.0, up.1 || r.1),
                Err(e) => return Pumped::Failed(e.side, e.error),
            }
        }
        let down = if examining {
            (0, false)
        } else {
            match transfer(
                backend,
                Some(&mut self.client),
                &mut self.to_client,
                pool,
                budget,
                None,
            ) {
                Ok(r) => r,
                Err(e) => return Pumped::Failed(e.side.flip(), e.error),
            }
        };
        self.check_startup_bytes(pool);
        self.bytes_up += up.0 as u64;
        self.bytes_down += down.0 as u64;
        let backend = self.backend.as_ref().expect("connected");
        let up_done = self.client.read_eof && backend.write_shut;
        let down_done = backend.read_eof && self.client.write_shut;
        match (up_done, down_done) {
            (true, true) => Pumped::Finished,
            _ if up.1 || down.1 => Pumped::Budget,
            (true, false) => Pumped::HalfClosed(Side::Client),
            (false, true) => Pumped::HalfClosed(Side::Backend),
            (false, false) => Pumped::Idle,
        }
    }

    /// A replayed start-up waits for the new backend's `N`.
    fn replaying(&self) -> bool {
        self.startup.as_ref().is_some_and(|st| st.swallow > 0)
    }

    /// Stops watching the start-up when the client's bytes are not a
    /// PostgreSQL start-up, or too many to replay.
    fn check_startup_bytes(&mut self, pool: &mut Pool) {
        let Some(st) = self.startup.as_deref() else {
            return;
        };
        if st.sent.len() > MAX_STARTUP_BYTES || pgwire::client_start(&st.sent).is_none() {
            let st = self.startup.take().expect("checked above");
            disengage(&st, &mut self.to_client, pool);
        }
    }

    /// Stops examining the start-up and relays what the server said.
    pub fn relay_startup(&mut self, pool: &mut Pool) {
        if let Some(st) = self.startup.take() {
            disengage(&st, &mut self.to_client, pool);
        }
    }

    /// Prepares a retry after the backend refused the start-up: the client's
    /// bytes go out again to the next backend, whose repeated `N` answers are
    /// not relayed. False when the start-up cannot be replayed.
    pub fn prepare_replay(&mut self, registry: &Registry, pool: &mut Pool) -> bool {
        if self
            .startup
            .as_ref()
            .is_none_or(|st| st.sent.len() > pool.buffer_size())
        {
            return false;
        }
        self.drop_backend(registry);
        let Some(st) = self.startup.as_deref_mut() else {
            return false;
        };
        self.to_backend.release(pool);
        st.swallow = st.answered;
        st.reply.clear();
        st.replayed = if st.answered > 0 {
            ENCRYPTION_REQUEST_BYTES
        } else {
            st.sent.len()
        };
        log::debug!(
            "session={} replay prepared: sent={} answered={} first segment={}",
            self.id,
            st.sent.len(),
            st.answered,
            st.replayed
        );
        let mut buf = pool.take();
        if buf.read_from(&mut &st.sent[..st.replayed]).is_err() {
            pool.give(buf);
            return false;
        }
        self.to_backend = Slot::Buf(buf);
        true
    }

    /// Deregisters both sockets and gives back buffers. Sockets close when
    /// the session is dropped (at the reap step).
    pub fn close(&mut self, registry: &Registry, pool: &mut Pool) {
        let _ = registry.deregister(&mut self.client.sock);
        self.drop_backend(registry);
        for slot in [&mut self.to_backend, &mut self.to_client] {
            slot.release(pool);
        }
        self.phase = Phase::Closed;
    }
}

/// Where one direction's bytes in flight are: nowhere (idle), in a buffer,
/// or in a kernel pipe (bulk transfer, spliced).
pub enum Slot {
    Empty,
    Buf(Buffer),
    Pipe(Pipe),
}

impl Slot {
    /// No bytes in flight.
    pub fn is_empty(&self) -> bool {
        match self {
            Slot::Empty => true,
            Slot::Buf(b) => b.is_empty(),
            Slot::Pipe(p) => p.len == 0,
        }
    }

    /// Gives whatever it holds back to the pool.
    pub fn release(&mut self, pool: &mut Pool) {
        match std::mem::replace(self, Slot::Empty) {
            Slot::Empty => {}
            Slot::Buf(b) => pool.give(b),
            Slot::Pipe(p) => pool.give_pipe(p),
        }
    }
}

/// Which end of a transfer failed, relative to the call.
struct TransferError {
    side: Side,
    error: io::Error,
}

impl Side {
    fn flip(self) -> Side {
        match self {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }
}

fn src_err(error: io::Error) -> TransferError {
    TransferError {
        side: Side::Client,
        error,
    }
}

fn dst_err(error: io::Error) -> TransferError {
    TransferError {
        side: Side::Backend,
        error,
    }
}

/// Moves bytes from `src` towards `dst` (if any) until neither can progress
/// or `budget` bytes were read. Returns the bytes read and whether the budget
/// stopped it. `TransferError::side` is `Client` for `src`, `Backend` for
/// `dst`. A direction starts with buffers; once a read fills a whole buffer
/// and the buffer has drained, it switches to a pipe (if the pool has one),
/// and it returns the pipe when it goes idle.
fn transfer(
    src: &mut Endpoint,
    dst: Option<&mut Endpoint>,
    slot: &mut Slot,
    pool: &mut Pool,
    budget: usize,
    tap: Option<&mut Vec<u8>>,
) -> Result<(usize, bool), TransferError> {
    let Some(dst) = dst else {
        return copy(src, None, slot, pool, budget, tap).map(|(n, over, _)| (n, over));
    };
    let mut moved = 0;
    if !matches!(slot, Slot::Pipe(_)) {
        let (n, over, bulk) = copy(src, Some(&mut *dst), slot, pool, budget, tap)?;
        moved = n;
        if over || !bulk {
            return Ok((moved, over));
        }
        match pool.take_pipe() {
            Some(p) => *slot = Slot::Pipe(p),
            None => return Ok((moved, over)),
        }
    }
    let (n, over) = splice(src, dst, slot, pool, budget.saturating_sub(moved))?;
    Ok((moved + n, over))
}

/// The buffer path. The third value is true when the direction should switch
/// to a pipe now: a read filled a whole buffer, the buffer has drained, and
/// the source is still readable.
fn copy(
    src: &mut Endpoint,
    mut dst: Option<&mut Endpoint>,
    slot: &mut Slot,
    pool: &mut Pool,
    budget: usize,
    mut tap: Option<&mut Vec<u8>>,
) -> Result<(usize, bool, bool), TransferError> {
    let mut moved = 0;
    let mut bulk = false;
    loop {
        let mut progress = false;
        let full = matches!(slot, Slot::Buf(b) if b.is_full());
        if src.readable && !src.read_eof && !full {
            if matches!(slot, Slot::Empty) {
                *slot = Slot::Buf(pool.take());
            }
            let Slot::Buf(buf) = slot else {
                unreachable!("a pipe slot never takes the copy path")
            };
            let room = buf.capacity() - buf.len();
            match buf.read_from(&mut src.sock) {
                Ok(0) => {
                    src.read_eof = true;
                    progress = true;
                }
                Ok(n) => {
                    moved += n;
                    progress = true;
                    bulk |= n == buf.capacity();
                    if let Some(tap) = tap.as_deref_mut() {
                        // Keep a copy of the start-up, within limits.
                        if tap.len() <= MAX_STARTUP_BYTES {
                            tap.extend_from_slice(&buf.filled()[buf.len() - n..]);
                        }
                    }
                    // A short read drained the socket (module docs), unless
                    // an end of stream is pending behind the data.
                    if n < room && !src.hup {
                        src.readable = false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => src.readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                Err(e) => return Err(src_err(e)),
            }
        }
        if let (Some(dst), Slot::Buf(buf)) = (dst.as_deref_mut(), &mut *slot) {
            if !buf.is_empty() && dst.writable {
                let want = buf.len();
                match dst.sock.write(buf.filled()) {
                    Ok(0) => return Err(dst_err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        buf.consume(n);
                        progress = true;
                        if n < want {
                            dst.writable = false;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                    Err(e) => return Err(dst_err(e)),
                }
            }
        }
        if matches!(slot, Slot::Buf(b) if b.is_empty()) {
            slot.release(pool);
        }
        if let Some(dst) = dst.as_deref_mut() {
            pass_fin(src, dst, slot);
            if bulk
                && matches!(slot, Slot::Empty)
                && src.readable
                && !src.read_eof
                && pool.splicing()
            {
                return Ok((moved, false, true));
            }
        }
        if !progress {
            return Ok((moved, false, false));
        }
        if moved >= budget {
            return Ok((moved, true, false));
        }
    }
}

/// The pipe path: socket -> pipe -> socket, no copy through user space.
fn splice(
    src: &mut Endpoint,
    dst: &mut Endpoint,
    slot: &mut Slot,
    pool: &mut Pool,
    budget: usize,
) -> Result<(usize, bool), TransferError> {
    let mut moved = 0;
    loop {
        let Slot::Pipe(pipe) = slot else {
            return Ok((moved, false));
        };
        let mut progress = false;
        if src.readable && !src.read_eof && !pipe.full && pipe.len < pipe.cap {
            match sys::splice(&src.sock, &pipe.write, pipe.cap - pipe.len) {
                Ok(0) => {
                    src.read_eof = true;
                    progress = true;
                }
                Ok(n) => {
                    pipe.len += n;
                    moved += n;
                    progress = true;
                }
                // Said for an empty socket and for a full pipe alike: only
                // an empty pipe proves the socket is drained.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if pipe.len == 0 {
                        src.readable = false;
                    } else {
                        pipe.full = true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                Err(e) => return Err(src_err(e)),
            }
        }
        if pipe.len > 0 && dst.writable {
            match sys::splice(&pipe.read, &dst.sock, pipe.len) {
                Ok(0) => return Err(dst_err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    pipe.len -= n;
                    pipe.full = false;
                    progress = true;
                }
                // The pipe holds bytes, so this is the socket.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                Err(e) => return Err(dst_err(e)),
            }
        }
        // Finished, or found idle by this pump, with nothing in flight: the
        // pipe goes back. A direction that keeps moving keeps its pipe.
        let idle = !progress && moved == 0;
        if pipe.len == 0 && (src.read_eof || idle) {
            slot.release(pool);
        }
        pass_fin(src, dst, slot);
        if !progress {
            return Ok((moved, false));
        }
        if moved >= budget {
            return Ok((moved, true));
        }
    }
}

/// Everything the source sent has been passed on: pass its FIN on.
fn pass_fin(src: &Endpoint, dst: &mut Endpoint, slot: &Slot) {
    if src.read_eof && slot.is_empty() && !dst.write_shut {
        dst.write_shut = true;
        // ENOTCONN here means the peer is already gone; the next read or
        // write on it reports that properly.
        let _ = dst.sock.shutdown(Shutdown::Write);
    }
}

/// Where the server's first answer stands.
enum FirstAnswer {
    /// Not all there yet; nothing relayed.
    Pending,
    /// Understood, and not a refusal: relay it and stop examining.
    Understood,
    /// SQLSTATE 57P03: retry elsewhere or later.
    Refused(String),
}

/// Reads and classifies the server's first bytes (see `pgwire`), relaying
/// `N` answers to encryption requests and swallowing repeated ones after a
/// retry. Errors are `Client` for the backend and `Backend` for the client
/// side, as `transfer` reports a backend-to-client direction.
fn first_answer(
    st: &mut Startup,
    backend: &mut Endpoint,
    client: &mut Endpoint,
    to_backend: &mut Slot,
    pool: &mut Pool,
) -> Result<FirstAnswer, TransferError> {
    let cap = pool.buffer_size().min(pgwire::MAX_ANSWER_BYTES);
    loop {
        if !st.reply.is_empty() {
            if st.swallow > 0 {
                if st.reply[0] != b'N' {
                    let e = io::Error::other(
                        "the new server answered the encryption request differently",
                    );
                    return Err(src_err(e));
                }
                st.reply.remove(0);
                st.swallow -= 1;
                // Answered: the next request, or the rest of the start-up.
                let end = if st.swallow > 0 {
                    st.replayed + ENCRYPTION_REQUEST_BYTES
                } else {
                    st.sent.len()
                };
                let next = st.sent.get(st.replayed..end).unwrap_or_default();
                log::debug!("replay: N swallowed, sending {} more bytes", next.len());
                send_now_or_queue(backend, to_backend, pool, next).map_err(src_err)?;
                st.replayed = end;
                continue;
            }
            // A PostgreSQL server says nothing before the client's first
            // complete packet: one that does is something else.
            let Some(start) = pgwire::client_start(&st.sent).filter(|c| c.packets > 0) else {
                return Ok(FirstAnswer::Understood);
            };
            let asked = start.encryption_requests;
            match pgwire::server_answer(&st.reply, st.answered < asked) {
                Answer::Incomplete => {}
                Answer::Other => return Ok(FirstAnswer::Understood),
                Answer::GoingAway { message } => return Ok(FirstAnswer::Refused(message)),
                Answer::NoEncryption => match client.sock.write(b"N") {
                    Ok(1) => {
                        st.reply.remove(0);
                        st.answered += 1;
                        continue;
                    }
                    // Could not hand it over at once: relay it the usual way.
                    Ok(_) => return Ok(FirstAnswer::Understood),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Ok(FirstAnswer::Understood)
                    }
                    Err(e) => return Err(dst_err(e)),
                },
            }
        }
        if !backend.readable || backend.read_eof {
            return Ok(FirstAnswer::Pending);
        }
        if st.reply.len() >= cap {
            return Ok(FirstAnswer::Understood);
        }
        let mut chunk = [0u8; pgwire::MAX_ANSWER_BYTES];
        let want = cap - st.reply.len();
        match backend.sock.read(&mut chunk[..want]) {
            // Closed before answering at all: a server going away (a
            // backend killed by a shutdown says nothing).
            Ok(0) if st.reply.is_empty() => {
                return Ok(FirstAnswer::Refused(
                    "closed the connection during the start-up".into(),
                ))
            }
            Ok(0) => {
                backend.read_eof = true;
                return Ok(FirstAnswer::Understood);
            }
            Ok(n) => st.reply.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => backend.readable = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(src_err(e)),
        }
    }
}

/// Stops examining the start-up: whatever the server said so far goes to
/// the client first.
fn disengage(st: &Startup, to_client: &mut Slot, pool: &mut Pool) {
    if st.reply.is_empty() {
        return;
    }
    debug_assert!(
        to_client.is_empty(),
        "nothing is relayed while the start-up is examined"
    );
    let mut buf = pool.take();
    let _ = buf.read_from(&mut st.reply.as_slice());
    *to_client = Slot::Buf(buf);
}

/// Writes `bytes` to the backend at once, or queues what did not fit behind
/// whatever `to_backend` holds (the up direction flushes it on the next
/// writable event).
fn send_now_or_queue(
    backend: &mut Endpoint,
    to_backend: &mut Slot,
    pool: &mut Pool,
    bytes: &[u8],
) -> io::Result<()> {
    let mut sent = 0;
    if to_backend.is_empty() && backend.writable {
        match backend.sock.write(bytes) {
            Ok(n) => {
                sent = n;
                // A short write: a new edge comes when there is room.
                if n < bytes.len() {
                    backend.writable = false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => backend.writable = false,
            Err(e) => return Err(e),
        }
    }
    if sent < bytes.len() {
        if matches!(to_backend, Slot::Empty) {
            *to_backend = Slot::Buf(pool.take());
        }
        let Slot::Buf(buf) = to_backend else {
            return Err(io::Error::other("start-up replay behind a pipe"));
        };
        buf.read_from(&mut &bytes[sent..])?;
    }
    Ok(())
}

//! The byte relay: two sockets, one [`Slot`] of bytes in flight per
//! direction, and the readiness we have been told about. It knows nothing
//! of PostgreSQL (the start-up examination is `startup.rs`).
//!
//! Readiness model (edge-triggered, registered once with READABLE|WRITABLE):
//! an event sets `readable`/`writable` on its endpoint (close and error hints
//! count as readable and writable: the next syscall reports the truth); only
//! a `WouldBlock` or a short read/write clears them. A short read or write
//! clears the bit because the kernel raises a new edge for every later
//! arrival of data or buffer space, so nothing is lost, and we save a
//! syscall that would only say `WouldBlock` (nginx does the same with
//! EPOLLET).
//!
//! Backpressure: a direction stops reading while its buffer is full; the
//! source's `readable` bit stays set, so reading resumes as soon as the
//! buffer drains, without needing a new edge.
//!
//! Half-close: when a source reaches end of stream and its slot is flushed,
//! the destination gets `shutdown(Write)`; the other direction keeps
//! flowing. The pair is finished when both directions are shut.
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

use std::io::{self, Write};
use std::net::Shutdown;

use log::warn;
use mio::event::Event;
use mio::net::TcpStream;
use mio::Registry;

use super::buffer::{Buffer, Pipe, Pool};
use super::sys::{self, IoError};
use super::token::Side;

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

    pub fn mark(&mut self, ev: &Event) {
        let hint = ev.is_error() || ev.is_read_closed() || ev.is_write_closed();
        self.hup |= ev.is_error() || ev.is_read_closed();
        self.readable |= ev.is_readable() || hint;
        self.writable |= ev.is_writable() || hint;
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

/// Where the relay stands after a pump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Nothing more to do until the next event.
    Idle,
    /// The byte budget ran out with work left: run again soon.
    Budget,
    /// One direction is shut (by the side that ended it), the other open.
    HalfClosed(Side),
    /// Both directions shut.
    Finished,
}

/// A socket of the pair failed.
#[derive(Debug)]
pub struct Failed {
    pub side: Side,
    pub error: io::Error,
}

/// What a tap allocates for its first bytes: enough for what a client sends
/// before the server's first answer (an 8-byte encryption request, then a
/// start-up packet of about 100 bytes) in one allocation, not three.
const TAP_FIRST_CAPACITY: usize = 256;

/// A copy of the bytes read from a source, up to `limit` (the start-up
/// stage keeps what the client sent, for a replay).
pub struct Tap<'a> {
    pub into: &'a mut Vec<u8>,
    pub limit: usize,
}

/// Both sockets of a session, the bytes in flight each way, and the bytes
/// moved so far.
pub struct Pair {
    pub client: Endpoint,
    /// Set once a backend is chosen; dropped on a failed connect or re-route.
    pub backend: Option<Endpoint>,
    pub to_backend: Slot,
    pub to_client: Slot,
    /// Bytes read from the client.
    pub bytes_up: u64,
    /// Bytes read from the backend.
    pub bytes_down: u64,
}

impl Pair {
    pub fn new(client: TcpStream) -> Pair {
        Pair {
            client: Endpoint::new(client),
            backend: None,
            to_backend: Slot::Empty,
            to_client: Slot::Empty,
            bytes_up: 0,
            bytes_down: 0,
        }
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

    /// Before a backend is connected: only collect what the client sends
    /// (into `to_backend`).
    pub fn collect(
        &mut self,
        pool: &mut Pool,
        budget: usize,
        tap: Option<Tap>,
    ) -> Result<(), Failed> {
        let r = transfer(
            &mut self.client,
            None,
            &mut self.to_backend,
            pool,
            budget,
            tap,
        );
        count(r, Side::Client, &mut self.bytes_up).map(|_| ())
    }

    /// Client to backend, once connected; true when the budget stopped it.
    pub fn up(&mut self, pool: &mut Pool, budget: usize, tap: Option<Tap>) -> Result<bool, Failed> {
        let dst = self.backend.as_mut();
        let r = transfer(
            &mut self.client,
            dst,
            &mut self.to_backend,
            pool,
            budget,
            tap,
        );
        count(r, Side::Client, &mut self.bytes_up)
    }

    /// Backend to client; true when the budget stopped it.
    pub fn down(&mut self, pool: &mut Pool, budget: usize) -> Result<bool, Failed> {
        let Some(backend) = self.backend.as_mut() else {
            return Ok(false);
        };
        let dst = Some(&mut self.client);
        let r = transfer(backend, dst, &mut self.to_client, pool, budget, None);
        count(r, Side::Backend, &mut self.bytes_down)
    }

    /// Both directions, up to `budget` bytes each: the relay's whole pump.
    pub fn relay(&mut self, pool: &mut Pool, budget: usize) -> Result<Flow, Failed> {
        let up = self.up(pool, budget, None)?;
        let down = self.down(pool, budget)?;
        Ok(self.flow(up || down))
    }

    /// Where the pair stands; `over`: a direction hit its budget.
    pub fn flow(&self, over: bool) -> Flow {
        let Some(backend) = self.backend.as_ref() else {
            return Flow::Idle;
        };
        let up_done = self.client.read_eof && backend.write_shut;
        let down_done = backend.read_eof && self.client.write_shut;
        match (up_done, down_done) {
            (true, true) => Flow::Finished,
            _ if over => Flow::Budget,
            (true, false) => Flow::HalfClosed(Side::Client),
            (false, true) => Flow::HalfClosed(Side::Backend),
            (false, false) => Flow::Idle,
        }
    }

    /// Drops the backend socket (failed connect or re-route).
    pub fn drop_backend(&mut self, registry: &Registry) {
        if let Some(mut b) = self.backend.take() {
            let _ = registry.deregister(&mut b.sock);
        }
    }

    /// Gives back buffers and pipes. The sockets close when the pair is
    /// dropped (the reap step, before the next poll), and closing a socket
    /// takes it out of the poll: no `epoll_ctl(DEL)` needed, as no
    /// descriptor is ever duplicated. Events already fetched for them are
    /// ignored (the session is closed).
    pub fn close(&mut self, pool: &mut Pool) {
        for slot in [&mut self.to_backend, &mut self.to_client] {
            slot.release(pool);
        }
    }
}

/// Which end of one transfer failed: its source or its destination.
enum End {
    Src,
    Dst,
}

struct EndError {
    end: End,
    error: io::Error,
}

impl EndError {
    /// Names the socket: `src` and `dst` are the sides of this transfer.
    fn at(self, src: Side, dst: Side) -> Failed {
        Failed {
            side: match self.end {
                End::Src => src,
                End::Dst => dst,
            },
            error: self.error,
        }
    }
}

fn src_err(error: io::Error) -> EndError {
    EndError {
        end: End::Src,
        error,
    }
}

fn dst_err(error: io::Error) -> EndError {
    EndError {
        end: End::Dst,
        error,
    }
}

/// Adds a transfer's bytes to `counter` and names the failed socket
/// (`src` is the transfer's source side); true when the budget stopped it.
fn count(r: Result<(usize, bool), EndError>, src: Side, counter: &mut u64) -> Result<bool, Failed> {
    let dst = match src {
        Side::Client => Side::Backend,
        Side::Backend => Side::Client,
    };
    let (n, over) = r.map_err(|e| e.at(src, dst))?;
    *counter += n as u64;
    Ok(over)
}

/// Moves bytes from `src` towards `dst` (if any) until neither can progress
/// or `budget` bytes were read. Returns the bytes read and whether the budget
/// stopped it. A direction starts with buffers; once a read fills a whole
/// buffer and the buffer has drained, it switches to a pipe (if the pool has
/// one), and it returns the pipe when it goes idle.
fn transfer(
    src: &mut Endpoint,
    dst: Option<&mut Endpoint>,
    slot: &mut Slot,
    pool: &mut Pool,
    budget: usize,
    tap: Option<Tap>,
) -> Result<(usize, bool), EndError> {
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
    moved += n;
    if over || matches!(slot, Slot::Pipe(_)) || pool.splicing() {
        return Ok((moved, over));
    }
    // splice(2) was refused: carry on with buffers in this pump.
    let (n, over, _) = copy(
        src,
        Some(dst),
        slot,
        pool,
        budget.saturating_sub(moved),
        None,
    )?;
    Ok((moved + n, over))
}

/// `splice(2)` refused (`sys::splice_unsupported`): leave the pipe for the
/// buffer path, with the bytes it holds read out of it, and stop splicing
/// for good. Only an error draining the pipe ends the session.
fn leave_pipe(slot: &mut Slot, pool: &mut Pool, e: &io::Error) -> Result<(), EndError> {
    if pool.splice_refused() {
        warn!("splice(2) refused ({e}); relaying through user-space buffers from now on");
    }
    let Slot::Pipe(pipe) = std::mem::replace(slot, Slot::Empty) else {
        return Ok(());
    };
    if pipe.len == 0 {
        pool.give_pipe(pipe);
        return Ok(());
    }
    let buf = pool.pipe_into_buffer(pipe).map_err(dst_err)?;
    *slot = Slot::Buf(buf);
    Ok(())
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
    mut tap: Option<Tap>,
) -> Result<(usize, bool, bool), EndError> {
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
                    if let Some(tap) = tap.as_mut() {
                        if tap.into.len() <= tap.limit {
                            if tap.into.capacity() == 0 {
                                tap.into.reserve(n.max(TAP_FIRST_CAPACITY));
                            }
                            tap.into.extend_from_slice(&buf.filled()[buf.len() - n..]);
                        }
                    }
                    // A short read drained the socket (module docs), unless
                    // an end of stream is pending behind the data.
                    if n < room && !src.hup {
                        src.readable = false;
                    }
                }
                Err(e) => match sys::classify(&e) {
                    IoError::WouldBlock => src.readable = false,
                    IoError::Interrupted => progress = true,
                    IoError::Failed => return Err(src_err(e)),
                },
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
                    Err(e) => match sys::classify(&e) {
                        IoError::WouldBlock => dst.writable = false,
                        IoError::Interrupted => progress = true,
                        IoError::Failed => return Err(dst_err(e)),
                    },
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
) -> Result<(usize, bool), EndError> {
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
                Err(e) => match sys::classify(&e) {
                    // Said for an empty socket and for a full pipe alike:
                    // only an empty pipe proves the socket is drained.
                    IoError::WouldBlock => {
                        if pipe.len == 0 {
                            src.readable = false;
                        } else {
                            pipe.full = true;
                        }
                    }
                    IoError::Interrupted => progress = true,
                    IoError::Failed if sys::splice_unsupported(&e) => {
                        leave_pipe(slot, pool, &e)?;
                        return Ok((moved, false));
                    }
                    IoError::Failed => return Err(src_err(e)),
                },
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
                Err(e) => match sys::classify(&e) {
                    // The pipe holds bytes, so this is the socket.
                    IoError::WouldBlock => dst.writable = false,
                    IoError::Interrupted => progress = true,
                    IoError::Failed if sys::splice_unsupported(&e) => {
                        leave_pipe(slot, pool, &e)?;
                        return Ok((moved, false));
                    }
                    IoError::Failed => return Err(dst_err(e)),
                },
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
/// When the other direction is over too (`dst` sent its FIN and `src` got
/// it), the session finishes now and closing `dst` sends the FIN: no
/// `shutdown` call.
fn pass_fin(src: &Endpoint, dst: &mut Endpoint, slot: &Slot) {
    if src.read_eof && slot.is_empty() && !dst.write_shut {
        dst.write_shut = true;
        if dst.read_eof && src.write_shut {
            return;
        }
        // ENOTCONN here means the peer is already gone; the next read or
        // write on it reports that properly.
        let _ = dst.sock.shutdown(Shutdown::Write);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::{TcpListener, TcpStream as StdStream};
    use std::thread;
    use std::time::{Duration, Instant};

    use super::*;

    const LEN: usize = 1 << 20;

    fn pattern() -> Vec<u8> {
        (0..LEN).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    /// A connected pair: (our non-blocking end, the peer's blocking end).
    fn pair() -> (TcpStream, StdStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = StdStream::connect(l.local_addr().unwrap()).unwrap();
        let (ours, _) = l.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        (TcpStream::from_std(ours), peer)
    }

    /// Relays 1 MiB through `transfer` with splice(2) failing with `errno`
    /// after `ok` successful calls; returns what arrived and the pool.
    fn relay_with_splice_fault(ok: usize, errno: i32) -> (Vec<u8>, Pool) {
        let (src_sock, mut writer) = pair();
        let (dst_sock, mut reader) = pair();
        let sent = pattern();
        let data = sent.clone();
        let w = thread::spawn(move || {
            writer.write_all(&data).unwrap();
        });
        let r = thread::spawn(move || {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).unwrap();
            got
        });
        let mut pool = Pool::new(16 * 1024, 4);
        pool.set_splice(true);
        sys::splice_fault::set(ok, errno);
        let (mut src, mut dst) = (Endpoint::new(src_sock), Endpoint::new(dst_sock));
        let mut slot = Slot::Empty;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(src.read_eof && slot.is_empty() && dst.write_shut) {
            assert!(Instant::now() < deadline, "relay stalled");
            src.readable = true;
            dst.writable = true;
            transfer(
                &mut src,
                Some(&mut dst),
                &mut slot,
                &mut pool,
                256 * 1024,
                None,
            )
            .map_err(|e| e.error)
            .expect("the relay falls back instead of failing");
            thread::sleep(Duration::from_micros(200));
        }
        w.join().unwrap();
        drop(dst);
        let got = r.join().unwrap();
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "bytes arrived out of order or changed");
        (got, pool)
    }

    #[test]
    fn refused_splice_into_the_pipe_falls_back_to_buffers() {
        for errno in [libc::EPERM, libc::EINVAL, libc::ENOSYS] {
            let (_, pool) = relay_with_splice_fault(0, errno);
            assert!(!pool.splicing(), "splicing stays off after a refusal");
            assert_eq!(pool.pipes_in_use(), 0);
        }
    }

    #[test]
    fn refused_splice_out_of_the_pipe_keeps_the_bytes_inside() {
        // The first splice fills the pipe; the one out of it is refused.
        let (_, mut pool) = relay_with_splice_fault(1, libc::EPERM);
        assert!(!pool.splicing());
        assert!(pool.take_pipe().is_none(), "no pipes after a refusal");
        pool.set_splice(true);
        assert!(!pool.splicing(), "a reload does not turn it back on");
    }

    #[test]
    fn other_splice_errors_still_end_the_session() {
        let (src_sock, mut writer) = pair();
        let (dst_sock, _reader) = pair();
        writer.write_all(&[1; 64 * 1024]).unwrap();
        let mut pool = Pool::new(16 * 1024, 4);
        pool.set_splice(true);
        sys::splice_fault::set(0, libc::ECONNRESET);
        let (mut src, mut dst) = (Endpoint::new(src_sock), Endpoint::new(dst_sock));
        let mut slot = Slot::Empty;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "splice never tried");
            src.readable = true;
            dst.writable = true;
            if let Err(e) = transfer(
                &mut src,
                Some(&mut dst),
                &mut slot,
                &mut pool,
                1 << 20,
                None,
            ) {
                assert_eq!(e.error.raw_os_error(), Some(libc::ECONNRESET));
                break;
            }
            thread::sleep(Duration::from_millis(1));
        }
        assert!(pool.splicing());
    }
}

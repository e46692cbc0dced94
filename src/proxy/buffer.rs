//! Fixed-size buffers and the pool they come from.
//!
//! A [`Buffer`] is a `Box<[u8]>` with two cursors, `start <= end <= cap`:
//! bytes `start..end` are waiting to be written, `end..cap` is free. When
//! the free tail is too small to be worth a read, the pending bytes are
//! moved to the front (compaction), so a buffer never grows.
//!
//! Sessions take a buffer from the [`Pool`] only while bytes are in flight
//! and give it back as soon as it is empty, so an idle connection pair holds
//! no buffer at all. The pool keeps a bounded number of free buffers.
//!
//! A direction that moves bulk data (a read filled a whole buffer) may
//! switch to a kernel [`Pipe`] and `splice(2)`, which moves the bytes without
//! copying them through user space. Pipes come from the same pool, also only
//! while a transfer is under way, and are bounded in number.

use std::io::{self, Read};
use std::os::fd::OwnedFd;

use super::sys;

/// Most pipes in use at once (two descriptors each).
pub const MAX_PIPES: usize = 256;
/// Free pipes kept for reuse.
const KEEP_PIPES: usize = 16;

pub struct Buffer {
    data: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Buffer {
    pub fn new(cap: usize) -> Buffer {
        Buffer {
            data: vec![0u8; cap].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.data.len()
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// No room for another read, even after compaction.
    pub fn is_full(&self) -> bool {
        self.len() == self.capacity()
    }

    /// The pending bytes.
    pub fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// Marks `n` pending bytes as written.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n.min(self.len());
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        self.check();
    }

    /// One `read` into the free space; `Ok(0)` is end of stream.
    pub fn read_from(&mut self, r: &mut impl Read) -> io::Result<usize> {
        // Compact when less than a quarter is free at the tail.
        if self.start > 0 && self.capacity() - self.end < self.capacity() / 4 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        debug_assert!(self.end < self.capacity(), "read_from on a full buffer");
        let n = r.read(&mut self.data[self.end..])?;
        self.end += n;
        self.check();
        Ok(n)
    }

    fn reset(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    fn check(&self) {
        debug_assert!(self.start <= self.end && self.end <= self.capacity());
    }
}

/// A kernel pipe that one direction of a session splices through.
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
    /// Bytes inside.
    pub len: usize,
    pub cap: usize,
    /// The last splice into it said `WouldBlock` while it held bytes: its
    /// page slots may be used up below `cap`, so read again only after some
    /// of it was written out.
    pub full: bool,
}

/// Free buffers of one size, and pipes, reused so the hot path does not
/// allocate.
pub struct Pool {
    size: usize,
    free: Vec<Buffer>,
    max_free: usize,
    /// Buffers handed out and not yet given back.
    in_use: usize,
    /// Whether bulk transfers may use pipes.
    splice: bool,
    /// `splice(2)` failed as unsupported once: pipes stay off.
    splice_refused: bool,
    free_pipes: Vec<Pipe>,
    pipes_in_use: usize,
    /// Most pipes in use at once: [`MAX_PIPES`], or fewer when the
    /// open-files limit leaves no room for them (`ports::fd_budget`).
    max_pipes: usize,
}

impl Pool {
    pub fn new(size: usize, max_free: usize) -> Pool {
        Pool {
            size,
            free: Vec::new(),
            max_free,
            in_use: 0,
            splice: false,
            splice_refused: false,
            free_pipes: Vec::new(),
            pipes_in_use: 0,
            max_pipes: MAX_PIPES,
        }
    }

    /// Caps the pipes in use (and kept free) at `n`.
    pub fn set_max_pipes(&mut self, n: usize) {
        self.max_pipes = n.min(MAX_PIPES);
        self.free_pipes.truncate(self.max_pipes);
    }

    /// A pipe for a bulk transfer, if splicing is on and one can be had.
    pub fn take_pipe(&mut self) -> Option<Pipe> {
        if !self.splicing() || self.pipes_in_use >= self.max_pipes {
            return None;
        }
        let pipe = match self.free_pipes.pop() {
            Some(p) => p,
            // Out of descriptors or pipe memory: stay with buffers.
            None => {
                let (read, write) = sys::pipe().ok()?;
                let cap = sys::pipe_capacity(&write);
                Pipe {
                    read,
                    write,
                    len: 0,
                    cap,
                    full: false,
                }
            }
        };
        self.pipes_in_use += 1;
        Some(pipe)
    }

    /// Gives a pipe back; one that still holds bytes is closed, never reused.
    pub fn give_pipe(&mut self, p: Pipe) {
        self.pipes_in_use = self.pipes_in_use.saturating_sub(1);
        if p.len == 0 && self.splice && self.free_pipes.len() < KEEP_PIPES.min(self.max_pipes) {
            self.free_pipes.push(p);
        }
    }

    pub fn buffer_size(&self) -> usize {
        self.size
    }

    pub fn pipes_in_use(&self) -> usize {
        self.pipes_in_use
    }

    pub fn splicing(&self) -> bool {
        self.splice && !self.splice_refused
    }

    /// `splice(2)` was refused (`sys::splice_unsupported`): no pipes from now
    /// on, across reloads too (the loop's one pool serves the whole
    /// process). True the first time.
    pub fn splice_refused(&mut self) -> bool {
        self.free_pipes.clear();
        !std::mem::replace(&mut self.splice_refused, true)
    }

    /// Gives a pipe back as a buffer holding the bytes it still held, read
    /// out with read(2), so a direction can leave the pipe without losing
    /// them. The buffer is counted as taken (give it back with [`Pool::give`]).
    pub fn pipe_into_buffer(&mut self, p: Pipe) -> io::Result<Buffer> {
        self.pipes_in_use = self.pipes_in_use.saturating_sub(1);
        self.in_use += 1;
        let want = p.len;
        let mut b = Buffer::new(want.max(self.size));
        let mut read_end = std::fs::File::from(p.read);
        while b.len() < want {
            match b.read_from(&mut read_end) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(b)
    }

    pub fn set_splice(&mut self, on: bool) {
        self.splice = on;
        if !on {
            self.free_pipes.clear();
        }
    }

    pub fn take(&mut self) -> Buffer {
        self.in_use += 1;
        self.free.pop().unwrap_or_else(|| Buffer::new(self.size))
    }

    pub fn give(&mut self, mut b: Buffer) {
        self.in_use = self.in_use.saturating_sub(1);
        if b.capacity() == self.size && self.free.len() < self.max_free {
            b.reset();
            self.free.push(b);
        }
    }

    /// A new buffer size (reload): retained buffers of the old size go.
    pub fn resize(&mut self, size: usize) {
        if size != self.size {
            self.size = size;
            self.free.clear();
        }
    }

    pub fn in_use(&self) -> usize {
        self.in_use
    }

    pub fn free(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_consume_and_compact() {
        let mut b = Buffer::new(8);
        assert!(b.is_empty() && !b.is_full());
        assert_eq!(b.read_from(&mut &b"abcdefgh"[..]).unwrap(), 8);
        assert!(b.is_full());
        b.consume(7);
        assert_eq!(b.filled(), b"h");
        // Free tail is 0 < 8/4: compaction makes room for 7 more.
        assert_eq!(b.read_from(&mut &b"1234567xyz"[..]).unwrap(), 7);
        assert_eq!(b.filled(), b"h1234567");
        b.consume(8);
        assert!(b.is_empty());
        assert_eq!(b.read_from(&mut &b""[..]).unwrap(), 0, "EOF");
    }

    #[test]
    fn cursors_hold_under_random_operations() {
        let mut b = Buffer::new(64);
        let mut model: Vec<u8> = Vec::new();
        let mut seed = 12345u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize
        };
        for i in 0..10_000u32 {
            if next() % 2 == 0 && !b.is_full() {
                let data: Vec<u8> = (0..next() % 80).map(|j| (i as usize + j) as u8).collect();
                let n = b.read_from(&mut &data[..]).unwrap();
                model.extend_from_slice(&data[..n]);
            } else {
                let n = next() % (b.len() + 1);
                b.consume(n);
                model.drain(..n);
            }
            assert_eq!(b.filled(), &model[..]);
        }
    }

    #[test]
    fn pool_reuses_and_bounds_free_buffers() {
        let mut p = Pool::new(16, 2);
        let bufs: Vec<_> = (0..4).map(|_| p.take()).collect();
        assert_eq!(p.in_use(), 4);
        for b in bufs {
            p.give(b);
        }
        assert_eq!((p.in_use(), p.free()), (0, 2));
        p.resize(32);
        assert_eq!(p.free(), 0);
        assert_eq!(p.take().capacity(), 32);
    }
}

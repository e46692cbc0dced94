//! The start-up stage of a session: the I/O shell over the pure `pgwire`.
//!
//! Until the login completes (ReadyForQuery) or needs the client (a
//! password request), the stage keeps a copy of what the client sent and
//! holds the server's bytes back. If the server refuses the start-up with
//! SQLSTATE 57P0x (shutting down, starting up), the session is held and
//! retried on another backend: [`Startup::prepare_replay`] queues the
//! client's bytes again, and the repeated `N` answers to its SSLRequests are
//! swallowed, so the client never sees the refusal. Anything that is not a
//! PostgreSQL start-up, a TLS or GSS acceptance, or any other answer ends
//! the stage at once ([`Examined::Done`]); the session then upgrades to a
//! plain byte relay.

use std::io::{self, Read, Write};

use super::buffer::Pool;
use super::relay::{Endpoint, Failed, Pair, Slot, Tap};
use super::sys::{self, IoError};
use super::token::Side;
use crate::pgwire::{self, Answer};

/// Largest client start-up kept for a replay.
const MAX_STARTUP_BYTES: usize = 8192;
/// Room first given to the server's answer (see `first_answer`).
const REPLY_FIRST_CAPACITY: usize = 1024;
/// An SSLRequest or GSSENCRequest is 8 bytes.
const ENCRYPTION_REQUEST_BYTES: usize = 8;

/// What a session keeps of its connection start-up so that a server that
/// refuses it can be replaced without the client noticing (see `pgwire`).
#[derive(Debug, Default)]
pub struct Startup {
    /// Every byte the client has sent.
    sent: Vec<u8>,
    /// `N` answers the client got to its encryption requests.
    answered: usize,
    /// `N` answers a new backend will repeat after a retry: not relayed.
    swallow: usize,
    /// The server's answer, held back until it is understood.
    reply: Vec<u8>,
    /// During a replay: how much of `sent` went to the new backend. Each
    /// encryption request goes alone and the rest only after its `N`, as
    /// PostgreSQL rejects data sent behind an SSLRequest before its answer.
    replayed: usize,
}

/// What a pump of the start-up stage found.
#[derive(Debug)]
pub enum Examined {
    /// Still examining; the relay's state for the loop.
    Pending(super::relay::Flow),
    /// The stage is over: upgrade to the relay and pump it now.
    Done,
    /// The server refused the start-up (SQLSTATE 57P0x) or closed without
    /// answering: retry elsewhere or later.
    Refused(String),
}

/// Where the server's first answer stands.
enum FirstAnswer {
    /// Not all there yet; nothing relayed.
    Pending,
    /// Understood, and not a refusal: relay it and stop examining.
    Understood,
    Refused(String),
}

impl Startup {
    /// A replayed start-up waits for the new backend's `N`: the client's
    /// bytes stay in its socket meanwhile.
    fn replaying(&self) -> bool {
        self.swallow > 0
    }

    fn tap(&mut self) -> Tap<'_> {
        Tap {
            into: &mut self.sent,
            limit: MAX_STARTUP_BYTES,
        }
    }

    /// The client's bytes may still be a PostgreSQL start-up worth keeping.
    fn plausible(&self) -> bool {
        self.sent.len() <= MAX_STARTUP_BYTES && pgwire::client_start(&self.sent).is_some()
    }

    /// One pump during the start-up. `connected`: the backend's connect is
    /// done (before that, only the client's bytes are collected).
    pub fn pump(
        &mut self,
        p: &mut Pair,
        pool: &mut Pool,
        budget: usize,
        connected: bool,
    ) -> Result<Examined, Failed> {
        // While a replay waits for the new backend's `N`, the client's bytes
        // stay in its socket (still marked readable): queued behind the
        // replayed SSLRequest they would reach the server too early.
        let paused = self.replaying();
        if !connected {
            if paused {
                return Ok(Examined::Pending(super::relay::Flow::Idle));
            }
            p.collect(pool, budget, Some(self.tap()))?;
            return Ok(if self.plausible() {
                Examined::Pending(super::relay::Flow::Idle)
            } else {
                Examined::Done
            });
        }
        let mut over = false;
        if !paused {
            over = p.up(pool, budget, Some(self.tap()))?;
        }
        // The server's first answer is examined before anything of it
        // reaches the client.
        match self.first_answer(p, pool)? {
            FirstAnswer::Pending => {}
            FirstAnswer::Understood => return Ok(Examined::Done),
            FirstAnswer::Refused(why) => return Ok(Examined::Refused(why)),
        }
        // A replay may have queued the rest of the start-up, or just ended:
        // send what is queued, and what the client sent meanwhile, now.
        let still = self.replaying();
        let resumed = paused && !still;
        let writable = p.backend.as_ref().is_some_and(|b| b.writable);
        if (!p.to_backend.is_empty() && writable) || resumed {
            // Still waiting for the N: flush only, the client's bytes wait.
            let readable = p.client.readable;
            p.client.readable &= !still;
            let more = p.up(pool, budget, Some(self.tap()));
            if still {
                p.client.readable = readable;
            }
            over |= more?;
        }
        if !self.plausible() {
            return Ok(Examined::Done);
        }
        Ok(Examined::Pending(p.flow(over)))
    }

    /// Reads and classifies the server's first bytes (see `pgwire`),
    /// relaying `N` answers to encryption requests and swallowing repeated
    /// ones after a retry.
    fn first_answer(&mut self, p: &mut Pair, pool: &mut Pool) -> Result<FirstAnswer, Failed> {
        let backend_err = |error| Failed {
            side: Side::Backend,
            error,
        };
        let Some(backend) = p.backend.as_mut() else {
            return Ok(FirstAnswer::Pending);
        };
        let cap = pool.buffer_size().min(pgwire::MAX_ANSWER_BYTES);
        loop {
            if !self.reply.is_empty() {
                if self.swallow > 0 {
                    if self.reply[0] != b'N' {
                        return Err(backend_err(io::Error::other(
                            "the new server answered the encryption request differently",
                        )));
                    }
                    self.reply.remove(0);
                    self.swallow -= 1;
                    // Answered: the next request, or the rest of the start-up.
                    let end = if self.swallow > 0 {
                        self.replayed + ENCRYPTION_REQUEST_BYTES
                    } else {
                        self.sent.len()
                    };
                    let next = self.sent.get(self.replayed..end).unwrap_or_default();
                    crate::logging::debug!(
                        "replay: N swallowed, sending {} more bytes",
                        next.len()
                    );
                    send_now_or_queue(backend, &mut p.to_backend, pool, next)
                        .map_err(backend_err)?;
                    self.replayed = end;
                    continue;
                }
                // A PostgreSQL server says nothing before the client's first
                // complete packet: one that does is something else.
                let Some(start) = pgwire::client_start(&self.sent).filter(|c| c.packets > 0) else {
                    return Ok(FirstAnswer::Understood);
                };
                let asked = start.encryption_requests;
                match pgwire::server_answer(&self.reply, self.answered < asked) {
                    Answer::Incomplete => {}
                    Answer::Other => return Ok(FirstAnswer::Understood),
                    Answer::GoingAway { message } => return Ok(FirstAnswer::Refused(message)),
                    Answer::NoEncryption => match p.client.sock.write(b"N") {
                        Ok(1) => {
                            self.reply.remove(0);
                            self.answered += 1;
                            continue;
                        }
                        // Could not hand it over at once: relay it the usual way.
                        Ok(_) => return Ok(FirstAnswer::Understood),
                        Err(e) if sys::classify(&e) == IoError::WouldBlock => {
                            return Ok(FirstAnswer::Understood)
                        }
                        Err(error) => {
                            return Err(Failed {
                                side: Side::Client,
                                error,
                            })
                        }
                    },
                }
            }
            if !backend.readable || backend.read_eof {
                return Ok(FirstAnswer::Pending);
            }
            if self.reply.len() >= cap {
                return Ok(FirstAnswer::Understood);
            }
            let mut chunk = [0u8; pgwire::MAX_ANSWER_BYTES];
            let want = cap - self.reply.len();
            match backend.sock.read(&mut chunk[..want]) {
                // Closed before answering at all: a server going away (a
                // backend killed by a shutdown says nothing).
                Ok(0) if self.reply.is_empty() => {
                    return Ok(FirstAnswer::Refused(
                        "closed the connection during the start-up".into(),
                    ))
                }
                Ok(0) => {
                    backend.read_eof = true;
                    return Ok(FirstAnswer::Understood);
                }
                Ok(n) => {
                    p.bytes_down += n as u64;
                    if self.reply.capacity() == 0 {
                        // The whole answer to a start-up (authentication,
                        // parameters, key, ready: 400-500 bytes) in one
                        // allocation, kept across the `N` before it.
                        self.reply.reserve(n.max(REPLY_FIRST_CAPACITY.min(cap)));
                    }
                    self.reply.extend_from_slice(&chunk[..n]);
                    // A short read drained the socket (the relay's rule):
                    // no read that would only say EAGAIN.
                    if n < want && !backend.hup {
                        backend.readable = false;
                    }
                }
                Err(e) => match sys::classify(&e) {
                    IoError::WouldBlock => backend.readable = false,
                    IoError::Interrupted => {}
                    IoError::Failed => return Err(backend_err(e)),
                },
            }
        }
    }

    /// Ends the stage: whatever the server said so far goes to the client
    /// first.
    pub fn disengage(self, to_client: &mut Slot, pool: &mut Pool) {
        if self.reply.is_empty() {
            return;
        }
        debug_assert!(
            to_client.is_empty(),
            "nothing is relayed while the start-up is examined"
        );
        let mut buf = pool.take();
        let _ = buf.read_from(&mut self.reply.as_slice());
        *to_client = Slot::Buf(buf);
    }

    /// Prepares a retry after the backend refused the start-up: the client's
    /// bytes go out again to the next backend (queued in `to_backend`, which
    /// is emptied first), whose repeated `N` answers are not relayed. False
    /// when the start-up cannot be replayed (then nothing changed).
    pub fn prepare_replay(&mut self, id: u64, to_backend: &mut Slot, pool: &mut Pool) -> bool {
        if self.sent.len() > pool.buffer_size() {
            return false;
        }
        to_backend.release(pool);
        self.swallow = self.answered;
        self.reply.clear();
        self.replayed = if self.answered > 0 {
            ENCRYPTION_REQUEST_BYTES
        } else {
            self.sent.len()
        };
        crate::logging::debug!(
            "session={id} replay prepared: sent={} answered={} first segment={}",
            self.sent.len(),
            self.answered,
            self.replayed
        );
        let mut buf = pool.take();
        if buf.read_from(&mut &self.sent[..self.replayed]).is_err() {
            pool.give(buf);
            return false;
        }
        *to_backend = Slot::Buf(buf);
        true
    }
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
            Err(e) if sys::classify(&e) == IoError::WouldBlock => backend.writable = false,
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

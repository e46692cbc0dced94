//! One admin HTTP connection: read a request head, wait for the answer
//! (which may take a Patroni poll for `/update_clusters`), write the
//! response, close. Same edge-triggered rules as sessions: read and write
//! until `WouldBlock`, never assume an event means progress.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::time::Instant;

use mio::event::Event;
use mio::net::TcpStream;

use crate::admin::{self, Parse, Request, Response};

pub enum State {
    /// Reading the request head.
    Reading,
    /// Waiting for the polls of `/update_clusters` (request id, clusters
    /// still to answer, failures so far).
    Refreshing {
        request: u64,
        pending: Vec<String>,
        failures: Vec<String>,
        head_only: bool,
    },
    /// Writing the response.
    Writing,
    /// Done or failed: reap it.
    Closed,
}

pub struct AdminConn {
    pub id: u64,
    pub sock: TcpStream,
    pub state: State,
    /// Idle deadline while reading, poll deadline while refreshing.
    pub deadline: Instant,
    input: Vec<u8>,
    output: Vec<u8>,
    written: usize,
    readable: bool,
    writable: bool,
}

/// What the loop must do after an event.
pub enum Step {
    Nothing,
    /// A complete request to route.
    Route(Request),
    Close,
}

impl AdminConn {
    pub fn new(id: u64, sock: TcpStream, deadline: Instant) -> AdminConn {
        AdminConn {
            id,
            sock,
            state: State::Reading,
            deadline,
            input: Vec::new(),
            output: Vec::new(),
            written: 0,
            readable: false,
            writable: false,
        }
    }

    pub fn on_event(&mut self, ev: &Event) -> Step {
        let hint = ev.is_error() || ev.is_read_closed() || ev.is_write_closed();
        self.readable |= ev.is_readable() || hint;
        self.writable |= ev.is_writable() || hint;
        self.advance()
    }

    /// Reads or writes as far as possible.
    pub fn advance(&mut self) -> Step {
        match self.state {
            State::Reading => self.read(),
            State::Writing => self.write(),
            // Bytes after the head are ignored; a peer that closed is noticed
            // when we write.
            State::Refreshing { .. } | State::Closed => Step::Nothing,
        }
    }

    fn read(&mut self) -> Step {
        let mut chunk = [0u8; 2048];
        while self.readable {
            match self.sock.read(&mut chunk) {
                Ok(0) => return Step::Close, // closed before a full request
                Ok(n) => {
                    let take = n.min(
                        admin::MAX_REQUEST_BYTES + 1
                            - self.input.len().min(admin::MAX_REQUEST_BYTES),
                    );
                    self.input.extend_from_slice(&chunk[..take]);
                    match admin::parse_request(&self.input) {
                        Parse::Incomplete => continue,
                        Parse::Ok(req) => return Step::Route(req),
                        Parse::Reject(resp) => {
                            self.respond(&resp);
                            return self.write();
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Step::Close,
            }
        }
        Step::Nothing
    }

    /// Queues `resp` for writing (the caller then calls [`advance`]).
    pub fn respond(&mut self, resp: &Response) {
        self.output = resp.render();
        self.written = 0;
        self.state = State::Writing;
    }

    fn write(&mut self) -> Step {
        while self.writable && self.written < self.output.len() {
            match self.sock.write(&self.output[self.written..]) {
                Ok(0) => return Step::Close,
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Step::Close,
            }
        }
        if self.written == self.output.len() {
            // All sent: FIN, then close at reap.
            let _ = self.sock.shutdown(Shutdown::Write);
            return Step::Close;
        }
        Step::Nothing
    }
}

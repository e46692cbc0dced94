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

use super::*;

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

impl Proxy {
    // ---- admin --------------------------------------------------------------

    pub(super) fn accept_admin(&mut self) {
        while self.admin_accept_ready {
            if self.admins.len() >= MAX_ADMIN {
                return; // leave the rest in the backlog until one finishes
            }
            match self.admin_listener.accept() {
                Ok((mut sock, _)) => {
                    let entry = self.admins.vacant_entry();
                    let key = entry.key();
                    let tok = token::admin(key);
                    if self
                        .poll
                        .registry()
                        .register(&mut sock, tok, Interest::READABLE | Interest::WRITABLE)
                        .is_err()
                    {
                        continue;
                    }
                    let id = self.next_id;
                    self.next_id += 1;
                    let deadline = Instant::now() + ADMIN_IDLE;
                    entry.insert(AdminConn::new(id, sock, deadline));
                    self.timers.add(deadline, Timer::Admin(key, id));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.admin_accept_ready = false,
                Err(e) if accept_retry(&e) => {}
                Err(e) => {
                    warn!("admin accept failed: {e}");
                    return; // retried on the next loop turn
                }
            }
        }
    }

    pub(super) fn admin_event(&mut self, key: usize, ev: Option<&Event>) {
        let Some(a) = self.admins.get_mut(key) else {
            return;
        };
        let step = match ev {
            Some(ev) => a.on_event(ev),
            None => a.advance(),
        };
        match step {
            Step::Nothing => {}
            Step::Close => self.close_admin(key),
            Step::Route(req) => self.admin_route(key, req),
        }
    }

    pub(super) fn close_admin(&mut self, key: usize) {
        if let Some(a) = self.admins.get_mut(key) {
            if !matches!(a.state, AdminState::Closed) {
                a.state = AdminState::Closed;
                self.closed_admins.push(key);
            }
        }
    }

    pub(super) fn admin_respond(&mut self, key: usize, resp: Response) {
        if let Some(a) = self.admins.get_mut(key) {
            a.respond(&resp);
            self.admin_event(key, None);
        }
    }

    pub(super) fn admin_route(&mut self, key: usize, req: Request) {
        let resp = match req.route {
            Route::Root => Response::text(200, "OK"),
            Route::Clusters => Response::json(200, self.status_json()),
            Route::UpdateClusters => {
                if self.clusters.is_empty() {
                    Response::text(200, "no clusters configured\n")
                } else {
                    return self.start_refresh(key, req.head_only);
                }
            }
        };
        self.admin_respond(key, resp.head_only(req.head_only));
    }

    pub(super) fn start_refresh(&mut self, key: usize, head_only: bool) {
        let request = self.next_request_id;
        self.next_request_id += 1;
        let mut pending = Vec::new();
        let mut failures = Vec::new();
        let mut hosts = 1;
        for (name, c) in &self.clusters {
            hosts = hosts.max(c.updater.settings.hosts.len() as u32);
            if c.updater.refresh(request) {
                pending.push(name.clone());
            } else {
                failures.push(format!("{name}: updater not running"));
            }
        }
        // Each host may take api_timeout; the poll may already be under way.
        let wait = self.config.api_timeout * (hosts * 2) + Duration::from_secs(1);
        let Some(a) = self.admins.get_mut(key) else {
            return;
        };
        a.deadline = Instant::now() + wait;
        self.timers.add(a.deadline, Timer::Admin(key, a.id));
        a.state = AdminState::Refreshing {
            request,
            pending,
            failures,
            head_only,
        };
        self.finish_refresh_if_done(key);
    }

    /// Records the poll answering `requests` for `cluster`.
    pub(super) fn answer_refreshes(
        &mut self,
        cluster: &str,
        requests: &[u64],
        failure: Option<&str>,
    ) {
        if requests.is_empty() {
            return;
        }
        let mut touched = Vec::new();
        for (key, a) in self.admins.iter_mut() {
            if let AdminState::Refreshing {
                request,
                pending,
                failures,
                ..
            } = &mut a.state
            {
                if requests.contains(request) {
                    pending.retain(|c| c != cluster);
                    if let Some(e) = failure {
                        failures.push(format!("{cluster}: {e}"));
                    }
                    touched.push(key);
                }
            }
        }
        for key in touched {
            self.finish_refresh_if_done(key);
        }
    }

    pub(super) fn finish_refresh_if_done(&mut self, key: usize) {
        let Some(a) = self.admins.get(key) else {
            return;
        };
        let AdminState::Refreshing {
            pending,
            failures,
            head_only,
            ..
        } = &a.state
        else {
            return;
        };
        if !pending.is_empty() {
            return;
        }
        let resp = if failures.is_empty() {
            Response::text(
                200,
                &format!("updated {} cluster(s)\n", self.clusters.len()),
            )
        } else {
            Response::text(503, &format!("update failed for {}\n", failures.join("\n")))
        };
        let head_only = *head_only;
        self.admin_respond(key, resp.head_only(head_only));
    }

    pub(super) fn admin_deadline(&mut self, key: usize, id: u64) {
        let Some(a) = self.admins.get(key) else {
            return;
        };
        if a.id != id || a.deadline > Instant::now() {
            return;
        }
        let resp = match &a.state {
            AdminState::Reading => Response::text(408, "request timeout\n"),
            AdminState::Refreshing {
                pending, head_only, ..
            } => Response::text(
                503,
                &format!("timed out waiting for: {}\n", pending.join(", ")),
            )
            .head_only(*head_only),
            // A client that does not read its response: give up on it.
            AdminState::Writing => return self.close_admin(key),
            AdminState::Closed => return,
        };
        // Give the writer one more idle period.
        if let Some(a) = self.admins.get_mut(key) {
            a.deadline = Instant::now() + ADMIN_IDLE;
            self.timers.add(a.deadline, Timer::Admin(key, id));
        }
        self.admin_respond(key, resp);
    }
}

//! Signals, delivered to the event loop through a self-pipe.
//!
//! For each signal we care about, signal-hook runs two actions in the
//! handler, in registration order: set that signal's flag, then write a byte
//! to a Unix socket pair. The loop registers the read end; on readiness it
//! first drains the socket until `WouldBlock`, then swaps the flags (the
//! other order can lose a signal that lands in between, see signal-hook's
//! `low_level::pipe` docs). No work happens inside the handler.

use std::io::{self, Read};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use libc::c_int;
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1};
use signal_hook::SigId;

/// What the loop does for a signal (documented in `man/patroni-proxy.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// SIGHUP: re-read the configuration file.
    Reload,
    /// SIGTERM, SIGINT: stop accepting, let sessions finish; a second one
    /// while draining exits at once.
    Drain,
    /// SIGQUIT: exit at once.
    Exit,
    /// SIGUSR1: poll every cluster now.
    Refresh,
}

/// The signals handled and what each means.
pub const HANDLED: [(c_int, Action); 5] = [
    (SIGHUP, Action::Reload),
    (SIGTERM, Action::Drain),
    (SIGINT, Action::Drain),
    (SIGQUIT, Action::Exit),
    (SIGUSR1, Action::Refresh),
];

/// The self-pipe and the flags behind it.
pub struct Signals {
    read_end: mio::net::UnixStream,
    flags: Vec<(Action, Arc<AtomicBool>)>,
    ids: Vec<SigId>,
}

impl Signals {
    pub fn install() -> io::Result<Signals> {
        let (read_end, write_end) = StdUnixStream::pair()?;
        read_end.set_nonblocking(true)?;
        let mut flags = Vec::new();
        let mut ids = Vec::new();
        for (signo, action) in HANDLED {
            let flag = Arc::new(AtomicBool::new(false));
            // Flag first, then the pipe: the loop must see the flag once it
            // sees the byte.
            ids.push(signal_hook::flag::register(signo, Arc::clone(&flag))?);
            ids.push(signal_hook::low_level::pipe::register(
                signo,
                write_end.try_clone()?,
            )?);
            flags.push((action, flag));
        }
        Ok(Signals {
            read_end: mio::net::UnixStream::from_std(read_end),
            flags,
            ids,
        })
    }

    /// The source to register with the poll, readable when a signal came.
    pub fn source(&mut self) -> &mut mio::net::UnixStream {
        &mut self.read_end
    }

    /// Drains the pipe, then returns the actions of the signals that came,
    /// in the order of [`HANDLED`] (at most one of each).
    pub fn pending(&mut self) -> Vec<Action> {
        let mut scratch = [0u8; 64];
        loop {
            match self.read_end.read(&mut scratch) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // WouldBlock: drained (edge-triggered, so we must get here).
                Err(_) => break,
            }
        }
        let mut out = Vec::new();
        for (action, flag) in &self.flags {
            if flag.swap(false, Ordering::SeqCst) && !out.contains(action) {
                out.push(*action);
            }
        }
        out
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_signal_has_one_action() {
        let find = |s| HANDLED.iter().find(|(n, _)| *n == s).map(|(_, a)| *a);
        assert_eq!(find(SIGHUP), Some(Action::Reload));
        assert_eq!(find(SIGTERM), Some(Action::Drain));
        assert_eq!(find(SIGINT), Some(Action::Drain));
        assert_eq!(find(SIGQUIT), Some(Action::Exit));
        assert_eq!(find(SIGUSR1), Some(Action::Refresh));
    }
}

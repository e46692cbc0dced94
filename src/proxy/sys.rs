//! The operating system, below mio: every libc call of the crate (socket
//! options, the listen backlog, the open-files limit, pipes and `splice`)
//! and the classification of I/O and accept errors. The only unsafe code in
//! the crate; each block says why it is sound.
#![allow(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use log::Level;

use crate::config::Keepalive;

/// What a failed non-blocking read or write means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoError {
    /// Edge-triggered: the readiness is used up; wait for the next event.
    WouldBlock,
    /// A signal landed: just try again.
    Interrupted,
    /// A real error: the connection is done.
    Failed,
}

pub fn classify(e: &io::Error) -> IoError {
    match e.kind() {
        io::ErrorKind::WouldBlock => IoError::WouldBlock,
        io::ErrorKind::Interrupted => IoError::Interrupted,
        _ => IoError::Failed,
    }
}

/// What a failed `accept` means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptError {
    /// The backlog is empty.
    WouldBlock,
    /// The next accept may well succeed: a signal, or a client that gave up
    /// while queued.
    Retry,
    /// Anything else (EMFILE, ENFILE, ENOBUFS, ENOMEM): the connection stays
    /// in the backlog and, edge-triggered, no new event will come for it, so
    /// accepting must pause and retry on a timer.
    Pause,
}

pub fn accept_error(e: &io::Error) -> AcceptError {
    match e.kind() {
        io::ErrorKind::WouldBlock => AcceptError::WouldBlock,
        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => AcceptError::Retry,
        _ => AcceptError::Pause,
    }
}

/// The log level of a session that ends on `e`: a peer that reset or went
/// away is normal life.
pub fn close_level(e: &io::Error) -> Level {
    match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::NotConnected => Level::Debug,
        _ => Level::Info,
    }
}

/// Binds a listening socket with `backlog` (std and mio hard-code 128,
/// which drops SYNs under a connection burst). std sets `SO_REUSEADDR` and
/// close-on-exec; calling `listen` again on a listening socket is how Linux
/// changes its backlog. Errors name the failing step.
pub fn bind_listener(
    addr: SocketAddr,
    backlog: u32,
) -> Result<std::net::TcpListener, (&'static str, io::Error)> {
    let l = std::net::TcpListener::bind(addr).map_err(|e| ("bind", e))?;
    let backlog = backlog.min(i32::MAX as u32) as libc::c_int;
    // SAFETY: the fd is owned by `l`, alive for the call; listen takes no pointers.
    if unsafe { libc::listen(l.as_raw_fd(), backlog) } != 0 {
        return Err(("listen", io::Error::last_os_error()));
    }
    l.set_nonblocking(true)
        .map_err(|e| ("set_nonblocking", e))?;
    Ok(l)
}

fn setsockopt_int(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` lives on the stack for the duration of the call and its
    // size is passed; the fd is borrowed from a live socket.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets what every accepted client socket should have on the listening
/// socket instead: Linux copies `TCP_NODELAY`, `SO_KEEPALIVE` and the
/// keepalive timing to each socket `accept` returns (and arms its keepalive
/// timer), which saves five `setsockopt` calls per client. `None` turns
/// keepalive off again (a reload can remove `tcp_keepalive`).
pub fn set_accepted_options(listener: &impl AsRawFd, ka: Option<&Keepalive>) -> io::Result<()> {
    setsockopt_int(listener, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
    match ka {
        Some(ka) => set_keepalive(listener, ka),
        None => setsockopt_int(listener, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 0),
    }
}

/// Turns on TCP keepalive with the given timing, so a peer that vanished
/// (power loss, partition) is detected instead of holding a session forever.
pub fn set_keepalive(fd: &impl AsRawFd, ka: &Keepalive) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    setsockopt_int(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPIDLE,
        ka.idle_secs as libc::c_int,
    )?;
    setsockopt_int(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        ka.interval_secs as libc::c_int,
    )?;
    setsockopt_int(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPCNT,
        ka.count as libc::c_int,
    )
}

/// Sets `TCP_USER_TIMEOUT`: unacknowledged data (or, with keepalive, an
/// unanswered probe) older than `timeout` fails the connection, so a
/// session to a host that vanished from the network ends in seconds
/// instead of after the kernel's retransmissions (about 15 minutes).
pub fn set_user_timeout(fd: &impl AsRawFd, timeout: std::time::Duration) -> io::Result<()> {
    let ms = timeout.as_millis().min(libc::c_int::MAX as u128) as libc::c_int;
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms)
}

/// Raises the soft open-files limit towards `wanted` (capped by the hard
/// limit) and returns the resulting `(soft, hard)`.
pub fn raise_nofile_limit(wanted: u64) -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let target = (wanted as libc::rlim_t).min(lim.rlim_max);
    if target > lim.rlim_cur {
        let new = libc::rlimit {
            rlim_cur: target,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `new` is a valid rlimit read by the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
            lim.rlim_cur = target;
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
    Ok((lim.rlim_cur as u64, lim.rlim_max as u64))
}

/// A non-blocking, close-on-exec pipe: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid, writable array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// How many bytes a pipe holds.
pub fn pipe_capacity(fd: &impl AsRawFd) -> usize {
    // SAFETY: F_GETPIPE_SZ takes no pointer; the fd is borrowed from a live pipe.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

/// Moves up to `len` bytes from `from` to `to` inside the kernel; one of
/// them must be a pipe. Never blocks on the pipe; the sockets are
/// non-blocking already. `Ok(0)`: end of stream on `from`.
pub fn splice(from: &impl AsRawFd, to: &impl AsRawFd, len: usize) -> io::Result<usize> {
    #[cfg(test)]
    if let Some(errno) = splice_fault::next() {
        return Err(io::Error::from_raw_os_error(errno));
    }
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    // SAFETY: null offsets are allowed for pipes and sockets; both fds are
    // borrowed from live objects for the duration of the call.
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            flags,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `splice(2)` refused as such (a seccomp filter, a file type without
/// splice support), not a failure of the sockets: copy in user space instead.
pub fn splice_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPERM | libc::EINVAL | libc::ENOSYS)
    )
}

/// Test-only fault injection for [`splice`], per thread: after `ok` more
/// calls, every call fails with `errno`.
#[cfg(test)]
pub mod splice_fault {
    use std::cell::Cell;

    thread_local! {
        static FAULT: Cell<Option<(usize, i32)>> = const { Cell::new(None) };
    }

    pub fn set(ok: usize, errno: i32) {
        FAULT.with(|f| f.set(Some((ok, errno))));
    }

    pub(super) fn next() -> Option<i32> {
        FAULT.with(|f| match f.get() {
            None => None,
            Some((0, errno)) => Some(errno),
            Some((n, errno)) => {
                f.set(Some((n - 1, errno)));
                None
            }
        })
    }
}

/// `sysconf(_SC_CLK_TCK)`, the unit of `/proc` CPU times (100 if unknown).
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a constant; no pointers involved.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// The page size, the unit of `/proc` memory sizes (4096 if unknown).
pub fn page_size() -> u64 {
    // SAFETY: as above.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;

    fn getsockopt_int(fd: &impl AsRawFd, level: libc::c_int, name: libc::c_int) -> libc::c_int {
        let mut value: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` and `len` are valid and writable for the call, and
        // `len` gives the size of `value`; the fd is borrowed from a live socket.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                level,
                name,
                &mut value as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            )
        };
        assert_eq!(rc, 0, "getsockopt: {}", io::Error::last_os_error());
        value
    }

    fn accept_one(l: &std::net::TcpListener) -> std::net::TcpStream {
        let _client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        l.set_nonblocking(false).unwrap();
        let (s, _) = l.accept().unwrap();
        s
    }

    /// What `new_session` relies on: the kernel copies the listener's
    /// options to every accepted socket.
    #[test]
    fn accepted_sockets_inherit_nodelay_and_keepalive_from_the_listener() {
        let l = bind_listener("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let ka = Keepalive {
            idle_secs: 61,
            interval_secs: 11,
            count: 7,
        };
        set_accepted_options(&l, Some(&ka)).unwrap();
        let s = accept_one(&l);
        assert_eq!(getsockopt_int(&s, libc::IPPROTO_TCP, libc::TCP_NODELAY), 1);
        assert_eq!(getsockopt_int(&s, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(
            getsockopt_int(&s, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
            61
        );
        assert_eq!(
            getsockopt_int(&s, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
            11
        );
        assert_eq!(getsockopt_int(&s, libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 7);

        // A reload that removes tcp_keepalive turns it off for new clients.
        set_accepted_options(&l, None).unwrap();
        let s = accept_one(&l);
        assert_eq!(getsockopt_int(&s, libc::IPPROTO_TCP, libc::TCP_NODELAY), 1);
        assert_eq!(getsockopt_int(&s, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 0);
    }

    #[test]
    fn user_timeout_is_set_in_milliseconds() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        set_user_timeout(&s, std::time::Duration::from_millis(2500)).unwrap();
        assert_eq!(
            getsockopt_int(&s, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
            2500
        );
    }
}

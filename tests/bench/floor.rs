//! The floor: the least work a user-space TCP relay can do per message, as a
//! benchmark contender (`tests/bench/run`, contender `floor`). Not part of
//! the product and not built by Cargo: the bench compiles it with `rustc -O`
//! (std only, no crate).
//!
//!     floor LISTEN_PORT:BACKEND_PORT...
//!
//! One thread, one level-triggered epoll, blocking sockets: a readable
//! socket is read once into a 32 KiB buffer and what was read is written to
//! its peer at once (a blocking write). So a message costs exactly
//! `epoll_wait`, `recvfrom` and `sendto`, and a connection `accept4`, a
//! blocking `connect`, two `setsockopt(TCP_NODELAY)`, two `epoll_ctl` and
//! two `close`. No timers, no buffers of its own, no parsing, no
//! accounting, no error handling beyond closing both sides. It relays
//! pgbench correctly (small messages never fill a socket buffer) and
//! nothing else is asked of it: what its CPU time per transaction costs is
//! the kernel's, and the gap between it and a real proxy is the real
//! proxy's own work.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;

#[cfg_attr(target_arch = "x86_64", repr(C, packed))]
#[cfg_attr(not(target_arch = "x86_64"), repr(C))]
#[derive(Clone, Copy)]
struct EpollEvent {
    events: u32,
    data: u64,
}

extern "C" {
    fn epoll_create1(flags: i32) -> i32;
    fn epoll_ctl(epfd: i32, op: i32, fd: i32, ev: *mut EpollEvent) -> i32;
    fn epoll_wait(epfd: i32, evs: *mut EpollEvent, max: i32, timeout: i32) -> i32;
}

const EPOLLIN: u32 = 0x1;
const EPOLL_CTL_ADD: i32 = 1;
const LISTENER: u64 = 1 << 62;

struct Conn {
    sock: TcpStream,
    peer: usize,
}

fn add(ep: i32, fd: i32, data: u64) -> io::Result<()> {
    let mut ev = EpollEvent {
        events: EPOLLIN,
        data,
    };
    // SAFETY: ep and fd are open descriptors; ev outlives the call.
    if unsafe { epoll_ctl(ep, EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn main() -> io::Result<()> {
    let mut listeners = Vec::new();
    for arg in std::env::args().skip(1) {
        let (l, b) = arg.split_once(':').expect("LISTEN_PORT:BACKEND_PORT");
        let backend: SocketAddr = format!("127.0.0.1:{b}").parse().expect("backend port");
        listeners.push((TcpListener::bind(format!("127.0.0.1:{l}"))?, backend));
    }
    // SAFETY: a plain syscall.
    let ep = unsafe { epoll_create1(0) };
    if ep < 0 {
        return Err(io::Error::last_os_error());
    }
    for (i, (l, _)) in listeners.iter().enumerate() {
        add(ep, l.as_raw_fd(), LISTENER | i as u64)?;
    }
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut freed: Vec<usize> = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    let mut evs = [EpollEvent { events: 0, data: 0 }; 256];
    loop {
        // SAFETY: evs is valid for 256 entries.
        let n = unsafe { epoll_wait(ep, evs.as_mut_ptr(), evs.len() as i32, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for ev in &evs[..n as usize] {
            let data = ev.data;
            if data & LISTENER != 0 {
                let (l, backend) = &listeners[(data & !LISTENER) as usize];
                let Ok((client, _)) = l.accept() else {
                    continue;
                };
                let Ok(server) = TcpStream::connect(backend) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let a = free.pop().unwrap_or_else(|| {
                    conns.push(None);
                    conns.len() - 1
                });
                let b = free.pop().unwrap_or_else(|| {
                    conns.push(None);
                    conns.len() - 1
                });
                add(ep, client.as_raw_fd(), a as u64)?;
                add(ep, server.as_raw_fd(), b as u64)?;
                conns[a] = Some(Conn {
                    sock: client,
                    peer: b,
                });
                conns[b] = Some(Conn {
                    sock: server,
                    peer: a,
                });
                continue;
            }
            let k = data as usize;
            let Some(c) = conns[k].as_mut() else { continue };
            let peer = c.peer;
            let done = match c.sock.read(&mut buf) {
                Ok(0) | Err(_) => true,
                Ok(got) => match conns[peer].as_mut() {
                    Some(p) => p.sock.write_all(&buf[..got]).is_err(),
                    None => true,
                },
            };
            if done {
                // Closing a descriptor takes it out of the epoll set; the
                // slots are reused only after this batch.
                conns[k] = None;
                conns[peer] = None;
                freed.extend([k, peer]);
            }
        }
        free.append(&mut freed);
    }
}

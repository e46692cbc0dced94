//! systemd readiness notification (`sd_notify`), with std alone: one
//! datagram to the Unix socket named by `$NOTIFY_SOCKET` (a path, or an
//! abstract name after `@`). Without the variable every call does nothing,
//! so the proxy behaves the same outside systemd.
//!
//! What is sent: `READY=1` once every socket is bound (clients are then
//! accepted, and held until a topology arrives); `RELOADING=1` and then
//! `READY=1` around a SIGHUP reload; `STOPPING=1` when a drain starts;
//! `STATUS=` lines an operator sees in `systemctl status`. The unit uses
//! `Type=notify` (Debian 12's systemd 252 predates `notify-reload`).

use std::os::unix::net::UnixDatagram;

/// Sends `state` (newline-separated `KEY=VALUE` lines) to systemd, if it
/// asked for notifications. Failures are logged once and otherwise ignored:
/// notification is a courtesy, never a reason to stop.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&target.to_string_lossy(), state) {
        log::warn!("sd_notify to {target:?} failed: {e}");
    }
}

fn send(target: &str, state: &str) -> std::io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    match target.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            sock.send_to(state.as_bytes(), target)?;
        }
    }
    Ok(())
}

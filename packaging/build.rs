//! Cargo build script (Cargo.toml: `build = "packaging/build.rs"`): links
//! the binary with packed relative relocations (`-z pack-relative-relocs`,
//! DT_RELR) where the toolchain supports them. A PIE's relocation table is
//! mostly relative relocations, 24 bytes each; packed, they take a bitmap:
//! about 82 kB less on x86_64 (tests/bench/RESULTS.md §10).
//!
//! The flag is a linker option, outside what a Cargo profile can set, and
//! the result needs a C library whose loader applies DT_RELR (glibc 2.36
//! and later: Debian 12 and 13). So it is probed, never assumed: a tiny
//! program is linked with the same rustc, target and RUSTFLAGS as the real
//! build and, unless cross-compiling, run. A linker without the option, a
//! C library without GLIBC_ABI_DT_RELR or a loader that cannot run the
//! result means an ordinary link, as before. `PATRONI_PROXY_NO_RELR=1`
//! turns it off (for a binary that must run on an older glibc than the one
//! it is built against).

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};

const FLAG: &str = "-Wl,-z,pack-relative-relocs";

fn main() {
    println!("cargo:rerun-if-changed=packaging/build.rs");
    println!("cargo:rerun-if-env-changed=PATRONI_PROXY_NO_RELR");
    if env::var_os("PATRONI_PROXY_NO_RELR").is_some_and(|v| v != "0") {
        return;
    }
    // DT_RELR is an ELF feature; the probe below needs a GNU-style linker
    // driver. Elsewhere, link as usual.
    let var = |name: &str| env::var(name).unwrap_or_default();
    if var("CARGO_CFG_TARGET_OS") != "linux" || var("CARGO_CFG_TARGET_ENV") != "gnu" {
        return;
    }
    if probe() {
        println!("cargo:rustc-link-arg-bins={FLAG}");
    }
}

/// Links (and, when the binary can run here, runs) an empty program with
/// the flag; true if all of it succeeded.
fn probe() -> bool {
    let Some(out) = env::var_os("OUT_DIR").map(PathBuf::from) else {
        return false;
    };
    let src = out.join("relr_probe.rs");
    let exe = out.join("relr_probe");
    if fs::write(&src, "fn main() {}\n").is_err() {
        return false;
    }
    let target = env::var("TARGET").unwrap_or_default();
    let host = env::var("HOST").unwrap_or_default();
    let mut rustc = Command::new(env::var_os("RUSTC").unwrap_or_else(|| OsString::from("rustc")));
    // The real build's flags (a `-C linker=`, a sysroot, path remapping), so
    // the probe meets the linker the binary will meet.
    if let Ok(flags) = env::var("CARGO_ENCODED_RUSTFLAGS") {
        rustc.args(flags.split('\x1f').filter(|f| !f.is_empty()));
    }
    rustc
        .args(["--target", &target, "-C", &format!("link-arg={FLAG}"), "-o"])
        .arg(&exe)
        .arg(&src)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if !rustc.status().is_ok_and(|s| s.success()) {
        return false;
    }
    if target != host {
        return true;
    }
    Command::new(&exe)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

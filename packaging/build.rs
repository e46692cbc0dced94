//! Cargo build script (Cargo.toml: `build = "packaging/build.rs"`): two
//! linker options that make the binary smaller, each used only where a
//! probe shows the toolchain takes it (tests/bench/RESULTS.md §10 has the
//! figures):
//!
//! - `-z pack-relative-relocs` (DT_RELR): a PIE's relocation table is
//!   mostly relative relocations, 24 bytes each; packed, they take a
//!   bitmap (about 82 kB less on x86_64). The result needs a loader that
//!   applies DT_RELR: glibc 2.36 and later (Debian 12 and 13); the binary
//!   then names the version `GLIBC_ABI_DT_RELR`, so an older glibc refuses
//!   it at start with that name rather than misbehaving.
//! - `--icf=all`: identical code folding, in LLD (rustc's default linker
//!   on x86_64 Linux since Rust 1.90) and gold; GNU ld has no such option
//!   and links as before (about 21 kB less). Rust gives function
//!   addresses no identity, and LLD never folds a function that has
//!   landing pads (an LSDA), so unwinding is unchanged. Read-only data is
//!   not folded (no `--ignore-data-address-equality`: a `static` has an
//!   address of its own).
//!
//! These are linker options, outside what a Cargo profile can set. Each
//! is probed, never assumed: a tiny program is linked with the same rustc,
//! target and RUSTFLAGS as the real build and, unless cross-compiling,
//! run. A linker without the option, a C library without
//! GLIBC_ABI_DT_RELR or a loader that cannot run the result means a link
//! without that option. `PATRONI_PROXY_PLAIN_LINK=1` turns both off (for
//! a binary that must run on an older glibc than the one it is built
//! against).

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};

const FLAGS: [(&str, &str); 2] = [
    ("relr", "-Wl,-z,pack-relative-relocs"),
    ("icf", "-Wl,--icf=all"),
];

fn main() {
    println!("cargo:rerun-if-changed=packaging/build.rs");
    println!("cargo:rerun-if-env-changed=PATRONI_PROXY_PLAIN_LINK");
    if env::var_os("PATRONI_PROXY_PLAIN_LINK").is_some_and(|v| v != "0") {
        return;
    }
    // ELF options; the probe below needs a GNU-style linker driver.
    // Elsewhere, link as usual.
    let var = |name: &str| env::var(name).unwrap_or_default();
    if var("CARGO_CFG_TARGET_OS") != "linux" || var("CARGO_CFG_TARGET_ENV") != "gnu" {
        return;
    }
    for (name, flag) in FLAGS {
        if probe(name, flag) {
            println!("cargo:rustc-link-arg-bins={flag}");
        }
    }
}

/// Links (and, when the binary can run here, runs) an empty program with
/// `flag`; true if all of it succeeded.
fn probe(name: &str, flag: &str) -> bool {
    let Some(out) = env::var_os("OUT_DIR").map(PathBuf::from) else {
        return false;
    };
    let src = out.join("link_probe.rs");
    let exe = out.join(format!("link_probe_{name}"));
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
        .args(["--target", &target, "-C", &format!("link-arg={flag}"), "-o"])
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

//! The crate's error type: one hand-written enum, each variant carrying the
//! context of the operation that failed (which file, which address, which
//! syscall), so a single log line says what went wrong and where.
//!
//! Per-connection I/O never becomes an `Error`: sessions classify their own
//! failures (see `proxy::session`) and at worst close themselves.

use std::fmt;
use std::io;
use std::net::SocketAddr;

/// Everything that can stop the process at start-up or make a reload fail.
#[derive(Debug)]
pub enum Error {
    /// The configuration is invalid. Each entry is one problem, already
    /// prefixed by the key path it concerns.
    Config { file: String, problems: Vec<String> },
    /// A listening socket could not be set up; `step` names the syscall.
    Bind {
        addr: SocketAddr,
        step: &'static str,
        source: io::Error,
    },
    /// Any other I/O failure, with what we were doing.
    Io { context: String, source: io::Error },
}

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Exit status for `main`: 2 for a configuration problem (like `nginx -t`),
    /// 1 for anything that went wrong while running.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config { .. } => 2,
            _ => 1,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config { file, problems } => {
                write!(f, "invalid configuration {file}:")?;
                for p in problems {
                    write!(f, "\n  {p}")?;
                }
                Ok(())
            }
            Error::Bind { addr, step, source } => write!(f, "{step} {addr}: {source}"),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Config { .. } => None,
            Error::Bind { source, .. } | Error::Io { source, .. } => Some(source),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

//! patroni-proxy: a TCP proxy that routes PostgreSQL clients to the members
//! of Patroni clusters by role, learning the topology from Patroni's REST API.
//!
//! The library exists so that integration tests and fuzz targets can reach
//! the pure modules; the binary (`src/main.rs`) is a thin wrapper over
//! [`proxy::Proxy`].
//!
//! Dependency direction: `main -> proxy -> {topology, admin, signals, config}`
//! and `updater -> {patroni, topology}`. The loop and the updater threads
//! share only the message types in `updater`.
#![deny(unsafe_code)]

pub mod access;
pub mod admin;
pub mod config;
pub mod error;
pub mod https;
pub mod notify;
pub mod patroni;
pub mod pgwire;
pub mod proxy;
pub mod signals;
pub mod tls;
pub mod tls_server;
pub mod topology;
pub mod updater;

//! patroni-proxy: a TCP proxy that routes PostgreSQL clients to the members
//! of Patroni clusters by role, learning the topology from Patroni's REST API.
//!
//! The library exists so that integration tests and fuzz targets can reach
//! the pure modules; the binary (`src/main.rs`) is a thin wrapper over
//! [`proxy::Proxy`].
//!
//! Dependency direction (nothing points back up):
//! `main -> {config, proxy}`;
//! `proxy -> {updater, config, topology, policy, admin, pgwire, signals, notify, error,
//! health, metrics, access, tls_server, logging}`;
//! `updater -> {patroni, topology, health, dns, tls, https, logging}`;
//! `config -> {topology, policy, error, config_guard, tls, tls_server, access}`;
//! `policy -> {topology, order}`; `tls -> order`; `tls_server -> tls`; `https -> tls`;
//! `patroni -> topology`; `health -> {topology, patroni}` (patroni in its
//! tests only).
//! `topology`, `pgwire`, `admin`, `metrics`, `signals`, `notify`, `error`,
//! `dns`, `config_guard`, `access`, `order` and `logging` depend on nothing of ours. The loop and the updater threads
//! share only the message types in `updater`. Every libc call and every
//! `unsafe` block is in `proxy::sys`.
#![deny(unsafe_code)]

pub mod access;
pub mod admin;
pub mod config;
pub mod config_guard;
pub mod dns;
pub mod error;
pub mod health;
pub mod https;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod order;
pub mod patroni;
pub mod pgwire;
pub mod policy;
pub mod proxy;
pub mod signals;
pub mod tls;
pub mod tls_server;
pub mod topology;
pub mod updater;

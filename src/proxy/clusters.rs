//! Clusters: the updater thread of each (one [`settings`] constructor, one
//! spawn, shared by start-up, reload and the restart of a dead thread), the
//! topology each one reports, and staleness (`topology_ttl`).
//!
//! [`Clusters`] owns the update channel and the loop's waker; the loop asks
//! it for updates and tells it what happened, and it says which ports need
//! a refresh. It never touches a session or a listener.

use std::collections::BTreeMap;
use std::io;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, info, warn, Level};
use mio::Waker;

use super::stats::ClusterStats;
use super::Proxy;
use crate::config::{ClusterConfig, Config};
use crate::error::{Error, Result};
use crate::topology::{self, Topology};
use crate::updater::{self, Update};

/// How often a topology that stays stale is logged again.
const STALE_REMINDER: Duration = Duration::from_secs(60);

/// What the loop knows of one cluster.
pub struct ClusterState {
    pub updater: updater::Handle,
    pub topology: Option<Topology>,
    pub last_success: Option<Instant>,
    pub last_host: Option<String>,
    pub last_error: Option<String>,
    /// Beyond `topology_ttl` without a successful poll: refuse new clients.
    pub stale: bool,
    stale_logged: Option<Instant>,
    /// The last leader seen, kept across polls without one.
    last_leader: Option<String>,
    pub stats: ClusterStats,
}

/// Every configured cluster, by name, and the channel their updaters send on.
pub struct Clusters {
    map: BTreeMap<String, ClusterState>,
    waker: Arc<Waker>,
    updates_tx: Sender<Update>,
    updates_rx: Receiver<Update>,
    next_updater_id: u64,
}

/// The settings an updater of `cluster` runs with. When they change on
/// reload, that updater is restarted.
pub fn settings(config: &Config, cluster: &ClusterConfig) -> updater::Settings {
    updater::Settings {
        hosts: cluster.hosts.clone(),
        interval: config.cluster_update_interval,
        api_timeout: config.api_timeout,
        tls: cluster.tls_material.clone(),
        // The health listeners answer `/readiness` by the cluster's
        // `maximum_lag_on_failover`.
        read_config: config.health.listen.is_some() || config.health.agent_listen.is_some(),
    }
}

impl Clusters {
    pub fn new(waker: Arc<Waker>) -> Clusters {
        let (updates_tx, updates_rx) = mpsc::channel();
        Clusters {
            map: BTreeMap::new(),
            waker,
            updates_tx,
            updates_rx,
            next_updater_id: 1,
        }
    }

    /// Starts a thread with a fresh id; its updates wake the loop.
    fn spawn(&mut self, name: &str, settings: updater::Settings) -> io::Result<updater::Handle> {
        let id = self.next_updater_id;
        self.next_updater_id += 1;
        let waker = Arc::clone(&self.waker);
        let wake: updater::Wake = Arc::new(move || {
            if let Err(e) = waker.wake() {
                error!("waking the event loop: {e}");
            }
        });
        updater::Handle::spawn(id, name, settings, self.updates_tx.clone(), wake)
    }

    /// Starts the updater of `cluster`, replacing (and stopping) a running
    /// one; the cluster keeps its topology meanwhile.
    pub fn start(&mut self, config: &Config, cluster: &ClusterConfig) -> Result<()> {
        let handle = self
            .spawn(&cluster.name, settings(config, cluster))
            .map_err(|e| {
                Error::io(
                    format!("starting the updater of cluster {}", cluster.name),
                    e,
                )
            })?;
        match self.map.get_mut(&cluster.name) {
            Some(c) => std::mem::replace(&mut c.updater, handle).stop(),
            None => {
                self.map.insert(
                    cluster.name.clone(),
                    ClusterState {
                        updater: handle,
                        topology: None,
                        last_success: None,
                        last_host: None,
                        last_error: None,
                        stale: false,
                        stale_logged: None,
                        last_leader: None,
                        stats: ClusterStats::default(),
                    },
                );
            }
        }
        Ok(())
    }

    /// Brings the clusters in line with a reloaded configuration: removed
    /// ones stop, new ones start, and those whose updater settings changed
    /// get a new updater.
    pub fn reconcile(&mut self, new: &Config) {
        let gone: Vec<String> = self
            .map
            .keys()
            .filter(|name| !new.clusters.iter().any(|c| &c.name == *name))
            .cloned()
            .collect();
        for name in gone {
            if let Some(c) = self.map.remove(&name) {
                c.updater.stop();
                info!("cluster={name} removed");
            }
        }
        for cluster in &new.clusters {
            let wanted = settings(new, cluster);
            let restart = self
                .map
                .get(&cluster.name)
                .is_none_or(|c| c.updater.settings != wanted);
            if restart {
                if let Err(e) = self.start(new, cluster) {
                    error!("{e}");
                }
            }
        }
    }

    /// Restarts updater threads that died (they only end on `Shutdown`, so
    /// a finished one panicked).
    pub fn restart_dead(&mut self) {
        let dead: Vec<(String, updater::Settings)> = self
            .map
            .iter()
            .filter(|(_, c)| c.updater.is_dead())
            .map(|(name, c)| (name.clone(), c.updater.settings.clone()))
            .collect();
        for (name, settings) in dead {
            error!("cluster={name} updater thread died; restarting it");
            match self.spawn(&name, settings) {
                Ok(h) => {
                    if let Some(c) = self.map.get_mut(&name) {
                        c.updater = h;
                    }
                }
                Err(e) => error!("cluster={name} cannot restart its updater: {e}"),
            }
        }
    }

    /// Marks clusters without a successful poll for longer than `ttl` as
    /// stale (logged once, then every [`STALE_REMINDER`]); returns those that
    /// just went stale.
    pub fn mark_stale(&mut self, ttl: Option<Duration>, now: Instant) -> Vec<String> {
        let mut went_stale = Vec::new();
        let Some(ttl) = ttl else {
            return went_stale;
        };
        for (name, c) in &mut self.map {
            let Some(last) = c.last_success else {
                continue;
            };
            let age = now.duration_since(last);
            if age <= ttl {
                continue;
            }
            if !c.stale {
                c.stale = true;
                c.stale_logged = Some(now);
                warn!(
                    "cluster={name} no successful Patroni poll for {:.0}s (topology_ttl); refusing new clients, keeping open sessions",
                    age.as_secs_f64()
                );
                went_stale.push(name.clone());
            } else if c
                .stale_logged
                .is_some_and(|t| now.duration_since(t) >= STALE_REMINDER)
            {
                c.stale_logged = Some(now);
                warn!(
                    "cluster={name} topology still stale ({:.0}s since the last successful poll)",
                    age.as_secs_f64()
                );
            }
        }
        went_stale
    }

    /// The next update waiting in the channel.
    pub fn next_update(&self) -> Option<Update> {
        self.updates_rx.try_recv().ok()
    }

    /// Records a poll's outcome; true when the cluster's topology changed
    /// (its ports need a refresh).
    pub fn apply(
        &mut self,
        cluster: &str,
        updater: u64,
        outcome: std::result::Result<updater::Polled, updater::PollFailure>,
        took: Duration,
        tls_failures: u64,
        now: Instant,
    ) -> bool {
        let Some(c) = self.map.get_mut(cluster) else {
            return false;
        };
        if c.updater.id != updater {
            return false; // from an updater a reload replaced
        }
        c.stats.polls += 1;
        c.stats.poll_duration.observe(took.as_secs_f64());
        c.stats.tls_failures += tls_failures;
        let polled = match outcome {
            Err(e) => {
                c.stats.poll_errors += 1;
                c.stats.poll_errors_by[e.kind as usize] += 1;
                c.last_error = Some(e.message);
                return false;
            }
            Ok(polled) => polled,
        };
        c.last_success = Some(now);
        c.last_host = Some(polled.host);
        c.last_error = None;
        if c.stale {
            c.stale = false;
            info!("cluster={cluster} topology fresh again; accepting new clients");
        }
        let Some(topo) = polled.topology else {
            return false;
        };
        for change in topology::diff(c.topology.as_ref(), &topo) {
            let level = match change {
                topology::Change::SplitBrain { .. } => Level::Error,
                _ => Level::Info,
            };
            crate::logging::log!(level, "cluster={cluster} {change}");
        }
        if topo.paused && !c.topology.as_ref().is_some_and(|t| t.paused) {
            info!("cluster={cluster} is in maintenance mode (pause)");
        }
        if let Some(leader) = topo.leader().map(|m| &m.name) {
            if c.last_leader.as_ref().is_some_and(|l| l != leader) {
                c.stats.leader_changes += 1;
            }
            c.last_leader = Some(leader.clone());
        }
        c.topology = Some(topo);
        true
    }

    pub fn topology(&self, name: &str) -> Option<&Topology> {
        self.map.get(name).and_then(|c| c.topology.as_ref())
    }

    pub fn is_stale(&self, name: &str) -> bool {
        self.map.get(name).is_some_and(|c| c.stale)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &ClusterState)> {
        self.map.iter()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl Drop for Clusters {
    fn drop(&mut self) {
        for (_, c) in std::mem::take(&mut self.map) {
            c.updater.stop();
        }
    }
}

impl Proxy {
    /// Once a second: restart dead updaters, and close the clients waiting
    /// on clusters that just went stale.
    pub(super) fn housekeeping(&mut self, now: Instant) {
        self.clusters.restart_dead();
        for name in self.clusters.mark_stale(self.config.topology_ttl, now) {
            self.close_waiting_of(&name);
        }
    }

    /// Applies every update in the channel (wake-ups coalesce: take
    /// everything that is there).
    pub(super) fn drain_updates(&mut self) {
        while let Some(u) = self.clusters.next_update() {
            let failure = u.outcome.as_ref().err().map(|e| e.message.clone());
            let changed = self.clusters.apply(
                &u.cluster,
                u.updater,
                u.outcome,
                u.took,
                u.tls_failures,
                Instant::now(),
            );
            if failure.is_none() {
                // Every successful poll counts for the lag rules.
                self.observe_poll(&u.cluster, changed);
            } else if changed {
                self.refresh_listeners(&u.cluster);
            }
            // Answer `/update_clusters` only once the new topology is in effect.
            self.answer_refreshes(&u.cluster, &u.requests, failure.as_deref());
        }
    }
}

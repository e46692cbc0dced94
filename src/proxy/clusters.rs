//! Clusters: updater threads, the topology each one reports, and staleness.

use super::*;

impl Proxy {
    pub(super) fn housekeeping(&mut self, now: Instant) {
        let ttl = self.config.topology_ttl;
        let mut went_stale = Vec::new();
        for (name, c) in &mut self.clusters {
            if c.updater.is_dead() {
                error!("cluster={name} updater thread died; restarting it");
                let settings = c.updater.settings.clone();
                let id = self.next_updater_id;
                self.next_updater_id += 1;
                let wake = waker_fn(&self.waker);
                match updater::Handle::spawn(id, name, settings, self.updates_tx.clone(), wake) {
                    Ok(h) => c.updater = h,
                    Err(e) => error!("cluster={name} cannot restart its updater: {e}"),
                }
            }
            let (Some(ttl), Some(last)) = (ttl, c.last_success) else {
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
        for name in went_stale {
            let waiting: Vec<usize> = self
                .sessions
                .iter()
                .filter(|(_, s)| s.phase == Phase::Waiting)
                .filter(|(_, s)| {
                    self.listeners
                        .get(s.listener)
                        .is_some_and(|l| l.cluster == name)
                })
                .map(|(k, _)| k)
                .collect();
            for key in waiting {
                self.close_session(key, "topology stale", Level::Info);
            }
        }
    }

    // ---- topology ---------------------------------------------------------

    pub(super) fn drain_updates(&mut self) {
        // Wake-ups coalesce: take everything that is there.
        while let Ok(u) = self.updates_rx.try_recv() {
            self.apply_update(u);
        }
    }

    pub(super) fn apply_update(&mut self, u: Update) {
        let failure = u.outcome.as_ref().err().cloned();
        self.apply_outcome(&u.cluster, u.updater, u.outcome);
        // Answer `/update_clusters` only once the new topology is in effect.
        self.answer_refreshes(&u.cluster, &u.requests, failure.as_deref());
    }

    pub(super) fn apply_outcome(
        &mut self,
        cluster: &str,
        updater: u64,
        outcome: std::result::Result<updater::Polled, String>,
    ) {
        let Some(c) = self.clusters.get_mut(cluster) else {
            return;
        };
        if c.updater.id != updater {
            return; // from an updater a reload replaced
        }
        match outcome {
            Err(e) => c.last_error = Some(e),
            Ok(polled) => {
                c.last_success = Some(Instant::now());
                c.last_host = Some(polled.host);
                c.last_error = None;
                if c.stale {
                    c.stale = false;
                    info!(
                        "cluster={} topology fresh again; accepting new clients",
                        cluster
                    );
                }
                if let Some(topo) = polled.topology {
                    for change in topology::diff(c.topology.as_ref(), &topo) {
                        match change {
                            topology::Change::SplitBrain { .. } => {
                                error!("cluster={} {change}", cluster)
                            }
                            _ => info!("cluster={} {change}", cluster),
                        }
                    }
                    if topo.paused && !c.topology.as_ref().is_some_and(|t| t.paused) {
                        info!("cluster={} is in maintenance mode (pause)", cluster);
                    }
                    c.topology = Some(topo);
                    self.refresh_listeners(cluster);
                }
            }
        }
    }

    // ---- clusters and listeners --------------------------------------------

    pub(super) fn start_cluster(&mut self, cluster: &ClusterConfig) -> Result<()> {
        let settings = updater::Settings {
            hosts: cluster.hosts.clone(),
            interval: self.config.cluster_update_interval,
            api_timeout: self.config.api_timeout,
        };
        let id = self.next_updater_id;
        self.next_updater_id += 1;
        let handle = updater::Handle::spawn(
            id,
            &cluster.name,
            settings,
            self.updates_tx.clone(),
            waker_fn(&self.waker),
        )
        .map_err(|e| {
            Error::io(
                format!("starting the updater of cluster {}", cluster.name),
                e,
            )
        })?;
        match self.clusters.get_mut(&cluster.name) {
            Some(c) => std::mem::replace(&mut c.updater, handle).stop(),
            None => {
                self.clusters.insert(
                    cluster.name.clone(),
                    ClusterState {
                        updater: handle,
                        topology: None,
                        last_success: None,
                        last_host: None,
                        last_error: None,
                        stale: false,
                        stale_logged: None,
                    },
                );
            }
        }
        Ok(())
    }
}

pub(super) fn waker_fn(waker: &Arc<Waker>) -> updater::Wake {
    let waker = Arc::clone(waker);
    Arc::new(move || {
        if let Err(e) = waker.wake() {
            error!("waking the event loop: {e}");
        }
    })
}

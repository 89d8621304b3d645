//! The real map writer: node-sync's [`MapWriter`] over global-lb-bpf's [`ServiceMaps`] (the
//! pinned eBPF maps through [`Datapath`], or global-lb-bpf's in-memory `FakeMaps`, which runs the
//! same slot-level update logic).
//!
//! The datapath identifies a backend's cluster by id; node-sync by name. [`ClusterIds`] holds the
//! ids of the clusters whose config was accepted, shared with the agent.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, RwLock};

use global_lb_bpf::signals::{KernelSignals, Outcomes, SuspectEvents};
use global_lb_bpf::{Datapath, DatapathConfig, Proto, ServiceMaps};
use mesh_model::ClusterName;
use mesh_model::values::Protocol;

use crate::lb::{Backend, ClusterRef, Frontend, MapError, MapWriter};

/// Cluster name <-> id, as learnt from accepted cluster configs.
#[derive(Debug, Clone, Default)]
pub struct ClusterIds(Arc<RwLock<BTreeMap<ClusterName, u16>>>);

impl ClusterIds {
    /// Record a cluster's id.
    pub fn set(&self, name: &ClusterName, id: u16) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone(), id);
    }

    /// Record a cluster's id unless another cluster holds it; `Err` names the holder.
    pub fn set_unless_taken(&self, name: &ClusterName, id: u16) -> Result<(), ClusterName> {
        let mut g = self.0.write().unwrap_or_else(|p| p.into_inner());
        if let Some((holder, _)) = g.iter().find(|(n, v)| **v == id && *n != name) {
            return Err(holder.clone());
        }
        g.insert(name.clone(), id);
        Ok(())
    }

    /// The id of a cluster (0 when unknown).
    pub fn id(&self, name: &ClusterName) -> u16 {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    /// The name of a cluster id (`cluster-<id>` when unknown).
    pub fn name(&self, id: u16) -> ClusterName {
        let g = self.0.read().unwrap_or_else(|p| p.into_inner());
        g.iter()
            .find(|(_, v)| **v == id)
            .map(|(n, _)| n.clone())
            .or_else(|| ClusterName::new(&format!("cluster-{id}")).ok())
            .unwrap_or_else(|| g.keys().next().cloned().unwrap_or_else(fallback_name))
    }
}

fn fallback_name() -> ClusterName {
    // "unknown" passes the cluster name rules; reached only for an id that has no name.
    ClusterName::new("unknown").unwrap_or_else(|_| unreachable!("\"unknown\" is a valid name"))
}

/// node-sync's map writer over any global-lb-bpf [`ServiceMaps`].
pub struct GlbWriter<S> {
    maps: S,
    local: ClusterName,
    ids: ClusterIds,
    /// The kernel's connect outcomes and suspect marks (the real datapath only).
    signals: Option<KernelSignals>,
}

impl<S: ServiceMaps> GlbWriter<S> {
    /// Wrap `maps`; `local` marks the backends of this cluster as local (for the counters).
    pub fn new(maps: S, local: ClusterName, ids: ClusterIds) -> Self {
        Self {
            maps,
            local,
            ids,
            signals: None,
        }
    }

    /// Read connect outcomes and manage suspect marks through `signals`.
    pub fn with_signals(mut self, signals: KernelSignals) -> Self {
        self.signals = Some(signals);
        self
    }

    /// Every backend the maps hold, by id.
    fn backends_by_id(&self) -> Vec<(u32, Backend)> {
        // Each cluster's name once (a lookup in the ids and an interning per backend cost more
        // than the rest at 32k backends).
        let mut names: HashMap<u16, ClusterRef> = HashMap::new();
        self.maps
            .backend_entries()
            .into_iter()
            .map(|c| {
                let cluster = names
                    .entry(c.cluster_id)
                    .or_insert_with(|| self.ids.name(c.cluster_id).into())
                    .clone();
                (
                    c.backend_id,
                    Backend {
                        cluster,
                        ip: c.addr,
                        port: c.port,
                        protocol: Protocol::Tcp,
                    },
                )
            })
            .collect()
    }

    /// The wrapped maps.
    pub fn maps(&self) -> &S {
        &self.maps
    }

    /// The wrapped maps, taken back.
    pub fn into_maps(self) -> S {
        self.maps
    }

    /// The datapath's backends for `backends` (the id map read once, not once per backend).
    fn glb_backends<'a>(
        &self,
        backends: impl IntoIterator<Item = &'a Backend>,
    ) -> Vec<global_lb_bpf::Backend> {
        let ids = self.ids.0.read().unwrap_or_else(|p| p.into_inner());
        backends
            .into_iter()
            .map(|b| {
                global_lb_bpf::Backend::new(
                    b.ip,
                    b.port,
                    ids.get(&*b.cluster).copied().unwrap_or(0),
                )
                .with_local(b.cluster == self.local)
            })
            .collect()
    }
}

/// Past this many changed entries a whole-set upsert is as cheap as an update.
const SMALL_CHANGE: usize = 64;

/// The backends that leave and join when `old` becomes `new`, if that is a small change: the
/// merge index emits a frontend's backends in a stable order, so one endpoint change leaves a
/// common prefix and suffix and a short middle. Two passes of equality checks, no hashing of the
/// 10k unchanged ones. When the middles are long, changes may still be few and scattered (a
/// batch that changed endpoints of several clusters of one frontend: the event loop behind by
/// 200 ms at 255 clusters gave batches of 8 changes per frontend, spread over its 2,550
/// backends): then by set, the runs of the clusters in the middles only when the lists are in
/// the index's order (by cluster), when no backend is listed twice and at most a quarter of
/// them changed. `None` otherwise (a failover, duplicates): upsert then.
fn small_change<'a>(
    old: &'a [Backend],
    new: &'a [Backend],
) -> Option<(Vec<&'a Backend>, Vec<&'a Backend>)> {
    let (whole_old, whole_new) = (old, new);
    let prefix = old.iter().zip(new).take_while(|(a, b)| a == b).count();
    let (old, new) = (&old[prefix..], &new[prefix..]);
    let suffix = old
        .iter()
        .rev()
        .zip(new.iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let (old, new) = (&old[..old.len() - suffix], &new[..new.len() - suffix]);
    if old.len() + new.len() > SMALL_CHANGE {
        // The stretches compared by set: in the index's order (each cluster's backends together,
        // clusters by name) only the runs of the clusters in the middles, whole; else the lists.
        let grouped = |l: &[Backend]| l.is_sorted_by(|a, b| a.cluster <= b.cluster);
        let stretches: Vec<(&[Backend], &[Backend])> = if grouped(whole_old) && grouped(whole_new) {
            let mut touched: Vec<&ClusterRef> = old.iter().chain(new).map(|b| &b.cluster).collect();
            touched.sort();
            touched.dedup();
            let run = |l: &'a [Backend], c: &ClusterRef| -> &'a [Backend] {
                let start = l.partition_point(|b| b.cluster < *c);
                &l[start..start + l[start..].partition_point(|b| b.cluster == *c)]
            };
            touched
                .into_iter()
                .map(|c| (run(whole_old, c), run(whole_new, c)))
                .collect()
        } else {
            vec![(whole_old, whole_new)]
        };
        let (mut removed, mut added) = (Vec::new(), Vec::new());
        for (o, n) in stretches {
            if o == n {
                continue;
            }
            let o_set: HashSet<&Backend> = o.iter().collect();
            let n_set: HashSet<&Backend> = n.iter().collect();
            // A backend listed twice has a weight to count: upsert.
            if o_set.len() != o.len() || n_set.len() != n.len() {
                return None;
            }
            removed.extend(o.iter().filter(|b| !n_set.contains(b)));
            added.extend(n.iter().filter(|b| !o_set.contains(b)));
        }
        let limit = whole_old.len().max(whole_new.len()) / 4;
        return (removed.len() + added.len() <= limit.max(SMALL_CHANGE))
            .then_some((removed, added));
    }
    // Removed: what `new` lacks anywhere (a backend listed twice must not go because one copy
    // did). An entry in both middles moved: listing it as added keeps it.
    let removed = old.iter().filter(|b| !whole_new.contains(b)).collect();
    Some((removed, new.iter().collect()))
}

fn proto(p: Protocol) -> Option<Proto> {
    match p {
        Protocol::Tcp => Some(Proto::Tcp),
        Protocol::Udp => Some(Proto::Udp),
        Protocol::Sctp => None,
    }
}

fn glb_frontend(f: &Frontend) -> Option<global_lb_bpf::Frontend> {
    proto(f.protocol).map(|p| global_lb_bpf::Frontend::new(f.ip, f.port, p))
}

fn map_err(op: &'static str, f: &Frontend, e: global_lb_bpf::Error) -> MapError {
    MapError {
        op,
        frontend: f.to_string(),
        no_room: matches!(e, global_lb_bpf::Error::MapFull { .. }),
        detail: e.to_string(),
    }
}

impl<S: ServiceMaps + Send> MapWriter for GlbWriter<S> {
    fn upsert_service(
        &mut self,
        frontend: &Frontend,
        backends: &[Backend],
    ) -> Result<(), MapError> {
        // The socket datapath balances TCP and UDP only; SCTP services are left alone.
        let Some(fe) = glb_frontend(frontend) else {
            return Ok(());
        };
        let bs: Vec<global_lb_bpf::Backend> = self.glb_backends(backends);
        self.maps
            .upsert_service(&fe, &bs)
            .map(|_| ())
            .map_err(|e| map_err("upsert", frontend, e))
    }

    fn update_service(
        &mut self,
        frontend: &Frontend,
        old: &[Backend],
        new: &[Backend],
    ) -> Result<(), MapError> {
        let Some(fe) = glb_frontend(frontend) else {
            return Ok(());
        };
        let Some((removed, added)) = small_change(old, new) else {
            return self.upsert_service(frontend, new);
        };
        let removed: Vec<global_lb_bpf::Backend> = self.glb_backends(removed.iter().copied());
        let added: Vec<global_lb_bpf::Backend> = self.glb_backends(added.iter().copied());
        self.maps
            .update_backends(&fe, &added, &removed)
            .map(|_| ())
            .map_err(|e| map_err("update", frontend, e))
    }

    fn delete_service(&mut self, frontend: &Frontend) -> Result<(), MapError> {
        let Some(fe) = glb_frontend(frontend) else {
            return Ok(());
        };
        self.maps
            .delete_service(&fe)
            .map(|_| ())
            .map_err(|e| map_err("delete", frontend, e))
    }

    fn connect_outcome(&mut self, id: u32) -> Option<Outcomes> {
        self.signals.as_ref()?.outcomes(id).ok()
    }

    fn backend_ids(&mut self) -> Vec<(u32, Backend)> {
        self.backends_by_id()
    }

    fn connections_to(&mut self, id: u32) -> Option<u64> {
        self.maps.counter(id).ok()
    }

    fn free_backends(&self) -> Option<usize> {
        Some(self.maps.backend_room())
    }

    fn backend_by_id(&mut self, id: u32) -> Option<Backend> {
        let c = self.maps.backend_entry(id)?;
        Some(Backend {
            cluster: self.ids.name(c.cluster_id).into(),
            ip: c.addr,
            port: c.port,
            protocol: Protocol::Tcp,
        })
    }

    fn clear_suspect(&mut self, id: u32) {
        if let Some(s) = &mut self.signals
            && let Err(error) = s.clear_suspect(id)
        {
            tracing::warn!(%error, backend_id = id, "clearing a suspect mark failed");
        }
    }

    fn sweep_suspects(&mut self) {
        if let Some(s) = &mut self.signals
            && let Err(error) = s.sweep(global_lb_bpf::signals::monotonic_ns())
        {
            tracing::debug!(%error, "sweeping suspect marks failed");
        }
    }

    fn services(&mut self) -> Result<HashMap<Frontend, Vec<Backend>>, MapError> {
        let list = self.maps.services().map_err(|e| MapError {
            op: "list",
            frontend: "*".into(),
            detail: e.to_string(),
            no_room: false,
        })?;
        Ok(list
            .into_iter()
            .map(|s| {
                let protocol = match s.frontend.proto {
                    Proto::Tcp => Protocol::Tcp,
                    Proto::Udp => Protocol::Udp,
                };
                let fe = Frontend {
                    ip: s.frontend.addr,
                    port: s.frontend.port,
                    protocol,
                };
                let bs = s
                    .backends
                    .iter()
                    .map(|b| Backend {
                        cluster: self.ids.name(b.cluster_id).into(),
                        ip: b.addr,
                        port: b.port,
                        protocol,
                    })
                    .collect();
                (fe, bs)
            })
            .collect())
    }
}

/// Open (or reuse) the pinned datapath under `bpffs`, attached to `cgroup`, its backends map of
/// `max_backends` entries: the map writer (with the kernel's connect outcomes and suspect marks)
/// and the ring buffer of suspect events.
pub fn open(
    bpffs: &Path,
    cgroup: &Path,
    max_backends: u32,
    local: ClusterName,
    ids: ClusterIds,
) -> Result<(Box<dyn MapWriter>, Option<SuspectEvents>), MapError> {
    let config =
        DatapathConfig::new(cgroup.to_owned(), bpffs.to_owned()).with_max_backends(max_backends);
    let mut dp = Datapath::open(&config).map_err(|e| MapError {
        op: "open",
        frontend: "*".into(),
        detail: e.to_string(),
        no_room: false,
    })?;
    let signals = dp.take_signals();
    let mut w = GlbWriter::new(dp, local, ids);
    let events = match signals {
        Some((signals, events)) => {
            w = w.with_signals(signals);
            Some(events)
        }
        None => None,
    };
    Ok((Box::new(w), events))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::Reconciler;

    fn c(n: &str) -> ClusterName {
        ClusterName::new(n).unwrap()
    }

    #[test]
    fn writes_through_the_real_update_logic_and_reads_back() {
        let ids = ClusterIds::default();
        ids.set(&c("c1"), 1);
        ids.set(&c("c2"), 2);
        let mut w = GlbWriter::new(global_lb_bpf::FakeMaps::new(), c("c1"), ids.clone());
        let fe = Frontend {
            ip: "10.96.0.10".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let b = |cl: &str, ip: &str| Backend {
            cluster: c(cl).into(),
            ip: ip.parse().unwrap(),
            port: 8080,
            protocol: Protocol::Tcp,
        };
        w.upsert_service(&fe, &[b("c1", "10.1.0.1"), b("c2", "10.2.0.1")])
            .unwrap();
        let back = w.services().unwrap();
        let mut got = back[&fe].clone();
        got.sort();
        assert_eq!(got, vec![b("c1", "10.1.0.1"), b("c2", "10.2.0.1")]);
        let svc = &w.maps().services().unwrap()[0];
        assert!(svc.backends.iter().any(|x| x.cluster_id == 1 && x.local));
        assert!(svc.backends.iter().any(|x| x.cluster_id == 2 && !x.local));
        // A reconciler started over these maps sees them programmed and writes nothing.
        let mut r = Reconciler::new(w).unwrap();
        let desired: crate::lb::Backends = vec![b("c2", "10.2.0.1"), b("c1", "10.1.0.1")].into();
        let n = r.reconcile_all([(&fe, &desired)]);
        assert_eq!(n.upserts + n.deletes, 0);
        r.set(&fe, None);
        assert!(r.programmed().is_empty());
    }

    #[test]
    fn one_endpoint_change_is_a_small_update_and_ends_like_an_upsert() {
        let ids = ClusterIds::default();
        ids.set(&c("c1"), 1);
        ids.set(&c("c2"), 2);
        let (fe, b) = (vip(), numbered);
        let all: Vec<Backend> = (0..500)
            .map(|i| b(if i % 2 == 0 { "c1" } else { "c2" }, i))
            .collect();
        // Each step: drop one, bring one back, replace the set with a reordered one (a large
        // change), drop the first and last, a duplicate entry (bad data) then its removal, one
        // more, three changes far apart.
        let mut steps: Vec<Vec<Backend>> = vec![all.clone()];
        let mut s = all.clone();
        s.remove(17);
        steps.push(s.clone());
        s.insert(17, all[17].clone());
        steps.push(s.clone());
        s.reverse();
        steps.push(s.clone());
        s.remove(0);
        s.pop();
        steps.push(s.clone());
        s.insert(3, s[200].clone());
        steps.push(s.clone());
        s.remove(3);
        steps.push(s.clone());
        s.push(b("c2", 9_999));
        steps.push(s.clone());
        // Changes scattered over the list (a batch of several): by set.
        s.remove(400);
        s[250] = b("c1", 7_777);
        s.remove(10);
        steps.push(s.clone());
        let r = updates_end_like_upserts(&ids, &fe, &steps);
        assert_eq!(svc_len(r.maps()), 497);
        assert_eq!(r.errors(), 0);
    }

    /// Lists in the index's order (each cluster's backends together): scattered changes in
    /// several clusters, written as updates of their runs, end as an upsert of the list would.
    #[test]
    fn scattered_changes_in_cluster_runs_end_like_an_upsert() {
        let ids = ClusterIds::default();
        for (i, n) in ["c1", "c2", "c3"].iter().enumerate() {
            ids.set(&c(n), i as u16 + 1);
        }
        let (fe, b) = (vip(), numbered);
        let mut s: Vec<Backend> = ["c1", "c2", "c3"]
            .iter()
            .flat_map(|cl| (0..200).map(move |i| b(cl, i)))
            .collect();
        let mut steps = vec![s.clone()];
        s.remove(7);
        s[300] = b("c2", 5_000);
        s.remove(550);
        s.insert(420, b("c3", 6_000));
        steps.push(s.clone());
        s.remove(100);
        s.remove(200);
        s.remove(500);
        steps.push(s.clone());
        let r = updates_end_like_upserts(&ids, &fe, &steps);
        assert_eq!(svc_len(r.maps()), 596);
        assert_eq!(r.errors(), 0);
    }

    fn vip() -> Frontend {
        Frontend {
            ip: "10.96.0.10".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        }
    }

    /// Backend number `i` (10.0.0.0 + i) of cluster `cl`.
    fn numbered(cl: &str, i: u32) -> Backend {
        Backend {
            cluster: c(cl).into(),
            ip: std::net::Ipv4Addr::from(0x0a00_0000 + i).into(),
            port: 8080,
            protocol: Protocol::Tcp,
        }
    }

    /// Write each step through a reconciler (updates where it can) and as a whole upsert into
    /// other maps: after every step both hold the same backends. Returns the reconciler.
    fn updates_end_like_upserts(
        ids: &ClusterIds,
        fe: &Frontend,
        steps: &[Vec<Backend>],
    ) -> Reconciler<GlbWriter<global_lb_bpf::FakeMaps>> {
        let mut r = Reconciler::new(GlbWriter::new(
            global_lb_bpf::FakeMaps::new(),
            c("c1"),
            ids.clone(),
        ))
        .unwrap();
        let mut upserted = GlbWriter::new(global_lb_bpf::FakeMaps::new(), c("c1"), ids.clone());
        let svc = |w: &GlbWriter<global_lb_bpf::FakeMaps>| -> Vec<_> {
            let mut v: Vec<_> = w.maps().services().unwrap()[0]
                .backends
                .iter()
                .map(|x| (x.addr, x.cluster_id, x.local))
                .collect();
            v.sort();
            v
        };
        for (i, step) in steps.iter().enumerate() {
            let step: crate::lb::Backends = step.clone().into();
            r.set(fe, Some(step.clone()));
            upserted.upsert_service(fe, &step).unwrap();
            assert_eq!(svc(r.maps()), svc(&upserted), "step {i}");
        }
        r
    }

    fn svc_len(w: &GlbWriter<global_lb_bpf::FakeMaps>) -> usize {
        w.maps().services().unwrap()[0].backends.len()
    }

    #[test]
    fn small_change_finds_the_middle() {
        let b = |i: u32| Backend {
            cluster: c("c1").into(),
            ip: std::net::Ipv4Addr::from(i).into(),
            port: 1,
            protocol: Protocol::Tcp,
        };
        let old: Vec<Backend> = (0..100).map(b).collect();
        let mut new = old.clone();
        new[40] = b(1000);
        let (removed, added) = small_change(&old, &new).unwrap();
        assert_eq!(removed, vec![&b(40)]);
        assert_eq!(added, vec![&b(1000)]);
        let (removed, added) = small_change(&old, &old[1..]).unwrap();
        assert_eq!((removed, added.len()), (vec![&b(0)], 0));

        // Scattered changes (a batch): by set, exactly what left and what came.
        let mut new = old.clone();
        new[3] = b(1003);
        new.remove(50);
        new[96] = b(1096);
        let (mut removed, mut added) = small_change(&old, &new).unwrap();
        removed.sort();
        added.sort();
        assert_eq!(removed, vec![&b(3), &b(50), &b(97)]);
        assert_eq!(added, vec![&b(1003), &b(1096)]);
        // The same set in another order: nothing to write.
        let reversed: Vec<Backend> = old.iter().rev().cloned().collect();
        assert_eq!(small_change(&old, &reversed), Some((vec![], vec![])));
        // Several clusters, each's backends together (the index's order): the changed clusters'
        // runs only, by set.
        let g = |cl: &str, i: u32| Backend {
            cluster: c(cl).into(),
            ip: std::net::Ipv4Addr::from(i).into(),
            port: 1,
            protocol: Protocol::Tcp,
        };
        let grouped: Vec<Backend> = ["c1", "c2", "c3"]
            .iter()
            .flat_map(|cl| (0..100).map(move |i| g(cl, i)))
            .collect();
        let mut changed = grouped.clone();
        changed.remove(5);
        changed[150] = g("c2", 777);
        changed.remove(290);
        let (mut removed, mut added) = small_change(&grouped, &changed).unwrap();
        removed.sort();
        added.sort();
        assert_eq!(removed, vec![&g("c1", 5), &g("c2", 51), &g("c3", 91)]);
        assert_eq!(added, vec![&g("c2", 777)]);
        let mut twice_in_a_run = grouped.clone();
        twice_in_a_run[3] = g("c1", 4);
        twice_in_a_run[250] = g("c3", 900);
        assert!(small_change(&grouped, &twice_in_a_run).is_none());
        // A failover (most backends replaced) and a backend listed twice: upsert.
        let other: Vec<Backend> = (500..600).map(b).collect();
        assert!(small_change(&old, &other).is_none());
        let mut twice = old.clone();
        twice[10] = b(20);
        twice[90] = b(1090);
        assert!(small_change(&old, &twice).is_none());
    }

    #[test]
    fn unknown_ids_get_a_placeholder_name() {
        let ids = ClusterIds::default();
        assert_eq!(ids.name(7).as_str(), "cluster-7");
        assert_eq!(ids.id(&c("c9")), 0);
    }
}

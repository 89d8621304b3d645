//! The agent's task: starts the watchers, the health checker, the publisher and the probers, then
//! loops over their events. Each arm drains what is queued (one batch), applies it to the state it
//! owns, writes the maps, and publishes a new snapshot (during a burst at most one per
//! [`crate::snapshot::PUBLISH_EVERY`], the last one once it is due); nothing else touches the index
//! or the map writer, so a reader of the status never delays a map write.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};

use super::connections::{Tasks, reconcile_connections, reread_remote_dir, spawn_watcher};
use super::passive_events::{on_confirm, on_mark, reprobe_passive};
use super::state::{AgentState, ClusterStatus};
use super::writes::after_batch;
use crate::health;
use crate::index::ProbeTarget;
use crate::publish::{self, Publish};
use crate::reach::{self, ReachChange};

/// The shortest time between two reads of the kernel's connect counters asked for by scrapes (a
/// read walks every backend; scrapes must not be able to put that on the loop at their rate).
const COUNTERS_MIN_INTERVAL: Duration = Duration::from_secs(1);

/// The status tick's counters are read: sample the golden signals and publish the node summary.
fn status_read(st: &mut AgentState, publish: bool, pub_tx: &mpsc::UnboundedSender<Publish>) {
    st.sample_golden();
    if publish && st.readiness.is_ready() {
        let _ = pub_tx.send(Publish::Status(st.node_status()));
    }
}

pub(super) async fn run(mut st: AgentState, events: Option<global_lb_bpf::signals::SuspectEvents>) {
    let opts = st.opts.clone();
    opts.cluster_ids.set(&opts.cluster, opts.cluster_id.get());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut tasks = Tasks::new(&opts, tx);

    // Publisher and health checker.
    let (targets_tx, targets_rx) = watch::channel(BTreeSet::<ProbeTarget>::new());
    let (pub_tx, pub_rx) = mpsc::unbounded_channel::<Publish>();
    if opts.publish {
        tasks.others.push(tokio::spawn(publish::run_publisher(
            opts.local_source(),
            opts.cluster.clone(),
            opts.node.clone(),
            pub_rx,
        )));
        let (h_tx, mut h_rx) = mpsc::unbounded_channel();
        let (passive_tx, passive_rx) = watch::channel(health::PassiveFailures::new());
        st.passive.publish = Some(passive_tx);
        tasks.others.push(tokio::spawn(health::run_health_checker(
            opts.cluster.clone(),
            opts.node.clone(),
            opts.health_interval,
            opts.health_failures,
            opts.health_rise,
            targets_rx,
            passive_rx,
            h_tx,
        )));
        let p = pub_tx.clone();
        tasks.others.push(tokio::spawn(async move {
            while let Some(r) = h_rx.recv().await {
                if p.send(Publish::Health(r)).is_err() {
                    return;
                }
            }
        }));
    }

    // Data-plane reachability of remote clusters from this node.
    let (reach_targets_tx, reach_targets_rx) = watch::channel(Arc::new(BTreeMap::new()));
    let (reach_tx, mut reach_rx) = mpsc::unbounded_channel::<ReachChange>();
    if let Some(timeout) = opts.remote_probe_timeout {
        tasks.others.push(tokio::spawn(reach::run_reach_prober(
            opts.health_interval,
            timeout,
            reach_targets_rx,
            reach_tx,
        )));
    }

    // Passive failure detection: the kernel's suspect marks, and the probes that confirm them.
    let (mark_tx, mut mark_rx) = mpsc::unbounded_channel::<crate::passive::SuspectMark>();
    let (confirm_tx, mut confirm_rx) = mpsc::unbounded_channel::<(u32, bool)>();
    if let Some(events) = events {
        tasks
            .others
            .push(tokio::spawn(crate::passive::run_event_reader(
                events, mark_tx,
            )));
    } else {
        drop(mark_tx);
    }
    let passive_timeout = opts
        .remote_probe_timeout
        .unwrap_or(Duration::from_millis(250));

    // The local cluster.
    {
        let src = opts.local_source();
        st.clusters.insert(
            opts.cluster.clone(),
            ClusterStatus::new(Some(std::sync::Arc::new(src.clone())), Instant::now()),
        );
        spawn_watcher(&mut tasks, src, &opts, HashSet::new());
        reread_remote_dir(&mut st);
        reconcile_connections(&mut st, &mut tasks);
        st.readiness = st
            .readiness
            .after(&st.sync_view(), crate::readiness::Plan::Wait);
        st.publish();
    }

    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dir_poll = tokio::time::interval(opts.remote_dir_poll);
    dir_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut status_tick = tokio::time::interval(opts.status_every);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A snapshot held back during a burst, and when it is due.
    let mut publish_due: Option<Instant> = None;
    loop {
        let due = publish_due.map(tokio::time::Instant::from_std);
        tokio::select! {
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {}
            ev = rx.recv() => {
                let Some(ev) = ev else { return };
                let received = SystemTime::now();
                // Each service the batch touches is selected once, at the end of the batch.
                st.index.defer();
                let mut conns_changed = st.handle(ev);
                while let Ok(ev) = rx.try_recv() {
                    conns_changed |= st.handle(ev);
                }
                st.index.settle();
                if conns_changed {
                    reconcile_connections(&mut st, &mut tasks);
                }
                st.send_nodes();
                after_batch(&mut st, received);
            }
            Some(mark) = mark_rx.recv() => {
                let received = SystemTime::now();
                let mut marks = vec![mark];
                while let Ok(mark) = mark_rx.try_recv() {
                    marks.push(mark);
                }
                // The last counts of the backends about to leave the maps (and of those already
                // followed), once per batch.
                let ids: Vec<u32> = marks.iter().map(|m| m.backend_id).collect();
                st.refresh_golden_of(&ids);
                for mark in marks {
                    on_mark(&mut st, mark, &confirm_tx, passive_timeout);
                }
                after_batch(&mut st, received);
            }
            Some((id, ok)) = confirm_rx.recv() => {
                let received = SystemTime::now();
                on_confirm(&mut st, id, ok);
                while let Ok((id, ok)) = confirm_rx.try_recv() {
                    on_confirm(&mut st, id, ok);
                }
                after_batch(&mut st, received);
            }
            Some(change) = reach_rx.recv() => {
                let received = SystemTime::now();
                st.apply_reach(change);
                while let Ok(change) = reach_rx.try_recv() {
                    st.apply_reach(change);
                }
                after_batch(&mut st, received);
            }
            _ = tick.tick() => {
                // A read's summary goes out when the status tick asked for it (a scrape's read
                // only refreshes what /metrics shows).
                if st.scan.is_some() && st.continue_counters() == Some(true) {
                    status_read(&mut st, opts.publish, &pub_tx);
                }
                reprobe_passive(&mut st, &confirm_tx, passive_timeout);
                st.evaluate_liveness();
                after_batch(&mut st, SystemTime::now());
                st.refresh_dns_zone();
                // Only when the index changed: a walk over every local endpoint ten times a second
                // would cost the most where the mesh is largest.
                if st.probe_generation != st.index.generation() {
                    st.probe_generation = st.index.generation();
                    let targets = st.index.probe_targets(&st.opts.node);
                    targets_tx.send_if_modified(|cur| {
                        if *cur != targets { *cur = targets; true } else { false }
                    });
                    let remote = Arc::new(st.index.remote_probe_sample(reach::MAX_TARGETS_PER_CLUSTER));
                    reach_targets_tx.send_if_modified(|cur| {
                        if *cur != remote { *cur = remote; true } else { false }
                    });
                }
                // A scrape asked for fresh connect counters: read them, at most once a second.
                if st.counters_wanted.load(Ordering::Relaxed)
                    && st.golden_read.is_none_or(|t| t.elapsed() >= COUNTERS_MIN_INTERVAL)
                {
                    st.counters_wanted.store(false, Ordering::Relaxed);
                    // The same read as the status tick's, a slice per tick for many backends.
                    if st.start_counters(false) == Some(true) {
                        status_read(&mut st, opts.publish, &pub_tx);
                    }
                }
            }
            _ = dir_poll.tick() => {
                if reread_remote_dir(&mut st) {
                    reconcile_connections(&mut st, &mut tasks);
                    st.send_nodes();
                }
            }
            _ = status_tick.tick() => {
                let ready = st.readiness.is_ready();
                if let Some(r) = st.reconciler.as_mut().filter(|_| ready) {
                    r.maps_mut().sweep_suspects();
                }
                // The counters of many backends are read a slice per tick (`CounterScan`); the
                // summary goes out when the read is done.
                if st.start_counters(true) == Some(true) {
                    status_read(&mut st, opts.publish, &pub_tx);
                }
            }
        }
        publish_due = st.publish_or_defer();
    }
}

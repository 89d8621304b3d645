//! Passive failure detection on the agent's task: the kernel's suspect marks (a connect that
//! failed), the probes that confirm or clear them, the re-probes of confirmed failures, and the
//! aborting of this node's sockets to backends that failed (off the loop, counted in
//! [`crate::snapshot::DestroyStats`]).

use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;

use super::state::AgentState;
use crate::reach;

/// Abort this node's sockets to `addrs` (off the event loop), counting what was done.
pub(super) fn spawn_destroy(st: &AgentState, addrs: Vec<std::net::SocketAddr>, why: &'static str) {
    use std::sync::atomic::Ordering::Relaxed;
    let stats = st.destroyed.clone();
    tokio::task::spawn_blocking(
        move || match crate::sockdestroy::destroy_sockets_to(&addrs) {
            Ok(d) => {
                stats.tcp.fetch_add(d.tcp as u64, Relaxed);
                stats.udp.fetch_add(d.udp as u64, Relaxed);
                if d.tcp + d.udp > 0 {
                    tracing::info!(
                        ?addrs,
                        why,
                        tcp = d.tcp,
                        udp = d.udp,
                        "aborted this node's sockets to failed backends"
                    );
                }
            }
            Err(error) => {
                stats.errors.fetch_add(1, Relaxed);
                tracing::warn!(%error, ?addrs, why, "could not abort the sockets to failed backends (needs CAP_NET_ADMIN and CONFIG_INET_DIAG_DESTROY; --keep-failed-sockets turns this off)");
            }
        },
    );
}

/// Probe backend `id` at `addr` now and report `(id, answered)` on `tx`.
fn spawn_confirm(
    id: u32,
    addr: std::net::SocketAddr,
    timeout: Duration,
    tx: &mpsc::UnboundedSender<(u32, bool)>,
) {
    let tx = tx.clone();
    tokio::spawn(async move {
        let (outcome, _) = reach::probe(addr, timeout).await;
        let _ = tx.send((id, outcome == reach::Outcome::Answered));
    });
}

/// The kernel marked backend `mark.backend_id` suspect: follow it and confirm with a probe.
pub(super) fn on_mark(
    st: &mut AgentState,
    mark: crate::passive::SuspectMark,
    confirm: &mpsc::UnboundedSender<(u32, bool)>,
    timeout: Duration,
) {
    let p = &mut st.passive;
    p.marks += 1;
    p.last_delay = mark.delay;
    p.max_delay = p.max_delay.max(mark.delay);
    if let Some(t) = p.tracks.get(&mark.backend_id) {
        // Already followed: a confirmed failure stays out; a probe in flight will tell.
        tracing::debug!(backend = %format!("{}:{}", t.backend.ip, t.backend.port), "suspect again");
        return;
    }
    let Some(backend) = st
        .reconciler
        .as_mut()
        .and_then(|r| r.maps_mut().backend_by_id(mark.backend_id))
    else {
        return;
    };
    tracing::info!(
        backend = %format!("{}:{}", backend.ip, backend.port),
        cluster = %backend.cluster.name(),
        refused = mark.refused,
        learnt_after_us = mark.delay.as_micros() as u64,
        "the kernel saw a connect fail: backend suspect on this node, probing it"
    );
    spawn_confirm(
        mark.backend_id,
        std::net::SocketAddr::new(backend.ip, backend.port),
        timeout,
        confirm,
    );
    st.passive.tracks.insert(
        mark.backend_id,
        crate::passive::Track {
            backend,
            since: mark.at,
            confirmed: false,
            goods: 0,
            probing: true,
            next_probe: Instant::now(),
        },
    );
}

/// A probe of a followed backend answered (`ok`) or not.
pub(super) fn on_confirm(st: &mut AgentState, id: u32, ok: bool) {
    let rise = st.opts.health_rise.max(1);
    let interval = st.opts.health_interval;
    let Some(t) = st.passive.tracks.get_mut(&id) else {
        return;
    };
    t.probing = false;
    let b = t.backend.clone();
    let addr = (b.ip, b.port, mesh_model::values::Protocol::Tcp);
    let name = format!("{}:{}", b.ip, b.port);
    match (t.confirmed, ok) {
        (false, true) => {
            // A false alarm: let traffic return at once.
            st.passive.tracks.remove(&id);
            st.passive.cleared += 1;
            if let Some(r) = st.reconciler.as_mut() {
                r.maps_mut().clear_suspect(id);
            }
            tracing::info!(backend = %name, "suspect backend answers a probe: mark cleared");
        }
        (false, false) => {
            t.confirmed = true;
            t.goods = 0;
            // Failed backends are probed twice as often as the health checker does: its own
            // verdict and this publication must both clear before traffic returns everywhere.
            t.next_probe = Instant::now() + interval / 2;
            let since = t.since;
            st.passive.confirmed += 1;
            st.passive.last_signal = Some(since);
            // A backend of this cluster: publish the verdict so every other node follows now.
            if *b.cluster.name() == st.opts.cluster
                && let Some(p) = &st.passive.publish
            {
                p.send_modify(|m| {
                    m.insert((b.ip, b.port), since);
                });
            }
            tracing::warn!(backend = %name, cluster = %b.cluster.name(), "a probe confirms the failed connect: backend out of this node's selection");
            st.index.set_passive_failure(b.cluster.name(), addr, true);
        }
        (true, false) => {
            t.goods = 0;
            t.next_probe = Instant::now() + interval / 2;
        }
        (true, true) => {
            t.goods += 1;
            t.next_probe = Instant::now() + interval / 4;
            if t.goods >= rise {
                st.passive.tracks.remove(&id);
                st.passive.recovered += 1;
                st.passive.last_signal = Some(SystemTime::now());
                if let Some(r) = st.reconciler.as_mut() {
                    r.maps_mut().clear_suspect(id);
                }
                if let Some(p) = &st.passive.publish {
                    p.send_if_modified(|m| m.remove(&(b.ip, b.port)).is_some());
                }
                tracing::info!(backend = %name, good_probes = rise, "backend answers again: back in this node's selection");
                st.index.set_passive_failure(b.cluster.name(), addr, false);
            }
        }
    }
}

/// Probe again the confirmed failures that are due.
pub(super) fn reprobe_passive(
    st: &mut AgentState,
    confirm: &mpsc::UnboundedSender<(u32, bool)>,
    timeout: Duration,
) {
    let now = Instant::now();
    for (id, t) in st.passive.tracks.iter_mut() {
        if t.confirmed && !t.probing && t.next_probe <= now {
            t.probing = true;
            spawn_confirm(
                *id,
                std::net::SocketAddr::new(t.backend.ip, t.backend.port),
                timeout,
                confirm,
            );
        }
    }
}

//! Wiring of the binary: flags -> sources, etcd, status endpoint, publisher.

use std::sync::Arc;

use anyhow::{Context, bail};
use tokio::sync::watch;
use tracing::info;

use crate::args::{Args, LogFormat, SourceKind};
use crate::managed::ManagedEtcd;
use crate::publisher::{PublisherConfig, run as run_publisher};
use crate::source::Source;
use crate::source::manifests::ManifestSource;
use crate::status::Status;

/// Installs the tracing subscriber for `format` on stderr (RUST_LOG filters; default info).
pub fn init_logging(format: LogFormat) {
    mesh_logging::init(format, mesh_logging::filter_from_env("info"));
}

/// Resolves when SIGTERM or SIGINT arrives.
async fn termination() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Runs the apiserver until SIGTERM/SIGINT.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let index = args.index_config().context("invalid flags")?;
    let replica = args.replica();
    let status = Status::new(index.cluster.as_str(), index.cluster_id.get(), &replica);
    if let Some(d) = &args.etcd.tls_dir {
        status.set_cert_dir(d);
    }
    let (bound, _status_task) = crate::status::serve(args.status_listen, status.clone())
        .await
        .with_context(|| format!("status endpoint on {}", args.status_listen))?;
    info!(addr = %bound, "status endpoint listening");

    let sources: Vec<Arc<dyn Source>> = match args.source {
        SourceKind::Manifests => {
            let dir = args.manifest_dir.clone().context("--manifest-dir")?;
            let mut s = ManifestSource::new(dir);
            s.interval = args.manifest_poll_interval;
            vec![Arc::new(s)]
        }
        SourceKind::Kubernetes => {
            vec![Arc::new(crate::source::kubernetes::KubernetesSource::new(
                args.kubeconfig.clone(),
            ))]
        }
    };
    // TLS: a cluster certificate directory (clustermesh ca issue-cluster), or a flat ca.crt/tls.crt/tls.key one.
    let cluster_dir = match &args.etcd.tls_dir {
        Some(d) if mesh_certs::ClusterDir::is_cluster_dir(d) => Some(
            mesh_certs::ClusterDir::open(d)
                .with_context(|| format!("--tls-dir {}", d.display()))?,
        ),
        _ => None,
    };
    let mut index = index;
    if let Some(dir) = &cluster_dir {
        if dir.info.name != index.cluster {
            bail!(
                "--tls-dir {} holds the certificates of cluster {:?}, not {:?}",
                dir.path.display(),
                dir.info.name.as_str(),
                index.cluster.as_str()
            );
        }
        index.ca_fingerprints = dir.ca_fingerprints().context("reading the CA bundle")?;
    }
    let managed = if args.etcd.endpoints.is_empty() {
        let dir = cluster_dir.as_ref().context(
            "managed etcd (no --etcd-endpoints) needs --tls-dir with a cluster certificate directory \
             (clustermesh ca issue-cluster)",
        )?;
        Some(
            ManagedEtcd::start(
                dir,
                &args.data_dir,
                &args.managed_etcd_client_url,
                &args.managed_etcd_peer_url,
                args.managed_etcd_client_trust.into(),
            )
            .await
            .context("starting managed etcd")?,
        )
    } else {
        None
    };
    let endpoints = match &managed {
        Some(m) => m.endpoints().to_vec(),
        None => args.etcd.endpoints.clone(),
    };
    // The etcd client's files: the admin identity of a cluster directory, or a TLS secret's files.
    let tls: Option<mesh_certs::TlsFiles> = match (&cluster_dir, &args.etcd.tls_dir) {
        (Some(d), _) => Some(d.tls_files(mesh_certs::Role::Admin)),
        (None, Some(d)) => Some(crate::etcd::secret_dir_files(d)),
        (None, None) => None,
    };
    let mut api_args = args.clone();
    api_args.etcd.endpoints = endpoints.clone();
    crate::mesh_api::start(&api_args, &index, status.clone())
        .await
        .context("gRPC API")?;
    let mut cfg = PublisherConfig::new(index, replica);
    cfg.lease_ttl = args.leader_lease_ttl;
    if args.kvstoremesh {
        cfg.kvstoremesh = Some(crate::kvstoremesh::MirrorTls {
            cluster_dir: cluster_dir.clone(),
            work_dir: args.data_dir.join("kvstoremesh"),
        });
    }
    let (term_tx, term_rx) = watch::channel(false);
    tokio::spawn(async move {
        termination().await;
        info!("termination signal; shutting down");
        let _ = term_tx.send(true);
    });

    // The etcd client reads its certificate once, at connect: when the TLS files change
    // (renewal, root rotation) this replica resigns, reconnects with the new files, republishes
    // the CA fingerprints and campaigns again (a standby leads meanwhile; the writer diffs against
    // what etcd holds, so nothing is rewritten). Without it, a renewed or re-rooted certificate
    // would only be used after a restart, and a broken connection could not come back once etcd
    // refuses the old one.
    let creds = credential_files(tls.as_ref());
    let mut stamp = files_stamp(&creds);
    let mut first = true;
    loop {
        let client = match connect_client(&endpoints, tls.as_ref()).await {
            Ok(c) => c,
            Err(e) if first => return Err(e),
            Err(e) => {
                // Files mid-rotation, or etcd restarting: try again; only a signal stops us.
                tracing::warn!(error = %format!("{e:#}"), "reconnecting to etcd with the new TLS files");
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                    _ = wait_true(term_rx.clone()) => return Ok(()),
                }
            }
        };
        first = false;
        let (client, _members) = client;
        let supervisor = managed
            .as_ref()
            .map(|m| m.supervise(client.clone(), std::time::Duration::from_secs(2)));
        if let Some(dir) = &cluster_dir {
            match dir.ca_fingerprints() {
                Ok(f) => cfg.index.ca_fingerprints = f,
                Err(e) => tracing::warn!(error = %e, "reading the CA bundle; fingerprints kept"),
            }
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut term = term_rx.clone();
        let watched = creds.clone();
        let interval = args.tls_reload_interval;
        let known = stamp;
        let watcher = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {
                        let now = files_stamp(&watched);
                        if now != known {
                            info!(files = ?watched, "TLS files changed; resigning to reconnect with them");
                            let _ = stop_tx.send(true);
                            return Some(now);
                        }
                    }
                    _ = term.wait_for(|t| *t) => {
                        let _ = stop_tx.send(true);
                        return None;
                    }
                }
            }
        });
        let r = run_publisher(
            mesh_kv::EtcdStore::new(client, STORE_REQUEST_TIMEOUT),
            cfg.clone(),
            sources.clone(),
            status.clone(),
            stop_rx,
        )
        .await;
        watcher.abort();
        if let Some(s) = supervisor {
            s.abort();
        }
        r.context("publisher")?;
        if *term_rx.borrow() {
            return Ok(());
        }
        stamp = files_stamp(&creds);
    }
}

/// How long one etcd request of the publisher may take (the client's own timeout is 5 s; a
/// transaction of 128 operations on a loaded etcd may take longer).
const STORE_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Resolves once `rx` holds `true`.
async fn wait_true(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|t| *t).await;
}

/// The files the etcd client's credentials come from.
fn credential_files(tls: Option<&mesh_certs::TlsFiles>) -> Vec<std::path::PathBuf> {
    let Some(f) = tls else { return vec![] };
    let mut v = vec![f.ca_bundle.clone()];
    if let Some(id) = &f.identity {
        v.push(id.cert.clone());
        v.push(id.key.clone());
    }
    v
}

/// A digest of the files' contents (a missing file counts as empty).
fn files_stamp(files: &[std::path::PathBuf]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in files {
        std::fs::read(f).unwrap_or_default().hash(&mut h);
    }
    h.finish()
}

/// The etcd client, with the TLS files as they are now. Several members: a long-lived client
/// kept on the members that answer (a killed member is left out within a second, and taken back
/// when it returns), with its tracker.
async fn connect_client(
    endpoints: &[String],
    tls: Option<&mesh_certs::TlsFiles>,
) -> anyhow::Result<(etcd_client::Client, Option<mesh_etcd::MemberTracker>)> {
    if endpoints.len() > 1 {
        let opts = match tls {
            Some(files) => mesh_etcd::client_options(files)?,
            None => crate::etcd::connect_options(),
        };
        let (c, t) = mesh_etcd::connect_tracked(
            endpoints,
            &opts,
            std::time::Duration::from_secs(2),
            std::time::Duration::from_secs(1),
        )
        .await
        .context("connecting to the etcd members")?;
        return Ok((c, Some(t)));
    }
    let client = match tls {
        Some(files) => mesh_etcd::connect(endpoints, files)
            .await
            .context("connecting to etcd")?,
        None => crate::etcd::connect(endpoints)
            .await
            .context("connecting to etcd")?,
    };
    Ok((client, None))
}

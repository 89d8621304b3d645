//! Benchmarks that print the figures of DESIGN.md's performance targets.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A real single-member etcd on plain HTTP on loopback, for benchmarks; killed by its PID on drop.
pub struct BenchEtcd {
    child: Child,
    /// Its client URL.
    pub url: String,
    /// Its data directory.
    pub data_dir: PathBuf,
}

impl BenchEtcd {
    /// Start `binary` with data in `data_dir` and a backend quota of `quota_bytes`; wait until it
    /// answers (30 s at most).
    pub async fn start(binary: &str, data_dir: &Path, quota_bytes: u64) -> anyhow::Result<Self> {
        if !Path::new(binary).exists() {
            bail!("{binary} is missing: install Debian's etcd-server (scripts/setup.sh does)");
        }
        let (cp, pp) = (free_port()?, free_port()?);
        let url = format!("http://127.0.0.1:{cp}");
        let peer = format!("http://127.0.0.1:{pp}");
        let child = Command::new(binary)
            .arg("--name=bench")
            .arg(format!("--data-dir={}", data_dir.display()))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=bench={peer}"))
            .arg(format!("--quota-backend-bytes={quota_bytes}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {binary}"))?;
        let e = Self {
            child,
            url,
            data_dir: data_dir.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut c) = etcd_client::Client::connect([e.url.as_str()], None).await
                && c.status().await.is_ok()
            {
                return Ok(e);
            }
            if Instant::now() > deadline {
                bail!("etcd on {} did not come up in 30 s", e.url);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for BenchEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

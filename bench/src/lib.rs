//! Benchmarks that print the figures of DESIGN.md's performance targets.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// A loopback TCP port that was free a moment ago (the workspace's one, from the test kit).
pub use mesh_testkit::free_port;

/// A real single-member etcd on plain HTTP on loopback, for benchmarks; killed by its PID on drop.
pub struct BenchEtcd {
    child: Child,
    binary: String,
    ports: (u16, u16),
    quota_bytes: u64,
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
        let (cp, pp) = (free_port(), free_port());
        let child = Self::spawn(binary, data_dir, (cp, pp), quota_bytes)?;
        let e = Self {
            child,
            binary: binary.to_owned(),
            ports: (cp, pp),
            quota_bytes,
            url: format!("http://127.0.0.1:{cp}"),
            data_dir: data_dir.to_owned(),
        };
        e.wait_up().await?;
        Ok(e)
    }

    /// The etcd process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kill the etcd (SIGKILL) and start it again on the same ports and data; wait until it
    /// answers.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill_now();
        self.start_again()?;
        self.wait_up().await
    }

    /// Kill the etcd (SIGKILL) and reap it; [`Self::start_again`] brings it back.
    pub fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start the killed etcd again on the same ports and data (does not wait for it).
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.child = Self::spawn(&self.binary, &self.data_dir, self.ports, self.quota_bytes)?;
        Ok(())
    }

    /// Wait until the etcd answers (30 s at most).
    pub async fn wait_up(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut c) = etcd_client::Client::connect([self.url.as_str()], None).await
                && c.status().await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("etcd on {} did not come up in 30 s", self.url);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn spawn(
        binary: &str,
        data_dir: &Path,
        (cp, pp): (u16, u16),
        quota_bytes: u64,
    ) -> anyhow::Result<Child> {
        let url = format!("http://127.0.0.1:{cp}");
        let peer = format!("http://127.0.0.1:{pp}");
        Command::new(binary)
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
            .with_context(|| format!("starting {binary}"))
    }
}

impl Drop for BenchEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! Starting a cluster's etcd in its control-plane namespace and waiting until it serves.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::error::{LabError, Result};
use crate::plan::{ClusterInfo, ETCD_CLIENT_PORT, EtcdInfo};
use crate::process::{LabProcess, poll_until};

/// Command-line flags of a cluster's etcd (plain or TLS, as the cluster's [`EtcdInfo`] says). The data directory is
/// reused across restarts; the initial-cluster flags are ignored by etcd once it holds data.
pub fn etcd_args(prefix: &str, etcd: &EtcdInfo) -> Vec<String> {
    let mut a = vec![
        format!("--name={}", etcd.name),
        format!("--data-dir={}", etcd.data_dir.display()),
        format!("--listen-client-urls={}", etcd.client_url),
        format!("--advertise-client-urls={}", etcd.client_url),
        format!("--listen-peer-urls={}", etcd.peer_url),
        format!("--initial-advertise-peer-urls={}", etcd.peer_url),
        format!("--initial-cluster={}={}", etcd.name, etcd.peer_url),
        "--initial-cluster-state=new".into(),
        format!("--initial-cluster-token={prefix}-{}", etcd.name),
        "--logger=zap".into(),
        "--log-outputs=stderr".into(),
    ];
    if let Some(tls) = &etcd.tls {
        a.extend([
            format!("--cert-file={}", tls.server_cert.display()),
            format!("--key-file={}", tls.server_key.display()),
            format!("--trusted-ca-file={}", tls.ca.display()),
            "--client-cert-auth".into(),
            format!("--peer-cert-file={}", tls.server_cert.display()),
            format!("--peer-key-file={}", tls.server_key.display()),
            format!("--peer-trusted-ca-file={}", tls.ca.display()),
            "--peer-client-cert-auth".into(),
        ]);
    }
    a
}

/// Prepares the data directory (mode 0700, as etcd wants) and opens the log for appending.
pub fn prepare(etcd: &EtcdInfo) -> Result<(Stdio, Stdio)> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&etcd.data_dir)
        .map_err(|e| LabError::io(&etcd.data_dir, e))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&etcd.log_file)
        .map_err(|e| LabError::io(&etcd.log_file, e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| LabError::io(&etcd.log_file, e))?;
    Ok((Stdio::from(log), Stdio::from(log2)))
}

/// The last `n` lines of a file (for error messages).
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One plain-HTTP `GET /health` against `addr`; `Ok(body)` on any HTTP answer.
fn http_health(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// One health probe of a cluster's etcd from the host: `Ok(())` when it reports healthy, else what it said.
pub fn probe(cluster: &ClusterInfo) -> std::result::Result<(), String> {
    let addr = SocketAddr::from((cluster.control_plane.addr, ETCD_CLIENT_PORT));
    match &cluster.etcd.tls {
        None => match http_health(addr) {
            Ok(body) if body.contains("\"health\":\"true\"") => Ok(()),
            Ok(body) => Err(format!(
                "GET /health answered {:?}",
                body.lines().last().unwrap_or("")
            )),
            Err(e) => Err(format!("GET http://{addr}/health: {e}")),
        },
        Some(tls) => {
            let url = format!("{}/health", cluster.etcd.client_url);
            let out = std::process::Command::new("curl")
                .args(["-sS", "--max-time", "2", "--cacert"])
                .arg(&tls.ca)
                .arg("--cert")
                .arg(&tls.client_cert)
                .arg("--key")
                .arg(&tls.client_key)
                .arg(&url)
                .output()
                .map_err(|e| format!("curl {url}: {e}"))?;
            let body = String::from_utf8_lossy(&out.stdout);
            if body.contains("\"health\":\"true\"") {
                Ok(())
            } else {
                Err(format!(
                    "curl {url}: {} {}",
                    body.trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        }
    }
}

/// Waits until `proc` (the etcd of `cluster`) reports healthy; fails early when it exits.
pub fn wait_healthy(cluster: &ClusterInfo, proc: &mut LabProcess, timeout: Duration) -> Result<()> {
    let mut last = String::from("no answer yet");
    let mut exited = None;
    let ok = poll_until(timeout, || {
        if let Ok(Some(st)) = proc.try_wait() {
            exited = Some(st);
            return true;
        }
        match probe(cluster) {
            Ok(()) => true,
            Err(e) => {
                last = e;
                false
            }
        }
    });
    let fail = |detail: String| LabError::Etcd {
        cluster: cluster.name.clone(),
        detail: format!("{detail}; log tail:\n{}", tail(&cluster.etcd.log_file, 8)),
        log: cluster.etcd.log_file.clone(),
    };
    if let Some(st) = exited {
        return Err(fail(format!("etcd exited ({st})")));
    }
    if !ok {
        return Err(fail(format!("not healthy after {timeout:?}: {last}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{EtcdSecurity, LabPlan, LabSpec};

    #[test]
    fn plain_args_listen_on_the_control_plane_address() {
        let spec = LabSpec::new("t", 1, 1).etcd_security(EtcdSecurity::Plain);
        let p = LabPlan::new(&spec, 100, Path::new("/cg")).unwrap();
        let a = etcd_args("t", &p.clusters[0].etcd).join(" ");
        assert!(
            a.contains("--listen-client-urls=http://10.100.1.2:2379"),
            "{a}"
        );
        assert!(
            a.contains("--initial-cluster=c1=http://10.100.1.2:2380"),
            "{a}"
        );
        assert!(!a.contains("--client-cert-auth"), "{a}");
    }

    #[test]
    fn tls_args_require_client_certs() {
        let spec = LabSpec::new("t", 1, 1).etcd_security(EtcdSecurity::Tls);
        let p = LabPlan::new(&spec, 100, Path::new("/cg")).unwrap();
        let a = etcd_args("t", &p.clusters[0].etcd).join(" ");
        assert!(
            a.contains("--listen-client-urls=https://10.100.1.2:2379"),
            "{a}"
        );
        assert!(a.contains("--client-cert-auth"), "{a}");
        assert!(a.contains("--trusted-ca-file="), "{a}");
    }
}

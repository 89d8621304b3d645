//! `clustermesh drill`: a failover drill against a running mesh.
//!
//! Runs a probe (one new connection to the service every `--interval`, each answered with the backend's
//! name) from this host or from inside a network namespace (`--netns`, e.g. a lab node), runs the
//! `--fail` hook, waits for traffic to settle on other clusters, runs the `--recover` hook, waits for it
//! to come back, and reports failover time, failback time and failed connects. Exits 1 past `--budget`.

use std::net::SocketAddr;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use mesh_lab::demo::fmt_ms;
use mesh_lab::drill::analyze;
use mesh_lab::workload::ProbeSample;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::cmd_mesh::Output;

#[derive(Debug, Args)]
pub struct DrillArgs {
    /// The global service (NAMESPACE/NAME), for the report.
    #[arg(long)]
    pub service: String,
    /// Address the clients use (the service's ClusterIP:port on this node).
    #[arg(long)]
    pub target: SocketAddr,
    /// Backends whose name starts with this are local (the probe reads each backend's name).
    #[arg(long)]
    pub local_prefix: String,
    /// Shell command that makes the local backends fail (e.g. `kubectl scale ... --replicas=0`).
    #[arg(long = "fail")]
    pub fail_cmd: String,
    /// Shell command that brings them back.
    #[arg(long = "recover")]
    pub recover_cmd: String,
    /// Run the probe inside this network namespace (`/run/netns/NAME`), e.g. a lab node.
    #[arg(long)]
    pub netns: Option<String>,
    /// Put the probe into this cgroup v2 directory first (where the socket load balancer is attached).
    #[arg(long)]
    pub cgroup: Option<std::path::PathBuf>,
    /// Time between two new connections.
    #[arg(long, default_value = "10ms", value_parser = mesh_logging::parse_duration)]
    pub interval: Duration,
    /// Traffic before the fault and after each settle.
    #[arg(long, default_value = "1500ms", value_parser = mesh_logging::parse_duration)]
    pub settle: Duration,
    /// Longest wait for traffic to move.
    #[arg(long, default_value = "15s", value_parser = mesh_logging::parse_duration)]
    pub timeout: Duration,
    /// Exit 1 when failover or failback takes longer, or does not happen.
    #[arg(long, default_value = "1s", value_parser = mesh_logging::parse_duration)]
    pub budget: Duration,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

async fn hook(what: &str, cmd: &str) -> anyhow::Result<()> {
    let st = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .await
        .with_context(|| format!("{what} hook"))?;
    if !st.success() {
        bail!("{what} hook `{cmd}` exited with {st}");
    }
    Ok(())
}

fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or_default()
}

pub async fn run_drill(a: DrillArgs) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("own executable")?;
    let mut probe_args: Vec<String> = vec![
        exe.display().to_string(),
        "workload".into(),
        "probe".into(),
        format!("--target={}", a.target),
        format!("--interval={}ms", a.interval.as_millis().max(1)),
        "--timeout=1s".into(),
    ];
    if let Some(ns) = &a.netns {
        let mut v = vec![
            "nsenter".to_string(),
            format!("--net=/run/netns/{ns}"),
            "--".into(),
        ];
        v.append(&mut probe_args);
        probe_args = v;
    }
    let script = match &a.cgroup {
        Some(cg) => format!("echo $$ > '{}/cgroup.procs' && exec \"$@\"", cg.display()),
        None => "exec \"$@\"".to_string(),
    };
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("drill-probe")
        .args(&probe_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("start the probe")?;
    let stdout = child.stdout.take().context("probe stdout")?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ProbeSample>();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            if let Ok(s) = serde_json::from_str::<ProbeSample>(&l) {
                let _ = tx.send(s);
            }
        }
    });
    let mut samples: Vec<ProbeSample> = Vec::new();
    let local = |b: &str| b.starts_with(&a.local_prefix);
    let say = |l: &str| {
        if a.output == Output::Text {
            eprintln!("{l}");
        }
    };
    // Collect for a while; `until` returns once a sample at/after `from` satisfies the predicate.
    async fn collect(
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<ProbeSample>,
        samples: &mut Vec<ProbeSample>,
        for_at_least: Duration,
    ) {
        let end = tokio::time::Instant::now() + for_at_least;
        while let Ok(Some(s)) = tokio::time::timeout_at(end, rx.recv()).await {
            samples.push(s);
        }
    }
    let to_probe = |samples: &[ProbeSample], unix: f64| {
        samples
            .first()
            .map_or(0.0, |s| unix - (s.unix_ms as f64 - s.t_ms))
    };

    say(&format!(
        "drill {}: probing {} every {:?}",
        a.service, a.target, a.interval
    ));
    collect(&mut rx, &mut samples, a.settle).await;
    if samples.is_empty() {
        bail!("the probe produced no sample (is the target reachable from here?)");
    }
    let fault_ms = to_probe(&samples, unix_ms());
    say("running the fail hook");
    hook("fail", &a.fail_cmd).await?;
    let deadline = tokio::time::Instant::now() + a.timeout;
    while tokio::time::Instant::now() < deadline
        && !samples
            .iter()
            .any(|s| s.t_ms >= fault_ms && s.ok && s.backend.as_deref().is_some_and(|b| !local(b)))
    {
        collect(&mut rx, &mut samples, Duration::from_millis(50)).await;
    }
    collect(&mut rx, &mut samples, a.settle).await;
    let recover_ms = to_probe(&samples, unix_ms());
    say("running the recover hook");
    hook("recover", &a.recover_cmd).await?;
    let deadline = tokio::time::Instant::now() + a.timeout;
    while tokio::time::Instant::now() < deadline
        && !samples
            .iter()
            .any(|s| s.t_ms >= recover_ms && s.ok && s.backend.as_deref().is_some_and(local))
    {
        collect(&mut rx, &mut samples, Duration::from_millis(50)).await;
    }
    collect(&mut rx, &mut samples, a.settle).await;
    let _ = child.start_kill();
    let report = analyze(&samples, fault_ms, Some(recover_ms), local);
    let budget = a.budget.as_secs_f64() * 1000.0;
    let within = report.failover_ms.is_some_and(|v| v <= budget)
        && report.failback_ms.is_some_and(|v| v <= budget);
    match a.output {
        Output::Json => {
            let mut v = serde_json::to_value(&report)?;
            if let Some(o) = v.as_object_mut() {
                o.insert("service".into(), a.service.clone().into());
                o.insert("budget_ms".into(), budget.into());
                o.insert("within_budget".into(), within.into());
            }
            println!("{v}");
        }
        Output::Text => {
            println!("drill {}  (budget {budget:.0} ms)", a.service);
            println!("  failover        {:>7} ms", fmt_ms(report.failover_ms));
            println!("  failback        {:>7} ms", fmt_ms(report.failback_ms));
            println!(
                "  failed connects {:>7} of {}",
                report.failed_connects, report.total_connects
            );
            for (b, n) in &report.backends {
                println!("    {b:<20} {n}");
            }
            println!(
                "  {}",
                if within {
                    "within budget"
                } else {
                    "OVER BUDGET"
                }
            );
        }
    }
    Ok(if within {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

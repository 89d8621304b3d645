//! [`Lab`]: build, drive and tear down a lab.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::cgroup;
use crate::cmd;
use crate::error::{LabError, Result};
use crate::etcd;
use crate::impair::Impairer;
use crate::net;
use crate::plan::{
    ClusterInfo, DEFAULT_STATE_ROOT, LabEtcdTls, LabPlan, LabSpec, NodeInfo, is_lab_netns,
    lab_cgroup_dir,
};
use crate::process::{LabProcess, ProcRecord, poll_until};
use crate::state::{self, Impairment, ImpairmentRecord, LabState, PrefixLock};

/// Shell wrapper that puts itself into a cgroup, enters a network namespace and `exec`s the program, so the PID the
/// lab hands out is the program's. Arguments: `$1` cgroup directory, `$2` netns name, then program and arguments.
const EXEC_WRAPPER: &str = r#"echo $$ > "$1/cgroup.procs" || exit 126
ns=$2; shift 2
exec nsenter --net="/run/netns/$ns" -- "$@""#;

/// How long teardown waits for processes to die and cgroups to empty.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Something that names a cluster of a lab: its 1-based index (`1`), its name (`"c1"`), or its [`ClusterInfo`].
pub trait ClusterRef {
    /// Finds the cluster in `plan`.
    fn resolve<'a>(&self, plan: &'a LabPlan) -> Result<&'a ClusterInfo>;
}

fn no_such(plan: &LabPlan, what: String) -> LabError {
    LabError::NoSuchCluster {
        prefix: plan.prefix.clone(),
        cluster: what,
        count: plan.clusters.len(),
    }
}

impl ClusterRef for usize {
    fn resolve<'a>(&self, plan: &'a LabPlan) -> Result<&'a ClusterInfo> {
        self.checked_sub(1)
            .and_then(|i| plan.clusters.get(i))
            .ok_or_else(|| no_such(plan, self.to_string()))
    }
}

impl ClusterRef for &str {
    fn resolve<'a>(&self, plan: &'a LabPlan) -> Result<&'a ClusterInfo> {
        plan.clusters
            .iter()
            .find(|c| c.name == *self)
            .ok_or_else(|| no_such(plan, format!("{self:?}")))
    }
}

impl ClusterRef for &String {
    fn resolve<'a>(&self, plan: &'a LabPlan) -> Result<&'a ClusterInfo> {
        self.as_str().resolve(plan)
    }
}

impl ClusterRef for &ClusterInfo {
    fn resolve<'a>(&self, plan: &'a LabPlan) -> Result<&'a ClusterInfo> {
        self.index.resolve(plan)
    }
}

/// A running lab: N clusters of M nodes as network namespaces behind a router namespace, one real etcd per cluster,
/// one cgroup v2 directory per node.
///
/// Clusters are named by 1-based index or by name (see [`ClusterRef`]); nodes by 1-based index. Every method is
/// blocking and takes `&self`, so a lab can be shared across threads (`Arc<Lab>`).
///
/// Dropping the lab tears everything down (processes by PID and by cgroup, namespaces, cgroups, state), unless
/// [`Lab::keep`] was called. Needs root.
///
/// ```no_run
/// use std::process::Command;
/// use mesh_lab::{EtcdSecurity, Lab, LabSpec};
///
/// // TLS etcd is the default; this example asks for plain HTTP so `curl` needs no certificates
/// let lab = Lab::up(LabSpec::new("demo", 2, 2).etcd_security(EtcdSecurity::Plain))?;
/// println!("etcd of c2: {}", lab.etcd_endpoint(2)?);
/// let out = lab.output_in_node(1, 1, Command::new("curl").arg(format!("{}/health", lab.etcd_endpoint(2)?)))?;
/// assert!(out.status.success());
/// lab.partition(1, 2)?;
/// lab.heal(1, 2)?;
/// # Ok::<(), mesh_lab::LabError>(())
/// ```
#[derive(Debug)]
pub struct Lab {
    plan: LabPlan,
    state_root: PathBuf,
    etcd_binary: PathBuf,
    etcd_ready_timeout: Duration,
    inner: Mutex<Inner>,
    keep: bool,
    _lock: PrefixLock,
}

#[derive(Debug)]
struct Inner {
    state: LabState,
    /// Per cluster, per member (index 0 is member 1).
    etcd: Vec<Vec<Option<LabProcess>>>,
    impairer: Option<Impairer>,
}

/// What `mesh-lab status` shows for one lab.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LabStatus {
    /// The lab prefix.
    pub prefix: String,
    /// True while a live process holds the lab (a test or program using the library).
    pub in_use: bool,
    /// The state, when the state file could be read.
    pub state: Option<LabState>,
    /// Live processes per record (etcd and spawned), as `(record, alive)`.
    pub processes: Vec<(ProcRecord, bool)>,
    /// Namespaces of the lab that exist right now.
    pub netns: Vec<String>,
}

impl Lab {
    // ---- building ----

    /// Builds the lab of `spec`: cleans up a crashed lab of the same prefix, allocates an address range, creates
    /// namespaces, links, cgroups, starts every etcd and waits until each is healthy.
    pub fn up(spec: LabSpec) -> Result<Lab> {
        spec.validate()?;
        check_prerequisites(&spec)?;
        std::fs::create_dir_all(&spec.state_root).map_err(|e| LabError::io(&spec.state_root, e))?;
        let lock = state::lock_prefix(&spec.state_root, &spec.prefix)?;
        if let Some(found) = sweep(&spec.state_root, &spec.prefix)? {
            tracing::warn!(prefix = %spec.prefix, %found, "cleaned up what a previous run left behind");
        }
        let cgroup_root = cgroup::ensure_cgroup2()?;
        cgroup::ensure_bpffs()?;
        let state = state::with_alloc_lock(&spec.state_root, || {
            let mut used = state::octets_in_use(&spec.state_root, &spec.prefix);
            let routes = cmd::ip(&["-4", "route", "show", "table", "all"])?;
            used.extend(state::octets_taken_by_routes(&routes));
            // a host veth left by a lab whose state is gone still blocks its name
            used.extend(crate::plan::OCTETS.filter(|o| net::host_link_exists(&format!("mlh{o}"))));
            let octet = state::pick_octet(&used)
                .ok_or_else(|| LabError::NoFreeRange(spec.prefix.clone()))?;
            let plan = LabPlan::new(&spec, octet, &cgroup_root)?;
            let mut st = LabState::new(plan);
            st.save()?;
            Ok(st)
        })?;
        let n = state.plan.clusters.len();
        let lab = Lab {
            plan: state.plan.clone(),
            state_root: spec.state_root.clone(),
            etcd_binary: spec.etcd_binary.clone(),
            etcd_ready_timeout: spec.etcd_ready_timeout,
            inner: Mutex::new(Inner {
                state,
                etcd: (0..n).map(|_| Vec::new()).collect(),
                impairer: None,
            }),
            keep: false,
            _lock: lock,
        };
        // from here on, Drop cleans up whatever a failure leaves
        net::build(&lab.plan)?;
        for dir in lab.plan.cgroup_dirs() {
            cgroup::create(&dir)?;
        }
        for c in &lab.plan.clusters {
            for m in std::iter::once(&c.control_plane).chain(&c.nodes) {
                std::fs::create_dir_all(&m.bpffs).map_err(|e| LabError::io(&m.bpffs, e))?;
            }
        }
        if let Some(ca_dir) = &lab.plan.ca_dir {
            etcd::issue_certs(&lab.plan, ca_dir)?;
        }
        let mut starting = Vec::new();
        for c in &lab.plan.clusters {
            for m in 1..=c.etcd.member_count() {
                starting.push((c, m, lab.launch_member(c, m)?));
            }
        }
        for (c, m, mut p) in starting {
            etcd::wait_member_healthy(c, m, &mut p, lab.etcd_ready_timeout)?;
            lab.put_member(c, m, p);
        }
        etcd::bootstrap_auth(&lab.plan)?;
        {
            let mut inner = lab.inner();
            inner.state.complete = true;
            inner.state.save()?;
        }
        tracing::info!(prefix = %lab.plan.prefix, range = %lab.plan.supernet(), "lab up");
        Ok(lab)
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- layout accessors ----

    /// The lab prefix.
    pub fn prefix(&self) -> &str {
        &self.plan.prefix
    }

    /// The whole layout.
    pub fn plan(&self) -> &LabPlan {
        &self.plan
    }

    /// All clusters, in index order.
    pub fn clusters(&self) -> &[ClusterInfo] {
        &self.plan.clusters
    }

    /// One cluster.
    pub fn cluster(&self, c: impl ClusterRef) -> Result<&ClusterInfo> {
        c.resolve(&self.plan)
    }

    /// Node `n` (1-based) of cluster `c`.
    pub fn node(&self, c: impl ClusterRef, n: usize) -> Result<&NodeInfo> {
        let cl = c.resolve(&self.plan)?;
        n.checked_sub(1)
            .and_then(|i| cl.nodes.get(i))
            .ok_or_else(|| LabError::NoSuchNode {
                prefix: self.plan.prefix.clone(),
                cluster: cl.index,
                node: n,
                count: cl.nodes.len(),
            })
    }

    /// The control-plane namespace of cluster `c` (where etcd runs).
    pub fn control_plane(&self, c: impl ClusterRef) -> Result<&NodeInfo> {
        Ok(&c.resolve(&self.plan)?.control_plane)
    }

    /// The etcd client endpoint of cluster `c` (`http://10.X.c.2:2379`, or `https://` with TLS). Reachable from the
    /// host (through the host's veth into the router) and from every node of every cluster. With several etcd
    /// members: every member's URL, comma-separated (the `--etcd-endpoints` form); [`Lab::etcd_endpoints`] lists
    /// them.
    pub fn etcd_endpoint(&self, c: impl ClusterRef) -> Result<String> {
        Ok(c.resolve(&self.plan)?.etcd.client_url.clone())
    }

    /// Every client URL of cluster `c`'s etcd (one per member), for clients that take a list.
    pub fn etcd_endpoints(&self, c: impl ClusterRef) -> Result<Vec<String>> {
        Ok(c.resolve(&self.plan)?.etcd.client_urls())
    }

    /// TLS files of cluster `c`'s etcd (CA bundle, server and `root` client cert/key, and the certificate
    /// directory); `None` for plain etcd.
    pub fn etcd_tls(&self, c: impl ClusterRef) -> Result<Option<&LabEtcdTls>> {
        Ok(c.resolve(&self.plan)?.etcd.tls.as_ref())
    }

    /// The certificate directory of cluster `c` (`mesh_certs` layout: bundle, intermediate, and the `etcd-server`,
    /// `apiserver`, `root`, `admin`, `node`, `remote` certificates); `None` for plain etcd. Connect to the cluster's
    /// etcd with e.g. `mesh_etcd::connect_as(&dir, Role::Admin, &[lab.etcd_endpoint(c)?])`.
    pub fn cluster_certs(&self, c: impl ClusterRef) -> Result<Option<mesh_certs::ClusterDir>> {
        let cl = c.resolve(&self.plan)?;
        let Some(tls) = &cl.etcd.tls else {
            return Ok(None);
        };
        mesh_certs::ClusterDir::open(&tls.dir)
            .map(Some)
            .map_err(|e| LabError::Certs {
                prefix: self.plan.prefix.clone(),
                detail: format!("certificate directory of {}: {e}", cl.name),
            })
    }

    /// Re-issues cluster `c`'s certificate directory with the current root of the lab's CA (after
    /// `clustermesh ca rotate --ca <ca_dir>`): a new intermediate, every leaf with a new key (the etcd server
    /// certificate included: etcd reads it on each new handshake), the CA's bundle. Processes pick the files up on
    /// their next connection. No-op for plain etcd.
    pub fn reissue_certs(&self, c: impl ClusterRef) -> Result<()> {
        let cl = c.resolve(&self.plan)?;
        let Some(ca_dir) = &self.plan.ca_dir else {
            return Ok(());
        };
        etcd::reissue_cluster(&self.plan, ca_dir, cl)
    }

    /// The lab's root CA directory (`mesh_certs` layout); `None` for plain etcd.
    pub fn ca_dir(&self) -> Option<&Path> {
        self.plan.ca_dir.as_deref()
    }

    /// The host's address on its veth into the lab (nodes reach the host there).
    pub fn host_addr(&self) -> std::net::Ipv4Addr {
        self.plan.host_addr
    }

    /// The lab's state directory (`/run/mesh-lab/<prefix>`); a good place for per-lab files of tests.
    pub fn state_dir(&self) -> &Path {
        &self.plan.state_dir
    }

    /// PID of cluster `c`'s etcd (its first member), `None` while stopped.
    pub fn etcd_pid(&self, c: impl ClusterRef) -> Result<Option<u32>> {
        self.etcd_member_pid(c, 1)
    }

    /// PID of member `m` (1-based) of cluster `c`'s etcd, `None` while stopped.
    pub fn etcd_member_pid(&self, c: impl ClusterRef, m: usize) -> Result<Option<u32>> {
        let cl = c.resolve(&self.plan)?;
        self.check_member(cl, m)?;
        let inner = self.inner();
        Ok(inner.etcd[cl.index - 1]
            .get(m - 1)
            .and_then(Option::as_ref)
            .map(LabProcess::pid))
    }

    /// Members of cluster `c`'s etcd.
    pub fn etcd_members(&self, c: impl ClusterRef) -> Result<usize> {
        Ok(c.resolve(&self.plan)?.etcd.member_count())
    }

    // ---- processes ----

    /// A command that runs `program` inside `member`'s namespace and cgroup. Add arguments, environment, working
    /// directory and stdio as usual, then start it with [`Lab::spawn`] (or `.output()` for a one-shot).
    pub fn member_command(member: &NodeInfo, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(EXEC_WRAPPER)
            .arg("mesh-lab-exec")
            .arg(&member.cgroup)
            .arg(&member.netns)
            .arg(program);
        c
    }

    /// [`Lab::member_command`] for node `n` of cluster `c`.
    pub fn node_command(
        &self,
        c: impl ClusterRef,
        n: usize,
        program: impl AsRef<OsStr>,
    ) -> Result<Command> {
        Ok(Self::member_command(self.node(c, n)?, program))
    }

    /// The pod behind node `n` of cluster `c` ([`LabSpec::pods`]); an error names a lab without pods.
    pub fn pod(&self, c: impl ClusterRef, n: usize) -> Result<&crate::plan::PodInfo> {
        let node = self.node(c, n)?;
        node.pod.as_ref().ok_or_else(|| {
            LabError::Spec(format!(
                "lab {} has no pods (LabSpec::with_pods); node {} of cluster {} has none",
                self.plan.prefix, node.name, node.cluster
            ))
        })
    }

    /// A command that runs `program` in the pod behind node `n` of cluster `c`: the pod's network namespace,
    /// the node's cgroup (a pod's processes are the node's, as in Kubernetes). Start it with [`Lab::spawn`].
    pub fn pod_command(
        &self,
        c: impl ClusterRef,
        n: usize,
        program: impl AsRef<OsStr>,
    ) -> Result<Command> {
        let node = self.node(c, n)?.clone();
        let pod = self.pod(node.cluster, n)?;
        let member = NodeInfo {
            netns: pod.netns.clone(),
            ..node
        };
        Ok(Self::member_command(&member, program))
    }

    /// [`Lab::member_command`] for the control plane of cluster `c`.
    pub fn control_plane_command(
        &self,
        c: impl ClusterRef,
        program: impl AsRef<OsStr>,
    ) -> Result<Command> {
        Ok(Self::member_command(self.control_plane(c)?, program))
    }

    /// Starts a command built by [`Lab::node_command`]/[`Lab::control_plane_command`] and records its PID in the
    /// lab state, so teardown (also from another process) stops it.
    pub fn spawn(&self, mut cmd: Command) -> Result<LabProcess> {
        let label = label_of(&cmd);
        let child = cmd.spawn().map_err(|source| LabError::Spawn {
            command: cmd::describe(&cmd),
            source,
        })?;
        let pid = child.id() as i32;
        let mut p = LabProcess::new(child, label.clone());
        if let Some((cgroup, netns)) = wrapper_target(&cmd) {
            wait_placed(&mut p, &cgroup, &netns)?;
        }
        if let Some(rec) = ProcRecord::of(pid, label) {
            let mut inner = self.inner();
            inner.state.processes.push(rec);
            inner.state.save()?;
        }
        Ok(p)
    }

    fn spawn_copy(&self, member: &NodeInfo, cmd: &Command) -> Result<LabProcess> {
        let mut w = Self::member_command(member, cmd.get_program());
        copy_settings(cmd, &mut w);
        w.stdin(Stdio::null());
        self.spawn(w)
    }

    /// Starts `cmd` (program, arguments, environment and working directory are taken from it) inside node `n` of
    /// cluster `c`: its network namespace and cgroup. stdin is null, stdout/stderr are inherited; for other stdio
    /// use [`Lab::node_command`] + [`Lab::spawn`].
    pub fn spawn_in_node(&self, c: impl ClusterRef, n: usize, cmd: &Command) -> Result<LabProcess> {
        let m = self.node(c, n)?.clone();
        self.spawn_copy(&m, cmd)
    }

    /// Like [`Lab::spawn_in_node`] for the control plane of cluster `c`.
    pub fn spawn_in_control_plane(&self, c: impl ClusterRef, cmd: &Command) -> Result<LabProcess> {
        let m = self.control_plane(c)?.clone();
        self.spawn_copy(&m, cmd)
    }

    /// Runs `cmd` to completion inside node `n` of cluster `c` and returns its output (exit status not checked).
    pub fn output_in_node(&self, c: impl ClusterRef, n: usize, cmd: &Command) -> Result<Output> {
        let m = self.node(c, n)?.clone();
        let mut w = Self::member_command(&m, cmd.get_program());
        copy_settings(cmd, &mut w);
        w.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.spawn(w)?.wait_with_output()
    }

    /// Runs `cmd` to completion inside the control plane of cluster `c` and returns its output.
    pub fn output_in_control_plane(&self, c: impl ClusterRef, cmd: &Command) -> Result<Output> {
        let m = self.control_plane(c)?.clone();
        let mut w = Self::member_command(&m, cmd.get_program());
        copy_settings(cmd, &mut w);
        w.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.spawn(w)?.wait_with_output()
    }

    /// Kills every process in node `n` of cluster `c` (SIGKILL through `cgroup.kill`: a node crash) and waits until
    /// the node's cgroup is empty. Handles of those processes see them exit by SIGKILL.
    pub fn crash_node(&self, c: impl ClusterRef, n: usize) -> Result<()> {
        let node = self.node(c, n)?;
        let kill = node.cgroup.join("cgroup.kill");
        if kill.exists() {
            std::fs::write(&kill, "1").map_err(|e| LabError::io(&kill, e))?;
        } else {
            for pid in cgroup::procs(&node.cgroup) {
                crate::process::send(pid, Signal::SIGKILL)?;
            }
        }
        if !poll_until(TEARDOWN_TIMEOUT, || cgroup::is_empty(&node.cgroup)) {
            return Err(LabError::Timeout {
                what: format!("cgroup {} to empty", node.cgroup.display()),
                timeout: TEARDOWN_TIMEOUT,
            });
        }
        Ok(())
    }

    // ---- etcd ----

    fn check_member(&self, cl: &ClusterInfo, m: usize) -> Result<()> {
        let k = cl.etcd.member_count();
        if m == 0 || m > k {
            return Err(LabError::Spec(format!(
                "etcd of cluster {} has members 1..={k}, no member {m}",
                cl.name
            )));
        }
        Ok(())
    }

    fn launch_member(&self, c: &ClusterInfo, m: usize) -> Result<LabProcess> {
        let view = c.etcd.member(m).ok_or_else(|| {
            LabError::Spec(format!("etcd of cluster {} has no member {m}", c.name))
        })?;
        let (out, err) = etcd::prepare(&view)?;
        let mut cmd = Self::member_command(&c.control_plane, &self.etcd_binary);
        cmd.args(etcd::member_args(&self.plan.prefix, &c.etcd, m)?)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // its own process group: a Ctrl-C meant for a test does not hit etcd before the lab stops it
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().map_err(|source| LabError::Spawn {
            command: cmd::describe(&cmd),
            source,
        })?;
        let p = LabProcess::new(child, format!("etcd {}", view.name));
        let mut inner = self.inner();
        let rec = ProcRecord::of(p.pid() as i32, p.label());
        if m == 1 {
            inner.state.etcd[c.index - 1] = rec;
        } else if let Some(rec) = rec {
            // other members are recorded with the lab's processes (a crashed run's sweep kills them)
            inner.state.processes.push(rec);
        }
        inner.state.save()?;
        Ok(p)
    }

    fn put_member(&self, c: &ClusterInfo, m: usize, p: LabProcess) {
        let mut inner = self.inner();
        let slots = &mut inner.etcd[c.index - 1];
        if slots.len() < m {
            slots.resize_with(m, || None);
        }
        slots[m - 1] = Some(p);
    }

    fn take_member(&self, cl: &ClusterInfo, m: usize) -> Result<Option<LabProcess>> {
        let mut inner = self.inner();
        let p = inner.etcd[cl.index - 1]
            .get_mut(m - 1)
            .and_then(Option::take);
        if m == 1 {
            inner.state.etcd[cl.index - 1] = None;
        }
        inner.state.save()?;
        Ok(p)
    }

    fn member_running(&self, cl: &ClusterInfo, m: usize) -> bool {
        self.inner().etcd[cl.index - 1]
            .get(m - 1)
            .is_some_and(Option::is_some)
    }

    /// Starts cluster `c`'s etcd (every stopped member, same data directories) and waits until each member is
    /// healthy. No-op when all run.
    pub fn start_etcd(&self, c: impl ClusterRef) -> Result<()> {
        let cl = c.resolve(&self.plan)?;
        let mut starting = Vec::new();
        for m in 1..=cl.etcd.member_count() {
            if !self.member_running(cl, m) {
                starting.push((m, self.launch_member(cl, m)?));
            }
        }
        for (m, mut p) in starting {
            etcd::wait_member_healthy(cl, m, &mut p, self.etcd_ready_timeout)?;
            self.put_member(cl, m, p);
        }
        Ok(())
    }

    /// Stops cluster `c`'s etcd (every member) gracefully (SIGTERM, then SIGKILL after a grace period).
    pub fn stop_etcd(&self, c: impl ClusterRef) -> Result<()> {
        let cl = c.resolve(&self.plan)?;
        for m in 1..=cl.etcd.member_count() {
            if let Some(mut p) = self.take_member(cl, m)? {
                p.stop()?;
            }
        }
        Ok(())
    }

    /// Kills cluster `c`'s etcd (every member) with SIGKILL (a crash).
    pub fn kill_etcd(&self, c: impl ClusterRef) -> Result<()> {
        let cl = c.resolve(&self.plan)?;
        for m in 1..=cl.etcd.member_count() {
            if let Some(mut p) = self.take_member(cl, m)? {
                p.kill()?;
            }
        }
        Ok(())
    }

    /// Kills member `m` (1-based) of cluster `c`'s etcd with SIGKILL. No-op when it is stopped.
    pub fn kill_etcd_member(&self, c: impl ClusterRef, m: usize) -> Result<()> {
        let cl = c.resolve(&self.plan)?;
        self.check_member(cl, m)?;
        if let Some(mut p) = self.take_member(cl, m)? {
            p.kill()?;
        }
        Ok(())
    }

    /// Starts member `m` (1-based) of cluster `c`'s etcd again (same data directory: it rejoins as the member it
    /// was) and waits until it answers and knows a leader. No-op when it runs.
    pub fn start_etcd_member(&self, c: impl ClusterRef, m: usize) -> Result<()> {
        let cl = c.resolve(&self.plan)?;
        self.check_member(cl, m)?;
        if self.member_running(cl, m) {
            return Ok(());
        }
        let mut p = self.launch_member(cl, m)?;
        etcd::wait_member_healthy(cl, m, &mut p, self.etcd_ready_timeout)?;
        self.put_member(cl, m, p);
        Ok(())
    }

    /// What member `m` (1-based) of cluster `c`'s etcd says (its id, the leader it knows, the term), through the
    /// maintenance `status` API over mTLS. TLS etcd only.
    pub fn etcd_member_status(&self, c: impl ClusterRef, m: usize) -> Result<etcd::MemberStatus> {
        let cl = c.resolve(&self.plan)?;
        self.check_member(cl, m)?;
        let tls = cl.etcd.tls.as_ref().ok_or_else(|| {
            LabError::Spec(format!(
                "etcd status of cluster {} needs TLS etcd (the lab runs plain)",
                cl.name
            ))
        })?;
        let url = cl
            .etcd
            .member(m)
            .map(|e| e.client_url)
            .unwrap_or_else(|| cl.etcd.client_url.clone());
        etcd::tls_status(&url, tls).map_err(|detail| LabError::Etcd {
            cluster: cl.name.clone(),
            detail: format!("member {m} status: {detail}"),
            log: cl
                .etcd
                .member(m)
                .map_or(cl.etcd.log_file.clone(), |e| e.log_file),
        })
    }

    /// The member (1-based) of cluster `c`'s etcd that leads now, as the running members see it: `None` while
    /// they know no leader or disagree (an election in progress). TLS etcd only.
    pub fn etcd_leader(&self, c: impl ClusterRef) -> Result<Option<usize>> {
        let cl = c.resolve(&self.plan)?;
        let mut ids = Vec::new();
        for m in 1..=cl.etcd.member_count() {
            if !self.member_running(cl, m) {
                continue;
            }
            if let Ok(st) = self.etcd_member_status(cl, m) {
                ids.push((m, st));
            }
        }
        let Some(leader) = ids.first().map(|(_, s)| s.leader) else {
            return Ok(None);
        };
        if leader == 0 || ids.iter().any(|(_, s)| s.leader != leader) {
            return Ok(None);
        }
        Ok(ids
            .iter()
            .find(|(_, s)| s.member_id == leader)
            .map(|(m, _)| *m))
    }

    /// Stops (SIGTERM) and starts cluster `c`'s etcd with the same data, waiting until it is healthy again.
    pub fn restart_etcd(&self, c: impl ClusterRef) -> Result<()> {
        let cl = c.resolve(&self.plan)?;
        self.stop_etcd(cl)?;
        self.start_etcd(cl)
    }

    /// Lets the node-syncs of cluster `peer` read cluster `target`'s etcd: creates the etcd user `remote-<peer>`
    /// (read-only on `clustermesh/v1/`), which `peer`'s `remote` certificate authenticates as (every cluster of a lab
    /// trusts the lab's CA). What `clustermesh connect` does per direction; idempotent; no-op for plain etcd.
    pub fn add_remote_user(&self, target: impl ClusterRef, peer: impl ClusterRef) -> Result<()> {
        let (t, p) = (target.resolve(&self.plan)?, peer.resolve(&self.plan)?);
        etcd::add_remote_user(&self.plan.prefix, t, p)
    }

    /// [`Lab::add_remote_user`] for every ordered pair of distinct clusters: a full mesh.
    pub fn add_all_remote_users(&self) -> Result<()> {
        for t in &self.plan.clusters {
            for p in self.plan.clusters.iter().filter(|p| p.index != t.index) {
                etcd::add_remote_user(&self.plan.prefix, t, p)?;
            }
        }
        Ok(())
    }

    /// One health probe of cluster `c`'s etcd from the host.
    pub fn etcd_healthy(&self, c: impl ClusterRef) -> Result<bool> {
        Ok(etcd::probe(c.resolve(&self.plan)?).is_ok())
    }

    // ---- faults ----

    fn pair(&self, a: impl ClusterRef, b: impl ClusterRef) -> Result<(&ClusterInfo, &ClusterInfo)> {
        let (a, b) = (a.resolve(&self.plan)?, b.resolve(&self.plan)?);
        if a.index == b.index {
            return Err(LabError::Spec(format!(
                "a fault needs two different clusters, got {} twice",
                a.name
            )));
        }
        Ok(if a.index < b.index { (a, b) } else { (b, a) })
    }

    /// Drops all traffic between clusters `a` and `b`, both ways, effective for the next packet (established
    /// connections stall too). Traffic within each cluster and to/from the host is untouched.
    pub fn partition(&self, a: impl ClusterRef, b: impl ClusterRef) -> Result<()> {
        let (a, b) = self.pair(a, b)?;
        net::partition(&self.plan, a, b)?;
        let mut inner = self.inner();
        if !inner.state.partitions.contains(&(a.index, b.index)) {
            inner.state.partitions.push((a.index, b.index));
        }
        inner.state.save()
    }

    /// Removes the partition between `a` and `b` (no-op without one).
    pub fn heal(&self, a: impl ClusterRef, b: impl ClusterRef) -> Result<()> {
        let (a, b) = self.pair(a, b)?;
        net::heal(&self.plan, a, b)?;
        let mut inner = self.inner();
        inner.state.partitions.retain(|p| *p != (a.index, b.index));
        inner.state.save()
    }

    /// Cuts the control planes of `a` and `b` apart: neither cluster reaches the other's etcd or
    /// apiserver, while traffic between their nodes (backends) flows. Idempotent.
    pub fn partition_control_plane(&self, a: impl ClusterRef, b: impl ClusterRef) -> Result<()> {
        let (a, b) = self.pair(a, b)?;
        net::partition_control_plane(&self.plan, a, b)
    }

    /// Removes the control-plane cut between `a` and `b` (no-op without one).
    pub fn heal_control_plane(&self, a: impl ClusterRef, b: impl ClusterRef) -> Result<()> {
        let (a, b) = self.pair(a, b)?;
        net::heal_control_plane(&self.plan, a, b)
    }

    /// Partitions cluster `c` from every other cluster (the host still reaches it).
    pub fn isolate(&self, c: impl ClusterRef) -> Result<()> {
        let cl = c.resolve(&self.plan)?;
        for other in self.plan.clusters.iter().filter(|o| o.index != cl.index) {
            self.partition(cl, other)?;
        }
        Ok(())
    }

    /// Cuts node `n` of cluster `c` off the network: nothing enters or leaves its namespace (nft drop rules on its
    /// `eth0`, inside the namespace), while its processes keep running. Peers see silence (connects time out), as
    /// with a node whose link or switch port died. Loopback inside the node still works; the host reads its pinned
    /// maps through bpffs as before. Idempotent.
    pub fn isolate_node(&self, c: impl ClusterRef, n: usize) -> Result<()> {
        let node = self.node(c, n)?.clone();
        net::isolate_member(&node.netns)?;
        let mut inner = self.inner();
        if !inner
            .state
            .isolated_nodes
            .contains(&(node.cluster, node.index))
        {
            inner.state.isolated_nodes.push((node.cluster, node.index));
        }
        inner.state.save()
    }

    /// Reconnects a node cut off by [`Lab::isolate_node`] (no-op when it is not).
    pub fn heal_node(&self, c: impl ClusterRef, n: usize) -> Result<()> {
        let node = self.node(c, n)?.clone();
        net::heal_member(&node.netns)?;
        let mut inner = self.inner();
        inner
            .state
            .isolated_nodes
            .retain(|x| *x != (node.cluster, node.index));
        inner.state.save()
    }

    /// Nodes cut off the network, as `(cluster, node)` indices.
    pub fn isolated_nodes(&self) -> Vec<(usize, usize)> {
        self.inner().state.isolated_nodes.clone()
    }

    /// Heals every partition.
    pub fn heal_all(&self) -> Result<()> {
        for (a, b) in self.partitions() {
            self.heal(a, b)?;
        }
        Ok(())
    }

    /// Partitions in force, as pairs of cluster indices.
    pub fn partitions(&self) -> Vec<(usize, usize)> {
        self.inner().state.partitions.clone()
    }

    /// Adds `delay` and `loss_percent` loss to packets between `a` and `b`, in each direction (so the round trip
    /// grows by twice `delay`). Replaces an earlier setting for the pair. Traffic within a cluster and to/from the
    /// host is untouched.
    ///
    /// The delay line runs on two threads of this process (see [`crate::impair`]); it ends with the lab.
    pub fn set_latency_loss(
        &self,
        a: impl ClusterRef,
        b: impl ClusterRef,
        delay: Duration,
        loss_percent: f64,
    ) -> Result<()> {
        let (a, b) = self.pair(a, b)?;
        if self.plan.underlay == crate::plan::Underlay::Switched {
            return Err(LabError::Spec(format!(
                "latency and loss between {} and {}: lab {} has a switched underlay (its clusters share one \
                 bridge, for --routing native), and the delay line takes routed packets only",
                a.name, b.name, self.plan.prefix
            )));
        }
        let imp = Impairment {
            delay,
            loss_percent,
        };
        imp.validate()?;
        let mut inner = self.inner();
        if inner.impairer.is_none() {
            let im = Impairer::start(&self.plan.router_netns, self.plan.octet)?;
            net::setup_impairer_routing(&self.plan)?;
            inner.impairer = Some(im);
        }
        for (from, to) in [(a, b), (b, a)] {
            if let Some(im) = &inner.impairer {
                im.set(from.index, to.index, imp);
            }
            net::add_detour(&self.plan, from, to)?;
            inner
                .state
                .impairments
                .retain(|r| !(r.from == from.index && r.to == to.index));
            inner.state.impairments.push(ImpairmentRecord {
                from: from.index,
                to: to.index,
                impairment: imp,
            });
        }
        inner.state.save()
    }

    /// Removes latency and loss between `a` and `b` (no-op without any).
    pub fn clear_impairment(&self, a: impl ClusterRef, b: impl ClusterRef) -> Result<()> {
        let (a, b) = self.pair(a, b)?;
        let mut inner = self.inner();
        for (from, to) in [(a, b), (b, a)] {
            net::remove_detour(&self.plan, from, to)?;
            if let Some(im) = &inner.impairer {
                im.remove(from.index, to.index);
            }
            inner
                .state
                .impairments
                .retain(|r| !(r.from == from.index && r.to == to.index));
        }
        inner.state.save()
    }

    /// Packets the delay line has forwarded and dropped so far.
    pub fn impairer_counters(&self) -> (u64, u64) {
        self.inner()
            .impairer
            .as_ref()
            .map(Impairer::counters)
            .unwrap_or_default()
    }

    /// Impairments in force.
    pub fn impairments(&self) -> Vec<ImpairmentRecord> {
        self.inner().state.impairments.clone()
    }

    // ---- lifetime ----

    /// Leaves the lab running after this handle goes away (what `mesh-lab up` does); `mesh-lab down` or the next
    /// `up` with the same prefix removes it.
    ///
    /// Latency and loss end here (the delay line lives in this process); partitions stay.
    pub fn keep(mut self) {
        self.keep = true;
        let mut inner = self.inner();
        inner.impairer = None;
        for r in std::mem::take(&mut inner.state.impairments) {
            if let (Some(from), Some(to)) = (
                self.plan.clusters.get(r.from - 1),
                self.plan.clusters.get(r.to - 1),
            ) {
                let _ = net::remove_detour(&self.plan, from, to);
            }
        }
        let _ = inner.state.save();
        for p in inner.etcd.drain(..).flatten().flatten() {
            p.detach();
        }
    }

    /// Tears the lab down now and reports what could not be removed.
    pub fn teardown(mut self) -> Result<()> {
        self.keep = true; // Drop must not run it again
        self.teardown_inner()
    }

    fn teardown_inner(&mut self) -> Result<()> {
        let state = {
            let mut inner = self.inner();
            // the TUN device holds the router namespace: close it first
            inner.impairer = None;
            for mut p in inner.etcd.drain(..).flatten().flatten() {
                let _ = p.kill();
            }
            inner.state.clone()
        };
        teardown(&self.state_root, &self.plan.prefix, Some(&state))
    }

    // ---- other processes' labs ----

    /// Tears down the lab `prefix` under the default state root (for `mesh-lab down`). Returns false when nothing
    /// of it existed. Fails with [`LabError::Busy`] while a live process holds the lab.
    pub fn down(prefix: &str) -> Result<bool> {
        Self::down_in(Path::new(DEFAULT_STATE_ROOT), prefix)
    }

    /// [`Lab::down`] with an explicit state root.
    pub fn down_in(state_root: &Path, prefix: &str) -> Result<bool> {
        crate::plan::check_prefix(prefix)?;
        let _lock = state::lock_prefix(state_root, prefix)?;
        Ok(sweep(state_root, prefix)?.is_some())
    }

    /// Partitions (or, with `heal`, heals) clusters `a` and `b` of the idle lab `prefix` — one built by `mesh-lab
    /// up` and not held by a live process (for `mesh-lab partition`/`heal`). Clusters by name or 1-based index.
    pub fn set_partition_in(
        state_root: &Path,
        prefix: &str,
        a: &str,
        b: &str,
        heal: bool,
    ) -> Result<()> {
        crate::plan::check_prefix(prefix)?;
        let _lock = state::lock_prefix(state_root, prefix)?;
        let dir = state_root.join(prefix);
        let mut st = LabState::load(&dir)?.ok_or_else(|| LabError::NoSuchLab {
            prefix: prefix.to_string(),
            path: state::state_file(&dir),
        })?;
        let find = |s: &str| -> Result<ClusterInfo> {
            match s.parse::<usize>() {
                Ok(i) => i.resolve(&st.plan).cloned(),
                Err(_) => s.resolve(&st.plan).cloned(),
            }
        };
        let (mut ca, mut cb) = (find(a)?, find(b)?);
        if ca.index == cb.index {
            return Err(LabError::Spec(format!(
                "a fault needs two different clusters, got {} twice",
                ca.name
            )));
        }
        if ca.index > cb.index {
            std::mem::swap(&mut ca, &mut cb);
        }
        let pair = (ca.index, cb.index);
        if heal {
            net::heal(&st.plan, &ca, &cb)?;
            st.partitions.retain(|p| *p != pair);
        } else {
            net::partition(&st.plan, &ca, &cb)?;
            if !st.partitions.contains(&pair) {
                st.partitions.push(pair);
            }
        }
        st.save()
    }

    /// Status of every lab under `state_root` (for `mesh-lab status`).
    pub fn status_in(state_root: &Path) -> Result<Vec<LabStatus>> {
        let all_ns = net::list_netns()?;
        let mut prefixes = state::lab_prefixes(state_root);
        prefixes.retain(|p| crate::plan::check_prefix(p).is_ok());
        Ok(prefixes
            .into_iter()
            .map(|prefix| {
                let state = LabState::load(&state_root.join(&prefix)).ok().flatten();
                let processes = state
                    .iter()
                    .flat_map(|s| s.etcd.iter().flatten().chain(&s.processes))
                    .map(|r| (r.clone(), r.is_alive()))
                    .collect();
                LabStatus {
                    in_use: state::prefix_in_use(state_root, &prefix),
                    netns: all_ns
                        .iter()
                        .filter(|n| is_lab_netns(&prefix, n))
                        .cloned()
                        .collect(),
                    prefix,
                    state,
                    processes,
                }
            })
            .collect())
    }

    /// [`Lab::status_in`] the default state root.
    pub fn status() -> Result<Vec<LabStatus>> {
        Self::status_in(Path::new(DEFAULT_STATE_ROOT))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Err(e) = self.teardown_inner() {
            tracing::error!(prefix = %self.plan.prefix, error = %e, "lab teardown incomplete");
            eprintln!(
                "mesh-lab: teardown of lab {} incomplete: {e}",
                self.plan.prefix
            );
        }
    }
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Lab>();
    is::<LabProcess>();
}

fn label_of(cmd: &Command) -> String {
    // the wrapper's arguments are: -c SCRIPT mesh-lab-exec CGROUP NETNS PROGRAM ARGS...
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if args.len() >= 6 && args[2] == "mesh-lab-exec" {
        format!("{}: {}", args[4], args[5..].join(" "))
    } else {
        cmd::describe(cmd)
    }
}

/// `(cgroup dir, netns)` of a command built by [`Lab::member_command`].
fn wrapper_target(cmd: &Command) -> Option<(PathBuf, String)> {
    let args: Vec<&OsStr> = cmd.get_args().collect();
    if args.len() >= 5 && args[2] == "mesh-lab-exec" {
        Some((
            PathBuf::from(args[3]),
            args[4].to_string_lossy().into_owned(),
        ))
    } else {
        None
    }
}

/// Waits until the wrapper has moved `p` into `cgroup` and `netns`, so a caller that gets a [`LabProcess`] can rely
/// on where it runs. Fails when the process exits first (e.g. the cgroup is gone).
fn wait_placed(p: &mut LabProcess, cgroup: &Path, netns: &str) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let want_ns = std::fs::metadata(Path::new("/run/netns").join(netns))
        .map(|m| (m.dev(), m.ino()))
        .map_err(|e| LabError::io(Path::new("/run/netns").join(netns), e))?;
    let pid = p.pid();
    let placed = || {
        let ns_ok = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .is_ok_and(|m| (m.dev(), m.ino()) == want_ns);
        ns_ok && cgroup::procs(cgroup).contains(&(pid as i32))
    };
    let mut exited = None;
    let ok = poll_until(Duration::from_secs(10), || {
        if placed() {
            return true;
        }
        if let Ok(Some(st)) = p.try_wait() {
            exited = Some(st);
            return true;
        }
        false
    });
    match exited {
        // a short-lived program may be done before we look: that is fine when it ran (exit code not 126)
        Some(st) if st.code() == Some(126) => Err(LabError::Command {
            command: p.label().to_string(),
            status: st.to_string(),
            stderr: format!("could not join cgroup {}", cgroup.display()),
        }),
        Some(_) => Ok(()),
        None if ok => Ok(()),
        None => Err(LabError::Timeout {
            what: format!("pid {pid} to enter {netns} and {}", cgroup.display()),
            timeout: Duration::from_secs(10),
        }),
    }
}

fn copy_settings(from: &Command, to: &mut Command) {
    to.args(from.get_args());
    for (k, v) in from.get_envs() {
        match v {
            Some(v) => to.env(k, v),
            None => to.env_remove(k),
        };
    }
    if let Some(d) = from.get_current_dir() {
        to.current_dir(d);
    }
}

fn check_prerequisites(spec: &LabSpec) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err(LabError::Prerequisite(
            "root (the lab creates network namespaces and cgroups)".into(),
        ));
    }
    for (tool, package) in [
        ("ip", "iproute2"),
        ("nft", "nftables"),
        ("nsenter", "util-linux"),
        ("mount", "mount"),
    ] {
        if which(tool).is_none() {
            return Err(LabError::Prerequisite(format!(
                "`{tool}` on PATH (Debian package {package})"
            )));
        }
    }
    if !Path::new("/dev/net/tun").exists() {
        tracing::warn!("no /dev/net/tun: set_latency_loss will fail (kernel CONFIG_TUN)");
    }
    if !spec.etcd_binary.exists() {
        return Err(LabError::Prerequisite(format!(
            "etcd at {} (Debian package etcd-server)",
            spec.etcd_binary.display()
        )));
    }
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Removes everything of lab `prefix` that exists (caller holds the prefix lock). Returns a description of what was
/// found, `None` when nothing was.
fn sweep(state_root: &Path, prefix: &str) -> Result<Option<String>> {
    let state_dir = state_root.join(prefix);
    let state = LabState::load(&state_dir).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "unreadable lab state; cleaning up by prefix");
        None
    });
    let netns: Vec<String> = net::list_netns()?
        .into_iter()
        .filter(|n| is_lab_netns(prefix, n))
        .collect();
    let cg = cgroup_dir_of(prefix, state.as_ref());
    let cg_exists = cg.as_ref().is_some_and(|d| d.exists());
    let bpffs_exists = crate::plan::lab_bpffs_dir(prefix).exists();
    if state.is_none() && netns.is_empty() && !cg_exists && !bpffs_exists && !state_dir.exists() {
        return Ok(None);
    }
    let found = format!(
        "state file: {}, namespaces: {:?}, cgroup: {}",
        state.is_some(),
        netns,
        if cg_exists { "yes" } else { "no" }
    );
    teardown(state_root, prefix, state.as_ref())?;
    Ok(Some(found))
}

fn cgroup_dir_of(prefix: &str, state: Option<&LabState>) -> Option<PathBuf> {
    match state {
        Some(s) => Some(s.plan.cgroup_dir.clone()),
        None => cgroup::find_cgroup2()
            .ok()
            .flatten()
            .map(|root| lab_cgroup_dir(&root, prefix)),
    }
}

/// Tears down lab `prefix`: recorded processes (by PID and start time), everything in its cgroups (cgroup.kill),
/// everything in its namespaces, the namespaces, the cgroups, the host veth, and the state directory. Works from
/// the state when there is one and by prefix in any case.
fn teardown(state_root: &Path, prefix: &str, state: Option<&LabState>) -> Result<()> {
    let mut leftovers = Vec::new();
    // 1. processes by PID
    let records: Vec<ProcRecord> = state
        .map(|s| {
            s.etcd
                .iter()
                .flatten()
                .chain(&s.processes)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    for r in &records {
        if let Err(e) = r.signal(Signal::SIGKILL) {
            leftovers.push(format!("{} (pid {}): {e}", r.what, r.pid));
        }
    }
    // 2. processes by cgroup and by namespace
    let mut netns: Vec<String> = state.map(|s| s.plan.netns_names()).unwrap_or_default();
    for n in net::list_netns()? {
        if is_lab_netns(prefix, &n) && !netns.contains(&n) {
            netns.push(n);
        }
    }
    let cg = cgroup_dir_of(prefix, state);
    if let Some(cg) = &cg
        && cg.exists()
        && cg.join("cgroup.kill").exists()
    {
        let _ = std::fs::write(cg.join("cgroup.kill"), "1");
    }
    let mut ns_pids = Vec::new();
    for n in &netns {
        for pid in net::netns_pids(n) {
            let _ = crate::process::send(pid, Signal::SIGKILL);
            if let Some(r) = ProcRecord::of(pid, n.clone()) {
                ns_pids.push(r);
            }
        }
    }
    if !poll_until(TEARDOWN_TIMEOUT, || {
        records.iter().chain(&ns_pids).all(|r| !r.is_alive())
    }) {
        for r in records.iter().chain(&ns_pids).filter(|r| r.is_alive()) {
            leftovers.push(format!("process {} ({}) survived SIGKILL", r.pid, r.what));
        }
    }
    // 3. cgroups
    if let Some(cg) = &cg
        && let Err(e) = cgroup::kill_and_remove(cg, TEARDOWN_TIMEOUT)
    {
        leftovers.push(e.to_string());
    }
    // 4. namespaces (their veths go with them, the host veth with the router)
    for n in &netns {
        if let Err(e) = net::delete_netns(n) {
            leftovers.push(e.to_string());
        }
    }
    if let Some(s) = state {
        let veth = &s.plan.host_veth;
        if !net::wait_host_link_gone(veth, TEARDOWN_TIMEOUT)
            && let Err(e) = cmd::ip(&["link", "del", veth])
        {
            leftovers.push(format!("host link {veth}: {e}"));
        }
    }
    // 5. pinned BPF objects of the lab's nodes
    let bpffs = crate::plan::lab_bpffs_dir(prefix);
    if bpffs.exists()
        && let Err(e) = std::fs::remove_dir_all(&bpffs)
    {
        leftovers.push(format!("{}: {e}", bpffs.display()));
    }
    // 6. state
    let state_dir = state_root.join(prefix);
    if state_dir.exists()
        && let Err(e) = std::fs::remove_dir_all(&state_dir)
    {
        leftovers.push(format!("{}: {e}", state_dir.display()));
    }
    if leftovers.is_empty() {
        tracing::info!(%prefix, "lab torn down");
        Ok(())
    } else {
        Err(LabError::Leftovers {
            prefix: prefix.to_string(),
            leftovers,
        })
    }
}

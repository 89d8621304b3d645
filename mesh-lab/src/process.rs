//! Processes of the lab: [`LabProcess`] (a child we spawned) and PID records that survive in the state file.

use std::path::Path;
use std::process::{Child, ExitStatus, Output};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::error::{LabError, Result};

/// How long [`LabProcess::stop`] waits after SIGTERM before it sends SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// A process identified by PID and kernel start time, so a recycled PID is never mistaken for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRecord {
    /// The PID.
    pub pid: i32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
    /// What it is (`etcd c1`, `c1/n1: node-sync ...`).
    pub what: String,
}

impl ProcRecord {
    /// Records the running process `pid`; `None` when it is already gone.
    pub fn of(pid: i32, what: impl Into<String>) -> Option<Self> {
        Some(ProcRecord {
            pid,
            start_time: start_time(pid)?,
            what: what.into(),
        })
    }

    /// True while this very process (same PID and start time) runs and is not a zombie.
    pub fn is_alive(&self) -> bool {
        match stat(self.pid) {
            Some((state, st)) => st == self.start_time && state != 'Z' && state != 'X',
            None => false,
        }
    }

    /// Sends `sig` if the process is still this one; a vanished process is not an error.
    pub fn signal(&self, sig: Signal) -> Result<()> {
        if !self.is_alive() {
            return Ok(());
        }
        send(self.pid, sig)
    }
}

/// Sends `sig` to `pid`; "no such process" is success.
pub fn send(pid: i32, sig: Signal) -> Result<()> {
    match kill(Pid::from_raw(pid), sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(source) => Err(LabError::Signal {
            pid,
            signal: sig.as_str().to_string(),
            source,
        }),
    }
}

/// `(state, start_time)` of `pid` from `/proc/<pid>/stat`.
fn stat(pid: i32) -> Option<(char, u64)> {
    let text =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")).ok()?;
    parse_stat(&text)
}

/// Parses `(state, start_time)` out of a `/proc/<pid>/stat` line (the comm field may hold spaces and parens).
pub(crate) fn parse_stat(text: &str) -> Option<(char, u64)> {
    let after = &text[text.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // after the state (field 3) comes field 4; start time is field 22
    let start = fields.nth(22 - 4)?.parse().ok()?;
    Some((state, start))
}

/// Start time of `pid` (clock ticks since boot), `None` when it does not exist.
pub fn start_time(pid: i32) -> Option<u64> {
    stat(pid).map(|(_, st)| st)
}

/// Polls `done` every few milliseconds until it is true or `timeout` passes. Returns whether it became true.
pub(crate) fn poll_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// A process started by the lab inside a node or control-plane namespace (and its cgroup).
///
/// The PID is the program's own (the lab's wrapper `exec`s it). Dropping a `LabProcess` that still runs kills it
/// with SIGKILL and reaps it, unless it was [`LabProcess::detach`]ed.
#[derive(Debug)]
pub struct LabProcess {
    child: Child,
    label: String,
    exited: Option<ExitStatus>,
    detached: bool,
}

impl LabProcess {
    pub(crate) fn new(child: Child, label: String) -> Self {
        LabProcess {
            child,
            label,
            exited: None,
            detached: false,
        }
    }

    /// The PID of the program.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What this process is (`c1/n1: curl`).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The underlying child, e.g. to take its piped stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Exit status if it has exited, without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self
                .child
                .try_wait()
                .map_err(|e| LabError::io(format!("/proc/{}", self.pid()), e))?;
        }
        Ok(self.exited)
    }

    /// True while it runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Waits for it to exit.
    pub fn wait(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.exited {
            return Ok(s);
        }
        let s = self
            .child
            .wait()
            .map_err(|e| LabError::io(format!("/proc/{}", self.pid()), e))?;
        self.exited = Some(s);
        Ok(s)
    }

    /// Waits at most `timeout`; `None` when it still runs.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let mut status = None;
        let mut err = None;
        poll_until(timeout, || match self.try_wait() {
            Ok(Some(s)) => {
                status = Some(s);
                true
            }
            Ok(None) => false,
            Err(e) => {
                err = Some(e);
                true
            }
        });
        match err {
            Some(e) => Err(e),
            None => Ok(status),
        }
    }

    /// Waits for exit and collects piped stdout/stderr (empty when not piped).
    pub fn wait_with_output(mut self) -> Result<Output> {
        fn drain<R: std::io::Read + Send + 'static>(
            pipe: Option<R>,
        ) -> std::thread::JoinHandle<Vec<u8>> {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_end(&mut buf);
                }
                buf
            })
        }
        let out = drain(self.child.stdout.take());
        let err = drain(self.child.stderr.take());
        let status = self.wait()?;
        Ok(Output {
            status,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        })
    }

    /// Sends `sig` (if it still runs).
    pub fn signal(&mut self, sig: Signal) -> Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        send(self.pid() as i32, sig)
    }

    /// SIGTERM, wait up to [`STOP_GRACE`], then SIGKILL; returns the exit status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.stop_with_grace(STOP_GRACE)
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL.
    pub fn stop_with_grace(&mut self, grace: Duration) -> Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        if let Some(s) = self.wait_timeout(grace)? {
            return Ok(s);
        }
        tracing::warn!(label = %self.label, pid = self.pid(), ?grace, "did not stop on SIGTERM; SIGKILL");
        self.kill()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.signal(Signal::SIGKILL)?;
        self.wait()
    }

    /// Leaves the process running when this handle is dropped.
    pub fn detach(mut self) {
        self.detached = true;
    }
}

impl Drop for LabProcess {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if let Ok(None) = self.try_wait() {
            let _ = self.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_comm() {
        let line = "1234 (a b) c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat(line), Some(('S', 98765)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn record_of_self_is_alive_and_of_a_gone_pid_is_not() {
        let me = ProcRecord::of(std::process::id() as i32, "me").unwrap();
        assert!(me.is_alive());
        let mut other = me.clone();
        other.start_time += 1;
        assert!(
            !other.is_alive(),
            "same pid, other start time: a recycled pid"
        );
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        assert!(ProcRecord::of(pid, "gone").is_none());
    }

    #[test]
    fn stop_terminates_and_reports_the_signal() {
        use std::os::unix::process::ExitStatusExt;
        let child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let mut p = LabProcess::new(child, "sleep".into());
        assert!(p.is_running());
        let st = p.stop().unwrap();
        assert_eq!(st.signal(), Some(Signal::SIGTERM as i32));
        assert!(!p.is_running());
    }

    #[test]
    fn dropping_a_running_process_kills_it() {
        let child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let rec = ProcRecord::of(child.id() as i32, "sleep").unwrap();
        drop(LabProcess::new(child, "sleep".into()));
        assert!(!rec.is_alive());
    }
}

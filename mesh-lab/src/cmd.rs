//! Running host tools (`ip`, `nft`, `tc`, `mount`) with errors that name the command and its stderr.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::error::{LabError, Result};

/// The command line of `cmd` as a user would type it (program and arguments, space separated).
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains([' ', '\'', '"', '$', '{', '}']) {
            s.push('\'');
            s.push_str(&a.replace('\'', "'\\''"));
            s.push('\'');
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Runs `cmd` to completion, returns its stdout; a non-zero exit is [`LabError::Command`].
pub fn run(cmd: &mut Command) -> Result<String> {
    run_input(cmd, None)
}

/// Runs `cmd` with `input` on stdin (when given), returns its stdout.
pub fn run_input(cmd: &mut Command, input: Option<&str>) -> Result<String> {
    let command = describe(cmd);
    let command = match input {
        Some(i) if i.len() < 400 => format!("{command} <<< {:?}", i.trim()),
        Some(_) => format!("{command} < (script)"),
        None => command,
    };
    tracing::debug!(%command, "run");
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| LabError::Spawn {
        command: command.clone(),
        source,
    })?;
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("stdin was piped");
        stdin
            .write_all(input.as_bytes())
            .map_err(|source| LabError::Spawn {
                command: command.clone(),
                source,
            })?;
    }
    let out = child.wait_with_output().map_err(|source| LabError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(LabError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip <args>` in the host namespace.
pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// `ip -n <netns> -batch -` with `script` (one `ip` command per line, without the leading `ip`).
pub fn ip_batch(netns: Option<&str>, script: &str) -> Result<String> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-batch", "-"]);
    run_input(&mut cmd, Some(script))
}

/// Runs `program args` inside network namespace `netns` (through `ip netns exec`).
pub fn in_netns(netns: &str, program: &str, args: &[&str]) -> Result<String> {
    run(Command::new("ip")
        .args(["netns", "exec", netns, program])
        .args(args))
}

/// Like [`in_netns`] with `input` on stdin.
pub fn in_netns_input(netns: &str, program: &str, args: &[&str], input: &str) -> Result<String> {
    run_input(
        Command::new("ip")
            .args(["netns", "exec", netns, program])
            .args(args),
        Some(input),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_quotes_what_needs_quoting() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo $$ > x", "plain"]);
        assert_eq!(describe(&c), "sh -c 'echo $$ > x' plain");
    }

    #[test]
    fn failed_command_names_itself_and_its_stderr() {
        let err = run(Command::new("sh").args(["-c", "echo boom >&2; exit 3"])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("sh -c"), "{msg}");
        assert!(msg.contains("boom"), "{msg}");
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let err = run(&mut Command::new("/nonexistent/tool")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/tool"), "{err}");
    }
}

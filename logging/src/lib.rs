//! The one tracing set-up of every ClusterMesh binary (`clustermesh`, `clustermesh-apiserver`,
//! `node-sync`, `mesh-lab`, `glb`), and the one way their flags read a duration
//! ([`parse_duration`]).
//!
//! Logs go to stderr, one line per event: human-readable (`--log-format plain`, the default) or one
//! JSON object per line (`--log-format json`, what the Helm chart sets). Plain lines carry terminal
//! colour codes only when stderr is a terminal and `NO_COLOR` is unset or empty
//! (<https://no-color.org>): a log redirected to a file, a pipe, journald or a log shipper holds
//! plain text.

use std::ffi::OsStr;
use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// How log lines are written on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured only on a terminal, never with NO_COLOR set).
    #[default]
    Plain,
    /// One JSON object per line.
    Json,
}

/// A duration flag (`200ms`, `30s`, `2m`, `1h 30m`): the value parser of every duration flag of
/// every binary, so they all take the same spellings and refuse a bad one the same way.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration (like 200ms, 30s, 2m): {e}"))
}

/// Whether plain log lines carry ANSI colour codes: only on a terminal, and not when `NO_COLOR`
/// holds a non-empty value.
pub fn use_colours(stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The filter from `RUST_LOG` when it is set and valid, else `default` (e.g. `"info"`).
pub fn filter_from_env(default: &str) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default))
}

/// The filter from a `--log` style directive, else `fallback` when the directive does not parse.
pub fn filter_from_directive(directive: &str, fallback: &str) -> EnvFilter {
    EnvFilter::try_new(directive).unwrap_or_else(|_| EnvFilter::new(fallback))
}

/// Installs the global subscriber: `format` on stderr, filtered by `filter`. Returns false (and
/// changes nothing) when a subscriber was already installed, as in a test binary.
pub fn init(format: LogFormat, filter: EnvFilter) -> bool {
    let colours = use_colours(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.with_ansi(colours).try_init().is_ok(),
        LogFormat::Json => builder.json().with_ansi(false).try_init().is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_every_flag_reads_them() {
        assert_eq!(
            parse_duration("200ms"),
            Ok(std::time::Duration::from_millis(200))
        );
        assert_eq!(
            parse_duration("2m"),
            Ok(std::time::Duration::from_secs(120))
        );
        let e = parse_duration("soon").unwrap_err();
        assert!(e.contains("\"soon\" is not a duration"), "{e}");
    }

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(use_colours(true, None));
        assert!(
            use_colours(true, Some(OsStr::new(""))),
            "an empty NO_COLOR does not count"
        );
        assert!(!use_colours(true, Some(OsStr::new("1"))));
        assert!(
            !use_colours(false, None),
            "a file or a pipe gets no colours"
        );
        assert!(!use_colours(false, Some(OsStr::new("1"))));
    }

    #[test]
    fn a_bad_directive_falls_back() {
        assert_eq!(
            filter_from_directive("[[[", "warn").to_string(),
            EnvFilter::new("warn").to_string()
        );
        assert_eq!(
            filter_from_directive("node_sync=debug", "warn").to_string(),
            "node_sync=debug"
        );
    }
}

//! The binaries' own argument parsers, run on what the chart renders, so chart and binaries
//! cannot drift apart.

use std::collections::BTreeSet;

use clap::Parser;
use serde_yaml::Value;

use crate::manifest::{args, seq_at, str_at};

/// Parse `args` as clustermesh-apiserver would at start, including its cluster rules
/// (`Args::index_config`: name, id against maxConnectedClusters, --manifest-dir with --source manifests).
pub fn parse_apiserver(case: &str, args: &[String]) -> clustermesh_apiserver::Args {
    let argv = std::iter::once("clustermesh-apiserver".to_owned()).chain(args.iter().cloned());
    let parsed = clustermesh_apiserver::Args::try_parse_from(argv).unwrap_or_else(|e| {
        panic!("{case}: clustermesh-apiserver refuses the chart's args {args:?}:\n{e}")
    });
    if let Err(e) = parsed.index_config() {
        panic!("{case}: clustermesh-apiserver would refuse to start with {args:?}: {e}");
    }
    parsed
}

/// Parse `args` as node-sync would at start.
pub fn parse_node_sync(case: &str, args: &[String]) -> node_sync::args::Args {
    let argv = std::iter::once("node-sync".to_owned()).chain(args.iter().cloned());
    node_sync::args::Args::try_parse_from(argv)
        .unwrap_or_else(|e| panic!("{case}: node-sync refuses the chart's args {args:?}:\n{e}"))
}

/// Every `$(VAR)` in a container's args names an env var of that container (the kubelet leaves
/// unknown references as they are, and the binary would get the literal text).
pub fn assert_env_refs_defined(case: &str, c: &Value) {
    let defined: BTreeSet<&str> = seq_at(c, &["env"])
        .iter()
        .filter_map(|e| str_at(e, &["name"]))
        .collect();
    for a in args(c) {
        let mut rest = a.as_str();
        while let Some(start) = rest.find("$(") {
            let end = rest[start..]
                .find(')')
                .map(|e| start + e)
                .unwrap_or_else(|| panic!("{case}: unclosed $( in {a}"));
            let var = &rest[start + 2..end];
            assert!(
                defined.contains(var),
                "{case}: arg {a} uses $({var}), which the container does not define"
            );
            rest = &rest[end..];
        }
    }
}

//! The etcd flags every binary that talks to its cluster's etcd shares, flattened into its
//! arguments (`#[command(flatten)]`): one spelling, one environment variable, one parser. A
//! binary whose reading differs says so with `mut_arg` (node-sync requires the endpoints; the
//! apiserver runs its own etcd without them).

use std::path::PathBuf;

/// `--etcd-endpoints` and `--tls-dir`.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct EtcdFlags {
    /// etcd client URLs, comma-separated (https:// uses --tls-dir).
    #[arg(
        id = "etcd_endpoints",
        long = "etcd-endpoints",
        value_name = "ETCD_ENDPOINTS",
        env = "CLUSTERMESH_ETCD_ENDPOINTS",
        value_delimiter = ','
    )]
    pub endpoints: Vec<String>,

    /// TLS directory: a cluster certificate directory (`clustermesh ca issue-cluster`), or the
    /// files of a Kubernetes TLS secret (ca.crt, tls.crt, tls.key). Plain HTTP to etcd without it.
    #[arg(
        id = "tls_dir",
        long = "tls-dir",
        value_name = "TLS_DIR",
        env = "CLUSTERMESH_TLS_DIR"
    )]
    pub tls_dir: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Bin {
        #[command(flatten)]
        etcd: EtcdFlags,
    }

    #[test]
    fn endpoints_split_on_commas_and_the_tls_dir_is_optional() {
        let b = Bin::try_parse_from(["bin", "--etcd-endpoints", "http://a:2379,http://b:2379"])
            .unwrap();
        assert_eq!(b.etcd.endpoints, ["http://a:2379", "http://b:2379"]);
        assert_eq!(b.etcd.tls_dir, None);
    }
}

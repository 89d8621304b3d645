//! The entry that registers one remote cluster with node-sync: a node-sync remote file
//! (`<name>.yaml`: name, id, endpoints, and TLS file names relative to the config directory) and the
//! remote's read-only credentials beside it. `clustermesh connect --context` writes it into a
//! remotes Secret, the lab mesh into a directory; node-sync reads it from `--remote-config-dir`.

use std::collections::BTreeMap;

use serde::Serialize;

/// A cluster's read-only remote credentials (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteTls {
    /// CA bundle the cluster's etcd server certificate chains to.
    pub ca_bundle: Vec<u8>,
    /// The `remote` client certificate chain.
    pub cert: Vec<u8>,
    /// Its key.
    pub key: Vec<u8>,
}

/// The node-sync remote file of one registration (TLS files relative to the config dir).
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct RemoteFileOut<'a> {
    name: &'a str,
    id: u32,
    endpoints: &'a [String],
    ca_file: String,
    cert_file: String,
    key_file: String,
}

/// The keys (file names) of `remote`'s entry.
pub fn entry_keys(remote: &str) -> [String; 4] {
    [
        format!("{remote}.yaml"),
        format!("{remote}.ca-bundle.pem"),
        format!("{remote}.remote.crt"),
        format!("{remote}.remote.key"),
    ]
}

/// The entry registering cluster `name` (id `id`, etcd at `endpoints`): its remote file and
/// credentials, keyed as in [`entry_keys`].
pub fn entry(
    name: &str,
    id: u32,
    endpoints: &[String],
    tls: &RemoteTls,
) -> BTreeMap<String, Vec<u8>> {
    let [yaml_k, ca_k, cert_k, key_k] = entry_keys(name);
    let file = RemoteFileOut {
        name,
        id,
        endpoints,
        ca_file: ca_k.clone(),
        cert_file: cert_k.clone(),
        key_file: key_k.clone(),
    };
    let yaml = format!(
        "# Written by `clustermesh connect --context`: cluster {} through its read-only remote certificate.\n{}",
        name,
        serde_yaml::to_string(&file).unwrap_or_default()
    );
    BTreeMap::from([
        (yaml_k, yaml.into_bytes()),
        (ca_k, tls.ca_bundle.clone()),
        (cert_k, tls.cert.clone()),
        (key_k, tls.key.clone()),
    ])
}

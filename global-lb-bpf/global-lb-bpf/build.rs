//! Builds the eBPF programs of `global-lb-bpf-ebpf` for the BPF target (nightly + bpf-linker,
//! through aya-build) and leaves the object in `OUT_DIR/global-lb-bpf`.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "global-lb-bpf-ebpf")
        .ok_or_else(|| anyhow!("package global-lb-bpf-ebpf not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("global-lb-bpf-ebpf manifest has no parent directory"))?
        .as_str()
        .to_owned();
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: &root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context("building the eBPF programs (needs nightly with rust-src and bpf-linker 0.10.0)")
}

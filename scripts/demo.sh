#!/usr/bin/env bash
# The main job: setup, build, then `clustermesh demo` (two clusters of two nodes on this host,
# every component real, a failover drill, the status page). Arguments go to `clustermesh demo`,
# e.g. `scripts/demo.sh --keep` or `scripts/demo.sh --non-interactive -o json`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh >&2
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

# Only what the demo runs: the CLI (it drives the lab and the drills), the apiserver and node-sync.
bins=(clustermesh clustermesh-apiserver node-sync)
echo "[demo] building ${bins[*]} (release): a first build takes 8-11 min on 2 cores, later ones seconds" >&2
cargo build --release "${bins[@]/#/--bin=}" >&2
# CARGO_TARGET_DIR or a build.target-dir setting may put the binaries elsewhere than target/.
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
export PATH="$target_dir/release:$PATH"
exec clustermesh demo "$@"

#!/usr/bin/env bash
# The main job: setup, build, then `clustermesh demo` (two clusters of two nodes on this host,
# every component real, a failover drill, the status page). Arguments go to `clustermesh demo`,
# e.g. `scripts/demo.sh --keep` or `scripts/demo.sh --non-interactive -o json`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh >&2
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

echo "[demo] building (release)" >&2
cargo build --release --bins >&2
# CARGO_TARGET_DIR or a build.target-dir setting may put the binaries elsewhere than target/.
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
export PATH="$target_dir/release:$PATH"
exec clustermesh demo "$@"

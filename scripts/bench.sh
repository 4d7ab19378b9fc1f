#!/usr/bin/env bash
# Runs every benchmark (or the suites named: overhead, overhead-small, batching, footprint,
# runtimes, ingest, session-writes, gates, engine, wire, rollout, compression, tls) and writes the figures to docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_DYLIB_PATH="$(scripts/fetch-onnxruntime.sh)"
export ORT_DYLIB_PATH
python3 -c 'import onnx, onnxruntime' 2>/dev/null || python3 -m pip install --quiet -r scripts/requirements.txt
python3 scripts/gen_test_models.py --only-bench --bench-dir target/bench-models
cargo build --release --locked -p edgefleet-agent -p edgefleet-bench -p edgefleet-control-plane -p edgefleet-cli
suites=("$@")
[[ ${#suites[@]} -eq 0 ]] && suites=(all)
for suite in "${suites[@]}"; do
  target/release/edgefleet-bench "$suite"
done

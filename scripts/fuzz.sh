#!/usr/bin/env bash
# Coverage-guided fuzzing of what apps send the agent (fuzz/):
#   scripts/fuzz.sh [TARGET] [SECONDS] [-- LIBFUZZER-FLAGS...]
# TARGET is http_infer (default), grpc_infer, http_routes, grpc_service,
# onnx_scan (the control plane's ONNX validation), control_plane_api (the
# control plane's agent and operator gRPC APIs) or agent_session (what the
# control plane sends an agent in managed mode);
# SECONDS defaults to 300.
# The agent serves with tract, or with ONNX Runtime when
# EDGEFLEET_FUZZ_RUNTIME=onnxruntime (fetched from PyPI if needed).
# control_plane_api's control plane keeps its data in SQLite, or in a new
# schema of the PostgreSQL database EDGEFLEET_FUZZ_DATABASE_URL names.
# Installs cargo-fuzz if missing, writes the starting corpus from
# testdata/cases the first time, and runs on the stable toolchain (no
# sanitizer: a panic that escapes the agent, or an error the target's checks
# refuse, is what it finds). Findings land in fuzz/artifacts/TARGET/; rerun
# one with `cargo fuzz run -s none --fuzz-dir fuzz TARGET FILE`.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:-http_infer}"
seconds="${2:-300}"
shift $(( $# > 2 ? 2 : $# ))
[[ "${1:-}" == "--" ]] && shift
case "$target" in
  http_infer|grpc_infer|http_routes|grpc_service|onnx_scan|control_plane_api|agent_session) ;;
  *) echo "fuzz.sh: unknown target '$target' (http_infer, grpc_infer, http_routes, grpc_service, onnx_scan, control_plane_api or agent_session)" >&2; exit 2 ;;
esac
[[ "$seconds" =~ ^[0-9]+$ ]] || { echo "fuzz.sh: SECONDS must be a whole number, not '$seconds'" >&2; exit 2; }

case "${EDGEFLEET_FUZZ_RUNTIME:-tract}" in
  tract) ;;
  onnxruntime) ORT_DYLIB_PATH="$(scripts/fetch-onnxruntime.sh)"; export ORT_DYLIB_PATH ;;
  *) echo "fuzz.sh: EDGEFLEET_FUZZ_RUNTIME must be tract or onnxruntime, not '$EDGEFLEET_FUZZ_RUNTIME'" >&2; exit 2 ;;
esac
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz
fi
if [[ ! -d "fuzz/corpus/$target" ]]; then
  cargo run --locked --release --manifest-path fuzz/Cargo.toml --example seeds
fi
exec cargo fuzz run --sanitizer none --fuzz-dir fuzz "$target" "fuzz/corpus/$target" -- \
  -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -max_len=8192 "$@"

#!/usr/bin/env bash
# The whole test suite, on both runtimes: fetches ONNX Runtime if needed
# (from the onnxruntime wheel on PyPI), then runs every test with nextest,
# PostgreSQL ones included (EDGEFLEET_TEST_POSTGRES_URL, default below).
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_DYLIB_PATH="$(scripts/fetch-onnxruntime.sh)"
export ORT_DYLIB_PATH
# The Python rollout client's test needs grpcio, the agent's client library
# tests NVIDIA's and KServe's clients (scripts/requirements-client.txt).
python3 -c 'import grpc, grpc_tools, tritonclient.http, tritonclient.grpc, importlib.util, sys
sys.exit(importlib.util.find_spec("kserve") is None)' 2>/dev/null ||
  python3 -m pip install --quiet -r scripts/requirements-client.txt
# The storage and fleet tests run on SQLite files and on this PostgreSQL
# (each test in a fresh schema it drops afterwards).
export EDGEFLEET_TEST_POSTGRES_URL="${EDGEFLEET_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"
if ! command -v cargo-nextest >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
cargo nextest run --workspace --locked --no-fail-fast "$@"

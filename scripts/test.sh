#!/usr/bin/env bash
# The whole test suite, on both runtimes: fetches ONNX Runtime if needed
# (from the onnxruntime wheel on PyPI), then runs every test with nextest.
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_DYLIB_PATH="$(scripts/fetch-onnxruntime.sh)"
export ORT_DYLIB_PATH
if ! command -v cargo-nextest >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
cargo nextest run --workspace --locked --no-fail-fast "$@"

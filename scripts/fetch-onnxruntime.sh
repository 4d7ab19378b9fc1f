#!/usr/bin/env bash
# Fetches ONNX Runtime 1.31.1's shared library from the `onnxruntime==1.31.1`
# wheel on PyPI into .onnxruntime/ (git-ignored) and prints its path.
# Idempotent: a second run only prints the path. `ort` loads the library
# dynamically (feature `load-dynamic`); point ORT_DYLIB_PATH at the printed
# path, or copy the file beside the edgefleet-agent binary.
set -euo pipefail

ORT_VERSION=1.31.1
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/.onnxruntime/$ORT_VERSION"
lib="$dest/libonnxruntime.so.$ORT_VERSION"

if [[ -f "$lib" ]]; then
  echo "$lib"
  exit 0
fi

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) arch=x86_64 ;;
  Linux-aarch64) arch=aarch64 ;;
  *) echo "fetch-onnxruntime: unsupported platform $(uname -s)-$(uname -m)" >&2; exit 1 ;;
esac

python="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "fetch-onnxruntime: downloading onnxruntime==$ORT_VERSION wheel from PyPI" >&2
"$python" -m pip download --quiet --no-deps --only-binary=:all: \
  --platform "manylinux_2_28_$arch" --platform "manylinux_2_27_$arch" \
  --platform "manylinux_2_17_$arch" --python-version 3.11 \
  "onnxruntime==$ORT_VERSION" -d "$tmp" >&2
wheel="$(ls "$tmp"/onnxruntime-"$ORT_VERSION"-*.whl | head -n1)"

"$python" - "$wheel" "$tmp/lib" "$ORT_VERSION" <<'PY'
import sys, zipfile, pathlib
wheel, out, version = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
name = f"onnxruntime/capi/libonnxruntime.so.{version}"
out.mkdir(parents=True, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    (out / f"libonnxruntime.so.{version}").write_bytes(z.read(name))
PY

mkdir -p "$dest"
# Rename into place last so an interrupted run never leaves a partial library.
mv "$tmp/lib/libonnxruntime.so.$ORT_VERSION" "$lib.partial"
mv "$lib.partial" "$lib"
echo "$lib"

"""The fixture cases (testdata/cases/*.json) as a client script sends and
checks them: shared by the tritonclient and kserve conformance scripts."""

import argparse
from pathlib import Path

import numpy as np
from tritonclient.utils import triton_to_np_dtype


def parse_args(description):
    """The agent's addresses, the cases' folder and the models to run."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--http", required=True, help="the agent's HTTP HOST:PORT")
    parser.add_argument("--grpc", required=True, help="the agent's gRPC HOST:PORT")
    parser.add_argument("--cases", required=True, type=Path)
    parser.add_argument("--models", required=True, help="comma-separated fixture names")
    return parser.parse_args()


def as_numpy(tensor):
    """A case's tensor (JSON form) as the numpy array a user would send."""
    if tensor["datatype"] == "BYTES":
        values = [item.encode() for item in tensor["data"]]
        return np.array(values, dtype=np.object_).reshape(tensor["shape"])
    dtype = triton_to_np_dtype(tensor["datatype"])
    return np.array(tensor["data"], dtype=dtype).reshape(tensor["shape"])


def check_output(got, want, context):
    expected = as_numpy(want)
    if got is None:
        raise AssertionError(f"{context}: no output {want['name']}")
    if list(got.shape) != list(want["shape"]):
        raise AssertionError(
            f"{context}: {want['name']} has shape {list(got.shape)}, expected {want['shape']}"
        )
    if want["datatype"] == "BYTES":
        # Binary data comes back as bytes, JSON data as str (as from Triton).
        items = [item.encode() if isinstance(item, str) else bytes(item) for item in got.flatten()]
        if items != list(expected.flatten()):
            raise AssertionError(f"{context}: {want['name']} = {got!r}, expected {expected!r}")
        return
    if got.dtype != expected.dtype:
        raise AssertionError(f"{context}: {want['name']} is {got.dtype}, expected {expected.dtype}")
    if want["datatype"] in ("FP16", "FP32", "FP64"):
        tolerance = 1e-2 if want["datatype"] == "FP16" else 1e-4
        ok = np.allclose(got.astype(np.float64), expected.astype(np.float64), rtol=tolerance, atol=tolerance)
    else:
        ok = np.array_equal(got, expected)
    if not ok:
        raise AssertionError(f"{context}: {want['name']} = {got!r}, expected {expected!r}")

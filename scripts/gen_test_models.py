#!/usr/bin/env python3
"""Builds edgefleet's test models and their expected outputs.

Default: writes the committed fixtures, relative to the repository root:
  testdata/models/<name>/1/model.onnx   (a valid model repository)
  testdata/cases/<name>.json            (inputs and onnxruntime's outputs)
  examples/model-repository/iris/...    (the quickstart model)
--bench-dir DIR also writes the (bigger, uncommitted) benchmark models;
--only-bench writes only those.

Deterministic: a fixed seed, opset 17, IR version 8; rerunning gives
byte-identical files. Requires scripts/requirements.txt.
"""

import argparse
import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = pathlib.Path(__file__).resolve().parent.parent
OPSET = [helper.make_opsetid("", 17)]
IR_VERSION = 8
# Fixtures draw from RNG in a fixed order; the bench models get their own
# generator so they are the same whether or not the fixtures were built first.
RNG = np.random.default_rng(20261124)
BENCH_SEED = 20261125
# The rollout tests' slow model: its own generator, so adding it changed no other fixture.
SLOW_SEED = 20261126
# Fixtures added after the first nine draw their cases from seeds of their
# own, so that adding one leaves the others' cases and iris's weights (drawn
# from RNG after them) as they were.
OWN_SEEDS = {"spectrum": 20261127}

KSERVE = {
    TensorProto.FLOAT16: "FP16", TensorProto.FLOAT: "FP32", TensorProto.DOUBLE: "FP64",
    TensorProto.INT8: "INT8", TensorProto.INT16: "INT16", TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64", TensorProto.UINT8: "UINT8", TensorProto.UINT16: "UINT16",
    TensorProto.UINT32: "UINT32", TensorProto.UINT64: "UINT64", TensorProto.BOOL: "BOOL",
    TensorProto.STRING: "BYTES",
}
NUMPY = {
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "INT8": np.int8,
    "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8,
    "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64, "BOOL": np.bool_,
}


def weight(name, *shape, rng=None):
    rng = RNG if rng is None else rng
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)


def vinfo(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def model(name, nodes, inputs, outputs, initializers=(), opsets=OPSET):
    graph = helper.make_graph(nodes, name, inputs, outputs, list(initializers))
    m = helper.make_model(graph, opset_imports=opsets, producer_name="edgefleet-gen")
    m.ir_version = IR_VERSION
    return m


def gemm_chain(name, inp, out, sizes, final_softmax=False, rng=None):
    nodes, inits = [], []
    prev = inp
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        inits += [weight(f"w{i}", a, b, rng=rng), weight(f"b{i}", b, rng=rng)]
        y = f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [y]))
        last = i == len(sizes) - 2
        if not last:
            nodes.append(helper.make_node("Relu", [y], [f"r{i}"]))
            prev = f"r{i}"
        else:
            prev = y
    if final_softmax:
        nodes.append(helper.make_node("Softmax", [prev], [out], axis=1))
    else:
        nodes[-1].output[0] = out
    return model(name, nodes, [vinfo(inp, TensorProto.FLOAT, ["N", sizes[0]])],
                 [vinfo(out, TensorProto.FLOAT, ["N", sizes[-1]])], inits)


def conv_net(name, channels, spatial, pools, classes, rng=None):
    nodes, inits = [], []
    prev, c_in = "image", 3
    for i, c in enumerate(channels):
        inits += [weight(f"cw{i}", c, c_in, 3, 3, rng=rng), weight(f"cb{i}", c, rng=rng)]
        nodes.append(helper.make_node("Conv", [prev, f"cw{i}", f"cb{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        prev = f"r{i}"
        if i < pools:
            nodes.append(helper.make_node("MaxPool", [prev], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2]))
            prev = f"p{i}"
        c_in = c
    inits += [weight("fw", c_in, classes, rng=rng), weight("fb", classes, rng=rng)]
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fw", "fb"], ["logits"]),
    ]
    return model(name, nodes, [vinfo("image", TensorProto.FLOAT, ["N", 3, spatial, spatial])],
                 [vinfo("logits", TensorProto.FLOAT, ["N", classes])], inits)


def fixture_models():
    models = {}
    models["mlp"] = gemm_chain("mlp", "input", "logits", [16, 32, 4])
    models["conv"] = conv_net("conv", [8, 16], 16, 1, 10)

    f = TensorProto.FLOAT
    models["multi_io"] = model("multi_io", [
        helper.make_node("Add", ["a", "b"], ["sum"]),
        helper.make_node("Mul", ["a", "b"], ["product"]),
        helper.make_node("ReduceMax", ["a"], ["a_max"], axes=[1], keepdims=0),
    ], [vinfo("a", f, ["N", 4]), vinfo("b", f, ["N", 4])],
        [vinfo("sum", f, ["N", 4]), vinfo("product", f, ["N", 4]), vinfo("a_max", f, ["N"])])

    i64, b = TensorProto.INT64, TensorProto.BOOL
    models["int_bool"] = model("int_bool", [
        helper.make_node("Where", ["mask", "x", "zero"], ["masked"]),
        helper.make_node("Not", ["mask"], ["inverted"]),
        helper.make_node("Cast", ["mask"], ["mask_i64"], to=i64),
        helper.make_node("ReduceSum", ["mask_i64", "axes"], ["count"], keepdims=0),
    ], [vinfo("x", i64, ["N", 3]), vinfo("mask", b, ["N", 3])],
        [vinfo("masked", i64, ["N", 3]), vinfo("inverted", b, ["N", 3]), vinfo("count", i64, ["N"])],
        [numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
         numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")])

    models["dynamic"] = model("dynamic", [
        helper.make_node("Mul", ["x", "two"], ["x2"]),
        helper.make_node("Add", ["x2", "one"], ["y"]),
        helper.make_node("ReduceSum", ["x", "axes"], ["row_sum"], keepdims=0),
    ], [vinfo("x", f, ["N", "M"])], [vinfo("y", f, ["N", "M"]), vinfo("row_sum", f, ["N"])],
        [numpy_helper.from_array(np.array(2, dtype=np.float32), "two"),
         numpy_helper.from_array(np.array(1, dtype=np.float32), "one"),
         numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")])

    models["no_batch"] = model("no_batch", [helper.make_node("MatMul", ["x", "w"], ["y"])],
                               [vinfo("x", f, [2, 3])], [vinfo("y", f, [2, 2])], [weight("w", 3, 2)])

    types = [TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT8,
             TensorProto.INT16, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8,
             TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64, TensorProto.BOOL]
    models["all_types"] = model(
        "all_types",
        [helper.make_node("Identity", [f"in_{KSERVE[t]}"], [f"out_{KSERVE[t]}"]) for t in types],
        [vinfo(f"in_{KSERVE[t]}", t, ["N", 2]) for t in types],
        [vinfo(f"out_{KSERVE[t]}", t, ["N", 2]) for t in types])

    s = TensorProto.STRING
    models["strings"] = model("strings", [helper.make_node("Identity", ["text"], ["text_out"])],
                              [vinfo("text", s, ["N"])], [vinfo("text_out", s, ["N"])])

    # A standard operator ONNX Runtime runs and tract does not implement.
    models["unsupported_op"] = model("unsupported_op", [helper.make_node("Det", ["x"], ["det"])],
                                     [vinfo("x", f, ["N", 3, 3])], [vinfo("det", f, ["N"])])

    # An audio front end: a DFT of the whole signal and an STFT with a Hann
    # window (tract runs both with rustfft).
    nodes, initializers = hann_stft(step=16, frame=32)
    models["spectrum"] = model(
        "spectrum", [helper.make_node("DFT", ["signal"], ["dft"], axis=1, onesided=1), *nodes],
        [vinfo("signal", f, ["N", 128, 1])],
        [vinfo("dft", f, ["N", 65, 2]), vinfo("stft", f, ["N", 7, 17, 2])], initializers)
    return models


def hann_stft(step, frame):
    """Nodes and initializers of an STFT of input `signal` into `stft`, frames
    of `frame` samples every `step` with a Hann window, one-sided."""
    nodes = [
        helper.make_node("HannWindow", ["frame_length"], ["window"]),
        helper.make_node("STFT", ["signal", "frame_step", "window", "frame_length"], ["stft"],
                         onesided=1),
    ]
    initializers = [numpy_helper.from_array(np.array(step, dtype=np.int64), "frame_step"),
                    numpy_helper.from_array(np.array(frame, dtype=np.int64), "frame_length")]
    return nodes, initializers


def random_input(kserve, shape, rng=RNG):
    if kserve == "BYTES":
        words = ["hello", "ünïcode ✓", "edge", "", "fleet"]
        return np.array([f"{words[i % len(words)]} {i}" for i in range(int(np.prod(shape)))],
                        dtype=object).reshape(shape)
    dtype = NUMPY[kserve]
    if kserve == "BOOL":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if kserve.startswith("FP"):
        return (rng.standard_normal(shape) * 2).astype(dtype)
    info = np.iinfo(dtype)
    low, high = max(info.min, -1000), min(info.max, 1000)
    return rng.integers(low, high, size=shape, endpoint=True).astype(dtype)


def json_tensor(name, array):
    kserve = "BYTES" if array.dtype == object else KSERVE[onnx.helper.np_dtype_to_tensor_dtype(array.dtype)]
    flat = array.reshape(-1).tolist()
    if kserve in ("FP16", "FP32", "FP64"):
        flat = [float(v) for v in flat]
    return {"name": name, "datatype": kserve, "shape": list(array.shape), "data": flat}


def concrete(shape, batch, extra):
    out = []
    for dim in shape.dim:
        if dim.HasField("dim_value"):
            out.append(dim.dim_value)
        elif dim.dim_param == "N":
            out.append(batch)
        else:
            out.append(extra)
    return out


def cases_for(name, m, session):
    rng = np.random.default_rng(OWN_SEEDS[name]) if name in OWN_SEEDS else RNG
    cases = []
    for batch, extra in [(1, 3), (2, 1), (5, 4)]:
        feeds = {}
        for inp in m.graph.input:
            elem = inp.type.tensor_type.elem_type
            feeds[inp.name] = random_input(KSERVE[elem], concrete(inp.type.tensor_type.shape, batch, extra), rng)
        results = session.run(None, feeds)
        outputs = [json_tensor(o.name, np.asarray(r)) for o, r in zip(session.get_outputs(), results)]
        cases.append({"inputs": [json_tensor(k, v) for k, v in feeds.items()], "outputs": outputs})
    return cases


def save(m, path, check=True):
    if check:
        onnx.checker.check_model(m, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = m.SerializeToString(deterministic=True)
    path.write_bytes(data)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} ({len(data)} bytes)")
    return data


def session_for(data, quiet=False):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if quiet:  # the run meant to fail logs its error otherwise
        options.log_severity_level = 4
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


# How far a float output may move between two runs of this script and still
# count as the same (relative, plus as much absolute around zero): ONNX
# Runtime's kernels round differently on different CPUs, in the last bits.
LAST_BITS = {"FP16": 2e-3, "FP32": 1e-6, "FP64": 1e-13}


def same_but_last_bits(old, new):
    """Whether cases `old` and `new` have the same inputs and outputs, float
    outputs equal up to LAST_BITS (much tighter than the tests' tolerance)."""
    if old["model"] != new["model"] or len(old["cases"]) != len(new["cases"]):
        return False
    for a, b in zip(old["cases"], new["cases"]):
        if a["inputs"] != b["inputs"] or len(a["outputs"]) != len(b["outputs"]):
            return False
        for x, y in zip(a["outputs"], b["outputs"]):
            if any(x[k] != y[k] for k in ("name", "datatype", "shape")):
                return False
            if x["datatype"] not in LAST_BITS:
                if x["data"] != y["data"]:
                    return False
                continue
            xs, ys = np.asarray(x["data"], dtype=np.float64), np.asarray(y["data"], dtype=np.float64)
            tolerance = LAST_BITS[x["datatype"]]
            if xs.shape != ys.shape or not np.allclose(xs, ys, rtol=tolerance, atol=tolerance, equal_nan=True):
                return False
    return True


def write_cases(path, cases):
    """Writes `cases` to `path`, unless the file there holds the same cases
    but for last-bit rounding: then it is kept, so that running this script
    on another CPU leaves the committed fixtures as they are."""
    data = (json.dumps(cases, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    if path.exists():
        old = path.read_bytes()
        if old == data:
            print(f"unchanged {path.relative_to(ROOT)}")
            return
        try:
            kept = same_but_last_bits(json.loads(old), json.loads(data))
        except (ValueError, KeyError, TypeError, AttributeError):
            kept = False  # not a cases file as this script writes them
        if kept:
            print(f"kept {path.relative_to(ROOT)} (this run's outputs differ from it in the last bits only)")
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    print(f"wrote {path.relative_to(ROOT)} ({len(data)} bytes)")


def write_fixtures():
    for name, m in fixture_models().items():
        data = save(m, ROOT / "testdata" / "models" / name / "1" / "model.onnx", check=True)
        cases = {"model": name, "cases": cases_for(name, m, session_for(data))}
        write_cases(ROOT / "testdata" / "cases" / f"{name}.json", cases)
    write_rollout_models()
    write_batch_dims_models()
    write_batch_isolation_models()
    write_unknown_rank_models()
    write_check_models()
    iris = gemm_chain("iris", "features", "probabilities", [4, 8, 3], final_softmax=True)
    data = save(iris, ROOT / "examples" / "model-repository" / "iris" / "1" / "model.onnx")
    session_for(data).run(None, {"features": np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)})
    config = ROOT / "examples" / "model-repository" / "iris" / "config.toml"
    config.write_bytes(b"# Optional per-model settings; see docs/model-repository.md\nmax_batch_size = 8\n")
    print(f"wrote {config.relative_to(ROOT)}")


def slow_mlp():
    """Same inputs and outputs as `mlp`, ~3000x the work: a chain of 300
    MatMul+Tanh layers sharing one 256x256 weight (so the file stays small).
    The rollout tests use it as the "new version is slower" model."""
    rng = np.random.default_rng(SLOW_SEED)
    inits = [weight("w_in", 16, 256, rng=rng), weight("b_in", 256, rng=rng),
             weight("w", 256, 256, rng=rng), weight("w_out", 256, 4, rng=rng),
             weight("b_out", 4, rng=rng)]
    nodes = [helper.make_node("Gemm", ["input", "w_in", "b_in"], ["h"])]
    prev = "h"
    for i in range(300):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"t{i}"]))
        prev = f"t{i}"
    nodes.append(helper.make_node("Gemm", [prev, "w_out", "b_out"], ["logits"]))
    return model("slow_mlp", nodes, [vinfo("input", TensorProto.FLOAT, ["N", 16])],
                 [vinfo("logits", TensorProto.FLOAT, ["N", 4])], inits)


def write_rollout_models():
    data = save(slow_mlp(), ROOT / "testdata" / "rollout-models" / "slow_mlp" / "1" / "model.onnx")
    session_for(data).run(None, {"input": np.zeros((1, 16), dtype=np.float32)})


def write_batch_dims_models():
    """A model whose dynamic first dimensions are not one batch dimension:
    [N, 2] flattened to [K] (K = 2N). Batching it would split its output
    along the wrong rows; the agent must run its requests alone."""
    f = TensorProto.FLOAT
    flatten = model("flatten", [helper.make_node("Reshape", ["x", "flat"], ["y"])],
                    [vinfo("x", f, ["N", 2])], [vinfo("y", f, ["K"])],
                    [numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat")])
    data = save(flatten, ROOT / "testdata" / "batch-dims" / "flatten" / "1" / "model.onnx")
    out = session_for(data).run(None, {"x": np.array([[1, 2], [3, 4]], dtype=np.float32)})[0]
    assert out.tolist() == [1, 2, 3, 4], out
    # The same with the output's dimension unnamed ([None]): ONNX Runtime
    # names none, so only that it is unnamed next to the input's N tells.
    flatten_unnamed = model("flatten_unnamed", [helper.make_node("Reshape", ["x", "flat"], ["y"])],
                            [vinfo("x", f, ["N", 2])], [vinfo("y", f, [None])],
                            [numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat")])
    data = save(flatten_unnamed, ROOT / "testdata" / "batch-dims" / "flatten_unnamed" / "1" / "model.onnx")
    out = session_for(data).run(None, {"x": np.array([[1, 2], [3, 4]], dtype=np.float32)})[0]
    assert out.tolist() == [1, 2, 3, 4], out
    # [N] sorted, largest first (TopK of all N), with the indices: as many
    # rows as the batch, but rows of every request in the batch.
    sorted_ = model("sorted", [helper.make_node("Shape", ["x"], ["k"]),
                               helper.make_node("TopK", ["x", "k"], ["y", "indices"], axis=0)],
                    [vinfo("x", f, ["N"])],
                    [vinfo("y", f, [None]), vinfo("indices", TensorProto.INT64, [None])])
    data = save(sorted_, ROOT / "testdata" / "batch-dims" / "sorted" / "1" / "model.onnx")
    out = session_for(data).run(None, {"x": np.array([1, 3, 2], dtype=np.float32)})
    assert [o.tolist() for o in out] == [[3, 2, 1], [1, 2, 0]], out


def write_unknown_rank_models():
    """`relu`: an input (and output) declared with no shape at all, unknown
    rank. ONNX Runtime runs it on any shape; its metadata API reports it with
    no dimensions, like a scalar, which `scalar` (rank 0 declared) is. The
    ONNX checker wants a shape on graph inputs, so neither is checked."""
    f = TensorProto.FLOAT
    for name, shape, x in [("relu", None, [[-1, 2]]), ("scalar", [], -3)]:
        m = model(name, [helper.make_node("Relu", ["x"], ["y"])],
                  [vinfo("x", f, shape)], [vinfo("y", f, shape)])
        data = save(m, ROOT / "testdata" / "unknown-rank" / name / "1" / "model.onnx", check=False)
        out = session_for(data).run(None, {"x": np.array(x, dtype=np.float32)})[0]
        assert out.tolist() == np.maximum(np.array(x, dtype=np.float32), 0).tolist(), out


def write_check_models():
    """Models the agent's pre-load check (a run on made-up inputs) must judge
    right. `spatial_conv`: a 3x3 convolution without padding on [N, 1, H, W],
    which no input of 1x1 pixels fits (H and W must be at least 3), as
    networks exported with dynamic image sizes are. `l2_normalize`: x / |x|
    per row, NaN for a row of zeros but a fine model. `nan_weights`: x plus a
    constant holding NaN, broken for any input. `width5`: [N, W] times a
    [5, 2] matrix, declared with a dynamic W that only 5 fits, which no
    made-up width (64, 1) is: loaded with a warning."""
    f = TensorProto.FLOAT
    rng = np.random.default_rng(7)
    kernel = numpy_helper.from_array(rng.standard_normal((2, 1, 3, 3)).astype(np.float32), "kernel")
    conv = model("spatial_conv", [helper.make_node("Conv", ["x", "kernel"], ["y"])],
                 [vinfo("x", f, ["N", 1, "H", "W"])], [vinfo("y", f, ["N", 2, None, None])], [kernel])
    data = save(conv, ROOT / "testdata" / "check-models" / "spatial_conv" / "1" / "model.onnx")
    out = session_for(data).run(None, {"x": np.ones((1, 1, 5, 4), dtype=np.float32)})[0]
    assert out.shape == (1, 2, 3, 2), out.shape
    l2 = model("l2_normalize", [
        helper.make_node("Mul", ["x", "x"], ["squares"]),
        helper.make_node("ReduceSum", ["squares", "axes"], ["sum"], keepdims=1),
        helper.make_node("Sqrt", ["sum"], ["norm"]),
        helper.make_node("Div", ["x", "norm"], ["y"]),
    ], [vinfo("x", f, ["N", 4])], [vinfo("y", f, ["N", 4])],
        [numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")])
    data = save(l2, ROOT / "testdata" / "check-models" / "l2_normalize" / "1" / "model.onnx")
    out = session_for(data).run(None, {"x": np.array([[3, 0, 4, 0]], dtype=np.float32)})[0]
    assert np.allclose(out, [[0.6, 0, 0.8, 0]]), out
    nan = model("nan_weights", [helper.make_node("Add", ["x", "bias"], ["y"])],
                [vinfo("x", f, ["N", 4])], [vinfo("y", f, ["N", 4])],
                [numpy_helper.from_array(np.array([0, np.nan, 0, 0], dtype=np.float32), "bias")])
    data = save(nan, ROOT / "testdata" / "check-models" / "nan_weights" / "1" / "model.onnx")
    out = session_for(data).run(None, {"x": np.ones((1, 4), dtype=np.float32)})[0]
    assert np.isnan(out[0, 1]), out
    weights = numpy_helper.from_array(rng.standard_normal((5, 2)).astype(np.float32), "weights")
    width5 = model("width5", [helper.make_node("MatMul", ["x", "weights"], ["y"])],
                   [vinfo("x", f, ["N", "W"])], [vinfo("y", f, ["N", 2])], [weights])
    data = save(width5, ROOT / "testdata" / "check-models" / "width5" / "1" / "model.onnx")
    out = session_for(data).run(None, {"x": np.ones((1, 5), dtype=np.float32)})[0]
    assert out.shape == (1, 2), out.shape


def gather_table():
    """The `gather` model's constant table: row i is [10i, 10i+1, 10i+2]."""
    return (np.arange(10, dtype=np.float32)[:, None] * 10 + np.arange(3, dtype=np.float32)).astype(np.float32)


def write_batch_isolation_models():
    """`gather`: rows of a constant [10, 3] table picked by INT64 indices [N, 2]
    (output [N, 2, 3]). Whether a run fails depends on the values: an index
    outside [-10, 9] fails it, so one bad request stacked with good ones fails
    their run. Outside testdata/models: the fixture suites run every model
    there on zeros and random values."""
    table = gather_table()
    gather = model("gather", [helper.make_node("Gather", ["table", "indices"], ["rows"], axis=0)],
                   [vinfo("indices", TensorProto.INT64, ["N", 2])],
                   [vinfo("rows", TensorProto.FLOAT, ["N", 2, 3])],
                   [numpy_helper.from_array(table, "table")])
    data = save(gather, ROOT / "testdata" / "batch-isolation" / "gather" / "1" / "model.onnx")
    session = session_for(data, quiet=True)
    indices = np.array([[0, 9], [3, -1]], dtype=np.int64)
    out = session.run(None, {"indices": indices})[0]
    assert out.tolist() == table[indices].tolist(), out
    try:
        session.run(None, {"indices": np.array([[0, 10]], dtype=np.int64)})
    except Exception as err:  # onnxruntime's own exception types are not public API
        assert "out of data bounds" in str(err), err
    else:
        raise AssertionError("onnxruntime ran gather with an index out of range")


def spectrogram(name, samples, frame, step):
    """An audio front end as speech models have it (Whisper's: 25 ms frames
    every 10 ms of 16 kHz audio): the STFT of a signal with a Hann window, and
    each bin's power. No weights: what it costs is the FFTs."""
    f = TensorProto.FLOAT
    frames, bins = (samples - frame) // step + 1, frame // 2 + 1
    nodes, initializers = hann_stft(step, frame)
    return model(name, [
        *nodes,
        helper.make_node("Mul", ["stft", "stft"], ["squares"]),
        helper.make_node("ReduceSum", ["squares", "last"], ["power"], keepdims=0),
    ], [vinfo("signal", f, ["N", samples, 1])], [vinfo("power", f, ["N", frames, bins])],
        [*initializers, numpy_helper.from_array(np.array([-1], dtype=np.int64), "last")])


def write_bench(directory):
    directory = pathlib.Path(directory).resolve()
    models = {
        "bench_mlp": gemm_chain("bench_mlp", "input", "logits", [256, 1024, 1024, 10],
                                rng=np.random.default_rng(BENCH_SEED)),
        "bench_conv": conv_net("bench_conv", [16, 32, 64], 64, 2, 10,
                               rng=np.random.default_rng(BENCH_SEED + 1)),
        "bench_spectrum": spectrogram("bench_spectrum", samples=16000, frame=400, step=160),
    }
    shapes = {"bench_mlp": (2, 256), "bench_conv": (2, 3, 64, 64), "bench_spectrum": (2, 16000, 1)}
    for name, m in models.items():
        data = save(m, directory / name / "1" / "model.onnx")
        feed = {m.graph.input[0].name: np.zeros(shapes[name], dtype=np.float32)}
        session_for(data).run(None, feed)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench-dir", help="also write the benchmark models into this repository")
    parser.add_argument("--only-bench", action="store_true", help="write only the benchmark models")
    args = parser.parse_args()
    if args.only_bench and not args.bench_dir:
        parser.error("--only-bench needs --bench-dir")
    if not args.only_bench:
        write_fixtures()
    if args.bench_dir:
        write_bench(args.bench_dir)


if __name__ == "__main__":
    main()

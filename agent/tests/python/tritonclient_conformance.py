#!/usr/bin/env python3
"""Drives a running agent with NVIDIA's own Python client, `tritonclient`,
as its users would: health, metadata, and every case of every fixture model
over HTTP (binary tensor data, the client's default, and JSON) and gRPC,
each answer compared with what onnxruntime (Python) computed for the case.

Run by agent/tests/tritonclient.rs against an agent it started:

    tritonclient_conformance.py --http HOST:PORT --grpc HOST:PORT \
        --cases testdata/cases --models mlp,strings,...

Prints one line per check and, last, `checked N inferences`; exits non-zero
on the first mismatch.
"""

import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import triton_to_np_dtype

from cases import as_numpy, check_output, parse_args


def infer(client, module, model, case, request_id, binary):
    """One inference of `case`; `binary` (HTTP only) sends and asks for
    binary tensor data (True) or JSON (False)."""
    inputs = []
    for tensor in case["inputs"]:
        value = module.InferInput(tensor["name"], tensor["shape"], tensor["datatype"])
        if binary is None:
            value.set_data_from_numpy(as_numpy(tensor))
        else:
            value.set_data_from_numpy(as_numpy(tensor), binary_data=binary)
        inputs.append(value)
    if binary is None:
        outputs = None
    elif binary:
        # No outputs named: the client asks for all of them as binary data.
        outputs = None
    else:
        outputs = [
            module.InferRequestedOutput(tensor["name"], binary_data=False)
            for tensor in case["outputs"]
        ]
    return client.infer(model, inputs, outputs=outputs, request_id=request_id)


def main():
    args = parse_args(__doc__.splitlines()[0])

    clients = [
        ("HTTP", httpclient, httpclient.InferenceServerClient(url=args.http), [True, False]),
        ("gRPC", grpcclient, grpcclient.InferenceServerClient(url=args.grpc), [None]),
    ]
    checked = 0
    served = {}
    for protocol, module, client, modes in clients:
        assert client.is_server_live(), f"{protocol}: server not live"
        assert client.is_server_ready(), f"{protocol}: server not ready"
        metadata = client.get_server_metadata()
        if protocol == "HTTP":
            name, extensions = metadata["name"], metadata["extensions"]
        else:
            name, extensions = metadata.name, list(metadata.extensions)
        assert name == "edgefleet-agent", f"{protocol}: server name {name!r}"
        assert "binary_tensor_data" in extensions, f"{protocol}: extensions {extensions!r}"
        for model in args.models.split(","):
            assert client.is_model_ready(model), f"{protocol}: {model} not ready"
            cases = json.loads((args.cases / f"{model}.json").read_text())["cases"]
            metadata = client.get_model_metadata(model)
            if protocol == "HTTP":
                inputs = {t["name"]: t["datatype"] for t in metadata["inputs"]}
            else:
                inputs = {t.name: t.datatype for t in metadata.inputs}
            want = {t["name"]: t["datatype"] for t in cases[0]["inputs"]}
            assert inputs == want, f"{protocol}: {model} metadata inputs {inputs}, expected {want}"
            if protocol == "HTTP":
                config = client.get_model_config(model)
            else:
                config = client.get_model_config(model, as_json=True)["config"]
            names = [t["name"] for t in config["input"]]
            assert config["name"] == model and names == list(want), f"{protocol}: {model} config {config}"
            for index, case in enumerate(cases):
                for binary in modes:
                    mode = {None: "", True: " binary", False: " JSON"}[binary]
                    context = f"{protocol}{mode} {model} case {index}"
                    request_id = f"{model}-{index}"
                    result = infer(client, module, model, case, request_id, binary)
                    response = result.get_response()
                    got_id = response["id"] if protocol == "HTTP" else response.id
                    assert got_id == request_id, f"{context}: id {got_id!r}"
                    for tensor in case["outputs"]:
                        if binary is not None:
                            # The client asked for binary data or for JSON:
                            # as_numpy would read either, so check which came.
                            output = result.get_output(tensor["name"])
                            came_binary = "binary_data_size" in (output.get("parameters") or {})
                            assert came_binary == binary, f"{context}: {tensor['name']} came as {output}"
                        check_output(result.as_numpy(tensor["name"]), tensor, context)
                    print(f"ok {context}")
                    checked += 1
                    served[model] = served.get(model, 0) + 1
    check_statistics(clients, served)
    check_repository_index(clients, args.models.split(","))
    if "all_types" in args.models.split(","):
        check_non_finite_over_json(httpclient.InferenceServerClient(url=args.http))
    if "mlp" in args.models.split(","):
        check_gzip_over_grpc(grpcclient.InferenceServerClient(url=args.grpc), args.cases)
        check_compression_over_http(httpclient.InferenceServerClient(url=args.http), args.cases)
    checked += check_streaming_over_grpc(
        grpcclient.InferenceServerClient(url=args.grpc), args.cases, args.models.split(",")
    )
    print(f"checked {checked} inferences")


def check_statistics(clients, served):
    """get_inference_statistics: every request served so far, alike over both protocols."""
    for model, requests in served.items():
        seen = []
        for protocol, _, client, _ in clients:
            if protocol == "gRPC":
                stats = client.get_inference_statistics(model, as_json=True)
            else:
                stats = client.get_inference_statistics(model)
            (model_stats,) = stats["model_stats"]
            assert model_stats["name"] == model, f"{protocol}: statistics of {model_stats['name']!r}"
            success = int(model_stats["inference_stats"]["success"]["count"])
            assert success == requests, f"{protocol}: {model} served {success} requests, expected {requests}"
            seen.append((success, int(model_stats["execution_count"]), int(model_stats["last_inference"])))
        assert seen[0] == seen[1], f"{model}: HTTP and gRPC statistics differ: {seen}"
        print(f"ok statistics {model}")


def check_repository_index(clients, models):
    """get_model_repository_index: every model served, version 1, READY."""
    for protocol, _, client, _ in clients:
        if protocol == "gRPC":
            index = client.get_model_repository_index(as_json=True).get("models", [])
        else:
            index = client.get_model_repository_index()
        listed = sorted((m["name"], m.get("version"), m["state"]) for m in index)
        want = sorted((model, "1", "READY") for model in models)
        assert listed == want, f"{protocol}: repository index {listed}, expected {want}"
        print(f"ok repository index over {protocol}")


def grpc_inputs(case):
    """A case's inputs for tritonclient.grpc."""
    inputs = []
    for tensor in case["inputs"]:
        value = grpcclient.InferInput(tensor["name"], tensor["shape"], tensor["datatype"])
        value.set_data_from_numpy(as_numpy(tensor))
        inputs.append(value)
    return inputs


def check_streaming_over_grpc(client, cases_dir, models):
    """Every case of every model on one stream (`start_stream`,
    `async_stream_infer`), all sent before any answer is read, answers
    matched by request id; then a request for a model the agent does not
    have, whose error comes on the stream. Returns the inferences checked."""
    answers = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    sent = {}
    for model in models:
        for index, case in enumerate(json.loads((cases_dir / f"{model}.json").read_text())["cases"]):
            request_id = f"stream {model} case {index}"
            client.async_stream_infer(model, grpc_inputs(case), request_id=request_id)
            sent[request_id] = case
    client.async_stream_infer("no_such_model", grpc_inputs(next(iter(sent.values()))), request_id="unknown")
    # Closes the client's side and waits for the stream to end.
    client.stop_stream()
    errors = []
    checked = 0
    while not answers.empty():
        result, error = answers.get()
        if error is not None:
            errors.append(str(error))
            continue
        request_id = result.get_response().id
        case = sent.pop(request_id)
        for tensor in case["outputs"]:
            check_output(result.as_numpy(tensor["name"]), tensor, f"gRPC {request_id}")
        print(f"ok gRPC {request_id}")
        checked += 1
    assert not sent, f"never answered on the stream: {sorted(sent)}"
    assert len(errors) == 1 and "no_such_model" in errors[0], f"errors on the stream: {errors}"
    return checked


def check_gzip_over_grpc(client, cases_dir):
    """gRPC requests gzipped (`compression_algorithm`), as Triton takes
    them."""
    for index, case in enumerate(json.loads((cases_dir / "mlp.json").read_text())["cases"]):
        result = client.infer("mlp", grpc_inputs(case), compression_algorithm="gzip")
        for tensor in case["outputs"]:
            check_output(result.as_numpy(tensor["name"]), tensor, f"gRPC gzip mlp case {index}")
    print("checked gzip over gRPC")


def check_compression_over_http(client, cases_dir):
    """HTTP requests compressed (`request_compression_algorithm`, gzip and
    deflate), binary data and JSON, as Triton takes them; the client also
    asks for compressed answers, which come compressed from 1 KiB."""
    for index, case in enumerate(json.loads((cases_dir / "mlp.json").read_text())["cases"]):
        for algorithm in ["gzip", "deflate"]:
            for binary in [True, False]:
                context = f"HTTP {algorithm} {'binary' if binary else 'JSON'} mlp case {index}"
                inputs = []
                for tensor in case["inputs"]:
                    value = httpclient.InferInput(tensor["name"], tensor["shape"], tensor["datatype"])
                    value.set_data_from_numpy(as_numpy(tensor), binary_data=binary)
                    inputs.append(value)
                result = client.infer(
                    "mlp",
                    inputs,
                    request_compression_algorithm=algorithm,
                    response_compression_algorithm=algorithm,
                )
                for tensor in case["outputs"]:
                    check_output(result.as_numpy(tensor["name"]), tensor, context)
    # An answer over 1 KiB, which the agent compresses as asked: 64 rows
    # of the first case, answered the same compressed and plain.
    first = json.loads((cases_dir / "mlp.json").read_text())["cases"][0]["inputs"][0]
    rows = np.repeat(as_numpy(first), 64, axis=0)
    for binary in [True, False]:
        value = httpclient.InferInput(first["name"], list(rows.shape), first["datatype"])
        value.set_data_from_numpy(rows, binary_data=binary)
        wanted = [httpclient.InferRequestedOutput("logits", binary_data=binary)]
        plain = client.infer("mlp", [value], outputs=wanted).as_numpy("logits")
        assert plain.shape == (64, 4), f"64 rows answered as {plain.shape}"
        for algorithm in ["gzip", "deflate"]:
            answer = client.infer(
                "mlp", [value], outputs=wanted, response_compression_algorithm=algorithm
            ).as_numpy("logits")
            context = f"64 rows answered {algorithm}, {'binary' if binary else 'JSON'}"
            assert np.array_equal(answer, plain), f"{context}: {answer} != {plain}"
    print("checked compression over HTTP")


def check_non_finite_over_json(client):
    """NaN and the infinities through `all_types`' identities over HTTP in
    JSON both ways: the client writes and reads them as the tokens `NaN`,
    `Infinity` and `-Infinity`, as Triton does."""
    floats = ["FP32", "FP64"]
    sent, inputs = {}, []
    for tensor in client.get_model_metadata("all_types")["inputs"]:
        datatype = tensor["datatype"]
        if datatype in floats:
            values = np.array([[np.inf, -np.inf], [np.nan, 1.5]], dtype=triton_to_np_dtype(datatype))
            sent[datatype] = values
        else:  # the model's other inputs, as binary data
            values = np.zeros([2, 2], dtype=triton_to_np_dtype(datatype))
        given = httpclient.InferInput(tensor["name"], [2, 2], datatype)
        given.set_data_from_numpy(values, binary_data=datatype not in floats)
        inputs.append(given)
    wanted = [httpclient.InferRequestedOutput(f"out_{datatype}", binary_data=False) for datatype in floats]
    result = client.infer("all_types", inputs, outputs=wanted)
    for datatype, values in sent.items():
        output = result.get_output(f"out_{datatype}")
        assert "data" in output, f"non-finite {datatype}: came as {output}"
        got = result.as_numpy(f"out_{datatype}")
        assert np.array_equal(got, values, equal_nan=True), f"non-finite {datatype}: {got.tolist()}"
        print(f"ok HTTP JSON non-finite {datatype}")
    assert len(sent) == len(floats), f"all_types inputs: {sorted(sent)}"
    print("checked non-finite values over JSON")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as err:
        print(f"FAILED: {err}", file=sys.stderr)
        sys.exit(1)

#!/usr/bin/env python3
"""Drives a running agent with KServe's own Python clients,
`kserve.InferenceRESTClient` (protocol v2) and `kserve.InferenceGRPCClient`,
as its users would: health, readiness, and every case of every fixture model
over HTTP (binary tensor data and JSON) and gRPC, each answer compared with
what onnxruntime (Python) computed for the case.

Run by agent/tests/kserve.rs against an agent it started:

    kserve_conformance.py --http HOST:PORT --grpc HOST:PORT \
        --cases testdata/cases --models mlp,strings,...

Prints one line per check and, last, `checked N inferences`; exits non-zero
on the first mismatch.
"""

import asyncio
import json
import sys

from cases import as_numpy, check_output, parse_args

# kserve parses the command line of whatever imports it (for its model
# server's options): it sees only the script's name.
ARGS = parse_args(__doc__.splitlines()[0])
sys.argv = sys.argv[:1]

from kserve import (  # noqa: E402
    InferenceGRPCClient,
    InferenceRESTClient,
    InferInput,
    InferRequest,
    RESTConfig,
)


def request(model, case, request_id, binary):
    inputs = []
    for tensor in case["inputs"]:
        value = InferInput(tensor["name"], tensor["shape"], tensor["datatype"])
        value.set_data_from_numpy(as_numpy(tensor), binary_data=binary)
        inputs.append(value)
    return InferRequest(model_name=model, infer_inputs=inputs, request_id=request_id)


def check_response(response, case, request_id, context):
    assert response.id == request_id, f"{context}: id {response.id!r}"
    outputs = {output.name: output for output in response.outputs}
    for tensor in case["outputs"]:
        output = outputs.get(tensor["name"])
        check_output(None if output is None else output.as_numpy(), tensor, context)
    print(f"ok {context}")


async def main():
    args = ARGS
    models = args.models.split(",")
    base_url = f"http://{args.http}"
    rest = InferenceRESTClient(RESTConfig(protocol="v2"))
    grpc = InferenceGRPCClient(url=args.grpc)
    checked = 0

    assert await rest.is_server_live(base_url), "HTTP: server not live"
    assert await rest.is_server_ready(base_url), "HTTP: server not ready"
    assert await grpc.is_server_live(), "gRPC: server not live"
    assert await grpc.is_server_ready(), "gRPC: server not ready"
    assert not await rest.is_model_ready(base_url, "no-such-model"), "HTTP: unknown model ready"
    for model in models:
        assert await rest.is_model_ready(base_url, model), f"HTTP: {model} not ready"
        assert await grpc.is_model_ready(model), f"gRPC: {model} not ready"
        cases = json.loads((args.cases / f"{model}.json").read_text())["cases"]
        for index, case in enumerate(cases):
            request_id = f"{model}-{index}"
            # FP16 goes only as bytes: kserve's client cannot write it as
            # JSON, and the protocol has no typed contents for it.
            fp16 = any(tensor["datatype"] == "FP16" for tensor in case["inputs"])
            modes = (True,) if fp16 else (True, False)
            for binary in modes:
                context = f"HTTP {'binary' if binary else 'JSON'} {model} case {index}"
                response = await rest.infer(
                    base_url, request(model, case, request_id, binary), model_name=model
                )
                check_response(response, case, request_id, context)
                checked += 1
            # gRPC: raw_input_contents (binary) and typed contents.
            for binary in modes:
                context = f"gRPC {'raw' if binary else 'typed'} {model} case {index}"
                response = await grpc.infer(request(model, case, request_id, binary))
                check_response(response, case, request_id, context)
                checked += 1
    await rest.close()
    await grpc.close()
    print(f"checked {checked} inferences")


if __name__ == "__main__":
    asyncio.run(main())

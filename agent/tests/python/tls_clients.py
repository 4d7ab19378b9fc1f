#!/usr/bin/env python3
"""Calls an agent that serves TLS with the clients its users already have:
tritonclient over HTTP and gRPC, and `requests` (urllib3, which offers only
HTTP/1.1 in its TLS handshake), each trusting only the given CA and, with
--cert and --key, presenting that client certificate.

Run by agent/tests/tls.rs against an agent it started:

    tls_clients.py --http HOST:PORT --grpc HOST:PORT --ca FILE \
        [--cert FILE --key FILE] --cases testdata/cases --model mlp

Prints `checked <client>` for each client whose every case matched; with
--expect-refused, prints `refused <client>` for each client the agent
refused at the TLS handshake instead, and fails if one got an answer.
"""

import argparse
import json
import ssl
import sys
from pathlib import Path

import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from cases import as_numpy, check_output


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http", required=True, help="the agent's HTTP HOST:PORT")
    parser.add_argument("--grpc", required=True, help="the agent's gRPC HOST:PORT")
    parser.add_argument("--ca", required=True, type=Path, help="the CA the agent's certificate chains to")
    parser.add_argument("--cert", type=Path, help="a client certificate to present")
    parser.add_argument("--key", type=Path, help="its private key")
    parser.add_argument("--cases", required=True, type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--expect-refused", action="store_true")
    return parser.parse_args()


def ssl_context(args):
    context = ssl.create_default_context(cafile=str(args.ca))
    if args.cert:
        context.load_cert_chain(str(args.cert), str(args.key))
    return context


def tritonclient_infer(module, client, model, case):
    inputs = []
    for tensor in case["inputs"]:
        value = module.InferInput(tensor["name"], tensor["shape"], tensor["datatype"])
        value.set_data_from_numpy(as_numpy(tensor))
        inputs.append(value)
    result = client.infer(model, inputs)
    for want in case["outputs"]:
        check_output(result.as_numpy(want["name"]), want, f"{model} over TLS")


def tritonclient_http(args, cases):
    client = httpclient.InferenceServerClient(
        url=args.http, ssl=True, ssl_context_factory=lambda: ssl_context(args)
    )
    for case in cases:
        tritonclient_infer(httpclient, client, args.model, case)


def tritonclient_grpc(args, cases):
    client = grpcclient.InferenceServerClient(
        url=args.grpc,
        ssl=True,
        root_certificates=str(args.ca),
        private_key=str(args.key) if args.key else None,
        certificate_chain=str(args.cert) if args.cert else None,
    )
    if not client.is_server_live():
        raise AssertionError("gRPC over TLS: not live")
    for case in cases:
        tritonclient_infer(grpcclient, client, args.model, case)


def requests_http(args, cases):
    # Per request: a session's `verify` gives way to REQUESTS_CA_BUNDLE.
    tls = {"verify": str(args.ca), "cert": (str(args.cert), str(args.key)) if args.cert else None}
    base = f"https://{args.http}"
    ready = requests.get(f"{base}/v2/health/ready", timeout=30, **tls)
    if ready.status_code != 200:
        raise AssertionError(f"requests: ready answered {ready.status_code}")
    for case in cases:
        body = {"inputs": case["inputs"]}
        answer = requests.post(f"{base}/v2/models/{args.model}/infer", json=body, timeout=30, **tls)
        if answer.status_code != 200:
            raise AssertionError(f"requests: infer answered {answer.status_code}: {answer.text}")
        outputs = {output["name"]: output for output in answer.json()["outputs"]}
        for want in case["outputs"]:
            check_output(as_numpy(outputs[want["name"]]), want, f"{args.model} over requests")


def main():
    args = parse_args()
    cases = json.loads((args.cases / f"{args.model}.json").read_text())["cases"]
    failed = False
    for name, run in [
        ("tritonclient HTTP", tritonclient_http),
        ("tritonclient gRPC", tritonclient_grpc),
        ("requests", requests_http),
    ]:
        try:
            run(args, cases)
        except Exception as error:  # noqa: BLE001 - each client fails its own way
            if args.expect_refused:
                print(f"refused {name}: {type(error).__name__}: {error}".splitlines()[0])
                continue
            print(f"{name} failed: {type(error).__name__}: {error}", file=sys.stderr)
            failed = True
            continue
        if args.expect_refused:
            print(f"{name} got answers without an accepted client certificate", file=sys.stderr)
            failed = True
        else:
            print(f"checked {name}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Create a staged rollout and watch it to the end, from Python over gRPC.

Proof that rollouts are scriptable from outside Rust: the stubs are generated
from the repo's own protos (grpcio-tools) at start, nothing else is needed.

    pip install -r scripts/requirements-client.txt
    EDGEFLEET_TOKEN=$(cat DATA_DIR/admin.token) EDGEFLEET_CA_CERT=DATA_DIR/ca.crt \
        scripts/rollout.py --server 127.0.0.1:7444 --model mlp@2 \
        --selector region=eu --waves 10%,100% --max-failed 1

Exit status: 0 if the rollout succeeded, 1 if it ended otherwise, 2 on a
usage or connection error.
"""

import argparse
import os
import pathlib
import sys
import tempfile

import grpc
from grpc_tools import protoc

PROTO_ROOT = pathlib.Path(__file__).resolve().parent.parent / "proto"


def load_stubs():
    """Generates the Python modules of edgefleet/v1/models.proto."""
    out = tempfile.mkdtemp(prefix="edgefleet-stubs-")
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "edgefleet/v1/models.proto",
        ]
    )
    if code != 0:
        sys.exit(f"rollout.py: cannot compile the protos under {PROTO_ROOT}")
    sys.path.insert(0, out)
    from edgefleet.v1 import models_pb2, models_pb2_grpc  # noqa: E402

    return models_pb2, models_pb2_grpc


def parse_waves(pb, text):
    waves = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if part.endswith("%"):
            waves.append(pb.Wave(percent=float(part[:-1])))
        else:
            waves.append(pb.Wave(count=int(part)))
    return waves


def open_channel(parser, server, ca_cert):
    """TLS trusting the fleet CA (the server's ca.crt), as the edgefleet CLI
    does; plaintext only for http:// to a server on this machine started
    with --plaintext-on-loopback: the token must not cross a network in the
    clear."""
    address = server.removeprefix("http://").removeprefix("https://")
    if not server.startswith("http://"):
        if not ca_cert:
            parser.error(
                f"--ca-cert (or EDGEFLEET_CA_CERT) is required to trust {server!r}: "
                "use the server's DATA_DIR/ca.crt"
            )
        with open(ca_cert, "rb") as f:
            roots = f.read()
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(roots))
    host = address.rsplit(":", 1)[0].strip("[]")
    if host not in ("localhost", "127.0.0.1", "::1") and not host.startswith("127."):
        parser.error(
            f"refusing to send the operator token in plaintext to {server!r}: "
            "http:// is for a server on this machine (loopback); "
            "use HOST:PORT (TLS) with --ca-cert"
        )
    return grpc.insecure_channel(address)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default=os.environ.get("EDGEFLEET_SERVER", "127.0.0.1:7444"),
                        help="operator API: HOST:PORT or https://HOST:PORT (TLS), "
                        "http://HOST:PORT for a plaintext one on loopback")
    parser.add_argument("--ca-cert", default=os.environ.get("EDGEFLEET_CA_CERT"),
                        help="the server's DATA_DIR/ca.crt, which its TLS certificate is from "
                        "(or EDGEFLEET_CA_CERT)")
    parser.add_argument("--token", default=os.environ.get("EDGEFLEET_TOKEN"),
                        help="operator bearer token (or EDGEFLEET_TOKEN)")
    parser.add_argument("--model", required=True, help="NAME@VERSION")
    parser.add_argument("--selector", default="", help="k=v,k2=v2")
    parser.add_argument("--waves", default="100%", help="e.g. 1%%,10%%,100%% or 1,5,20")
    parser.add_argument("--soak-seconds", type=int, default=0)
    parser.add_argument("--max-failed", type=int, default=0,
                        help="failed activations tolerated before rolling back (0: off)")
    args = parser.parse_args()
    if not args.token:
        parser.error("--token or EDGEFLEET_TOKEN is required")
    name, _, version = args.model.partition("@")

    pb, pb_grpc = load_stubs()
    channel = open_channel(parser, args.server, args.ca_cert)
    stub = pb_grpc.RolloutServiceStub(channel)
    metadata = [("authorization", f"Bearer {args.token.strip()}")]

    try:
        rollout = stub.CreateRollout(
            pb.CreateRolloutRequest(
                model=name,
                version=int(version or 0),
                selector=args.selector,
                waves=parse_waves(pb, args.waves),
                soak_seconds=args.soak_seconds,
                gates=pb.Gates(max_failed_activations=args.max_failed),
            ),
            metadata=metadata,
            timeout=30,
        )
        print(f"created {rollout.id}: {rollout.model}@{rollout.version} "
              f"to {rollout.counts.targeted} devices", flush=True)
        last = rollout
        for last in stub.WatchRollout(
                pb.RolloutRef(id=rollout.id, view=pb.ROLLOUT_VIEW_BASIC), metadata=metadata):
            c = last.counts
            print(f"{last.state} wave {last.current_wave}/{max(len(last.waves), 1)}: "
                  f"{c.active} active, {c.updating} updating, {c.waiting} waiting, "
                  f"{c.failed} failed", flush=True)
    except grpc.RpcError as err:
        print(f"rollout.py: {err.code().name}: {err.details()}", file=sys.stderr)
        return 2
    if last.reason:
        print(f"reason: {last.reason}")
    return 0 if last.state == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())

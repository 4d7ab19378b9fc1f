#!/usr/bin/env python3
"""Records which functions the agent runs from start to idle, for agent/text-order.txt.

The release agent is linked with a linker script written from
agent/text-order.txt (agent/build.rs, agent/src/text_order.rs), which places
the functions it names side by side in `.text`, so an idle agent maps
far less of its code than when it is spread over the whole
binary. This script writes that list. For each way the agent is built (alone,
as a device build does, and with the other packages, as the README and
scripts/bench.sh build it: Cargo's feature unification gives dependencies,
and so symbol names, that differ between the two), it:

1. builds it (`cargo build --release --locked`, stripped as shipped) with
   EDGEFLEET_AGENT_LINK_MAP set, so lld writes its map: which function is where
   (rustc's own lld on x86_64: the map read below is lld's format);
2. runs it under `valgrind --tool=callgrind --dump-instr=yes`, which records
   every instruction executed: `serve` (tract, empty repository) until idle,
   then `run` enrolled with a control plane of the same build, until idle;
   each answers a few health, metadata and metrics requests (HTTP and gRPC)
   once ready, as a supervisor or a client library would;
3. turns the executed addresses into function names through the map.

The list is the union, `serve`'s functions first, then each name again as a
glob without the parts that change from build to build (Cargo's hash, a
crate's disambiguator, LLVM's `.N` suffix). The linker places the functions
the exact names match first, then the rest the globs match: with the names
current that is just the functions that ran, packed; after a dependency or
toolchain update changed them, the globs still gather the functions that ran,
with the other instances of the generic ones among them. Running this script
again restores the packed layout. Needs valgrind
and grpcio (scripts/requirements-client.txt); takes 10-20 minutes (a release
build of each kind).

Usage: scripts/order-agent-text.py [--idle-seconds N]
"""

import argparse
import bisect
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER_FILE = ROOT / "agent" / "text-order.txt"
# The package sets the agent is built with: scripts/bench.sh's, the README's
# and a device's (the agent alone).
BUILDS = [
    ["edgefleet-agent", "edgefleet-bench", "edgefleet-control-plane", "edgefleet-cli"],
    ["edgefleet-control-plane", "edgefleet-agent", "edgefleet-cli"],
    ["edgefleet-agent"],
]
# Prefixes LLVM may put before a function's name in its section's name: all
# are stripped to find the name, but the linker script takes only "unlikely."
# (agent/src/text_order.rs): the others come with profile data, which these
# builds do not use.
SECTION_PREFIXES = ("unlikely.", "hot.", "startup.", "exit.", "split.")


def log(message):
    print(f"order-agent-text: {message}", file=sys.stderr, flush=True)


def target_dir():
    metadata = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--no-deps"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    return Path(json.loads(metadata)["target_directory"]) / "release"


def build(packages, link_map):
    command = ["cargo", "build", "--release", "--locked"]
    for package in packages:
        command += ["-p", package]
    log(" ".join(command))
    env = dict(os.environ, EDGEFLEET_AGENT_LINK_MAP=str(link_map))
    subprocess.run(command, cwd=ROOT, env=env, check=True)


def functions_by_address(link_map):
    """(start, end, symbol) of every function section in lld's map, sorted."""
    line_re = re.compile(
        r"^\s*([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)\s+\d+\s+\S.*:\(\.text\.([^)]+)\)$"
    )
    functions = []
    with open(link_map) as lines:
        for line in lines:
            found = line_re.match(line)
            if not found:
                continue
            start, size, name = int(found[1], 16), int(found[2], 16), found[3]
            for prefix in SECTION_PREFIXES:
                if name.startswith(prefix):
                    name = name[len(prefix):]
            if size:
                functions.append((start, start + size, name))
    functions.sort()
    return functions


LEGACY_HASH = re.compile(r"17h[0-9a-f]{16}E")
V0_CRATE = re.compile(r"Cs[0-9A-Za-z]+_")
LOCAL_SUFFIX = re.compile(r"(\.\d+)+$")


def glob_of(name):
    """`name` with the parts that change between builds as `*`."""
    glob = LEGACY_HASH.sub("17h*E", name) if name.startswith("_ZN") else name
    if name.startswith("_R"):
        glob = V0_CRATE.sub("Cs*_", glob)
    return LOCAL_SUFFIX.sub(".*", glob)


def executed_addresses(callgrind_out, object_name):
    """Addresses of the instructions of `object_name` that ran, from a
    callgrind file written with --dump-instr=yes (positions: instr line)."""
    names, current, last = {}, None, 0
    addresses = set()
    with open(callgrind_out) as lines:
        for line in lines:
            if line.startswith(("ob=", "cob=")):
                found = re.match(r"c?ob=\((\d+)\)(?: (.*))?", line.strip())
                if found[2]:
                    names[found[1]] = found[2]
                if line.startswith("ob="):
                    current = found[1]
                continue
            # A call's target does not move the position; the cost line after it does.
            if line.startswith("calls=") or not line[:1] or line[0] not in "0123456789+-*":
                continue
            position = line.split()[0]
            if position.startswith("0x"):
                last = int(position, 16)
            elif position[0] in "+-":
                step = position[1:]
                step = int(step, 16) if step.startswith("0x") else int(step)
                last += step if position[0] == "+" else -step
            elif position != "*":
                last = int(position)
            if names.get(current, "").endswith(object_name):
                addresses.add(last)
    return addresses


def names_of(addresses, functions):
    starts = [start for start, _, _ in functions]
    names = set()
    for address in addresses:
        i = bisect.bisect_right(starts, address) - 1
        if i >= 0 and address < functions[i][1]:
            names.add(functions[i])
    return [name for _, _, name in sorted(names)]


def run_under_callgrind(command, ready_line, idle_seconds, out, env=None):
    """Runs `command` under callgrind until it logs `ready_line`, lets it idle,
    then stops it with SIGINT (callgrind writes `out` as it exits)."""
    process = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--dump-instr=yes", f"--callgrind-out-file={out}", *command],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    seen, addresses = [], None
    for line in process.stdout:
        seen.append(line)
        if "listening" in line:
            addresses = dict(re.findall(r"(grpc|http)=(\S+)", line))
        if ready_line in line:
            break
    else:
        process.wait()
        sys.exit("order-agent-text: the agent exited before it was ready:\n" + "".join(seen[-20:]))
    # Give the reader of its output a thread of its own, so the agent never blocks on a full pipe.
    threading.Thread(target=process.stdout.read, daemon=True).start()
    probe(addresses)
    time.sleep(idle_seconds)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=120)
    if not Path(out).exists():
        sys.exit(f"order-agent-text: callgrind wrote no {out}")


def probe(addresses):
    """What a ready agent answers before it serves a model: the health,
    metadata and metrics endpoints a supervisor, a load balancer or a client
    library calls (HTTP, and gRPC with raw bytes: every message here is empty)."""
    import grpc  # scripts/requirements-client.txt

    for path in ["/v2/health/live", "/v2/health/ready", "/v2", "/metrics", "/v2/models/absent"]:
        try:
            urllib.request.urlopen(f"http://{addresses['http']}{path}", timeout=30).read()
        except urllib.error.HTTPError:
            pass  # the absent model's 404 is the point
    with grpc.insecure_channel(addresses["grpc"]) as channel:
        for method in [
            "/inference.GRPCInferenceService/ServerLive",
            "/inference.GRPCInferenceService/ServerReady",
            "/inference.GRPCInferenceService/ServerMetadata",
            "/grpc.health.v1.Health/Check",
        ]:
            channel.unary_unary(method)(b"", timeout=30)


def record(release, work, idle_seconds):
    """The callgrind files of `serve` and of `run`, in that order."""
    agent, server, cli = release / "edgefleet-agent", release / "edgefleet-server", release / "edgefleet"
    repository = work / "empty-repository"
    repository.mkdir(exist_ok=True)
    serve_out = work / "serve.callgrind"
    run_under_callgrind(
        [agent, "serve", "--runtime", "tract", "--model-repository", repository,
         "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"],
        "listening", idle_seconds, serve_out,
    )
    # `run`: enrolled with a control plane (of the same build) on ports of its own.
    data_dir, state_dir = work / "control-plane", work / "device"
    for directory in (data_dir, state_dir):
        shutil.rmtree(directory, ignore_errors=True)
    ports = free_ports(3)
    control_plane = subprocess.Popen(
        [server, "serve", "--data-dir", data_dir, "--agent-addr", f"127.0.0.1:{ports[0]}",
         "--api-addr", f"127.0.0.1:{ports[1]}", "--http-addr", f"127.0.0.1:{ports[2]}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        token_file = data_dir / "admin.token"
        for _ in range(300):
            if token_file.exists() and token_file.read_text().strip():
                break
            time.sleep(0.1)
        else:
            sys.exit(f"order-agent-text: the control plane wrote no {token_file} within 30 s")
        env = dict(os.environ, EDGEFLEET_TOKEN=token_file.read_text().strip(),
                   EDGEFLEET_SERVER=f"https://127.0.0.1:{ports[1]}",
                   EDGEFLEET_CA_CERT=str(data_dir / "ca.crt"))
        join = subprocess.run([cli, "join-token", "create", "--uses", "1"], env=env,
                              check=True, capture_output=True, text=True).stdout.strip()
        subprocess.run([agent, "enroll", "--server", f"https://127.0.0.1:{ports[0]}", "--token", join,
                        "--state-dir", state_dir], check=True, capture_output=True)
        run_out = work / "run.callgrind"
        run_under_callgrind(
            [agent, "run", "--runtime", "tract", "--state-dir", state_dir,
             "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"],
            "connected to the control plane", idle_seconds, run_out,
        )
    finally:
        control_plane.send_signal(signal.SIGINT)
        control_plane.wait(timeout=60)
    return [serve_out, run_out]


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idle-seconds", type=float, default=10,
                        help="how long each agent idles once ready before it is stopped (default 10)")
    args = parser.parse_args()
    if subprocess.run(["valgrind", "--version"], capture_output=True).returncode != 0:
        sys.exit("order-agent-text: needs valgrind (apt-get install valgrind)")
    release = target_dir()
    ordered, seen = [], set()
    counts = []
    with tempfile.TemporaryDirectory(prefix="order-agent-text.") as tmp:
        work = Path(tmp)
        for packages in BUILDS:
            link_map = work / "agent.map"
            build(packages, link_map)
            functions = functions_by_address(link_map)
            found = 0
            for out in record(release, work, args.idle_seconds):
                names = names_of(executed_addresses(out, "/edgefleet-agent"), functions)
                found += len(names)
                for name in names:
                    if name not in seen:
                        seen.add(name)
                        ordered.append(name)
            counts.append(f"{' '.join(packages)}: {found} functions (serve's and run's, each counted)")
            log(counts[-1])
    globs = []
    for name in ordered:
        glob = glob_of(name)
        if glob != name and glob not in seen:
            seen.add(glob)
            globs.append(glob)
    header = [
        "# The functions the agent runs from start to idle (serve, then run), placed",
        "# first in its code, side by side, when it is linked (agent/build.rs,",
        "# agent/src/text_order.rs). Their exact names first, then the same names as",
        "# globs (`*` for Cargo's hash, a crate's disambiguator, LLVM's suffix): where a",
        "# dependency or toolchain update has changed the names, the globs still find",
        "# the functions, with their other instances. Written by",
        "# scripts/order-agent-text.py; run it again after such an update. Builds recorded:",
        *(f"#   {line}" for line in counts),
    ]
    ORDER_FILE.write_text("\n".join(header + ordered + ["# The same functions as globs."] + globs) + "\n")
    log(f"wrote {ORDER_FILE.relative_to(ROOT)}: {len(ordered)} functions, then {len(globs)} globs")
    log("the next `cargo build --release` links the agent with it")


if __name__ == "__main__":
    main()

"""Throw generated bad inputs at the epplan command line, as a user calls it, and count outcomes.

    python scripts/fuzz_inputs.py [--budget-s 900] [--timeout-s 30] [--seed 0] [--verbose]

Every case is an ``epplan ...`` command line over files this script writes: a topology, a model
config, routing statistics, a manifest or a run's metrics, each mutated one way (infinities, NaN,
negative, zero, huge, booleans and strings for numbers, duplicate keys, YAML alias bombs, deep
nesting, bytes that are not UTF-8, truncation, directories, FIFOs, device files), or a number
flag out of range. Every case is bad, so the only right outcome is exit code 1 (2 for a usage
error of the flag parser) with one ``error:`` line and no traceback. Each runs in a forked child
(``epplan.cli.main`` with that ``sys.argv``; the parent imported everything once) and is killed
after ``--timeout-s`` (a hang). The unmutated inputs are run first and must succeed, so that a
case's failure is its mutation's doing.

Prints ``N tried, N clean errors, 0 tracebacks, 0 hangs, 0 accepted wrongly`` and exits 1 if any
case ends otherwise (``--verbose`` prints each such case). The run stops starting new cases after
``--budget-s`` seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import select
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml

TOPOLOGY = {
    "name": "fuzz-pair",
    "node_types": {"box": {
        "gpus": 2,
        "gpu": {"model": "H100-SXM5-80GB", "memory_gb": 80, "bf16_tflops": 989, "hbm_gbps": 3350},
        "fabric": {"kind": "nvswitch", "gbps": 450, "latency_us": 1.0},
        "nics": {"gbps": 50, "attach": [0, 1], "pcie_gbps": 64, "latency_us": 2.0},
    }},
    "nodes": [{"prefix": "n", "count": 2, "type": "box"}],
    "fabric": {"kind": "rail_optimized", "nodes_per_su": 2, "spines": 1, "oversubscription": 1.0,
               "latency_us": 1.0},
}
MODEL = {"base": "tiny", "num_layers": 2, "num_experts": 4, "top_k": 2, "d_model": 64, "d_ff": 128,
         "num_heads": 4, "head_dim": 16, "vocab_size": 256, "seq_len": 32, "global_batch": 8,
         "router_aux_loss_coef": 0.01}

# Bad for any positive number; some fields add their own.
BAD_NUMBERS: list[Any] = [float("inf"), float("-inf"), float("nan"), -1, 0, True, False, "fast", [1],
                          {"a": 1}, None, 1e308, 10**30]
BAD_COUNTS: list[Any] = [-1, 0, True, 1.5, "two", float("inf"), float("nan"), [2], 10**9, 10**30]


def _dump_yaml(doc: Any) -> str:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


def _set(doc: dict, path: tuple, value: Any) -> dict:
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def _structural(kind: str) -> list[tuple[str, bytes | str]]:
    """File contents that are bad whatever the format: (label, content); 'DIR', 'FIFO', 'DEVZERO'
    stand for a directory, a named pipe and /dev/zero."""
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
    return [
        ("empty", ""), ("not-utf8", b"name: \xff\xfe\xfa\n"), ("binary", bytes(range(256)) * 4),
        ("truncated", "name: x\nnodes: [\n"), ("a-list", "- 1\n- 2\n"), ("a-scalar", "42\n"),
        ("deep-nesting", "a: " + "[" * 5000 + "]" * 5000 + "\n"), ("deep-flow-map", "a: " + "{b: " * 3000 + "1" + "}" * 3000),
        ("alias-bomb", bomb), ("DIR", ""), ("FIFO", ""), ("DEVZERO", ""), ("json-nan", '{"a": NaN}'),
    ]


def _write(root: Path, name: str, content: bytes | str) -> Path:
    path = root / name
    if content == "" and name.startswith("DIR"):
        path.mkdir()
    elif name.startswith("FIFO"):
        os.mkfifo(path)
    elif name.startswith("DEVZERO"):
        return Path("/dev/zero")
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


class Cases:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.items: list[tuple[str, list[str]]] = []
        self.n = 0

    def file(self, label: str, suffix: str, content: bytes | str) -> str:
        self.n += 1
        special = label.split(":")[-1]
        name = f"{special if special in ('DIR', 'FIFO', 'DEVZERO') else 'f'}{self.n}{suffix}"
        return str(_write(self.root, name, content))

    def add(self, label: str, argv: list[str]) -> None:
        self.items.append((label, argv))


def build_cases(root: Path, good: dict[str, str], rng: random.Random) -> list[tuple[str, list[str]]]:
    c = Cases(root)
    topo_cmds: list[Callable[[str], list[str]]] = [
        lambda f: ["topo", "show", f],
        lambda f: ["estimate", "--topology", f, "--model", "tiny"],
    ]
    # Topology: every numeric field with every bad value, through show and estimate.
    fields = [("node_types", "box", "gpus"), ("node_types", "box", "gpu", "memory_gb"),
              ("node_types", "box", "gpu", "bf16_tflops"), ("node_types", "box", "gpu", "hbm_gbps"),
              ("node_types", "box", "fabric", "gbps"), ("node_types", "box", "nics", "gbps"),
              ("node_types", "box", "nics", "pcie_gbps"), ("fabric", "oversubscription"),
              ("fabric", "spines"), ("fabric", "nodes_per_su")]
    for field in fields:
        for value in BAD_NUMBERS:
            if field[-1] in ("gpus", "spines", "nodes_per_su") and value in (1e308,):
                value = 10**9
            f = c.file("topology", ".yaml", _dump_yaml(_set(TOPOLOGY, field, value)))
            c.add(f"topology {'.'.join(field)}={value!r}", topo_cmds[rng.randrange(2)](f))
    for field in [("node_types", "box", "fabric", "latency_us"), ("node_types", "box", "nics", "latency_us"),
                  ("fabric", "latency_us")]:
        for value in (float("inf"), float("nan"), -1, True, "slow", 1e300):
            f = c.file("topology", ".yaml", _dump_yaml(_set(TOPOLOGY, field, value)))
            c.add(f"topology {'.'.join(field)}={value!r}", topo_cmds[rng.randrange(2)](f))
    for value in BAD_COUNTS:
        f = c.file("topology", ".yaml", _dump_yaml(_set(TOPOLOGY, ("nodes", 0, "count"), value)))
        c.add(f"topology nodes[0].count={value!r}", topo_cmds[rng.randrange(2)](f))
    for value in (float("inf"), 0.5, -2, float("nan")):
        f = c.file("topology", ".yaml", _dump_yaml(_set(TOPOLOGY, ("fabric", "oversubscription"), value)))
        c.add(f"topology oversubscription={value!r} (place)",
              ["place", "--topology", f, "--model", "tiny", "--placement", "contiguous", "--out", str(root / "m.json")])
    dup = _dump_yaml(TOPOLOGY).replace("name: fuzz-pair\n", "name: fuzz-pair\nname: other\n", 1)
    c.add("topology duplicate key", ["topo", "show", c.file("topology", ".yaml", dup)])
    dup = _dump_yaml(TOPOLOGY).replace("    gpus: 2\n", "    gpus: 2\n    gpus: 8\n", 1)
    c.add("topology duplicate gpus", ["estimate", "--topology", c.file("topology", ".yaml", dup), "--model", "tiny"])
    for label, content in _structural("topology"):
        f = c.file(f"topology:{label}", ".yaml", content)
        c.add(f"topology {label}", ["topo", "show", f])
        f = c.file(f"topology:{label}", ".yaml", content)
        c.add(f"topology {label} (validate)", ["topo", "validate", f])

    # Model config files and --set overrides, through estimate.
    est = ["estimate", "--topology", good["topology"]]
    for field in ("num_layers", "num_experts", "top_k", "d_model", "d_ff", "num_heads", "head_dim",
                  "vocab_size", "seq_len", "global_batch"):
        for value in (-1, 0, True, 1.5, "many", float("inf"), float("nan"), [4], 10**9):
            f = c.file("model", ".yaml", _dump_yaml(_set(MODEL, (field,), value)))
            c.add(f"model {field}={value!r}", est + ["--model", f])
    for value in (-1, True, "x", float("inf"), float("nan"), [0.1], 1e300):
        f = c.file("model", ".yaml", _dump_yaml(_set(MODEL, ("router_aux_loss_coef",), value)))
        c.add(f"model router_aux_loss_coef={value!r}", est + ["--model", f])
    for base in (["tiny"], {"a": 1}, "nope", 3, True):
        f = c.file("model", ".yaml", _dump_yaml(_set(MODEL, ("base",), base)))
        c.add(f"model base={base!r}", est + ["--model", f])
    dup = _dump_yaml(MODEL).replace("num_experts: 4\n", "num_experts: 4\nnum_experts: 8\n")
    c.add("model duplicate key", est + ["--model", c.file("model", ".yaml", dup)])
    for label, content in _structural("model"):
        c.add(f"model {label}", est + ["--model", c.file(f"model:{label}", ".yaml", content)])
    for item in ("num_experts=1000000", "num_layers=1000000", "router_aux_loss_coef=.nan", "top_k=true",
                 "nope=1", "num_layers=-1", "d_model=1e9", "global_batch=0", "name=[1]", "num_experts"):
        c.add(f"--set {item}", est + ["--model", "tiny", "--set", item])

    # Routing statistics, through estimate --routing.
    stats = json.loads(Path(good["stats"]).read_text())
    rt = est + ["--model", "tiny", "--routing"]
    for field, values in (("steps", [0, -1, True, 1.5, "x", 1e308, None]),
                          ("tokens_per_rank_per_step", [0, -1, True, "x", None]),
                          ("num_ranks", [0, 3, True]), ("num_experts", [0, 5, True]), ("top_k", [0, 9, True]),
                          ("version", [True, 3, 0, "1"]), ("format", ["other", None, 1])):
        for value in values:
            f = c.file("stats", ".json", json.dumps(_set(stats, (field,), value)))
            c.add(f"stats {field}={value!r}", rt + [f])
    for label, text in (("nan", json.dumps(stats).replace('"steps": 3', '"steps": NaN')),
                        ("infinity", json.dumps(stats).replace('"tokens_per_rank_per_step": 128.0',
                                                               '"tokens_per_rank_per_step": Infinity'))):
        c.add(f"stats {label}", rt + [c.file("stats", ".json", text)])
    counts = stats["counts"]
    for label, value in (("negative", -5), ("1e308", 1e308), ("float", 2.5), ("string", "7"), ("bool", True),
                         ("huge-int", 10**30), ("null", None)):
        bad = copy.deepcopy(counts)
        bad[0][0][0] = value
        c.add(f"stats counts {label}", rt + [c.file("stats", ".json", json.dumps(_set(stats, ("counts",), bad)))])
    for label, value in (("ragged", [[[1, 2], [3]]]), ("flat", [1, 2, 3]), ("deep", [[[[1]]]]), ("empty", [])):
        c.add(f"stats counts {label}", rt + [c.file("stats", ".json", json.dumps(_set(stats, ("counts",), value)))])
    for label, content in _structural("stats"):
        c.add(f"stats {label}", rt + [c.file(f"stats:{label}", ".json", content)])
    # .npz traces
    c.add("npz that is an .npy", rt + [_npy_as_npz(root)])
    c.add("npz bad zip", rt + [c.file("trace", ".npz", b"PK\x03\x04garbage")])
    c.add("npz text", rt + [c.file("trace", ".npz", "not a zip")])
    c.add("npz directory", rt + [c.file("trace:DIR", ".npz", "")])

    # Manifests, through estimate, report and run --print-launch.
    doc = json.loads(Path(good["manifest"]).read_text())
    users: list[Callable[[str], list[str]]] = [
        lambda f: ["estimate", "--topology", good["topology"], "--placement", f],
        lambda f: ["report", f, "--topology", good["topology"]],
        lambda f: ["run", f, "--out", str(root / "run"), "--print-launch", "torchrun", "--nnodes", "2"],
    ]
    mutations: list[tuple[str, Callable[[dict], None]]] = [
        ("world_size 3", lambda d: d.update(world_size=3, ranks={"node": [0, 0, 1], "local_gpu": [0, 1, 0]})),
        ("world_size true", lambda d: d.update(world_size=True)),
        ("world_size 0", lambda d: d.update(world_size=0)),
        ("hash empty", lambda d: d["topology"].update(content_hash="")),
        ("hash other", lambda d: d["topology"].update(content_hash="0" * 64)),
        ("schema_version true", lambda d: d.update(schema_version=True)),
        ("schema_version 2", lambda d: d.update(schema_version=2)),
        ("format", lambda d: d.update(format="other")),
        ("replica 1e20", lambda d: d["placement"]["layers"][0]["experts"][0].update(replicas=[1e20])),
        ("replica -1", lambda d: d["placement"]["layers"][0]["experts"][0].update(replicas=[-1])),
        ("replica true", lambda d: d["placement"]["layers"][0]["experts"][0].update(replicas=[True])),
        ("no replica", lambda d: d["placement"]["layers"][0]["experts"][0].update(replicas=[])),
        ("share 0.5", lambda d: d["placement"]["layers"][0]["experts"][0].update(rows=[[[0, 0.5]]])),
        ("share -1", lambda d: d["placement"]["layers"][0]["experts"][0].update(rows=[[[0, -1.0]]])),
        ("row_of 9", lambda d: d["placement"]["layers"][0]["experts"][0].update(row_of=9)),
        ("experts_per_gpu 0", lambda d: d["problem"].update(experts_per_gpu=0)),
        ("experts_per_gpu true", lambda d: d["problem"].update(experts_per_gpu=True)),
        ("num_experts 5", lambda d: d["placement"].update(num_experts=5)),
        ("node index 7", lambda d: d["ranks"].update(node=[7, 1])),
        ("same GPU twice", lambda d: d["ranks"].update(node=[0, 0], local_gpu=[0, 0])),
        ("model num_layers -1", lambda d: d["model"].update(num_layers=-1)),
        ("model nested", lambda d: d["model"].update(d_model={"x": 1})),
        ("extra key", lambda d: d.update(surprise=1)),
        ("layers missing", lambda d: d["placement"].update(layers=[])),
        ("compute_efficiency 2", lambda d: d["problem"].update(compute_efficiency=2)),
    ]
    for i, (label, mutate) in enumerate(mutations):
        bad = copy.deepcopy(doc)
        mutate(bad)
        f = c.file("manifest", ".json", json.dumps(bad))
        for use in users:
            c.add(f"manifest {label}", use(f))
    text = json.dumps(doc)
    for label, content in [("nan share", text.replace(', 1.0]', ', NaN]', 1)), ("cut", text[: len(text) // 2])] + \
            _structural("manifest"):
        for use in users[:2]:
            c.add(f"manifest {label}", use(c.file(f"manifest:{label}", ".json", content)))

    # Metrics of a run, through report --metrics.
    lines = Path(good["metrics"]).read_text().splitlines()
    start, step = json.loads(lines[0]), json.loads(lines[1])

    def run_dir(records: list[Any] | str | bytes) -> str:
        c.n += 1
        d = root / f"run{c.n}"
        d.mkdir()
        body = records if isinstance(records, (str, bytes)) else "".join(json.dumps(r) + "\n" for r in records)
        (d / "metrics.jsonl").write_bytes(body if isinstance(body, bytes) else body.encode())
        return str(d)

    rep = ["report", good["manifest"], "--topology", good["topology"], "--metrics"]
    for field, values in (("step_time_s", ["fast", -1, 0, True, None, 1e300, [1]]),
                          ("dispatch_bytes", [[[[-5, 0], [0, 0]]] * 2, [[[1e300, 0], [0, 0]]] * 2, [[[1, 2]]], "x",
                                              [[[1.5, 0], [0, 0]]] * 2, [[[10**30, 0], [0, 0]]] * 2]),
                          ("tokens_per_expert", [[[1, -2, 3, 4]] * 2, "x", [[1]]]),
                          ("step", ["one", None])):
        for value in values:
            c.add(f"metrics {field}={str(value)[:30]}", rep + [run_dir([start, _set(step, (field,), value)])])
    for field, value in (("format", "other"), ("version", 2), ("kind", "step"), ("manifest_hash", "0" * 64)):
        c.add(f"metrics start {field}={value!r}", rep + [run_dir([_set(start, (field,), value), step])])
    good_text = Path(good["metrics"]).read_text()
    for label, body in (("cut", good_text[:-20]), ("not-utf8", b"\xff\xfe" + good_text.encode()),
                        ("not-json", "garbage\n" + good_text), ("empty", ""), ("a list", "[1, 2]\n"),
                        ("deep", "[" * 100000 + "\n")):
        c.add(f"metrics {label}", rep + [run_dir(body)])
    c.add("metrics is a file", rep + [good["manifest"]])
    c.add("metrics missing", rep + [str(root / "nope")])

    # Number flags out of range, where they are parsed.
    gen = ["topo", "gen"]
    for args in (["--nodes", "0"], ["--nodes", "-1"], ["--nodes", "1000000000"], ["--nodes", "2", "--spines", "0"],
                 ["--nodes", "2", "--spines", "-1"], ["--nodes", "2", "--oversubscription", "0.5"],
                 ["--nodes", "2", "--oversubscription", "inf"], ["--nodes", "2", "--oversubscription", "nan"],
                 ["--nodes", "2", "--nodes-per-su", "0"], ["--nodes", "4", "--fabric", "three_tier", "--cores", "0"],
                 ["--nodes", "2", "--node-type", "nope"], ["--nodes", "2", "--fabric", "nope"], ["--nodes", "x"],
                 ["--nodes", "2", "--out", str(root)]):
        c.add(f"topo gen {' '.join(args)}", gen + args)
    place = ["place", "--topology", good["topology"], "--model", "tiny", "--out", str(root / "p.json")]
    for args in (["--time-limit", "-1"], ["--time-limit", "0"], ["--time-limit", "nan"], ["--time-limit", "inf"],
                 ["--gap", "-1"], ["--gap", "nan"], ["--gap", "2"], ["--experts-per-gpu", "0"],
                 ["--experts-per-gpu", "-3"], ["--compute-efficiency", "0"], ["--compute-efficiency", "1.5"],
                 ["--compute-efficiency", "nan"], ["--achievable-tflops", "0"], ["--achievable-tflops", "inf"], ["--achievable-tflops", "-1"],
                 ["--micro-batches", "0"], ["--workers", "0"], ["--workers", "-1"], ["--seed", "-1"],
                 ["--placement", "nope"], ["--solver", "nope"], ["--routing", "zipf:-1"], ["--routing", "zipf:nan"],
                 ["--routing", "nope"], ["--set", "num_experts=1000000", "--time-limit", "5"]):
        c.add(f"place {' '.join(args)}", place + args)
    for args in (["--compute-efficiency", "0"], ["--achievable-tflops", "nan"], ["--micro-batches", "-1"], ["--seed", "-5"],
                 ["--experts-per-gpu", "0"], ["--placement", "nope"], ["--set", "num_layers=1000000"]):
        c.add(f"estimate {' '.join(args)}", est + ["--model", "tiny"] + args)
    launch = ["run", good["manifest"], "--out", str(root / "r"), "--print-launch", "torchrun", "--nnodes", "2"]
    for args in (["--seed", "-1"], ["--lr", "-1"], ["--lr", "nan"], ["--lr", "inf"], ["--lr", "0"],
                 ["--capacity-factor", "0"], ["--capacity-factor", "nan"], ["--max-restarts", "-1"],
                 ["--grad-clip", "-1"], ["--grad-clip", "nan"], ["--warmup-steps", "-5"], ["--num-chunks", "100000"],
                 ["--num-chunks", "0"], ["--min-lr-ratio", "2"], ["--weight-decay", "-1"],
                 ["--keep-checkpoints", "-1"], ["--steps", "0"], ["--global-batch", "0"], ["--global-batch", "7"],
                 ["--peak-tflops", "0"], ["--micro-batches", "0"], ["--ckpt-every", "0"], ["--overlap", "maybe"],
                 ["--device", "tpu"], ["--allow-change", "lr", "--resume"], ["--allow-change", "seed"],
                 ["--node-rank", "5"], ["--out", good["manifest"]], ["--print-launch", "mpi"]):
        c.add(f"run {' '.join(args)}", launch + args)
    for args in (["--top", "0"], ["--top", "-1"], ["--layer", "-1"], ["--layer", "99"]):
        c.add(f"report {' '.join(args)}", ["report", good["manifest"], "--topology", good["topology"]] + args)
    return c.items


def _npy_as_npz(root: Path) -> str:
    import numpy as np

    path = root / "trace_npy.npz"
    with open(path, "wb") as fh:
        np.save(fh, np.ones((2, 4, 4)))
    return str(path)


def make_good(root: Path) -> dict[str, str]:
    """Valid inputs: a topology, routing statistics, a manifest planned on them, a run's metrics."""
    import numpy as np

    from epplan.workload.config import PRESETS
    from epplan.workload.routing_stats import write_routing_stats

    good = {"topology": str(root / "good.yaml"), "stats": str(root / "stats.json"),
            "manifest": str(root / "good.json"), "model": str(root / "model.yaml")}
    Path(good["topology"]).write_text(_dump_yaml(TOPOLOGY))
    Path(good["model"]).write_text(_dump_yaml(MODEL))
    config = PRESETS["tiny"]
    counts = np.random.default_rng(0).integers(0, 100, size=(config.num_moe_layers, 4, config.num_experts))
    write_routing_stats(Path(good["stats"]), counts, steps=3, model="tiny", top_k=config.top_k,
                        tokens_per_rank_per_step=128.0, manifest_hash=None)
    # A run directory's metrics for the manifest (the shapes report checks).
    return good


def _metrics(root: Path, manifest: str) -> str:
    from epplan.manifest import load_manifest

    m = load_manifest(manifest)
    L, G, E = m.config.num_moe_layers, m.world_size, m.config.num_experts
    start = {"format": "epplan.metrics", "version": 1, "kind": "start", "step": 0, "manifest_hash": m.hash,
             "tokens_per_step": m.config.tokens_per_step, "device": "cpu"}
    a2a = [[[1000 * (s + 1) + t for t in range(G)] for s in range(G)] for _ in range(L)]
    step = {"kind": "step", "step": 1, "step_time_s": 0.5, "tokens_per_expert": [[64] * E for _ in range(L)],
            "dispatch_bytes": a2a, "combine_bytes": [[list(r) for r in zip(*layer)] for layer in a2a]}
    end = {"kind": "end", "step": 1, "routing_stats": None, "checkpoint": None}
    d = root / "goodrun"
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (start, step, end)))
    return str(d / "metrics.jsonl")


def run_case(argv: list[str], timeout_s: float) -> tuple[int | None, str]:
    """Run ``epplan ARGV`` in a forked child; (exit code or None on a hang, stdout + stderr)."""
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the CLI as its console script runs it
        os.close(out_r)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        os.setsid()
        code = 0
        try:
            from epplan.cli import main

            sys.argv = ["epplan", *argv]
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    os.close(out_w)
    chunks, deadline = [], time.monotonic() + timeout_s
    status = None
    while True:
        ready, _, _ = select.select([out_r], [], [], max(0.0, min(0.5, deadline - time.monotonic())))
        if ready:
            data = os.read(out_r, 65536)
            if data:
                chunks.append(data)
                continue
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(out_r)
            return None, b"".join(chunks).decode("utf-8", "replace")
    while True:
        data = os.read(out_r, 65536)
        if not data:
            break
        chunks.append(data)
    os.close(out_r)
    code = os.waitstatus_to_exitcode(status)
    return code, b"".join(chunks).decode("utf-8", "replace")


def classify(argv: list[str], code: int | None, output: str) -> str:
    if code is None:
        return "hang"
    if "Traceback" in output or code not in (0, 1, 2):
        return "traceback"
    if code == 0:
        return "accepted"
    if argv[:2] == ["topo", "validate"]:  # lists every problem of each file under its name, by design
        return "clean" if code == 1 and "✗" in output else "traceback"
    errors = [line for line in output.splitlines() if "error:" in line.lower() or line.startswith("╭─ Error")]
    if code == 2 and "Error" in output:
        return "clean"  # the flag parser's usage error: a box, exit 2, no traceback
    return "clean" if len(errors) == 1 else "traceback"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=900.0, help="stop starting cases after this")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="a case running longer is a hang")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("COLUMNS", "200")
    import epplan.cli  # noqa: F401  -- imported once, before the children fork
    import epplan.cli.run  # noqa: F401
    import torch  # noqa: F401  -- what 'epplan run' imports

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="epplan-fuzz-") as tmp:
        root = Path(tmp)
        good = make_good(root)
        for label, argv in (("good place", ["place", "--topology", good["topology"], "--model", "tiny",
                                            "--placement", "contiguous", "--out", good["manifest"]]),):
            code, output = run_case(argv, 120)
            if code != 0:
                print(f"the unmutated inputs fail ({label}): {output}")
                return 1
        good["metrics"] = _metrics(root, good["manifest"])
        sanity = [["topo", "show", good["topology"]], ["estimate", "--topology", good["topology"], "--model", good["model"]],
                  ["estimate", "--topology", good["topology"], "--model", "tiny", "--routing", good["stats"]],
                  ["estimate", "--topology", good["topology"], "--placement", good["manifest"]],
                  ["report", good["manifest"], "--topology", good["topology"], "--metrics", str(Path(good["metrics"]).parent)],
                  ["run", good["manifest"], "--out", str(root / "r"), "--print-launch", "torchrun", "--nnodes", "2"]]
        for argv in sanity:
            code, output = run_case(argv, 120)
            if code != 0:
                print(f"the unmutated inputs fail (epplan {' '.join(argv)}): {output}")
                return 1
        cases = build_cases(root, good, random.Random(args.seed))
        counts = {"clean": 0, "traceback": 0, "hang": 0, "accepted": 0}
        tried = 0
        for label, argv in cases:
            if time.monotonic() - started > args.budget_s:
                break
            code, output = run_case(argv, args.timeout_s)
            outcome = classify(argv, code, output)
            counts[outcome] += 1
            tried += 1
            if outcome != "clean" and args.verbose:
                tail = "\n    ".join(output.strip().splitlines()[-6:])
                print(f"{outcome.upper()}: {label}: epplan {' '.join(argv)}\n    {tail}", flush=True)
    print(f"{tried} tried, {counts['clean']} clean errors, {counts['traceback']} tracebacks, {counts['hang']} hangs, "
          f"{counts['accepted']} accepted wrongly ({time.monotonic() - started:.0f} s)")
    return 0 if counts["clean"] == tried and tried else 1


if __name__ == "__main__":
    sys.exit(main())

"""Measured vs predicted: a run's recorded all-to-all bytes against the cost function.

The central check: scoring the placement on the run's *own* routing statistics (the replay)
reproduces the bytes the runtime recorded, pair by pair exactly and link by link up to the
float32 storage of ``Cost``. Here on metrics files written in the runtime's format
(``epplan.metrics`` v1, splitting each (source, expert) count over the replicas as the runtime
does), where the error cases are also made; tests/test_cli_report.py checks the same on a real
4-process gloo run of the training loop.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from epplan.cost import evaluate
from epplan.placement.problem import PlacementProblem
from epplan.placement.types import LayerPlacement, Placement
from epplan.report import PlanView, ReportError, build_report, read_run
from epplan.report.measured import compare_measured, measured_link_bytes
from epplan.topology import load_topology
from epplan.workload import make_traffic
from epplan.workload.config import PRESETS
from epplan.workload.routing_stats import write_routing_stats

# Two servers of two GPUs, one NIC each on GPU 0: GPU 1's inter-node traffic crosses NVLink to
# GPU 0 first, so the path fractions are not trivial.
MINI_TOPOLOGY = """\
name: mini-2x2
node_types:
  mini:
    gpus: 2
    gpu: {model: H100-SXM5-80GB, memory_gb: 80, bf16_tflops: 989, hbm_gbps: 3350}
    fabric: {kind: nvswitch, gbps: 450, latency_us: 1.0}
    nics: {gbps: 50, attach: [0], pcie_gbps: 64, latency_us: 2.0}
nodes:
  - {prefix: n, count: 2, type: mini}
fabric:
  kind: switch
"""
G = 4
CONFIG = PRESETS["tiny"]  # 2 MoE layers, 4 experts, top-2, d_model 32, bf16
L, E = CONFIG.num_moe_layers, CONFIG.num_experts
ROW_BYTES = CONFIG.d_model * 4  # the runtime's activations are fp32 on CPU


def one_per_gpu() -> Placement:
    layer = LayerPlacement([np.array([e]) for e in range(E)], [np.ones((G, 1)) for _ in range(E)])
    return Placement(G, E, [layer] * L, method="one-per-gpu")


def replicated(shares: tuple[float, float] = (0.5, 0.5)) -> Placement:
    """Experts 0 and 1 on ranks {0, 2} and {1, 3}; 2 and 3 share ... no: 4 experts, 8 slots."""
    reps = [np.array([0, 2]), np.array([1, 3]), np.array([0, 1]), np.array([2, 3])]
    split = [np.tile(np.array(shares), (G, 1)) for _ in reps]
    return Placement(G, E, [LayerPlacement(reps, split)] * L, method="replicated")


def plan_view(topo, placement: Placement, manifest_hash: str) -> PlanView:
    problem = PlacementProblem(topo, CONFIG, make_traffic("uniform", CONFIG, G), experts_per_gpu=2)
    return PlanView("test", placement, problem, evaluate(placement, problem), manifest_hash)


@pytest.fixture(scope="module")
def topo(tmp_path_factory):
    path = tmp_path_factory.mktemp("topo") / "mini.yaml"
    path.write_text(MINI_TOPOLOGY)
    return load_topology(path)


# ------------------------------------------------------------------------------ metrics files written here

def _largest_remainder(n: int, shares: np.ndarray) -> np.ndarray:
    exact = n * shares
    out = np.floor(exact).astype(np.int64)
    out[np.argsort(-(exact - out), kind="stable")[:n - out.sum()]] += 1
    return out


def write_run(out: Path, placement: Placement, counts: np.ndarray, manifest_hash: str, *,
              routing_hash: str | None = None, end: bool = True, matrix_every: int = 1) -> Path:
    """A run directory as ``epplan run`` leaves it, for per-step routing ``counts`` [N, L, G, E]:
    forward dispatch bytes per (source, destination) as the runtime splits and records them, on
    every ``matrix_every``-th step and the last (as a run of many ranks records them)."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [{"format": "epplan.metrics", "version": 1, "kind": "start", "step": 0, "manifest_hash": manifest_hash,
              "num_ranks": G, "device": "cpu", "tokens_per_step": CONFIG.tokens_per_step}]
    for n, step in enumerate(counts):
        dispatch = np.zeros((L, G, G), dtype=np.int64)
        for li in range(L):
            lp = placement.layers[li]
            for s in range(G):
                for e in range(E):
                    rows = _largest_remainder(int(step[li, s, e]), lp.split[e][s])
                    dispatch[li, s, lp.replicas[e]] += rows * ROW_BYTES
        record = {"kind": "step", "step": n + 1, "loss": 5.0, "step_time_s": 0.1 + 0.01 * n,
                  "tokens_per_expert": step.sum(axis=1).tolist()}
        if (n + 1) % matrix_every == 0 or n + 1 == len(counts):
            record.update(dispatch_bytes=dispatch.tolist(), combine_bytes=dispatch.transpose(0, 2, 1).tolist())
        lines.append(record)
    if end:
        lines.append({"kind": "end", "step": len(counts), "routing_stats": None})
    (out / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    write_routing_stats(out / "routing_stats.json", counts.sum(axis=0), steps=len(counts), model=CONFIG.name,
                        top_k=2, tokens_per_rank_per_step=64.0, manifest_hash=routing_hash or manifest_hash)
    return out


def _counts(seed: int, steps: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 60, size=(steps, L, G, E))


@pytest.mark.parametrize("placement, exact", [(one_per_gpu(), True), (replicated(), False),
                                              (replicated((0.25, 0.75)), False)])
def test_replay_matches_written_metrics(tmp_path, topo, placement, exact):
    counts = _counts(1)
    if placement.method == "replicated" and exact is False and placement.layers[0].split[0][0, 0] == 0.5:
        even = write_run(tmp_path / "even", placement, 2 * counts, "h")  # even counts split evenly: exact
        run = read_run(even, manifest_hash="h", num_layers=L, num_ranks=G)
        m = compare_measured(plan_view(topo, placement, "h").cost, placement, plan_view(topo, placement, "h").problem,
                             run)
        assert m.replay_pair_error_bytes == 0.0
    run_dir = write_run(tmp_path / "run", placement, counts, "h")
    plan = plan_view(topo, placement, "h")
    run = read_run(run_dir, manifest_hash="h", num_layers=L, num_ranks=G)
    m = compare_measured(plan.cost, plan.placement, plan.problem, run)
    if exact:
        assert m.replay_pair_error_bytes == 0.0
        np.testing.assert_allclose(m.replayed["dispatch"], m.measured["dispatch"], rtol=1e-6)
    else:  # rounding per (source, expert, step): within a row per step on average
        assert 0 < m.replay_pair_error_bytes <= E * ROW_BYTES
        np.testing.assert_allclose(m.replayed["dispatch"], m.measured["dispatch"], rtol=0.05)
    # The prediction (uniform routing, the model's volume) in the runtime's bytes per assignment.
    scale = ROW_BYTES / (CONFIG.d_model * CONFIG.dtype_bytes)
    np.testing.assert_allclose(m.predicted["dispatch"], scale * 2 * plan.cost.dispatch_fwd_bytes.sum(axis=0),
                               rtol=1e-6)
    assert m.measured_step_time_s == pytest.approx(0.12)  # median of steps 2..4


def test_layer_view_and_report_json(tmp_path, topo):
    placement = one_per_gpu()
    run_dir = write_run(tmp_path / "run", placement, _counts(2), "h")
    plan = plan_view(topo, placement, "h")
    run = read_run(run_dir, manifest_hash="h", num_layers=L, num_ranks=G)
    whole = measured_link_bytes(topo, run.dispatch_bytes.mean(axis=0), run.combine_bytes.mean(axis=0))
    parts = [measured_link_bytes(topo, run.dispatch_bytes.mean(axis=0), run.combine_bytes.mean(axis=0), li)
             for li in range(L)]
    np.testing.assert_allclose(sum(p["dispatch"] for p in parts), whole["dispatch"], rtol=1e-12)
    data = build_report(plan, run=run, layer=1, top=3).to_dict()["measured"]
    assert data["steps"] == 4 and data["bytes_scale"] == 2.0 and data["replay"]["max_pair_error_bytes"] == 0.0
    assert len(data["links"]) == 3
    row = data["links"][0]
    assert row["measured_bytes"] == pytest.approx(parts[1]["dispatch"][row["index"]] + parts[1]["combine"][row["index"]])
    assert row["ratio"] == pytest.approx(row["measured_bytes"] / row["predicted_bytes"])


def test_manifest_switch_keeps_this_manifests_steps(tmp_path, topo):
    placement = one_per_gpu()
    a = write_run(tmp_path / "a", placement, _counts(3, 2), "old")
    b = write_run(tmp_path / "b", placement, _counts(4, 3), "new")
    text = (a / "metrics.jsonl").read_text().replace('{"kind": "end"', '{"kind": "checkpoint"')
    (b / "metrics.jsonl").write_text(text + (b / "metrics.jsonl").read_text())
    run = read_run(b, manifest_hash="new", num_layers=L, num_ranks=G)
    assert run.num_steps == 3 and any("switched manifests" in n for n in run.notes)


def test_matrices_recorded_on_some_steps(tmp_path, topo):
    """Runs of many ranks record the all-to-all matrices every few steps: the measurement is the
    mean over those steps, and the report says so."""
    placement = one_per_gpu()
    counts = _counts(6, 5)
    run_dir = write_run(tmp_path / "run", placement, counts, "h", matrix_every=2)  # steps 2, 4, 5
    run = read_run(run_dir, manifest_hash="h", num_layers=L, num_ranks=G)
    assert run.steps.tolist() == [2, 4, 5] and run.step_time_s.size == 5
    assert any("recorded on 3 of the 5 steps" in n for n in run.notes)
    full = read_run(write_run(tmp_path / "full", placement, counts, "h"), manifest_hash="h", num_layers=L,
                    num_ranks=G)
    np.testing.assert_array_equal(run.dispatch_bytes, full.dispatch_bytes[[1, 3, 4]])
    assert run.bytes_per_assignment == full.bytes_per_assignment  # the same steps' assignments
    plan = plan_view(topo, placement, "h")
    m = compare_measured(plan.cost, placement, plan.problem, run)
    assert m.replay_steps == 3 and any("the metrics hold 3 of them" in n for n in m.notes)


# ------------------------------------------------------------------------------ bad input

@pytest.fixture
def good_run(tmp_path) -> Path:
    return write_run(tmp_path / "run", one_per_gpu(), _counts(5, 2), "h")


def _read(run_dir: Path, manifest_hash: str = "h", ranks: int = G):
    return read_run(run_dir, manifest_hash=manifest_hash, num_layers=L, num_ranks=ranks)


def test_truncated_metrics_file(good_run):
    path = good_run / "metrics.jsonl"
    text = path.read_text()
    path.write_text(text[:len(text) - 40])
    with pytest.raises(ReportError, match=r"metrics.jsonl: line 4 is cut short: the file is truncated"):
        _read(good_run)
    lines = text.splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][:50] + "\n" + "".join(lines[2:]))
    with pytest.raises(ReportError, match="line 2 is not JSON: the file is corrupt"):
        _read(good_run)
    path.write_text(text.rstrip("\n"))
    with pytest.raises(ReportError, match="no line end: the file is truncated"):
        _read(good_run)


def test_metrics_of_another_manifest(good_run, tmp_path):
    with pytest.raises(ReportError, match=r"recorded by a run of manifest h, not of this manifest \(other\)"):
        _read(good_run, "other")
    odd = write_run(tmp_path / "odd", one_per_gpu(), _counts(5, 2), "h", routing_hash="zzz")
    with pytest.raises(ReportError, match=r"routing_stats.json: recorded by a run of manifest zzz"):
        _read(odd)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('"version": 1', '"version": 7', 1), "version 7; this epplan reads 'epplan.metrics' version 1"),
    (lambda t: t.split("\n", 1)[1], "does not begin with a 'start' record"),
    (lambda t: t.replace('"dispatch_bytes"', '"dispatch"'), "step record lacks dispatch_bytes"),
    (lambda t: "\n".join(json.dumps({k: v for k, v in json.loads(x).items() if k[-6:] != "_bytes"}) if x else x
                         for x in t.split("\n")),
     "no step of this manifest recorded all-to-all bytes"),
    (lambda t: "\n".join(x for x in t.split("\n") if '"step"' not in x or '"start"' in x) + "\n",
     "no step records of this manifest"),
])
def test_malformed_metrics(good_run, edit, message):
    path = good_run / "metrics.jsonl"
    path.write_text(edit(path.read_text()))
    with pytest.raises(ReportError, match=message):
        _read(good_run)


def test_metrics_shape_and_missing(good_run, tmp_path):
    with pytest.raises(ReportError, match=r"dispatch_bytes has shape \[2, 4, 4\], the manifest needs \[2, 8, 8\]"):
        _read(good_run, ranks=8)
    with pytest.raises(ReportError, match="not a directory"):
        _read(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no metrics.jsonl in it"):
        _read(tmp_path / "empty")
    (good_run / "routing_stats.json").unlink()
    run = _read(good_run)
    assert run.routing is None and any("no replay" in n for n in run.notes)

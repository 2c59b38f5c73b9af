"""``epplan report --metrics`` on a real run: the training loop of ``epplan run`` (same ``Job``
from the manifest, same ``Trainer``) in 4 gloo CPU processes, 3 steps of the tiny model.

The central check of the measured half: scoring the manifest's placement on the run's own routing
statistics reproduces the all-to-all bytes the runtime recorded, exactly per (layer, source,
destination) and per link up to the float32 storage of ``Cost``; for a run with hierarchical
dispatch, the run's measured (token, node) and (token, GPU) rows put on the links do.

This module imports little at the top on purpose: each training process imports it (to find
``_train``), and the report's imports (plotting, the CLI) would cost seconds per process.
"""

from __future__ import annotations

import json

import pytest

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


def _train(rank: int, world_size: int, job, out: str, dispatch: str | None = None, recompute: str = "none",
           **kw) -> None:
    import torch

    from epplan.train.options import TrainOptions
    from epplan.train.trainer import Trainer

    opts = TrainOptions.of(manifest="m.json", out=out, steps=3, ckpt_every=100, keep_checkpoints=1,
                           dispatch=dispatch, recompute=recompute, **kw)
    Trainer(job, opts, rank, torch.device("cpu")).run(resume=False, show_progress=False)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """(manifest, run directory): tiny (4 experts, one per rank, contiguous) on 2 x 2 GPUs whose
    inter-node traffic crosses NVLink to the NIC's GPU first."""
    pytest.importorskip("epplan.train.trainer")
    from epplan.cost.calibration import resolve_calibrations
    from epplan.manifest import build_manifest, load_manifest, write_manifest
    from epplan.placement.baselines import contiguous
    from epplan.placement.problem import PlacementProblem
    from epplan.runtime.testing import run_distributed
    from epplan.topology import load_topology
    from epplan.train.job import job_from_manifest
    from epplan.workload import make_traffic
    from epplan.workload.config import PRESETS

    folder = tmp_path_factory.mktemp("real")
    (folder / "mini.yaml").write_text(MINI_TOPOLOGY)
    topo = load_topology(folder / "mini.yaml")
    config = PRESETS["tiny"]
    cals, _ = resolve_calibrations(topo)  # the H100 table, as 'epplan place' does by default
    problem = PlacementProblem(topo, config, make_traffic("uniform", config, topo.num_gpus), calibration=cals)
    manifest = folder / "m.json"
    write_manifest(manifest, build_manifest(contiguous(problem), problem, routing_spec="uniform"))
    run_dir = folder / "run"
    run_distributed(_train, 4, job_from_manifest(load_manifest(manifest)), str(run_dir))
    return manifest, run_dir


def _invoke(*args):
    from typer.testing import CliRunner

    from epplan.cli import app

    return CliRunner().invoke(app, ["report", *map(str, args)], env={"COLUMNS": "160"})


def test_replay_of_the_runs_routing_matches_the_measured_bytes(real_run):
    manifest, run_dir = real_run
    result = _invoke(manifest, "--metrics", run_dir, "--json", "--all")
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)["measured"]
    assert m["steps"] == 3 and m["device"] == "cpu" and m["finished"]
    # The runtime sends fp32 activations (d_model 32 x 4 bytes); the model dtype bf16 gives 64.
    assert m["runtime_bytes_per_assignment"] == 128 and m["model_bytes_per_assignment"] == 64
    assert m["bytes_scale"] == 2.0
    # Pair level, to the byte; link level, float32.
    assert m["replay"]["steps"] == 3 and m["replay"]["max_pair_error_bytes"] == 0.0
    assert m["replay"]["max_link_relative_error"] < 1e-6
    assert len(m["links"]) == 16
    for row in m["links"]:
        assert row["replayed_bytes"] == pytest.approx(row["measured_bytes"], rel=1e-6, abs=1e-3)
        if row["predicted_bytes"]:
            assert row["ratio"] == pytest.approx(row["measured_bytes"] / row["predicted_bytes"])
    # Uniform routing predicted, the run's routing measured: same volume, close loads.
    assert m["totals_bytes"]["measured"] == pytest.approx(m["totals_bytes"]["predicted"], rel=0.2)
    assert m["step_time_s"]["measured_median"] > 0


def test_memory_predicted_against_the_allocator_peak(real_run, tmp_path):
    """A GPU run's step records carry the allocator's peak (``peak_memory_gb``): the report puts it
    beside the memory the model predicts for rank 0; a CPU run has none; a bad value is named."""
    import shutil

    manifest, run_dir = real_run
    m = json.loads(_invoke(manifest, "--metrics", run_dir, "--json").stdout)["measured"]
    assert m["memory_gb"]["rank"] == 0 and m["memory_gb"]["measured_peak"] is None
    assert m["memory_gb"]["predicted"] > 0
    peaked = tmp_path / "peaked"
    shutil.copytree(run_dir, peaked)
    lines = (peaked / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for rec in records:
        if rec["kind"] == "step":
            rec["peak_memory_gb"] = 0.5 + rec["step"]
    (peaked / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = _invoke(manifest, "--metrics", peaked, "--json")
    assert result.exit_code == 0, result.output
    memory = json.loads(result.stdout)["measured"]["memory_gb"]
    assert memory["measured_peak"] == 3.5 and memory["predicted"] == m["memory_gb"]["predicted"]
    text = _invoke(manifest, "--metrics", peaked).stdout
    assert "the allocator's peak 3.5 GB" in " ".join(text.split())
    step = next(r for r in reversed(records) if r["kind"] == "step")
    step["peak_memory_gb"] = "lots"
    (peaked / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    bad = _invoke(manifest, "--metrics", peaked)
    assert bad.exit_code != 0 and "peak_memory_gb is 'lots'" in bad.output and "Traceback" not in bad.output


def test_measured_links_are_the_recorded_matrices_through_the_path_model(real_run):
    import numpy as np

    from epplan.manifest import load_manifest
    from epplan.report import read_run
    from epplan.topology import load_topology

    manifest, run_dir = real_run
    topo = load_topology(manifest.parent / "mini.yaml")
    run = read_run(run_dir, manifest_hash=load_manifest(manifest).hash, num_layers=2, num_ranks=4)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert run.num_steps == len(steps) == 3
    dispatch = np.mean([np.array(r["dispatch_bytes"], dtype=float).sum(axis=0) for r in steps], axis=0)
    data = json.loads(_invoke(manifest, "--metrics", run_dir, "--json", "--all").stdout)["measured"]
    loads = 2 * topo.link_loads(dispatch)
    for row in data["links"]:
        assert row["measured_dispatch_bytes"] == pytest.approx(loads[row["index"]], rel=1e-12)
    # combine is dispatch transposed: results return to where their rows came from
    np.testing.assert_array_equal(run.combine_bytes, run.dispatch_bytes.transpose(0, 1, 3, 2))


def test_table_and_bad_metrics(real_run, tmp_path):
    manifest, run_dir = real_run
    table = _invoke(manifest, "--metrics", run_dir)
    assert table.exit_code == 0, table.output
    assert "measured vs predicted all-to-all" in table.stdout and "replay of the run's routing" in table.stdout

    doc = json.loads(manifest.read_text())
    doc["placement"]["method"] = "edited"  # another manifest: another hash
    other = tmp_path / "other.json"
    other.write_text(json.dumps(doc))
    wrong = _invoke(other, "--metrics", run_dir)
    assert wrong.exit_code == 1
    assert wrong.stderr.count("\n") == 1 and "recorded by a run of manifest" in wrong.stderr

    cut = tmp_path / "cut"
    cut.mkdir()
    text = (run_dir / "metrics.jsonl").read_text()
    middle = text.rindex("\n", 0, len(text) // 2) + 10  # inside a record, whatever the lengths
    (cut / "metrics.jsonl").write_text(text[:middle])
    truncated = _invoke(manifest, "--metrics", cut)
    assert truncated.exit_code == 1
    assert truncated.stderr.count("\n") == 1 and "the file is truncated" in truncated.stderr


def test_component_timings_of_the_run(real_run, tmp_path):
    """The run writes per-step component timings; on CPU the report compares no times, and a
    run on the topology's GPUs is compared per component against the calibrated prediction."""
    manifest, run_dir = real_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timing = [r for r in records if r["kind"] == "timing"]
    assert [r["step"] for r in timing] == [1, 2, 3]
    for r in timing:
        parts = r["components_s"]
        assert {"attention", "moe", "lm_head_loss", "optimizer", "step"} <= set(parts)
        assert all(v >= 0 for k, v in parts.items() if k != "other")
        assert sum(v for k, v in parts.items() if k not in ("step", "other", "exchange")) <= parts["step"]
    cpu = json.loads(_invoke(manifest, "--metrics", run_dir, "--json").stdout)["measured"]["components"]
    assert cpu["comparable"] is False and "for the topology's GPUs (H100-SXM5-80GB)" in cpu["note"]
    assert cpu["components"]["step"]["predicted_s"] is None

    gpu_run = tmp_path / "gpu"
    gpu_run.mkdir()
    for r in records:
        if r["kind"] == "start":
            r["device"] = "cuda"
    (gpu_run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = _invoke(manifest, "--metrics", gpu_run, "--json")
    assert result.exit_code == 0, result.output
    comp = json.loads(result.stdout)["measured"]["components"]
    assert comp["comparable"] is True and "shipped:h100" in comp["note"]
    rows = comp["components"]
    assert rows["step"]["predicted_s"] > rows["attention"]["predicted_s"] > 0
    assert rows["moe"]["predicted_s"] > 0 and rows["optimizer"]["predicted_s"] > 0
    table = _invoke(manifest, "--metrics", gpu_run)
    assert "time per step by component, predicted vs measured" in table.stdout


def test_plot_draws_the_runs_measured_bytes(real_run, tmp_path):
    from epplan.report import build_report, read_run
    from epplan.report.manifests import open_plan
    from epplan.report.plot import plotted_series, write_plot

    manifest, run_dir = real_run
    opened = open_plan(manifest, None)
    run = read_run(run_dir, manifest_hash=opened.hash, num_layers=2, num_ranks=4)
    report = build_report(opened.plan, top=6, run=run)
    links, series, refused = plotted_series(report)
    capacity = opened.plan.cost.capacity_bytes_per_s
    expected = report.measured.measured_total[links] / capacity[links] / report.links.period_s
    assert refused == [] and list(series)[1] == "measured (--metrics)"
    assert series["measured (--metrics)"] == pytest.approx(expected) and expected.max() > 0
    write_plot(report, tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def hierarchical_run(tmp_path_factory):
    """(manifest, run directory): tiny on 2 x 2 GPUs with hierarchical dispatch (the manifest's),
    overlapped in chunks (CPU), expert 0 replicated across the nodes with uneven per-source
    splits, experts 2 and 3 on the second node."""
    import numpy as np

    from epplan.cost.calibration import resolve_calibrations
    from epplan.manifest import build_manifest, load_manifest, write_manifest
    from epplan.placement.problem import PlacementProblem
    from epplan.placement.types import Placement
    from epplan.runtime.testing import layer_placement, run_distributed
    from epplan.topology import load_topology
    from epplan.train.job import job_from_manifest
    from epplan.workload import make_traffic
    from epplan.workload.config import PRESETS

    folder = tmp_path_factory.mktemp("hier")
    (folder / "mini.yaml").write_text(MINI_TOPOLOGY)
    topo = load_topology(folder / "mini.yaml")
    config = PRESETS["tiny"]
    cals, _ = resolve_calibrations(topo)
    problem = PlacementProblem(topo, config, make_traffic("uniform", config, topo.num_gpus), calibration=cals,
                               experts_per_gpu=2, dispatch="hierarchical")
    split = np.array([[0.7, 0.3], [0.45, 0.55], [0.2, 0.8], [0.0, 1.0]])
    layer = layer_placement([[0, 3], [1], [2], [3]], {0: split}, 4)
    manifest = folder / "m.json"
    write_manifest(manifest, build_manifest(Placement(4, 4, [layer, layer], method="hand"), problem,
                                            routing_spec="uniform"))
    run_dir = folder / "run"
    run_distributed(_train, 4, job_from_manifest(load_manifest(manifest)), str(run_dir))
    return manifest, run_dir


def test_replay_of_a_hierarchical_run_matches_the_measured_bytes(hierarchical_run):
    from epplan.workload.routing_stats import read_routing_stats

    manifest, run_dir = hierarchical_run
    start = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert start["dispatch"] == "hierarchical" and start["overlap"] is True
    stats = read_routing_stats(run_dir / "routing_stats.json")
    assert stats.dispatch == "hierarchical" and stats.steps == 3
    assert stats.nodes == (("n0", (0, 1)), ("n1", (2, 3)))
    # Every token has 2 experts on at most 2 nodes; fewer node rows than assignments when both are on one.
    assert (stats.node_rows.sum(axis=2) < stats.counts.sum(axis=2)).all()
    result = _invoke(manifest, "--metrics", run_dir, "--json", "--all")
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)["measured"]
    assert m["dispatch"] == "hierarchical" and m["runtime_bytes_per_assignment"] == 128  # 32 x fp32
    # The rows the runtime sent, on the links: to the byte, per pair and per link.
    assert m["replay"]["steps"] == 3 and m["replay"]["max_pair_error_bytes"] == 0.0
    assert m["replay"]["max_link_relative_error"] == 0.0 and len(m["links"]) == 16
    for row in m["links"]:
        assert row["replayed_bytes"] == row["measured_bytes"], row
    assert m["totals_bytes"]["measured"] > 0 and m["totals_bytes"]["predicted"] > 0
    table = _invoke(manifest, "--metrics", run_dir)
    assert table.exit_code == 0 and "replay of the run's routing" in table.stdout


def test_a_hierarchical_run_of_a_flat_plan_is_predicted_as_hierarchical(hierarchical_run):
    """A plan scored for flat dispatch but run hierarchically: the prediction beside the
    measurement is the plan re-scored for hierarchical dispatch, with a note."""
    import dataclasses

    from epplan.cost import evaluate
    from epplan.report import read_run
    from epplan.report.manifests import open_plan
    from epplan.report.measured import compare_measured

    manifest, run_dir = hierarchical_run
    plan = open_plan(manifest).plan
    run = read_run(run_dir, manifest_hash=open_plan(manifest).hash, num_layers=2, num_ranks=4)
    assert run.dispatch == "hierarchical" and run.row_bytes == 128
    flat = dataclasses.replace(plan.problem, dispatch="flat")
    as_flat = compare_measured(evaluate(plan.placement, flat), plan.placement, flat, run)
    as_planned = compare_measured(plan.cost, plan.placement, plan.problem, run)
    assert any("scored for flat dispatch, the run used hierarchical" in n for n in as_flat.notes)
    for k in ("dispatch", "combine"):
        assert (as_flat.predicted[k] == as_planned.predicted[k]).all()
        assert (as_flat.replayed[k] == as_flat.measured[k]).all()
    assert as_flat.predicted_step_time_s == as_planned.predicted_step_time_s


def test_replay_scores_the_runs_routing_under_the_plans_settings(real_run):
    """The replay is the cost model on the run's routing with every setting of the plan's problem
    kept: its calibrated rates (the manifest's), and recompute, optimizer sharding, overlap or
    TP, the run's where its start record gives them. (It once rebuilt the problem from a few
    fields, so a calibrated or block-recompute plan's replay was timed as an uncalibrated,
    unrecomputed one.)"""
    import dataclasses

    import numpy as np

    from epplan.cost import evaluate
    from epplan.opened import open_manifest
    from epplan.report import read_run
    from epplan.report.measured import compare_measured
    from epplan.report.predicted import component_bytes
    from epplan.runfiles import RUN_SETTINGS
    from epplan.workload.traffic import Traffic

    manifest, run_dir = real_run
    opened = open_manifest(manifest)
    assert opened.problem.calibration is not None  # 'epplan place' calibrates by default
    run = read_run(run_dir, manifest_hash=opened.hash, num_layers=2, num_ranks=4)
    runs_routing = Traffic(run.routing.per_step(), source="the run's routing")
    settings = [{}, {"recompute": "block"}, {"recompute": "attention", "optimizer_sharding": "dense"},
                {"overlap": "on", "num_chunks": 2}, {"tp": 2}]
    times = set()
    for changed in settings:
        problem = dataclasses.replace(opened.problem, **changed)
        want = evaluate(opened.placement, dataclasses.replace(problem, traffic=runs_routing))
        # The plan made with the settings (a run that recorded none, as before they were recorded),
        # and the run's start record giving them over the plan made without (run --recompute ...).
        cases = [(problem, {})]
        if changed.keys() <= set(RUN_SETTINGS):
            cases.append((opened.problem, {**run.settings, **changed}))
        for plan, recorded in cases:
            m = compare_measured(evaluate(opened.placement, plan), opened.placement, plan,
                                 dataclasses.replace(run, settings=recorded))
            assert m.replayed_step_time_s == pytest.approx(want.step_time_s, rel=1e-12), (changed, recorded)
            for k, v in component_bytes(want).items():
                if k in m.replayed:
                    np.testing.assert_allclose(m.replayed[k], m.bytes_scale * v, rtol=1e-12, err_msg=str(changed))
        times.add(round(m.replayed_step_time_s, 12))
    assert len(times) == len(settings)  # each setting changes the step; the replay follows each


@pytest.fixture(scope="module")
def block_run(real_run, tmp_path_factory):
    """(manifest, run directory): the real run's manifest (planned without recompute) trained with
    every block recomputed, as 'epplan run --recompute block' over it does."""
    from epplan.manifest import load_manifest
    from epplan.runtime.testing import run_distributed
    from epplan.train.job import job_from_manifest

    manifest, _ = real_run
    run_dir = tmp_path_factory.mktemp("block") / "run"
    run_distributed(_train, 4, job_from_manifest(load_manifest(manifest)), str(run_dir), None, "block")
    return manifest, run_dir


def test_a_block_recompute_run_is_measured_predicted_and_replayed_with_its_third_pass(block_run):
    """Under block recompute backward sends the forward's rows again: three passes of the recorded
    forward matrices on the wire, as the cost model counts them (a2a_passes). The run's recompute
    (its start record) is what the prediction and the replay are scored with, the plan's being none."""
    import dataclasses

    import numpy as np

    from epplan.cost import evaluate
    from epplan.opened import open_manifest
    from epplan.topology import load_topology

    manifest, run_dir = block_run
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["recompute"] == "block"
    steps = [r for r in records if r["kind"] == "step"]
    dispatch = np.mean([np.array(r["dispatch_bytes"], dtype=float).sum(axis=0) for r in steps], axis=0)
    result = _invoke(manifest, "--metrics", run_dir, "--json", "--all")
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)["measured"]
    loads = 3 * load_topology(manifest.parent / "mini.yaml").link_loads(dispatch)
    for row in m["links"]:
        assert row["measured_dispatch_bytes"] == pytest.approx(loads[row["index"]], rel=1e-12)
        assert row["replayed_bytes"] == pytest.approx(row["measured_bytes"], rel=1e-6, abs=1e-3)
    assert m["replay"]["max_link_relative_error"] < 1e-6
    opened = open_manifest(manifest)
    cost = evaluate(opened.placement, dataclasses.replace(opened.problem, recompute="block"))
    assert cost.a2a_passes == 3
    assert m["totals_bytes"]["predicted"] == pytest.approx(m["bytes_scale"] * cost.a2a_bytes.sum(), rel=1e-6)
    assert any("recompute block where the plan has none" in note for note in m["notes"]), m["notes"]


def _train_expert_tp(rank: int, world_size: int, job, out: str) -> None:
    _train(rank, world_size, job, out, tp=2, expert_tp=True, recompute="block")


@pytest.fixture(scope="module")
def expert_tp_run(tmp_path_factory):
    """(manifest, run directory): tiny on 2 x 2 GPUs, --tp 2 --expert-tp --recompute block (each
    node a TP group holding its GPUs' experts, one per GPU), as the manifest records."""
    from epplan.cost.calibration import resolve_calibrations
    from epplan.manifest import build_manifest, load_manifest, write_manifest
    from epplan.placement.baselines import contiguous
    from epplan.placement.problem import PlacementProblem
    from epplan.runtime.testing import run_distributed
    from epplan.topology import load_topology
    from epplan.train.job import job_from_manifest
    from epplan.workload import make_traffic
    from epplan.workload.config import PRESETS

    folder = tmp_path_factory.mktemp("etp")
    (folder / "mini.yaml").write_text(MINI_TOPOLOGY)
    topo = load_topology(folder / "mini.yaml")
    config = PRESETS["tiny"].replace(num_kv_heads=2)
    cals, _ = resolve_calibrations(topo)
    problem = PlacementProblem(topo, config, make_traffic("uniform", config, topo.num_gpus), calibration=cals,
                               tp=2, expert_tp=True, recompute="block")
    manifest = folder / "m.json"
    write_manifest(manifest, build_manifest(contiguous(problem), problem, routing_spec="uniform"))
    run_dir = folder / "run"
    run_distributed(_train_expert_tp, 4, job_from_manifest(load_manifest(manifest)), str(run_dir))
    return manifest, run_dir


def test_expert_tp_bytes_measured_equal_the_replay_of_the_runs_routing(expert_tp_run):
    """The gathers and reduce-scatters of --expert-tp inside each TP group: recorded per step,
    times 3 passes (forward, backward, the block recompute), they are what the cost model's
    expert_tp_traffic gives on the run's own routing, to the byte; beside the prediction."""
    manifest, run_dir = expert_tp_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert len(steps) == 3 and all("expert_tp_bytes" in r for r in steps)
    sent = [[sum(row) for row in layer] for layer in steps[0]["expert_tp_bytes"]]   # [L][S]
    assert all(v > 0 for layer in sent for v in layer)  # every GPU sends to its group's other GPU
    result = _invoke(manifest, "--metrics", run_dir, "--json", "--all")
    assert result.exit_code == 0, result.output
    etp = json.loads(result.stdout)["measured"]["expert_tp"]
    assert etp["passes"] == 3
    assert etp["replayed_bytes"] == pytest.approx(etp["measured_bytes"], rel=1e-12)
    # Uniform routing predicted, the run's routing measured: same volume.
    assert sum(etp["measured_bytes"]) == pytest.approx(sum(etp["predicted_bytes"]), rel=0.2)
    table = _invoke(manifest, "--metrics", run_dir)
    assert table.exit_code == 0 and "--expert-tp: bytes each GPU sends inside its TP group" in table.stdout

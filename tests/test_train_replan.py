"""Live re-placement (``--replan-every``) in 4 gloo CPU processes, float64, the ``tiny`` model.

Routing drifts away from the manifest's (planned on uniform routing) because the routers' selection
biases send every token to expert 0 (and, in layer 1, expert 3) and stay there (no bias
updates): the re-plan replicates the hot experts, and the run moves them.

- A run that moves its experts equals, step for step and bitwise, a run restarted from the
  step's checkpoint onto the manifest the move put in force; its record's bytes are
  plan_migration's.
- The move itself: the single-device state (weights, AdamW moments and steps, by logical id)
  is the same before and after.
- A re-plan whose predicted gain is below the move's cost moves nothing and says why.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from epplan.manifest import build_manifest, load_manifest, write_manifest
from epplan.placement.problem import PlacementProblem
from epplan.placement.types import LayerPlacement, Placement
from epplan.runtime.testing import run_distributed
from epplan.topology import load_topology
from epplan.runfiles import read_metrics
from epplan.workload import make_traffic
from epplan.workload.config import PRESETS

G = 4
CONFIG = PRESETS["tiny"].replace(dtype="fp64", router_bias_rate=0.0)
BIASES = {(0, 0): 10.0, (1, 3): 10.0}  # (MoE layer, expert) -> selection bias
TOPOLOGY = """\
name: cpu-quad
node_types:
  box:
    gpus: 4
    gpu: {model: H100-SXM5-80GB, memory_gb: 80, bf16_tflops: 989, hbm_gbps: 3350}
    fabric: {kind: nvswitch, gbps: 450}
nodes:
  - {name: n0, type: box}
"""


def _manifest(root: Path, config=CONFIG) -> tuple[Path, Path]:
    """One expert per rank, planned for uniform routing, room for two per GPU."""
    topology = root / "cpu-quad.yaml"
    topology.write_text(TOPOLOGY)
    reps = [[0], [1], [2], [3]]
    placement = Placement(G, 4, [LayerPlacement([np.array(r) for r in reps], [np.ones((G, 1)) for _ in reps])
                                 for _ in range(2)], method="one-each")
    problem = PlacementProblem(load_topology(topology), config, make_traffic("uniform", config, G), experts_per_gpu=2)
    path = root / "one-each.json"
    write_manifest(path, build_manifest(placement, problem))
    return path, topology


def _trainer(manifest: Path, out: Path, steps: int, **kw):
    from epplan.train.job import load_job
    from epplan.train.options import TrainOptions
    from epplan.train.trainer import Trainer

    opts = TrainOptions.of(manifest=str(manifest), out=str(out), steps=steps, lr=0.01, keep_checkpoints=0,
                           **{"ckpt_every": 1, **kw})
    trainer = Trainer(load_job(manifest), opts, torch.distributed.get_rank(), torch.device("cpu"))
    with torch.no_grad():
        for (li, e), value in BIASES.items():
            trainer.model.moe_layers()[li].router.bias[e] = value
    return trainer


def _steps(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "step"]


def _replans(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "replan"]


def _checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of checkpoint ``path`` (model and optimizer state), by entry name."""
    from epplan.train.checkpoint import read_tensors

    return {k: v for k, v in read_tensors(path).items() if k.startswith(("model.", "optim."))}


def _moving_run(rank: int, world_size: int, manifest: Path, topology: Path, root: Path) -> None:
    # The run that re-plans: window 1-4, solved beside rank 0, used after step 5.
    _trainer(manifest, root / "live", 8, replan_every=4, replan_lag=1, topology=str(topology)).run(
        resume=False, show_progress=False)
    # The same run without re-planning (identical to the live one up to step 5).
    _trainer(manifest, root / "static", 8).run(resume=False, show_progress=False)


def _restarted_run(rank: int, world_size: int, manifest: Path, root: Path, original: Path) -> None:
    from epplan.train.job import load_job
    from epplan.train.replan import job_in_force

    # A resume of the live run starts on the manifest its newest checkpoint was written under.
    job, path = job_in_force(load_job(original), root / "live", rank)
    assert (path, job.manifest_hash) == (str(manifest), load_manifest(manifest).hash)
    job, path = job_in_force(load_job(original), root / "static", rank)  # never moved
    assert (path, job.manifest_hash) == (None, load_manifest(original).hash)
    trainer = _trainer(manifest, root / "static", 8)
    trainer.run(resume=True, show_progress=False)


def test_a_run_that_moves_its_experts_equals_a_restart_on_the_new_manifest(tmp_path):
    manifest, topology = _manifest(tmp_path)
    run_distributed(_moving_run, G, manifest, topology, tmp_path)
    live = tmp_path / "live"
    replans = _replans(live)
    assert [(r["step"], r["window"], r["moved"]) for r in replans] == [(5, [1, 4], True)], replans
    record = replans[0]
    assert record["predicted_gain_s"] > record["move_cost_s"] > 0 and record["cost_basis"] == "predicted"
    assert record["bytes_moved"] == record["predicted_bytes"] > 0
    moved_to = load_manifest(record["manifest"])
    assert moved_to.hash == record["manifest_hash"] == load_manifest(live / "manifest.json").hash
    hot = [len(moved_to.placement.layers[li].replicas[e]) for li, e in BIASES]
    assert min(hot) > 1, hot  # the hot experts are replicated now
    meta = json.loads((live / "checkpoints" / "step_00000005" / "meta.json").read_text())
    assert meta["manifest_hash"] == record["manifest_hash"]  # written after the move

    # Restart the static run from its step-5 checkpoint onto the manifest the move put in force.
    for step in (6, 7, 8):
        shutil.rmtree(tmp_path / "static" / "checkpoints" / f"step_{step:08d}")
    run_distributed(_restarted_run, G, Path(record["manifest"]), tmp_path, manifest)
    static = tmp_path / "static"
    mine, ref = _steps(static), _steps(live)
    assert [r["step"] for r in mine] == list(range(1, 9))
    for a, b in zip(mine, ref):
        assert (a["loss"], a["grad_norm"], a["tokens_per_expert"]) == (b["loss"], b["grad_norm"], b["tokens_per_expert"])
    for a, b in zip(mine[5:], ref[5:]):
        assert a["dispatch_bytes"] == b["dispatch_bytes"]  # the same placement since step 5
    final_live = _checkpoint_tensors(live / "checkpoints" / "step_00000008")
    final_static = _checkpoint_tensors(static / "checkpoints" / "step_00000008")
    assert final_live.keys() == final_static.keys()
    for key in final_live:
        assert torch.equal(final_live[key], final_static[key]), key


def _skipping_run(rank: int, world_size: int, manifest: Path, topology: Path, out: Path) -> None:
    # A window of one step: its gain (one step's saving) is below the move's predicted cost.
    _trainer(manifest, out, 4, replan_every=1, replan_lag=1, topology=str(topology)).run(
        resume=False, show_progress=False)


def test_a_replan_whose_gain_is_below_the_move_cost_moves_nothing(tmp_path):
    manifest, topology = _manifest(tmp_path)
    out = tmp_path / "run"
    run_distributed(_skipping_run, G, manifest, topology, out)
    replans = _replans(out)
    assert [(r["step"], r["window"]) for r in replans] == [(2, [1, 1]), (3, [2, 2]), (4, [3, 3])]
    original = load_manifest(manifest).hash
    for r in replans:
        assert not r["moved"] and r["bytes_moved"] == 0 and r["replicas_to_move"] > 0
        assert 0 < r["predicted_gain_s"] < r["move_cost_s"], r
        assert "does not exceed the move's predicted cost" in r["reason"]
    assert not (out / "manifests").exists() and not (out / "manifest.json").exists()
    for step in range(1, 5):
        meta = json.loads((out / "checkpoints" / f"step_{step:08d}" / "meta.json").read_text())
        assert meta["manifest_hash"] == original


def _move_and_back(rank: int, world_size: int, manifest: Path, topology: Path, out: Path) -> None:
    from epplan.cost.migration import plan_migration
    from epplan.runtime.expert_parallel import gather_state_dict
    from epplan.train.replan import move_experts

    trainer = _trainer(manifest, out, 2)
    trainer.train_step()
    trainer.train_step()
    config = trainer.job.config
    problem = PlacementProblem(load_topology(topology), config, make_traffic("uniform", config, G), experts_per_gpu=3)
    # Layer 0: rank 3 loses its only expert; layer 1: expert 2 on three ranks, rank 0 holds none.
    spread = Placement(G, 4, [LayerPlacement([np.array(r) for r in reps], [np.full((G, len(r)), 1 / len(r)) for r in reps])
                              for reps in ([[0, 1], [1, 2], [2], [0]], [[1], [1, 3], [1, 2, 3], [2]])], method="spread")

    def replicas() -> dict[str, list[torch.Tensor]]:
        """Every replica's weights and AdamW state (moments, step), by logical id and rank."""
        from epplan.train.checkpoint import expert_entries

        mine: dict[str, list[torch.Tensor]] = {}
        for key, t in sorted(expert_entries(trainer.model, trainer.optimizer, rank=rank, owned_only=False).items()):
            expert = key.split(".", 1)[1].split("]")[0] + "]"  # layers.1.ffn.experts.w1[5]
            mine.setdefault(f"{expert}@{rank}", []).append(t.clone())
        everyone = [None] * world_size
        torch.distributed.all_gather_object(everyone, mine)
        return {k: v for part in everyone for k, v in part.items()}

    def by_expert(found: dict) -> dict[str, list[torch.Tensor]]:
        out = {}
        for key, tensors in found.items():  # every replica of an expert holds the same state
            expert = key.split("@")[0]
            for a, b in zip(out.setdefault(expert, tensors), tensors):
                assert torch.equal(a, b), key
        return out

    before, full = by_expert(replicas()), gather_state_dict(trainer.model)
    dtypes = {t.dtype for ts in before.values() for t in ts}
    assert (torch.bfloat16 in dtypes) == (config.optimizer_state_dtype == "bf16"), dtypes
    for placement in (spread, load_manifest(manifest).placement):
        migration = plan_migration(trainer.job.placement, placement, problem)
        sent = move_experts(trainer.model, trainer.optimizer, placement, migration.moves)
        assert sent == migration.bytes_moved
        trainer.job = trainer.job.__class__(**{**trainer.job.__dict__, "placement": placement})
        found = replicas()
        held = {f"layers.{li}.ffn.experts.w1[{e}]@{r}" for li, layer in enumerate(placement.layers)
                for e, ranks in enumerate(layer.replicas) for r in ranks}
        assert {k for k in found if ".w1[" in k} == held
        after = by_expert(found)
        assert after.keys() == before.keys()
        for key in before:
            for a, b in zip(after[key], before[key]):
                assert torch.equal(a, b), key
        for key, value in gather_state_dict(trainer.model).items():
            assert torch.equal(value, full[key]), key
        layer = trainer.model.expert_parallel.layers[1]
        assert layer.w1.shape[0] == len(layer.local_experts)
    trainer.train_step()  # and training goes on where the experts are now


@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_moving_experts_keeps_every_weight_and_optimizer_state_by_logical_id(tmp_path, moments):
    """Also with AdamW's moments in bf16 (optimizer_state_dtype): they travel as bf16."""
    manifest, topology = _manifest(tmp_path, CONFIG.replace(optimizer_state_dtype=moments))
    run_distributed(_move_and_back, G, manifest, topology, tmp_path / "run")


# ------------------------------------------------------------------------------ through 'epplan run'
# Text of one repeated byte: every token looks alike, so the routers send them all to the same two
# experts of each layer (routing drifts from the manifest's uniform plan through the data alone).
RUN = ["--steps", "4", "--ckpt-every", "2", "--keep-checkpoints", "0", "--lr", "0.01", "--device", "cpu",
       "--global-batch", "32", "--replan-every", "2", "--replan-lag", "1"]


def _cli_run(*args: str, env: dict[str, str] | None = None) -> str:
    from typer.testing import CliRunner

    from epplan.cli import app

    result = CliRunner().invoke(app, ["run", *args], env=env)
    assert result.exit_code == 0, result.output
    return result.output


def test_a_move_interrupted_by_a_killed_worker_resumes_from_the_last_checkpoint(tmp_path):
    manifest, _ = _manifest(tmp_path, PRESETS["tiny"])
    data = tmp_path / "same-byte.txt"
    data.write_text("a" * 20000)
    reference, out = tmp_path / "reference", tmp_path / "run"
    _cli_run(str(manifest), "--out", str(reference), "--data", str(data), *RUN)
    # Rank 1 dies inside the move after step 3 (state packed, nothing exchanged yet).
    _cli_run(str(manifest), "--out", str(out), "--data", str(data), *RUN, "--max-restarts", "1",
             env={"EPPLAN_TEST_KILL_MOVE": "1"})

    for run in (reference, out):  # window 1-2 moves after step 3; window 3-4 is not planned (the run ends)
        replans = _replans(run)
        assert [(r["step"], r["window"], r["moved"]) for r in replans] == [(3, [1, 2], True)], replans
        assert replans[0]["bytes_moved"] == replans[0]["predicted_bytes"] > 0 and replans[0]["seconds"] > 0
        metas = [json.loads((run / "checkpoints" / f"step_{s:08d}" / "meta.json").read_text()) for s in (2, 4)]
        assert [m["manifest_hash"] for m in metas] == [load_manifest(manifest).hash, replans[0]["manifest_hash"]]
        assert load_manifest(run / "manifest.json").hash == replans[0]["manifest_hash"]
    starts = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "start"]
    # Resumed from step 2, written before the move, on the manifest in force then (the one given),
    # with the pending re-plan of window 1-2 from the checkpoint; it moved again after step 3.
    assert [(s["step"], s["attempt"], s["manifest"]) for s in starts] == [(0, 0, str(manifest)), (2, 1, str(manifest))]
    assert [r["loss"] for r in _steps(out)] == [r["loss"] for r in _steps(reference)]
    # The report compares the manifest in force with the steps run under it (step 4).
    from typer.testing import CliRunner

    from epplan.cli import app

    report = CliRunner().invoke(app, ["report", str(out / "manifest.json"), "--metrics", str(out)], terminal_width=200)
    assert report.exit_code == 0, report.output
    assert "only the 1 steps run under this one are compared" in " ".join(report.output.split())
    mine, ref = (_checkpoint_tensors(run / "checkpoints" / "step_00000004") for run in (out, reference))
    assert mine.keys() == ref.keys()
    for key in ref:
        assert torch.equal(mine[key], ref[key]), key


def test_replan_flags_are_checked_before_any_worker(tmp_path):
    from typer.testing import CliRunner

    from epplan.cli import app

    manifest, topology = _manifest(tmp_path, PRESETS["tiny"])
    out = str(tmp_path / "run")
    for args, message in ((["--replan-every", "0"], "--replan-every 0: give a number of steps"),
                          (["--replan-every", "4", "--replan-lag", "5"], "--replan-lag 5: give 1 .. --replan-every (4)"),
                          (["--replan-every", "4", "--replan-time-limit", "0"], "--replan-time-limit must be > 0")):
        result = CliRunner().invoke(app, ["run", str(manifest), "--out", out, "--device", "cpu", *args])
        assert result.exit_code == 1 and message in result.output, result.output
    topology.unlink()  # the file the manifest records is gone
    result = CliRunner().invoke(app, ["run", str(manifest), "--out", out, "--device", "cpu", "--replan-every", "4"])
    assert result.exit_code == 1 and "pass --topology FILE" in result.output, result.output
    assert not (tmp_path / "run").exists()

"""``epplan run`` as a user runs it: torchrun, 2 CPU processes with gloo, the ``tiny`` model.

One uninterrupted 12-step run (checkpoints every 4 steps) is the reference for the rest:
- end to end: the loss falls; metrics.jsonl, the checkpoints and routing_stats.json are valid, and
  the routing statistics feed a new placement problem (the re-plan loop);
- fault: a worker is SIGKILLed at step 7 on torchrun's first attempt; with --max-restarts 1 the
  job restarts from the step-4 checkpoint and ends with bitwise the reference's weights, optimizer
  state and routing statistics;
- re-placement: the reference's step-8 checkpoint resumed under a manifest whose experts live on
  other ranks continues the reference's loss curve;
- two nodes: two torchrun agents on this machine (--nnodes 2, a c10d rendezvous on localhost)
  run a manifest of two one-GPU nodes.
"""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from epplan.cli import app
from epplan.manifest import build_manifest, load_manifest, write_manifest
from epplan.placement.problem import PlacementProblem
from epplan.placement.types import LayerPlacement, Placement
from epplan.topology import load_topology
from epplan.train.checkpoint import latest, list_checkpoints, read_tensors
from epplan.runfiles import read_metrics
from epplan.train.options import TrainOptions
from epplan.workload import make_traffic
from epplan.workload.config import PRESETS
from epplan.workload.routing_stats import read_routing_stats

CONFIG = PRESETS["tiny"]  # 2 MoE layers x 4 experts, top-2, 8 sequences x 32 tokens per step
G = 2
# One server with two GPUs (the CPU processes stand in for them).
TOPOLOGY = """\
name: cpu-pair
node_types:
  box:
    gpus: 2
    gpu: {model: H100-SXM5-80GB, memory_gb: 80, bf16_tflops: 989, hbm_gbps: 3350}
    fabric: {kind: nvswitch, gbps: 450}
nodes:
  - {name: n0, type: box}
"""
# Two servers of one GPU each, on one switch.
TWO_NODES = """\
name: cpu-two-nodes
node_types:
  single:
    gpus: 1
    gpu: {model: H100-SXM5-80GB, memory_gb: 80, bf16_tflops: 989, hbm_gbps: 3350}
    fabric: {kind: nvswitch, gbps: 450}
    nics: {gbps: 50, attach: [0], pcie_gbps: 64}
nodes:
  - {prefix: n, count: 2, type: single}
fabric: {kind: switch}
"""
TRAIN = ["--steps", "12", "--ckpt-every", "4", "--keep-checkpoints", "0", "--lr", "0.01", "--device", "cpu"]
runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*args: str, env: dict[str, str] | None = None) -> str:
    result = runner.invoke(app, ["run", *args], env=env)
    assert result.exit_code == 0, result.output
    return result.output


def _steps(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "step"]


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the newest checkpoint (model and optimizer state), by entry name."""
    entries = read_tensors(latest(out / "checkpoints").path)
    return {k: v for k, v in entries.items() if k.startswith(("model.", "optim."))}


def _place(*args: str) -> None:
    result = runner.invoke(app, ["place", "--model", "tiny", *args], terminal_width=200)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> dict[str, Path]:
    """a: planned by 'epplan place'; b: every expert of a on another rank or replicated, and rank 0
    holding no expert of layer 1; two: planned for two one-GPU nodes."""
    root = tmp_path_factory.mktemp("manifests")
    topology = root / "cpu-pair.yaml"
    topology.write_text(TOPOLOGY)
    paths = {"topology": topology, "a": root / "a.json", "b": root / "b.json", "two": root / "two.json"}
    _place("--topology", str(topology), "--experts-per-gpu", "2", "--out", str(paths["a"]))
    a = load_manifest(paths["a"]).placement
    assert [r.tolist() for r in a.layers[0].replicas] == [[0], [1], [0], [1]]
    moved = [[1], [0, 1], [1], [0]], [[1], [1], [1], [1]]
    b = Placement(G, 4, [LayerPlacement([np.array(r) for r in reps], [np.full((G, len(r)), 1 / len(r)) for r in reps])
                         for reps in moved], method="moved")
    problem = PlacementProblem(load_topology(topology), CONFIG, make_traffic("uniform", CONFIG, G), experts_per_gpu=4)
    write_manifest(paths["b"], build_manifest(b, problem))
    two_nodes = root / "cpu-two-nodes.yaml"
    two_nodes.write_text(TWO_NODES)
    _place("--topology", str(two_nodes), "--experts-per-gpu", "2", "--out", str(paths["two"]))
    return paths


@pytest.fixture(scope="module")
def reference(manifests, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    _run(str(manifests["a"]), "--out", str(out), *TRAIN)
    return out


def test_end_to_end_loss_falls_and_files_are_valid(reference, manifests):
    records = read_metrics(reference / "metrics.jsonl")
    start, steps = records[0], _steps(reference)
    assert (start["kind"], start["format"], start["version"]) == ("start", "epplan.metrics", 1)
    assert start["manifest_hash"] == load_manifest(manifests["a"]).hash
    assert [r["step"] for r in steps] == list(range(1, 13))
    losses = [r["loss"] for r in steps]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.4, losses
    for r in steps:
        assert r["step_time_s"] > 0 and r["tokens_per_s"] > 0 and r["tflops_per_gpu"] > 0
        assert r["mfu"] is None  # no peak on the CPU
        counts = np.array(r["tokens_per_expert"])  # [L][E]: every token picks top_k experts
        assert counts.shape == (2, 4) and (counts.sum(axis=1) == CONFIG.tokens_per_step * CONFIG.top_k).all()
        dispatch, combine = np.array(r["dispatch_bytes"]), np.array(r["combine_bytes"])  # [L][S][T]
        assert dispatch.shape == (2, G, G) and (dispatch > 0).all()
        np.testing.assert_array_equal(combine, dispatch.transpose(0, 2, 1))
    assert [r["step"] for r in records if r["kind"] == "checkpoint"] == [4, 8, 12]
    assert records[-1]["kind"] == "end" and records[-1]["step"] == 12
    assert [c.step for c in list_checkpoints(reference / "checkpoints")] == [4, 8, 12]

    stats = read_routing_stats(reference / "routing_stats.json")
    assert stats.steps == 12 and stats.counts.shape == (2, G, 4)
    assert stats.manifest_hash == start["manifest_hash"]
    assert stats.tokens_per_rank_per_step == CONFIG.tokens_per_step / G
    np.testing.assert_array_equal(stats.counts.sum(axis=1), np.sum([r["tokens_per_expert"] for r in steps], axis=0))
    # Version 2: one node, so every token of a rank is one (token, node) row; top-2, one pair each.
    tokens = stats.steps * stats.tokens_per_rank_per_step
    assert stats.nodes == (("n0", (0, 1)),) and stats.dispatch == load_manifest(manifests["a"]).dispatch
    assert (stats.node_rows[..., 0] == tokens).all() and (stats.pairs.sum(axis=(2, 3)) == tokens).all()
    assert (stats.gpu_rows.sum(axis=2) >= tokens).all() and (stats.gpu_rows.sum(axis=2) <= 2 * tokens).all()
    # The re-plan loop: run -> statistics -> place -> run.
    traffic = make_traffic(str(reference / "routing_stats.json"), CONFIG, G)
    np.testing.assert_allclose(traffic.counts, stats.per_step())  # this run's own volume: no rescaling
    replan = reference / "replan.json"
    _place("--topology", str(manifests["topology"]), "--experts-per-gpu", "2",
           "--routing", str(reference / "routing_stats.json"), "--out", str(replan))
    assert load_manifest(replan).routing_spec == str(reference / "routing_stats.json")


def test_killed_worker_restarts_and_ends_bitwise_equal(reference, manifests, tmp_path):
    out = tmp_path / "run"
    output = _run(str(manifests["a"]), "--out", str(out), *TRAIN, "--max-restarts", "1",
                  env={"EPPLAN_TEST_KILL": "1:7"})  # rank 1 dies as it starts step 7
    starts = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "start"]
    assert [(s["step"], s["attempt"]) for s in starts] == [(0, 0), (4, 1)], output
    assert [r["loss"] for r in _steps(out)] == [r["loss"] for r in _steps(reference)]
    mine, ref = _final_state(out), _final_state(reference)
    assert mine.keys() == ref.keys()
    for key in ref:
        assert torch.equal(mine[key], ref[key]), key
    mine, ref = read_routing_stats(out / "routing_stats.json"), read_routing_stats(reference / "routing_stats.json")
    for name in ("counts", "pairs", "gpu_rows", "node_rows"):  # the checkpoint carries them all
        np.testing.assert_array_equal(getattr(mine, name), getattr(ref, name), err_msg=name)


def test_resume_under_another_placement_continues_the_loss(reference, manifests, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "checkpoints" / "step_00000012")
    _run(str(manifests["b"]), "--out", str(out), *TRAIN, "--resume")
    start = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "start"][-1]
    assert start["resumed_from"].endswith("step_00000008") and start["placement_changed"] is True
    ref = _steps(reference)
    mine = _steps(out)
    assert [r["loss"] for r in mine[:8]] == [r["loss"] for r in ref[:8]]  # kept from the reference
    np.testing.assert_allclose([r["loss"] for r in mine[8:]], [r["loss"] for r in ref[8:]], rtol=1e-5)
    # Same math, other ranks: the expert rows now travel elsewhere.
    assert mine[-1]["dispatch_bytes"] != ref[-1]["dispatch_bytes"]
    stats = read_routing_stats(out / "routing_stats.json")  # the steps run under b only
    assert stats.steps == 4 and stats.manifest_hash == load_manifest(manifests["b"]).hash
    owners = json.loads((latest(out / "checkpoints").path / "meta.json").read_text())["expert_owners"]
    assert owners == {"layers.0.ffn.experts": [1, 0, 1, 0], "layers.1.ffn.experts": [1, 1, 1, 1]}


def test_tp2_follows_the_reference_run(reference, manifests, tmp_path):
    """--tp 2 on the two-rank node: one TP group, experts still over both ranks; the same losses
    within fp32 rounding (TP's chunked loss is vocab-parallel: its log-sum-exp is summed in
    another order)."""
    out = tmp_path / "run"
    output = _run(str(manifests["a"]), "--out", str(out), *TRAIN, "--tp", "2")
    assert "tp 2" in output
    start = read_metrics(out / "metrics.jsonl")[0]
    assert start["tp"] == 2
    np.testing.assert_allclose([r["loss"] for r in _steps(out)], [r["loss"] for r in _steps(reference)], rtol=1e-4)


def test_two_nodes_on_one_machine(manifests, tmp_path):
    """Node 0 through 'epplan run'; node 1 through the command 'epplan run --print-launch torchrun'
    prints for it (started first: the rendezvous waits for both)."""
    out, endpoint = tmp_path / "run", f"127.0.0.1:{_free_port()}"
    args = [str(manifests["two"]), "--out", str(out), "--steps", "3", "--lr", "0.01", "--device", "cpu",
            "--nnodes", "2", "--rdzv-endpoint", endpoint]
    printed = runner.invoke(app, ["run", *args, "--print-launch", "torchrun"]).output
    node1 = shlex.split([line for line in printed.splitlines() if line.startswith("python ")][1])
    agent = subprocess.Popen([sys.executable, *node1[1:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        _run(*args, "--node-rank", "0")
    finally:
        output = agent.communicate(timeout=120)[0]
    assert agent.returncode == 0, output
    start = read_metrics(out / "metrics.jsonl")[0]
    assert start["nodes"] == [{"name": "n0", "ranks": [0]}, {"name": "n1", "ranks": [1]}]
    assert start["overlap"] is True and start["num_chunks"] is None  # auto: on across nodes
    assert [r["step"] for r in _steps(out)] == [1, 2, 3]


# ------------------------------------------------------------------------------ without a launch

def test_help_names_the_main_options():
    result = runner.invoke(app, ["run", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for flag in ("--out", "--steps", "--device", "--data", "--ckpt-every", "--resume", "--max-restarts",
                 "--nnodes", "--node-rank", "--rdzv-endpoint", "--print-launch"):
        assert flag in result.output


def test_print_launch_torchrun_gives_one_command_per_node(manifests):
    result = runner.invoke(app, ["run", str(manifests["two"]), "--out", "runs/x", "--steps", "7",
                                 "--nnodes", "2", "--dispatch", "hierarchical", "--print-launch", "torchrun"],
                           env={"SLURM_NODEID": None})
    assert result.exit_code == 0, result.output
    commands = [line.split() for line in result.output.splitlines() if line.startswith("python ")]
    assert len(commands) == 2
    for i, argv in enumerate(commands):
        assert argv[:3] == ["python", "-m", "torch.distributed.run"]
        assert argv[argv.index("--nproc-per-node") + 1] == "1"
        assert argv[argv.index("--rdzv-endpoint") + 1] == "n0:29500"
        worker = argv[argv.index("epplan.train.worker") + 1:]
        opts = TrainOptions.from_argv(worker)
        assert (opts.manifest, opts.out, opts.batch.steps, opts.node_rank, opts.device, opts.parallel.dispatch) == \
               (str(manifests["two"]), "runs/x", 7, i, "cuda", "hierarchical")


def test_print_launch_passes_tp_and_expert_tp_to_the_workers(manifests):
    result = runner.invoke(app, ["run", str(manifests["a"]), "--out", "runs/x", "--tp", "2", "--expert-tp",
                                 "--print-launch", "torchrun"], env={"SLURM_NODEID": None})
    assert result.exit_code == 0, result.output
    (argv,) = [line.split() for line in result.output.splitlines() if line.startswith("python ")]
    opts = TrainOptions.from_argv(argv[argv.index("epplan.train.worker") + 1:])
    assert (opts.parallel.tp, opts.parallel.expert_tp, opts.overridden) == (2, True, "tp,expert_tp")


def test_print_launch_slurm_writes_an_sbatch_script(manifests):
    result = runner.invoke(app, ["run", str(manifests["two"]), "--out", "runs/x", "--nnodes", "2",
                                 "--max-restarts", "2", "--print-launch", "slurm"])
    assert result.exit_code == 0, result.output
    script = result.output
    assert script.startswith("#!/bin/bash") and "#SBATCH --nodes=2" in script
    assert "#SBATCH --gpus-per-node=1" in script
    srun = script[script.index("srun"):]
    for part in ("epplan run", "--resume", "--nnodes 2", "--max-restarts 2", "--device cuda",
                 '--rdzv-endpoint "$RDZV_HOST:29500"', '--rdzv-id "$SLURM_JOB_ID"'):
        assert part in srun


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "1"], "the manifest spans 2 nodes"),
    (["--nnodes", "2"], "give this node's --node-rank"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], "--node-rank 2 is out of range"),
    (["--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "h:1", "--global-batch", "7"],
     "does not split into 2 ranks"),
    (["--nnodes", "2", "--print-launch", "mpi"], "--print-launch 'mpi'"),
    (["--nnodes", "2", "--print-launch", "torchrun", "--tp", "2"],
     "--tp 2: node n0's ranks [0] do not form groups of 2 consecutive ranks"),
    (["--nnodes", "2", "--print-launch", "torchrun", "--expert-tp"],
     "--expert-tp splits the experts over each TP group, and --tp is 1"),
    (["--nnodes", "2", "--print-launch", "torchrun", "--num-chunks", "0"], "--num-chunks must be at least 1, got 0"),
    (["--nnodes", "2", "--print-launch", "torchrun", "--overlap-ctas", "-1"],
     "--overlap-ctas must be at least 1, got -1"),
    (["--nnodes", "2", "--print-launch", "torchrun", "--dispatch", "sideways"],
     "--dispatch 'sideways': use flat or hierarchical"),
])
def test_launch_mistakes_are_clear_errors(manifests, tmp_path, args, message):
    result = runner.invoke(app, ["run", str(manifests["two"]), "--out", str(tmp_path), *args],
                           env={"SLURM_NODEID": None}, terminal_width=300)
    assert result.exit_code == 1
    assert message in " ".join(result.output.split()), result.output


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has the GPUs the manifest asks for")
def test_cuda_without_enough_gpus_is_refused_before_launch(manifests, tmp_path):
    result = runner.invoke(app, ["run", str(manifests["a"]), "--out", str(tmp_path), "--device", "cuda"],
                           terminal_width=300)
    assert result.exit_code == 1
    assert "the manifest puts 2 ranks on this node but" in " ".join(result.output.split())


def test_existing_checkpoints_need_resume(reference, manifests):
    result = runner.invoke(app, ["run", str(manifests["a"]), "--out", str(reference), "--device", "cpu"],
                           terminal_width=300)
    assert result.exit_code == 1
    assert "already holds checkpoints (newest: step 12); pass --resume" in result.output


def test_bad_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "m.json").write_text("{not json")
    result = runner.invoke(app, ["run", str(tmp_path / "m.json"), "--out", str(tmp_path)], terminal_width=300)
    assert result.exit_code == 1 and "corrupted manifest" in result.output


def test_gpu_out_of_memory_is_a_clear_failure_that_is_not_retried(manifests, tmp_path, monkeypatch):
    """A worker that runs out of GPU memory says which batch did not fit and what to change, and a
    restarted attempt of the same run stops at once instead of running out of memory again."""
    from epplan.train import worker

    class OutOfMemoryTrainer:
        def __init__(self, *args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 15.62 GiB.")

    monkeypatch.setattr(worker, "Trainer", OutOfMemoryTrainer)
    monkeypatch.setattr(worker, "_process_group_store", lambda rank, attempt: None)
    monkeypatch.setattr(worker.dist, "init_process_group", lambda *args, **kwargs: None)
    monkeypatch.setattr(worker, "_device", lambda kind, local_rank: torch.device("cpu"))
    for name, value in {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2",
                        "TORCHELASTIC_RUN_ID": "r1", "TORCHELASTIC_RESTART_COUNT": "0"}.items():
        monkeypatch.setenv(name, value)
    argv = TrainOptions.of(manifest=str(manifests["a"]), out=str(tmp_path), device="cuda").to_argv()
    assert worker.main.__wrapped__(argv) == 1
    failure = worker.read_failure(tmp_path)
    assert failure["kind"] == "out_of_memory"
    message = failure["message"]
    assert "rank 0 ran out of GPU memory" in message and "15.62 GiB" in message
    assert "4 sequences of 32 tokens per GPU" in message  # tiny: global batch 8 over 2 ranks
    assert "--micro-batches" in message and "--recompute block" in message

    class MustNotRun:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a restart after running out of memory must not train again")

    monkeypatch.setattr(worker, "Trainer", MustNotRun)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert worker.main.__wrapped__(argv) == 1
    assert worker.read_failure(tmp_path)["message"] == message


# ------------------------------------------------------------------------------ faults (issue: nothing lost)

def _fail(*args: str) -> str:
    result = runner.invoke(app, ["run", *args], terminal_width=400)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "ChildFailedError" not in result.output, result.output
    return " ".join(result.output.split())


def test_a_busy_run_directory_is_one_clear_error(manifests, tmp_path):
    from epplan.train.rundir import RunLock

    with RunLock(tmp_path) as lock:
        assert lock.acquire() is None
        message = _fail(str(manifests["a"]), "--out", str(tmp_path), *TRAIN)
    assert f"{tmp_path} is in use by another 'epplan run' (pid {__import__('os').getpid()} on" in message
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_lock_left_behind_is_named_when_taken_over(tmp_path):
    from epplan.train.rundir import RunLock

    (tmp_path / "run.lock").write_text('{"host": "gone-host", "pid": 4242, "since": "yesterday"}')
    with RunLock(tmp_path) as lock:
        note = lock.acquire()
    assert "taking over the lock left by an earlier run (pid 4242 on gone-host, since yesterday)" in note
    with RunLock(tmp_path) as lock:  # released cleanly: nothing to say
        assert lock.acquire() is None


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killing_epplan_run_ends_torchrun_and_its_workers(manifests, tmp_path, sig):
    import os
    import signal
    import time

    out = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "epplan", "run", str(manifests["a"]), "--out", str(out), "--steps", "100000",
         "--ckpt-every", "100000", "--lr", "0.01", "--device", "cpu"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() or '"kind":"step"' not in (out / "metrics.jsonl").read_text():
            assert launcher.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.2)
        tree = _descendants(launcher.pid)
        assert len(tree) >= 3  # the agent and two workers
        os.kill(launcher.pid, getattr(signal, sig))
        launcher.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in tree):
            assert time.monotonic() < deadline, f"still running after {sig}: {[p for p in tree if _alive(p)]}"
            time.sleep(0.2)
    finally:
        launcher.kill()
    from epplan.train.rundir import RunLock

    with RunLock(out) as lock:  # free again, for a --resume
        lock.acquire()
        lock.wait_for_workers(timeout_s=0)


def _copy_reference(reference: Path, out: Path) -> Path:
    shutil.copytree(reference, out)
    return out / "checkpoints"


def test_a_corrupted_checkpoint_of_the_right_size_is_skipped_with_a_line(reference, manifests, tmp_path):
    out = tmp_path / "run"
    root = _copy_reference(reference, out)
    shutil.rmtree(root / "step_00000012")
    with open(root / "step_00000008" / "__1_0.distcp", "r+b") as fh:  # 4 KiB flipped, same size
        fh.seek(600)
        block = fh.read(4096)
        fh.seek(600)
        fh.write(bytes(b ^ 0xFF for b in block))
    output = _run(str(manifests["a"]), "--out", str(out), *TRAIN, "--resume")
    start = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "start"][-1]
    assert start["resumed_from"].endswith("step_00000004"), output
    assert start["resume_notes"] == [  # the lines rank 0 printed
        f"skipped {root / 'step_00000008'}: the content of __1_0.distcp differs from the checksum written with it",
        "resuming from the newest intact checkpoint, step_00000004"]
    mine, ref = _final_state(out), _final_state(reference)
    for key in ref:  # from step 4 again: bitwise the uninterrupted run
        assert torch.equal(mine[key], ref[key]), key


def test_resume_with_no_intact_checkpoint_refuses_and_keeps_history(reference, manifests, tmp_path):
    out = tmp_path / "run"
    root = _copy_reference(reference, out)
    for ckpt in root.iterdir():  # zero-filled DCP indexes, of the right size
        size = (ckpt / ".metadata").stat().st_size
        (ckpt / ".metadata").write_bytes(bytes(size))
    metrics = (out / "metrics.jsonl").read_text()
    stats = (out / "routing_stats.json").read_text()
    message = _fail(str(manifests["a"]), "--out", str(out), *TRAIN, "--resume")
    assert "no intact checkpoint in" in message and "pass --start-over" in message
    assert ".metadata differs from the checksum" in message
    assert (out / "metrics.jsonl").read_text() == metrics and (out / "routing_stats.json").read_text() == stats
    # Without --resume as well: the earlier run's records are never wiped silently.
    (root / "step_00000004").rename(root / "junk")
    shutil.rmtree(root)
    assert "holds an earlier run's metrics.jsonl" in _fail(str(manifests["a"]), "--out", str(out), *TRAIN)
    _run(str(manifests["a"]), "--out", str(out), *TRAIN, "--steps", "3", "--start-over")
    assert (out / "previous-1" / "metrics.jsonl").read_text() == metrics
    assert [r["step"] for r in _steps(out)] == [1, 2, 3]


def test_resume_names_a_changed_seed_and_allow_change_accepts_it(reference, manifests, tmp_path):
    out = tmp_path / "run"
    root = _copy_reference(reference, out)
    shutil.rmtree(root / "step_00000012")
    message = _fail(str(manifests["a"]), "--out", str(out), *TRAIN, "--resume", "--seed", "5")
    assert "--resume: seed is 5 but the checkpoint 8 was written with 0" in message
    assert "--allow-change seed" in message
    message = _fail(str(manifests["a"]), "--out", str(out), *TRAIN, "--resume", "--global-batch", "16")
    assert "global_batch is 16 but the checkpoint 8 was written with 8" in message
    _run(str(manifests["a"]), "--out", str(out), *TRAIN, "--resume", "--seed", "5", "--allow-change", "seed")
    start = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "start"][-1]
    assert start["allowed_changes"] == {"seed": {"checkpoint": 0, "now": 5}}


def test_worker_errors_are_one_line_with_the_log_kept(manifests, tmp_path):
    """A user error raised inside the workers: one line, no torchrun report; its log in --out."""
    out = tmp_path / "run"
    (out / "checkpoints" / "step_00000004").mkdir(parents=True)  # not a checkpoint: meta.json missing
    message = _fail(str(manifests["a"]), "--out", str(out), *TRAIN, "--resume")
    assert message.count("error:") == 1 and "no meta.json" in message, message
    assert "Root Cause" in (out / "logs" / "torchrun.node0.log").read_text()  # torchrun's report


def _edited(manifests, tmp_path, name: str, edit) -> str:
    doc = json.loads(manifests["a"].read_text())
    edit(doc)
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def _three_ranks(doc: dict, summary_too: bool) -> None:
    doc["world_size"] = 3
    doc["ranks"] = {"node": [0, 0, 0], "local_gpu": [0, 1, 2]}
    if summary_too:
        doc["predicted"]["summary"]["num_gpus"] = 3


@pytest.mark.parametrize("edit, message", [
    (lambda d: _three_ranks(d, False), "world_size 3, but it was planned for 2 GPUs"),
    (lambda d: _three_ranks(d, True), "3 ranks on 1 node(s), but topology"),
    (lambda d: d["topology"].update(content_hash=""), "records no topology content hash"),
])
def test_run_checks_the_manifest_against_the_cluster_before_any_worker(manifests, tmp_path, edit, message):
    path = _edited(manifests, tmp_path, "edited.json", edit)
    out = tmp_path / "run"
    assert message in _fail(path, "--out", str(out), *TRAIN)
    assert not out.exists()  # nothing started


def test_estimate_and_report_refuse_a_manifest_of_another_cluster(manifests, tmp_path):
    two = json.loads(manifests["two"].read_text())
    two["topology"]["content_hash"] = json.loads(manifests["a"].read_text())["topology"]["content_hash"]
    path = tmp_path / "two.json"
    path.write_text(json.dumps(two))
    for argv in (["estimate", "--topology", str(manifests["topology"]), "--placement", str(path)],
                 ["report", str(path), "--topology", str(manifests["topology"])]):
        result = runner.invoke(app, argv, terminal_width=400)
        assert result.exit_code == 1, result.output
        assert "2 ranks on 2 node(s), but" in " ".join(result.output.split()), result.output

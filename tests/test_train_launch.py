"""Launch plumbing without launching: options on a worker's command line, the LR schedule, the
manifest's node layout and the process -> rank mapping, torchrun command lines."""

from __future__ import annotations

import math

import numpy as np
import pytest

from epplan.errors import RuntimeSetupError
from epplan.placement.types import LayerPlacement, Placement
from epplan.schedule import Schedule
from epplan.train.job import Job, Node, job_from_manifest
from epplan.train.launch import LaunchOptions, torchrun_argv
from epplan.train.options import DEFAULTS, TrainOptions
from epplan.train.trainer import lr_at
from epplan.workload.config import PRESETS


def test_options_survive_the_worker_command_line():
    opts = TrainOptions.of(manifest="m.json", out="runs/a b", steps=7, device="cuda", data="corpus/", seed=3,
                           global_batch=16, micro_batches=2, lr=3e-4, warmup_steps=0, grad_clip=0.0,
                           capacity_factor=1.25, recompute="block", optimizer_sharding="dense", overlap="off", num_chunks=3,
                           overlap_ctas=8, ckpt_every=3, resume=True, peak_tflops=400.0, node_rank=1)
    assert TrainOptions.from_argv(opts.to_argv()) == opts
    plain = TrainOptions.of(manifest="m.json", out="o")
    assert plain.to_argv() == ["m.json", "--out", "o"]
    assert TrainOptions.from_argv(plain.to_argv()) == plain


# The worker's flags, one per option, as printed torchrun lines and sbatch scripts carry them.
WORKER_FLAGS = ["--out", "--steps", "--device", "--data", "--seed", "--global-batch", "--micro-batches", "--lr",
                "--min-lr-ratio", "--warmup-steps", "--weight-decay", "--grad-clip", "--capacity-factor",
                "--recompute", "--optimizer-sharding", "--tp", "--expert-tp", "--overridden", "--overlap",
                "--num-chunks", "--overlap-ctas", "--dispatch", "--ckpt-every", "--async-checkpoints",
                "--keep-checkpoints", "--resume", "--start-over", "--allow-change", "--peak-tflops",
                "--tensorboard", "--node-rank", "--replan-every", "--replan-lag", "--replan-time-limit",
                "--topology"]


def test_every_option_has_its_worker_flag_and_survives_it():
    opts = TrainOptions.of(manifest="m.json", out="o", steps=9, device="cuda", data="d.bin", seed=4, global_batch=32,
                           micro_batches=4, lr=1e-3, min_lr_ratio=0.2, warmup_steps=2, weight_decay=0.0, grad_clip=0.5,
                           capacity_factor=2.0, recompute="attention", optimizer_sharding="all", tp=2, expert_tp=True,
                           overridden="tp,expert_tp", overlap="on", num_chunks=4, overlap_ctas=16, dispatch="flat",
                           ckpt_every=5, async_checkpoints="off", keep_checkpoints=3, resume=True, start_over=True,
                           allow_change="seed,data", peak_tflops=100.0, tensorboard="tb", node_rank=2,
                           replan_every=8, replan_lag=3, replan_time_limit=5.0, topology="t.json")
    argv = opts.to_argv()
    assert argv[0] == "m.json"
    assert [a for a in argv if a.startswith("--")] == WORKER_FLAGS
    assert TrainOptions.from_argv(argv) == opts


def test_flat_names_reach_their_sections_and_come_back():
    opts = TrainOptions.of(manifest="m.json", out="o", steps=9, lr=1e-3, tp=2, keep_checkpoints=3, replan_every=8,
                           peak_tflops=100.0)
    assert (opts.batch.steps, opts.optimizer.lr, opts.parallel.tp, opts.checkpoints.keep_checkpoints,
            opts.replan.replan_every, opts.output.peak_tflops) == (9, 1e-3, 2, 3, 8, 100.0)
    assert TrainOptions.of(**opts.flat()) == opts
    assert TrainOptions.of("m", "o").flat() == {"manifest": "m", "out": "o", **DEFAULTS}
    moved = opts.replace(tp=1, resume=True, node_rank=1)
    assert (moved.parallel.tp, moved.checkpoints.resume, moved.node_rank) == (1, True, 1)
    assert moved.replace(tp=2, resume=False, node_rank=0) == opts  # nothing else changed
    with pytest.raises(TypeError, match="no option 'warmup'"):
        TrainOptions.of(manifest="m.json", out="o", warmup=3)


def test_replan_lag_is_a_quarter_of_the_window_unless_given():
    assert TrainOptions.of("m", "o", replan_every=8).replan.lag() == 2
    assert TrainOptions.of("m", "o", replan_every=3).replan.lag() == 1
    assert TrainOptions.of("m", "o", replan_every=8, replan_lag=5).replan.lag() == 5


def test_overlap_auto_is_on_where_the_exchange_leaves_the_node_and_on_cpu():
    # Measured (docs/benchmarks.md): overlap gained 11-21 % with the exchange through host memory
    # (the cross-node bandwidth regime) and lost 16 % training inside one NVLink node.
    cuda = dict(manifest="m", out="o", device="cuda")
    assert TrainOptions.of(**cuda).parallel.use_overlap("cuda", num_nodes=2)
    assert not TrainOptions.of(**cuda).parallel.use_overlap("cuda", num_nodes=1)
    assert TrainOptions.of(**cuda, overlap="on").parallel.use_overlap("cuda", num_nodes=1)
    assert not TrainOptions.of(**cuda, overlap="off").parallel.use_overlap("cuda", num_nodes=2)
    assert TrainOptions.of(manifest="m", out="o", device="cpu").parallel.use_overlap("cpu", num_nodes=1)


def test_run_follows_the_schedule_the_plan_was_made_for():
    cuda = dict(manifest="m", out="o", device="cuda")
    serial, chunked = Schedule(False, 1), Schedule(True, 6)
    assert not TrainOptions.of(**cuda).parallel.use_overlap("cuda", num_nodes=2, planned=serial)
    assert TrainOptions.of(**cuda).parallel.use_overlap("cuda", num_nodes=1, planned=chunked)
    assert TrainOptions.of(**cuda).parallel.chunks("cuda", chunked) == 6
    assert TrainOptions.of(**cuda).parallel.chunks("cuda", serial) is None
    assert TrainOptions.of(**cuda, num_chunks=3).parallel.chunks("cuda", chunked) == 3           # a flag wins
    assert TrainOptions.of(**cuda, overlap="off").parallel.use_overlap("cuda", num_nodes=1, planned=chunked) is False
    assert TrainOptions.of(manifest="m", out="o", device="cpu").parallel.chunks("cpu", chunked) is None


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    opts = TrainOptions.of(manifest="m", out="o", steps=100, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, opts, 1.0) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, opts, 1.0) == pytest.approx(0.1)
    assert TrainOptions.of(manifest="m", out="o").optimizer.warmup(steps=100) == 5
    assert TrainOptions.of(manifest="m", out="o").optimizer.peak_lr(32) == 0.01
    assert TrainOptions.of(manifest="m", out="o").optimizer.peak_lr(4096) == pytest.approx(1 / 4096)


def _job() -> Job:
    layer = LayerPlacement([np.array([g]) for g in range(4)], [np.ones((4, 1))] * 4)
    return Job(PRESETS["tiny"], Placement(4, 4, [layer, layer]), "ab" * 32,
               (Node("n0", (0, 1)), Node("n1", (2, 3))))


def test_processes_map_to_manifest_ranks_by_node_and_local_gpu():
    job = _job()
    assert [job.rank_of(n, i, 2, 4) for n in (0, 1) for i in (0, 1)] == [0, 1, 2, 3]
    with pytest.raises(RuntimeSetupError, match="3 processes were launched but the manifest places experts on 4"):
        job.rank_of(0, 0, 2, 3)
    with pytest.raises(RuntimeSetupError, match=r"node 1 \(n1\) has 2 GPUs in the manifest but 1 processes"):
        job.rank_of(1, 0, 1, 4)
    with pytest.raises(RuntimeSetupError, match="node_rank=2 is out of range") as exc:  # the library's words
        job.rank_of(2, 0, 2, 4)
    assert "--node-rank 2 is out of range" in exc.value.cli_message()  # as 'epplan run' shows it


def test_job_from_a_manifest_orders_nodes_and_gpus():
    """Ranks of a manifest need not be node-major: the layout follows (node, local GPU)."""
    class FakeManifest:  # the attributes epplan.manifest.Manifest has
        config = PRESETS["tiny"]
        placement = _job().placement
        rank_nodes = ["b", "a", "b", "a"]
        rank_local_gpus = [1, 0, 0, 1]
        hash = "cd" * 32

    job = job_from_manifest(FakeManifest())
    assert job.nodes == (Node("b", (2, 0)), Node("a", (1, 3)))
    assert job.describe_nodes() == "2 nodes (b: 2 GPUs, a: 2 GPUs)"


def test_torchrun_command_lines():
    job = _job()
    opts = TrainOptions.of(manifest="m.json", out="o", steps=5)
    single = Job(job.config, job.placement, job.manifest_hash, (Node("n0", (0, 1, 2, 3)),))
    argv = torchrun_argv(single, opts, LaunchOptions(max_restarts=2), 0, python="python")
    assert argv == ["python", "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "4",
                    "--standalone", "--max-restarts", "2", "-m", "epplan.train.worker",
                    "m.json", "--out", "o", "--steps", "5"]
    multi = torchrun_argv(job, opts, LaunchOptions(nnodes=2, rdzv_endpoint="head:1234"), 1, python="python")
    assert multi[multi.index("--rdzv-endpoint") + 1] == "head:1234"
    assert multi[multi.index("--rdzv-id") + 1] == "epplan-" + "ab" * 6
    assert multi[-2:] == ["--node-rank", "1"] and multi[multi.index("--nproc-per-node") + 1] == "2"


def test_out_of_memory_message_counts_the_sequences_each_gpu_computes():
    """The message names what a GPU held: the global batch over the data-parallel groups (under TP
    a TP group's ranks compute the same sequences) and the micro-batches, as the trainer splits it."""
    from epplan.train.worker import _out_of_memory_message

    job = _job()  # 4 ranks on 2 nodes; tiny's global batch
    batch = PRESETS["tiny"].global_batch
    for tp, micro_batches in ((1, 1), (2, 1), (2, 2), (1, 2)):
        opts = TrainOptions.of(manifest="m.json", out="o", tp=tp, micro_batches=micro_batches)
        per_gpu = batch // (job.num_ranks // tp) // micro_batches
        message = _out_of_memory_message(job, opts, 0, RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
        assert f"with {per_gpu} sequences of 32 tokens per GPU per micro-batch" in message, (tp, micro_batches)

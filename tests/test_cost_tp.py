"""The cost and memory models of ``--tp`` against what the runtime does, and the TP run settings.

- In 4 gloo CPU processes (two TP groups of 2, float64, a dense layer and a MoE layer): the
  model's weight, gradient and optimizer bytes per rank are the bytes each rank holds, and the
  bytes its sequence parallelism all-gathers and reduce-scatters in a training step (recompute
  none, attention, block; and fp32 weights under CPU bf16 autocast, where the gathered norm
  outputs are fp32 and the linear outputs bf16) are the model's, which are also the TP link
  loads ``evaluate`` puts on a GPU's own link; under ``--expert-tp`` (block recompute) so are
  the bytes each rank holds (its slices of its group's union of experts) and sends to its group
  in the expert exchanges, given the rows it received; and so are the optimizer bytes under
  ``--optimizer-sharding all`` (AdamW's state over each TP rank's data-parallel group, the
  experts' over their replicas or, under ``--expert-tp``, over each hidden slice's replicas).
- ``shard_size`` is torch's chunking; ``--tp auto`` is the fastest of the fixed degrees that fit;
  TP's refusals; the manifest records tp and expert_tp and reads older ones as 1 / off; the CLI.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from epplan.cli import app
from epplan.cost.evaluate import evaluate, memory_for, tp_traffic
from epplan.cost.fit import choose_run_settings
from epplan.errors import PlacementError
from epplan.placement.baselines import baseline
from epplan.placement.problem import PlacementProblem
from epplan.placement.types import LayerPlacement, Placement
from epplan.runtime.testing import run_distributed
from epplan.topology import build_topology, load_topology, parse_spec
from epplan.workload import make_traffic
from epplan.workload.config import PRESETS
from epplan.workload.tensor_parallel import expert_tp_traffic, shard_size, sp_collectives
from epplan.workload.traffic import Traffic

G, TP = 4, 2
# Layer 0 dense, layer 1 MoE; heads and vocab split over 2.
CONFIG = PRESETS["tiny"].replace(dtype="fp64", num_kv_heads=2, global_batch=4, seq_len=8, num_dense_layers=1,
                                 dense_d_ff=48)
BF16 = CONFIG.replace(dtype="bf16")  # activations gathered in bf16, the loss statistics in fp32
# Expert 0 on ranks 0, 1 (one TP group) and 3 (the other), uneven splits; ranks 1 and 2 hold two
# experts. Under --expert-tp the groups hold {0, 2} and {0, 1, 3}.
PLACEMENT = Placement(G, 4, [LayerPlacement(
    [np.array(r) for r in ([0, 1, 3], [2], [1], [2])],
    [np.array([[0.5, 0.2, 0.3], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.2, 0.2, 0.6]]),
     np.ones((G, 1)), np.ones((G, 1)), np.ones((G, 1))])],
    method="test")
FOUR = """
name: four
node_types:
  box:
    gpus: 4
    gpu: {model: X, memory_gb: 80, bf16_tflops: 100, hbm_gbps: 1000}
    fabric: {kind: nvswitch, gbps: 100}
nodes:
  - {name: n0, type: box}
"""
# name -> (config, recompute, optimizer sharding, expert TP); the sharded ones split AdamW's state
# over the data-parallel group of each TP rank (ranks 0, 2 and 1, 3) and each expert's over its
# replicas, under --expert-tp over each hidden slice's (expert 0: slices on 0, 2 and on 1, 3).
CASES = {"none": (CONFIG, "none", "none", False), "attention": (CONFIG, "attention", "none", False),
         "block": (CONFIG, "block", "none", False), "bf16": (BF16, "none", "none", False),
         "etp": (CONFIG, "block", "none", True), "all": (CONFIG, "none", "all", False),
         "etp-all": (CONFIG, "block", "all", True)}
KINDS = {"_c10d_functional::all_gather_into_tensor": "all_gather",
         "_c10d_functional::reduce_scatter_tensor": "reduce_scatter"}


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def _held_and_moved(rank: int, world_size: int, tmp: str) -> None:
    import functools

    from torch.utils._python_dispatch import TorchDispatchMode

    from epplan.train.job import Job, Node
    from epplan.train.options import TrainOptions
    from epplan.train.trainer import Trainer

    class Collectives(TorchDispatchMode):
        """Bytes of the whole (gathered) tensor of every functional all-gather and reduce-scatter."""

        def __init__(self) -> None:
            super().__init__()
            self.bytes = {"all_gather": 0, "reduce_scatter": 0}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kind = KINDS.get(func._overloadpacket._qualified_op_name)
            if kind == "all_gather":
                self.bytes[kind] += args[0].numel() * args[0].element_size() * args[1]
            elif kind == "reduce_scatter":
                self.bytes[kind] += args[0].numel() * args[0].element_size()
            return func(*args, **(kwargs or {}))

    import epplan.runtime.expert_parallel as ep
    import epplan.runtime.expert_tensor_parallel as etp
    from epplan.runtime.recompute import is_replaying

    # --expert-tp's exchanges (uneven all-to-alls inside the TP group): bytes this rank sends to
    # the others, and the rows it received in dispatch (each forward, not its recompute).
    moved = {"etp_sent": 0, "rows": 0}
    exchange, group_mlp = ep._exchange, etp.group_expert_mlp

    def counting_exchange(out, x, output_splits, input_splits, group):
        if group is not None and torch.distributed.get_world_size(group) == TP:
            me = torch.distributed.get_rank(group)
            row = x[0].numel() * x.element_size() if x.shape[0] else 0
            moved["etp_sent"] += sum(n for i, n in enumerate(input_splits) if i != me) * row
        return exchange(out, x, output_splits, input_splits, group)

    def counting_mlp(recv_x, *args, **kwargs):
        if not is_replaying():
            moved["rows"] += recv_x.shape[0]
        return group_mlp(recv_x, *args, **kwargs)

    # The vocab-parallel loss's statistics: a plain all_gather over the TP group (floating point;
    # --expert-tp's int64 count gather is left out, as the model leaves it).
    all_gather = torch.distributed.all_gather

    def counting_all_gather(parts, tensor, group=None, async_op=False):
        if group is not None and torch.distributed.get_world_size(group) == TP and tensor.is_floating_point():
            mode.bytes["all_gather"] += tensor.numel() * tensor.element_size() * TP
        return all_gather(parts, tensor, group=group, async_op=async_op)

    ep._exchange, etp.group_expert_mlp = counting_exchange, counting_mlp
    torch.distributed.all_gather = counting_all_gather
    out = {}
    for recompute in CASES:
        config, setting, sharding, expert_tp = CASES[recompute]
        job = Job(config, PLACEMENT, "h", (Node("n0", tuple(range(G))),))
        opts = TrainOptions.of(manifest="m.json", out=f"{tmp}/{recompute}", steps=1, lr=0.01, ckpt_every=1,
                               keep_checkpoints=0, warmup_steps=0, tp=TP, micro_batches=2, recompute=setting,
                               optimizer_sharding=sharding, expert_tp=expert_tp)
        trainer = Trainer(job, opts, rank, torch.device("cpu"))
        if recompute == "bf16":  # as on GPUs: fp32 weights, bf16 autocast (CPU's)
            trainer.autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
        mode = Collectives()
        moved.update(etp_sent=0, rows=0)
        with mode:
            trainer.train_step()  # AdamW's state exists after the first step
        for p in trainer.model.parameters():  # gradients as a step holds them
            p.grad = torch.zeros_like(p)
        params = list(trainer.model.parameters())
        state = [v for _, s in trainer.optimizer.state_items() for v in s.values() if isinstance(v, torch.Tensor)]
        out[recompute] = {"weights": _local_bytes(params), "grads": _local_bytes(p.grad for p in params),
                          "optimizer": _local_bytes(state), "moved": mode.bytes, **moved}
    with open(f"{tmp}/held.{rank}", "w") as fh:
        json.dump(out, fh)


def _problem(config=CONFIG, **kw) -> PlacementProblem:
    topo = build_topology(parse_spec(FOUR))
    return PlacementProblem(topo, config, Traffic(np.ones((1, G, 4)), "test"), experts_per_gpu=2, tp=TP, **kw)


def test_tp_memory_and_collectives_are_what_the_ranks_hold_and_move(tmp_path):
    run_distributed(_held_and_moved, G, str(tmp_path))
    group_tokens = CONFIG.tokens_per_step / G * TP
    held = [json.loads((tmp_path / f"held.{rank}").read_text()) for rank in range(G)]
    for recompute, (config, setting, sharding, expert_tp) in CASES.items():
        problem = _problem(config=config, expert_tp=expert_tp)
        model = memory_for(PLACEMENT, problem, np.zeros((1, G)), 2, setting, sharding)
        expect = {kind: group_tokens * sum(x.count * x.bytes_per_token for x in sp_collectives(config, setting, TP)
                                           if x.kind == kind) for kind in ("all_gather", "reduce_scatter")}
        # The rows the ranks received in this step (the routing is the model's own), as served.
        served = np.array([[h[recompute]["rows"] for h in held]], dtype=np.float64)   # [L = 1, G]
        src, _, etp_bytes = expert_tp_traffic(served, TP, setting, CONFIG.d_model * 8)
        etp_sent = np.bincount(src, etp_bytes, minlength=G) if expert_tp else np.zeros(G)
        problem = dataclasses.replace(problem, recompute=setting, micro_batches=2)
        tp_loads = problem.topology.link_loads(tp_traffic(problem, served).toarray())
        if not expert_tp:  # evaluate's loads are the same function's
            np.testing.assert_allclose(evaluate(PLACEMENT, problem).tp_bytes, tp_loads, rtol=1e-6)
        for rank in range(G):
            h = held[rank][recompute]
            assert model["weight_bytes"][rank] == h["weights"], (recompute, rank)
            assert model["grad_bytes"][rank] == h["grads"], (recompute, rank)
            assert model["optimizer_bytes"][rank] == h["optimizer"], (recompute, rank)
            assert h["moved"] == pytest.approx(expect, rel=1e-12), (recompute, rank)
            assert h["etp_sent"] == pytest.approx(etp_sent[rank], rel=1e-12), (recompute, rank)
            # A ring hop carries (t - 1) / t of every collective, plus --expert-tp's rows: rank -> the switch.
            up = [problem.topology.link_name(k) for k in range(problem.topology.num_links)].index(
                f"n0/gpu{rank} -> n0/nvswitch")
            assert tp_loads[up] == pytest.approx(sum(h["moved"].values()) * (TP - 1) / TP + etp_sent[rank],
                                                 rel=1e-9)
    assert all(h["etp"]["etp_sent"] > 0 for h in held)
    # Sharding splits the optimizer's state (the model's per-rank bytes are checked above).
    assert all(h["all"]["optimizer"] < h["none"]["optimizer"] for h in held)
    # TP held less than TP = 1 would: attention, the dense MLP and the LM head are halved.
    problem = _problem()
    model = memory_for(PLACEMENT, problem, np.zeros((1, G)), 2, "none", "none")
    plain = memory_for(PLACEMENT, dataclasses.replace(problem, tp=1), np.zeros((1, G)), 2, "none", "none", tp=1)
    assert np.all(model["weight_bytes"] < plain["weight_bytes"])


@pytest.mark.parametrize("n,t", [(256, 2), (255, 2), (10, 4), (3, 4), (7, 8)])
def test_shard_size_is_torch_s_chunking(n, t):
    sizes = [c.numel() for c in torch.chunk(torch.arange(n), t)]
    assert [shard_size(n, t, i) for i in range(t)] == sizes + [0] * (t - len(sizes))


def _seed():
    topo = load_topology("topologies/dgx-h100-2node.yaml")
    config = PRESETS["seed"]
    problem = PlacementProblem(topo, config, make_traffic("uniform", config, topo.num_gpus), experts_per_gpu=1)
    return problem, baseline("contiguous", problem, 0)


def test_tp_auto_is_the_fastest_fixed_degree_that_fits():
    problem, plan = _seed()
    fixed = [choose_run_settings(plan, problem, tp=t) for t in (1, 2, 4, 8)]
    fits = [f for f in fixed if f.fits]
    assert len(fits) >= 2
    auto = choose_run_settings(plan, problem, tp=None)
    best = min(fits, key=lambda f: f.cost.step_time_s)
    assert auto.settings == best.settings and auto.cost.step_time_s == best.cost.step_time_s
    # TP halves the sharded weights' share; its collectives are on NVLink only.
    two = fixed[1].cost
    assert two.tp_s > 0 and two.weight_bytes.max() < fixed[0].cost.weight_bytes.max()
    classes = {problem.topology.link_class[k] for k in np.flatnonzero(two.tp_bytes)}
    assert classes == {"nvlink"}


def test_expert_tp_splits_the_group_s_experts_and_moves_their_rows():
    problem = _problem()
    base = evaluate(PLACEMENT, problem)
    etp = evaluate(PLACEMENT, dataclasses.replace(problem, expert_tp=True))
    # Replicas held: 1, 2, 2, 1; each rank then holds half of its group's union (1, 1, 1.5, 1.5).
    per_expert = problem.costs.params_per_expert * 8
    np.testing.assert_allclose(etp.weight_bytes - base.weight_bytes, np.array([0, -1, -0.5, 0.5]) * per_expert)
    served = base.expert_assignments                                  # [1, G]
    group = np.repeat(served.reshape(1, 2, 2).sum(axis=2) / 2, 2, axis=1)
    np.testing.assert_allclose(etp.expert_compute_s, group / served * base.expert_compute_s)
    assert np.all(etp.tp_bytes >= base.tp_bytes) and etp.tp_bytes.sum() > base.tp_bytes.sum()


def test_tp_with_optimizer_sharding_gathers_each_shard_over_its_data_parallel_group():
    """ZeRO's broadcasts after the step under TP 2: each rank's shards over its data-parallel
    group (ranks 0, 2 and 1, 3), so rank 0's link carries its ring hop of those, less than at TP 1;
    under all with --expert-tp each hidden slice's replicas gather 1 / t of the expert."""
    from epplan.workload.flops import optimizer_sync_bytes

    problem = _problem(optimizer_sharding="dense")
    topo = problem.topology
    up = [topo.link_name(k) for k in range(topo.num_links)].index("n0/gpu0 -> n0/nvswitch")
    dense = evaluate(PLACEMENT, problem)
    shards = optimizer_sync_bytes(problem.costs, CONFIG, "dense", TP)   # a rank's, in fp64
    d = G // TP
    assert dense.optimizer_sync_bytes[up] == pytest.approx(2 * (d - 1) / d * shards / 2, rel=1e-6)
    plain = evaluate(PLACEMENT, dataclasses.replace(problem, tp=1))
    assert 0 < dense.optimizer_sync_bytes[up] < plain.optimizer_sync_bytes[up]
    etp = evaluate(PLACEMENT, dataclasses.replace(problem, optimizer_sharding="all", expert_tp=True))
    # Expert 0's slices: rank 0 with rank 2 (its groups' TP rank 0), half of the expert each hop.
    slice_bytes = problem.costs.params_per_expert * 8 / TP
    assert etp.optimizer_sync_bytes[up] == pytest.approx(dense.optimizer_sync_bytes[up] + slice_bytes / 2, rel=1e-6)


def test_tp_refusals():
    with pytest.raises(PlacementError, match="divides the GPUs per node"):
        _problem().__class__(build_topology(parse_spec(FOUR)), CONFIG, Traffic(np.ones((1, G, 4)), "t"),
                             experts_per_gpu=2, tp=3)
    with pytest.raises(PlacementError, match="expert_tp"):
        dataclasses.replace(_problem(), tp=1, expert_tp=True)
    with pytest.raises(PlacementError, match="key/value heads"):
        dataclasses.replace(_problem(), tp=4)


def test_cli_tp_place_records_it_and_estimate_reads_it(tmp_path):
    runner = CliRunner()
    topo = tmp_path / "four.yaml"
    topo.write_text(FOUR)
    args = ["--topology", str(topo), "--model", "tiny", "--set", "num_kv_heads=2"]
    out = tmp_path / "m.json"
    result = runner.invoke(app, ["place", *args, "--placement", "contiguous", "--tp", "2", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["problem"]["tp"] == 2 and doc["problem"]["expert_tp"] is False
    result = runner.invoke(app, ["estimate", "--topology", str(topo), "--placement", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["run_settings"]["tp"] == 2
    # A manifest written before TP reads as tp 1.
    del doc["problem"]["tp"], doc["problem"]["expert_tp"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc))
    from epplan.manifest import load_manifest
    assert (load_manifest(old).tp, load_manifest(old).expert_tp) == (1, False)
    result = runner.invoke(app, ["estimate", *args, "--tp", "2", "--optimizer-sharding", "all", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["run_settings"]["optimizer_sharding"] == "all"
    result = runner.invoke(app, ["estimate", *args, "--tp", "3"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "divides the GPUs per node" in result.output
    result = runner.invoke(app, ["estimate", *args, "--tp", "auto", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["run_settings"]["tp"] in (1, 2)

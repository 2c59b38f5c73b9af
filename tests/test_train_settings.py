"""Run settings against the plain run, in 3 gloo CPU processes, float64.

- ``--recompute attention|block`` and ``--optimizer-sharding dense|all`` train exactly like the run
  with neither: the same losses, gradients and weights after several AdamW steps, the same
  routing statistics (a block recompute replays its routing: no second count, same splits), on a
  placement with replicas, uneven splits and a rank that holds no expert of a layer; so does a
  block recompute under hierarchical dispatch.
- The cost model's weight, gradient and optimizer bytes per rank are the bytes the ranks hold, under
  every sharding; its ZeRO all-gathers are the replicas' weights on the links.
- A checkpoint written in the background by 3 ranks with a sharded optimizer resumes on 2 ranks,
  unsharded, under another placement, and one written by 2 unsharded ranks resumes sharded on 3:
  every weight and every AdamW moment arrives, by name and logical expert (DCP reshards on load);
  so does one written with the experts' state sharded (``all``) into an unsharded run, and back.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from epplan.placement.types import LayerPlacement, Placement
from epplan.runtime.testing import run_distributed
from epplan.train.job import Job, Node
from epplan.workload.config import PRESETS

CONFIG = PRESETS["tiny"].replace(dtype="fp64", global_batch=12)
SPLIT = np.array([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]])  # each source rank's shares of a replicated expert
# Rank 2 holds no expert of layer 0; experts 0 (layer 0) and 1 (layer 1) have two replicas.
THREE = Placement(3, 4, [
    LayerPlacement([np.array(r) for r in ([0, 1], [1], [0], [1])],
                   [SPLIT, np.ones((3, 1)), np.ones((3, 1)), np.ones((3, 1))]),
    LayerPlacement([np.array(r) for r in ([2], [0, 2], [1], [2])],
                   [np.ones((3, 1)), SPLIT[:, ::-1].copy(), np.ones((3, 1)), np.ones((3, 1))]),
], method="test")
TWO = Placement(2, 4, [LayerPlacement([np.array(r) for r in reps], [np.full((2, len(r)), 1 / len(r)) for r in reps])
                       for reps in ([[1], [0], [0, 1], [1]], [[0], [1], [1], [0]])], method="test")


def _trainer(placement: Placement, out: str, steps: int, config=CONFIG, **kw):
    from epplan.train.options import TrainOptions
    from epplan.train.trainer import Trainer

    nodes = (Node("n0", tuple(range(placement.num_ranks))),)
    opts = TrainOptions.of(manifest="m.json", out=out, steps=steps, lr=0.01, ckpt_every=steps, keep_checkpoints=0,
                           warmup_steps=0, **kw)
    return Trainer(Job(config, placement, f"h{placement.num_ranks}", nodes), opts,
                   torch.distributed.get_rank(), torch.device("cpu"))


def _grads(trainer) -> dict[str, torch.Tensor]:
    """The single-device model's gradient of one more micro-batch (each expert once)."""
    from epplan.runtime.expert_parallel import gather_state_dict, sync_gradients

    model = trainer.model
    model.zero_grad(set_to_none=True)
    x, y = trainer.data.batch(trainer.step, 0)
    model(x, y)[1].backward()
    sync_gradients(model)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(p.grad)
        grads = gather_state_dict(model)
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    return {n: grads[n] for n in saved}


def _same_training(rank: int, world_size: int, tmp: str) -> None:
    from epplan.runtime.expert_parallel import gather_state_dict

    def run(name: str, **kw):
        trainer = _trainer(THREE, f"{tmp}/{name}", 3, micro_batches=2, **kw)
        records = [trainer.train_step() for _ in range(3)]
        return trainer, records

    plain, plain_records = run("plain")
    plain_weights, plain_grads = gather_state_dict(plain.model), _grads(plain)
    for kw in ({"recompute": "block"}, {"recompute": "attention", "optimizer_sharding": "dense"},
               {"recompute": "block", "optimizer_sharding": "dense"}, {"optimizer_sharding": "all"},
               {"recompute": "block", "dispatch": "hierarchical"}):
        trainer, records = run("-".join(kw.values()), **kw)
        for a, b in zip(records, plain_records):
            np.testing.assert_allclose([a["loss"], a["aux_loss"], a["grad_norm"]],
                                       [b["loss"], b["aux_loss"], b["grad_norm"]], rtol=1e-12, err_msg=str(kw))
            assert a["tokens_per_expert"] == b["tokens_per_expert"], kw  # routing counted once
            if "dispatch" not in kw:  # hierarchical dispatch sends a token once per GPU
                assert a["dispatch_bytes"] == b["dispatch_bytes"], kw  # the same splits
        weights, grads = gather_state_dict(trainer.model), _grads(trainer)
        for key in plain_weights:
            torch.testing.assert_close(weights[key], plain_weights[key], rtol=1e-11, atol=1e-13, msg=f"{kw} {key}")
        for key in plain_grads:
            torch.testing.assert_close(grads[key], plain_grads[key], rtol=1e-10, atol=1e-13, msg=f"{kw} {key}")
    # The weights moved: the comparison is not of initial values.
    initial = gather_state_dict(_trainer(THREE, f"{tmp}/init", 1).model)
    for key in ("layers.0.ffn.experts.w1", "layers.1.attn.wq.weight"):
        assert (plain_weights[key] - initial[key]).abs().max() > 1e-3, key


def test_recompute_and_sharded_optimizer_train_exactly_like_the_plain_run(tmp_path):
    run_distributed(_same_training, 3, str(tmp_path))


def _same_with_bf16_moments(rank: int, world_size: int, tmp: str) -> None:
    from epplan.runtime.expert_parallel import gather_state_dict

    config = CONFIG.replace(optimizer_state_dtype="bf16")
    runs = {}
    for sharding in ("none", "dense", "all"):
        trainer = _trainer(THREE, f"{tmp}/bf16-{sharding}", 3, config, micro_batches=2, optimizer_sharding=sharding)
        records = [trainer.train_step() for _ in range(3)]
        moments = {s[k].dtype for _, s in trainer.optimizer.state_items() for k in ("exp_avg", "exp_avg_sq")}
        assert moments == {torch.bfloat16}, (sharding, moments)
        runs[sharding] = (gather_state_dict(trainer.model), [r["loss"] for r in records])
    for sharding in ("dense", "all"):  # each rank steps its share with the same arithmetic
        weights, losses = runs[sharding]
        assert losses == runs["none"][1], sharding
        for key, value in runs["none"][0].items():
            assert torch.equal(weights[key], value), (sharding, key)


def test_bf16_moments_sharded_train_exactly_like_unsharded(tmp_path):
    """optimizer_state_dtype bf16 under ZeRO (dense, all): ZeRO's inner optimizers are the
    one-pass step with bf16 moments; the weights equal the unsharded bf16 run's, bit for bit."""
    run_distributed(_same_with_bf16_moments, 3, str(tmp_path))


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _held_bytes(rank: int, world_size: int, tmp: str, results: str, moments: str = "fp32") -> None:
    import json

    config = CONFIG.replace(optimizer_state_dtype=moments)
    for sharding in ("none", "dense", "all"):
        trainer = _trainer(THREE, f"{tmp}/{sharding}", 1, config, optimizer_sharding=sharding)
        trainer.train_step()  # AdamW's state exists after the first step
        for p in trainer.model.parameters():  # gradients as a step holds them
            p.grad = torch.zeros_like(p)
        params = list(trainer.model.parameters())
        state = [v for _, s in trainer.optimizer.state_items() for v in s.values() if isinstance(v, torch.Tensor)]
        held = {"weights": _bytes(params), "grads": _bytes(p.grad for p in params), "optimizer": _bytes(state)}
        with open(f"{results}.{sharding}.{rank}", "w") as fh:
            json.dump(held, fh)


@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_memory_accounting_is_the_bytes_the_ranks_hold(tmp_path, moments):
    """Also with AdamW's moments in bf16 (optimizer_state_dtype), sharded or not."""
    import json

    from epplan.cost.evaluate import memory_for
    from epplan.placement.problem import PlacementProblem
    from epplan.topology import build_topology, parse_spec
    from epplan.workload.traffic import Traffic

    run_distributed(_held_bytes, 3, str(tmp_path), str(tmp_path / "held"), moments)
    config = CONFIG.replace(optimizer_state_dtype=moments)
    topo = build_topology(parse_spec("""
name: three
node_types:
  box:
    gpus: 3
    gpu: {model: X, memory_gb: 80, bf16_tflops: 100, hbm_gbps: 1000}
    fabric: {kind: nvswitch, gbps: 100}
nodes:
  - {name: n0, type: box}
"""))
    problem = PlacementProblem(topo, config, Traffic(np.ones((2, 3, 4)), "test"), experts_per_gpu=4)
    for sharding in ("none", "dense", "all"):  # 2 micro-batches: every gradient held at the peak
        model = memory_for(THREE, problem, np.zeros((2, 3)), 2, "none", sharding)
        for rank in range(3):
            held = json.loads((tmp_path / f"held.{sharding}.{rank}").read_text())
            assert model["weight_bytes"][rank] == held["weights"], (sharding, rank)
            assert model["grad_bytes"][rank] == held["grads"], (sharding, rank)
            assert model["optimizer_bytes"][rank] == held["optimizer"], (sharding, rank)
    optimizer = {s: memory_for(THREE, problem, np.zeros((2, 3)), 1, "none", s)["optimizer_bytes"].sum()
                 for s in ("none", "dense", "all")}
    assert optimizer["all"] < optimizer["dense"] < optimizer["none"]
    # Link loads of ZeRO's weight all-gathers: under "all" each replicated expert's (k - 1) x its
    # bytes more, each byte over two links (GPU -> switch -> GPU).
    import dataclasses

    from epplan.cost.evaluate import evaluate
    from epplan.workload.flops import model_costs

    sync = {s: evaluate(THREE, dataclasses.replace(problem, optimizer_sharding=s)).optimizer_sync_bytes
            .astype(np.float64).sum() for s in ("none", "dense", "all")}
    expert_bytes = model_costs(CONFIG).params_per_expert * 8  # fp64
    extra = sum(len(r) - 1 for layer in THREE.layers for r in layer.replicas) * expert_bytes * 2
    assert sync["none"] == 0 and sync["dense"] > 0 and sync["all"] - sync["dense"] == extra == 4 * expert_bytes


def _save_and_hold(rank: int, world_size: int, out: str, sharding: str, run_async: str) -> None:
    placement = THREE if world_size == 3 else TWO
    trainer = _trainer(placement, out, 2, optimizer_sharding=sharding, recompute="block", async_checkpoints=run_async)
    trainer.run(resume=False, show_progress=False)  # checkpoint at step 2
    experts = {n: m.local_experts for n, m in trainer.model.named_modules() if hasattr(m, "local_experts")}
    state = {n: (trainer.optimizer.expert_slot_states(p) if n.rsplit(".", 1)[0] in experts
                 else trainer.optimizer.state_of(p)) for n, p in trainer.model.named_parameters()}
    local = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    torch.save({"state": {n: s for n, s in state.items() if s}, "weights": local, "experts": experts},
               f"{out}/held{rank}.pt")


def _resume_and_compare(rank: int, world_size: int, out: str, sharding: str, saved_ranks: int) -> None:
    trainer = _trainer(THREE if world_size == 3 else TWO, out, 3, optimizer_sharding=sharding)
    info, moved = trainer.resume()
    assert info.step == 2 and moved
    saved = [torch.load(f"{out}/held{r}.pt") for r in range(saved_ranks)]
    for name, p in trainer.model.named_parameters():
        state = trainer.optimizer.state_of(p)
        module = name.rsplit(".", 1)[0]
        if module not in saved[0]["experts"]:  # dense: from a rank that kept it
            torch.testing.assert_close(p, saved[0]["weights"][name], rtol=0, atol=0)
            if state is None:
                assert sharding != "none"  # another rank keeps it now
                continue
            held = next(s["state"][name] for s in saved if name in s["state"])
            for key in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(state[key], held[key], rtol=0, atol=0)
            continue
        slot_states = trainer.optimizer.expert_slot_states(p)
        for j, e in enumerate(trainer.model.get_submodule(module).local_experts):  # by logical id
            holders = [(r, saved[r]["experts"][module].index(e)) for r in range(saved_ranks)
                       if e in saved[r]["experts"][module]]
            r, i = holders[0]
            torch.testing.assert_close(p[j], saved[r]["weights"][name][i], rtol=0, atol=0)
            if slot_states[j] is None:
                assert sharding == "all"  # another replica keeps it now
                continue
            r, i = next((r, i) for r, i in holders if saved[r]["state"][name][i] is not None)
            for key in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(slot_states[j][key], saved[r]["state"][name][i][key], rtol=0, atol=0)
    kept = sum(trainer.optimizer.state_of(p) is not None for p in trainer.model.parameters())
    assert kept < len(list(trainer.model.parameters())) or sharding == "none"
    trainer.train_step()  # and it trains on


def test_a_sharded_checkpoint_resumes_on_another_world_size_and_placement(tmp_path):
    run_distributed(_save_and_hold, 3, str(tmp_path), "dense", "on")  # written in the background
    run_distributed(_resume_and_compare, 2, str(tmp_path), "none", 3)


def test_an_unsharded_checkpoint_resumes_sharded_on_more_ranks(tmp_path):
    run_distributed(_save_and_hold, 2, str(tmp_path), "none", "off")
    run_distributed(_resume_and_compare, 3, str(tmp_path), "all", 2)


def test_a_checkpoint_with_expert_state_sharded_resumes_unsharded(tmp_path):
    run_distributed(_save_and_hold, 3, str(tmp_path), "all", "on")
    run_distributed(_resume_and_compare, 2, str(tmp_path), "none", 3)


def _replan_with_sharded_experts(rank: int, world_size: int, out: str) -> None:
    import pytest

    from epplan.errors import RuntimeSetupError

    with pytest.raises(RuntimeSetupError, match="use optimizer_sharding=dense with replan_every") as exc:
        _trainer(THREE, out, 2, optimizer_sharding="all", replan_every=2)
    assert "use --optimizer-sharding dense with --replan-every" in exc.value.cli_message()


def test_live_replan_refuses_expert_state_sharded_over_replicas(tmp_path):
    run_distributed(_replan_with_sharded_experts, 3, str(tmp_path))

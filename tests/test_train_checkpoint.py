"""Checkpoints and the training step in 2 gloo CPU processes, without torchrun.

- Re-placement: a checkpoint written under placement A, loaded under placement B (experts on
  other ranks, one replicated, a rank holding no expert of a layer), holds the same single-device
  model; one more step from it under B matches one more step under A, which needs the AdamW
  moments to have moved with the experts.
- Atomicity: half-written and damaged checkpoint directories are ignored; a write that fails on
  one rank fails on all, and the earlier checkpoint stays the newest.
- Asynchronous save: the checkpoint holds the state at ``save``, not what training wrote after.
- --keep-checkpoints 1 never deletes the newest known-good checkpoint for a newer, unconfirmed one.
- Divergence: a NaN loss stops the step before the optimizer touches the weights, with a message
  naming the step and the last good checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from epplan.placement.types import LayerPlacement, Placement
from epplan.runtime.testing import run_distributed
from epplan.train.checkpoint import latest, list_checkpoints
from epplan.train.job import Job, Node
from epplan.workload.config import PRESETS

G = 2


def _placement(*layers: list[list[int]]) -> Placement:
    return Placement(G, 4, [LayerPlacement([np.array(r) for r in reps], [np.full((G, len(r)), 1 / len(r)) for r in reps])
                            for reps in layers], method="test")


A = _placement([[0], [0], [1], [1]], [[0], [0], [1], [1]])
B = _placement([[1], [0, 1], [1], [1]], [[1], [1], [1], [1]])  # rank 0 holds no expert of layer 1


def _job(placement: Placement, name: str, state_dtype: str = "fp32") -> Job:
    return Job(PRESETS["tiny"].replace(optimizer_state_dtype=state_dtype), placement, name, (Node("n0", (0, 1)),))


def _trainer(job: Job, out: str, steps: int, **kw):
    from epplan.train.options import TrainOptions
    from epplan.train.trainer import Trainer

    opts = TrainOptions.of(**{"manifest": "m.json", "out": out, "steps": steps, "lr": 0.01, "ckpt_every": 2,
                           "keep_checkpoints": 0, **kw})
    return Trainer(job, opts, torch.distributed.get_rank(), torch.device("cpu"))


def _replace_and_step(rank: int, world_size: int, out: str, state_dtype: str = "fp32") -> None:
    from epplan.runtime.expert_parallel import gather_state_dict

    a = _trainer(_job(A, "A", state_dtype), out, steps=4)
    a.run(resume=False, show_progress=False)  # checkpoints at 2 and 4
    saved = gather_state_dict(a.model)
    b = _trainer(_job(B, "B", state_dtype), out, steps=5)
    info, moved = b.resume()
    assert (info.step, moved, b.step) == (4, True, 4)
    loaded = gather_state_dict(b.model)
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
    moments = {state[k].dtype for _, state in b.optimizer.state_items() for k in ("exp_avg", "exp_avg_sq")}
    assert moments == {torch.bfloat16 if state_dtype == "bf16" else torch.float32}
    assert b.routing_steps == 0  # a new manifest starts new routing statistics
    a.opts = b.opts  # the same schedule for step 5
    a.train_step()
    b.train_step()
    after_a, after_b = gather_state_dict(a.model), gather_state_dict(b.model)
    for key in after_a:
        # Same math on other ranks: only the order of float32 sums differs.
        torch.testing.assert_close(after_b[key], after_a[key], rtol=1e-5, atol=1e-6, msg=key)
        if "experts" in key:  # and the step moved the experts by much more than that
            assert (after_a[key] - saved[key]).abs().max() > 1e-3


def test_checkpoint_moves_experts_and_their_optimizer_state_to_a_new_placement(tmp_path):
    run_distributed(_replace_and_step, G, str(tmp_path))
    meta = json.loads((tmp_path / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta["expert_owners"] == {"layers.0.ffn.experts": [0, 0, 1, 1], "layers.1.ffn.experts": [0, 0, 1, 1]}
    assert meta["manifest_hash"] == "A" and meta["data"]["next_step"] == 4
    assert set(meta["files"]) == {".metadata", "__0_0.distcp", "__1_0.distcp"}  # DCP's files
    assert meta["writer"] == "torch.distributed.checkpoint" and meta["optimizer_sharding"] == "none"

    # Atomicity: damaged or half-written checkpoints are skipped, the newest good one wins.
    root = tmp_path / "checkpoints"
    assert [c.step for c in list_checkpoints(root)] == [2, 4]
    shutil.copytree(root / "step_00000004", root / ".step_00000006.tmp")  # crashed before the rename
    shutil.copytree(root / "step_00000004", root / "step_00000007")
    (root / "step_00000007" / "meta.json").unlink()  # no meta: never completed
    shutil.copytree(root / "step_00000004", root / "step_00000008")
    with open(root / "step_00000008" / "__1_0.distcp", "r+b") as fh:
        fh.truncate(100)  # a short file
    assert latest(root).step == 4


def test_bf16_adamw_moments_survive_a_checkpoint_and_a_new_placement(tmp_path):
    """``optimizer_state_dtype`` bf16: the moments are bf16, written and read back as bf16 by the
    checkpoint, moved with the experts, and the step after the re-placement matches the step
    under the old placement."""
    run_distributed(_replace_and_step, G, str(tmp_path), "bf16")


def _diverge(rank: int, world_size: int, out: str) -> None:
    from epplan.train.trainer import TrainingDiverged

    trainer = _trainer(_job(A, "A"), out, steps=4)
    trainer.run(resume=False, show_progress=False)  # checkpoints at 2 and 4
    with torch.no_grad():
        trainer.model.lm_head.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(TrainingDiverged) as caught:
        trainer.train_step()
    message = str(caught.value)
    root = Path(out) / "checkpoints"
    assert "training stopped at step 5: the loss is nan" in message
    # Step 4's checkpoint holds the weights step 5 diverged from: the one named is from before.
    assert f"the last good checkpoint is {root / 'step_00000002'} (step 2)" in message
    assert "step_00000004, written after the weights diverged, is kept as step_00000004.diverged" in message
    for key, value in trainer.model.state_dict().items():  # no optimizer step: bitwise the same, NaN included
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True, msg=key)
    torch.distributed.barrier()
    assert latest(root).step == 2 and (root / "step_00000004.diverged").is_dir()


def test_nan_loss_stops_with_the_step_and_the_last_good_checkpoint(tmp_path):
    run_distributed(_diverge, G, str(tmp_path))


def _huge_lr(rank: int, world_size: int, out: str) -> None:
    """The issue's reproducer: --lr 1e6 --ckpt-every 1 diverges at step 2; step 1's checkpoint
    already holds the diverged weights and must not be named as good."""
    from epplan.train.trainer import TrainingDiverged

    trainer = _trainer(_job(A, "A"), out, steps=6, warmup_steps=0)
    trainer.opts = trainer.opts.replace(lr=1e6, ckpt_every=1)
    trainer.lr = 1e6
    with pytest.raises(TrainingDiverged) as caught:
        trainer.run(resume=False, show_progress=False)
    message = str(caught.value)
    step = int(message.split("training stopped at step ")[1].split(":")[0])
    root = Path(out) / "checkpoints"
    torch.distributed.barrier()
    good = latest(root)
    if step <= 2:
        assert "no checkpoint from before the divergence" in message and good is None, message
    else:
        assert good.step == step - 2 and f"(step {step - 2})" in message, message
    assert (root / f"step_{step - 1:08d}.diverged").is_dir()


def test_huge_learning_rate_never_names_the_diverged_checkpoint(tmp_path):
    run_distributed(_huge_lr, G, str(tmp_path))


def _async_copy_and_failed_write(rank: int, world_size: int, out: str) -> None:
    """dcp.async_save's host copy is the checkpoint: the weights changed right after ``save``
    returns do not reach the files. A write that fails on one rank fails on both, with a message,
    and leaves the earlier checkpoint the newest."""
    import errno

    import torch.distributed.checkpoint as dcp

    from epplan.train import checkpoint
    from epplan.train.checkpoint import CheckpointError

    trainer = _trainer(_job(A, "A"), out, steps=2, async_checkpoints="on")
    for _ in range(2):
        trainer.train_step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = {n: trainer.optimizer.state_of(p)["exp_avg"].clone() for n, p in trainer.model.named_parameters()}
    trainer.save()  # returns once staged; DCP's thread writes the files
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.fill_(float("nan"))
            trainer.optimizer.state_of(p)["exp_avg"].fill_(float("nan"))
    trainer.finish_checkpoint()
    fresh = _trainer(_job(A, "A"), out, steps=4)
    info, _ = fresh.resume()
    assert info.step == 2
    for key, value in fresh.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for name, p in fresh.model.named_parameters():
        assert torch.equal(fresh.optimizer.state_of(p)["exp_avg"], moments[name]), name

    write_data = dcp.FileSystemWriter.write_data

    def disk_full_on_rank_1(self, plan, planner):
        if rank == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_data(self, plan, planner)

    dcp.FileSystemWriter.write_data = disk_full_on_rank_1
    fresh.train_step()
    with pytest.raises(CheckpointError) as caught:
        fresh.save()
    assert "cannot write the checkpoint" in str(caught.value) and "the earlier checkpoints are intact" in str(caught.value)
    assert "No space left on device" in str(caught.value)
    dcp.FileSystemWriter.write_data = write_data
    torch.distributed.barrier()
    assert [c.step for c in checkpoint.list_checkpoints(Path(out) / "checkpoints")] == [2]


def test_async_checkpoint_is_the_state_at_save_and_a_failed_write_keeps_the_last(tmp_path):
    run_distributed(_async_copy_and_failed_write, G, str(tmp_path))


def _prune_race(rank: int, world_size: int, out: str) -> None:
    """--keep-checkpoints 1 with a background writer: when a step confirms checkpoint 1, a newer
    checkpoint (2) may already be complete on disk though not yet known good (its writer has
    renamed it and not returned). Confirming 1 must not delete 1 for it."""
    trainer = _trainer(_job(A, "A"), out, steps=3, keep_checkpoints=1)
    trainer.train_step()
    trainer.save()  # checkpoint 1: complete, unconfirmed
    root = Path(out) / "checkpoints"
    if rank == 0:  # what the writer of checkpoint 2 leaves between its rename and its return
        shutil.copytree(root / "step_00000001", root / "step_00000002")
    torch.distributed.barrier()
    trainer.train_step()  # finite: confirms checkpoint 1, and prunes
    torch.distributed.barrier()
    assert [c.step for c in list_checkpoints(root)] == [1, 2]
    trainer.unconfirmed, trainer.last_step = root / "step_00000002", 2  # the writer returns
    trainer.train_step()  # confirms 2: now 1 goes
    torch.distributed.barrier()
    assert [c.step for c in list_checkpoints(root)] == [2]


def test_keep_one_never_prunes_the_last_good_checkpoint_for_an_unconfirmed_one(tmp_path):
    run_distributed(_prune_race, G, str(tmp_path))


def test_a_checkpoint_of_the_torch_save_format_is_named_not_loaded(tmp_path):
    from epplan.train.checkpoint import scan

    old = tmp_path / "step_00000003"
    old.mkdir()
    (old / "meta.json").write_text(json.dumps({"format": "epplan.checkpoint", "version": 1, "step": 3}))
    (old / "dense.pt").write_bytes(b"x")
    complete, damaged = scan(tmp_path)
    assert complete == [] and len(damaged) == 1
    assert "written by an earlier epplan as a torch.save file per rank (format version 1)" in damaged[0]
    assert "continue that run with the epplan that wrote it" in damaged[0]

"""``epplan run --tp``: the training loop with tensor parallelism against the same run without,
in 2 gloo CPU processes, float64 (one TP group of 2; experts over both ranks).

- Losses, gradient norms and the weights after AdamW steps (clipped) equal the TP = 1 run's,
  also with every block recomputed in backward, and with the experts split over the TP group
  (``expert_tp``).
- In 4 processes (TP 2 x DP 2), AdamW's state sharded under TP equals the unsharded run, and
  its checkpoints resume under other shardings and TP degrees.
- A TP = 1 checkpoint resumes at TP = 2 and a TP = 2 one at TP = 1, with and without expert TP
  (DCP reshards the DTensor weights and moments, the experts' hidden slices included), each
  ending where the uninterrupted run ends.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from epplan.errors import RuntimeSetupError
from epplan.placement.types import LayerPlacement, Placement
from epplan.runtime.testing import run_distributed
from epplan.train.job import Job, Node
from epplan.runfiles import read_metrics
from epplan.workload.config import PRESETS

G = 2
PLACEMENT = Placement(G, 4, [LayerPlacement([np.array(r) for r in reps], [np.full((G, len(r)), 1 / len(r)) for r in reps])
                             for reps in ([[0, 1], [0], [1], [0, 1]], [[1], [0, 1], [0], [1]])], method="test")
CONFIG = PRESETS["tiny"].replace(dtype="fp64", num_kv_heads=2, global_batch=4, seq_len=8)
TOL = dict(rtol=1e-9, atol=1e-12)


# TP 2 x DP 2 on one node of 4: expert 0 on ranks 0, 1 (one TP group) and 3, uneven splits.
PLACEMENT4 = Placement(4, 4, [LayerPlacement(
    [np.array(r) for r in reps], [np.random.default_rng(i).dirichlet(np.ones(len(r)), size=4) for r in reps])
    for i, reps in enumerate(([[0, 1, 3], [2], [1], [2, 3]], [[0], [1, 2], [3], [0, 2]]))], method="test")


def _trainer(out: str, steps: int, placement: Placement = PLACEMENT, **kw):
    from epplan.train.options import TrainOptions
    from epplan.train.trainer import Trainer

    job = Job(CONFIG, placement, "h", (Node("n0", tuple(range(placement.num_ranks))),))
    opts = TrainOptions.of(**{"manifest": "m.json", "out": out, "steps": steps, "lr": 0.01, "ckpt_every": 2,
                           "keep_checkpoints": 0, "grad_clip": 0.05, **kw})
    return Trainer(job, opts, torch.distributed.get_rank(), torch.device("cpu"))


def _weights(trainer) -> dict[str, torch.Tensor]:
    from epplan.runtime.tensor_parallel import full_state_dict

    return full_state_dict(trainer.model) if trainer.opts.parallel.tp > 1 else _ep_state(trainer)


def _ep_state(trainer) -> dict[str, torch.Tensor]:
    from epplan.runtime.expert_parallel import gather_state_dict

    return gather_state_dict(trainer.model)


def _records(trainer, steps: int) -> list[tuple[float, float]]:
    return [(r["loss"] + r["aux_loss"], r["grad_norm"]) for r in (trainer.train_step() for _ in range(steps))]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **TOL, msg=name)


def _tp_equals_plain(rank: int, world_size: int, tmp: str) -> None:
    plain = _trainer(f"{tmp}/plain", 3)
    tp = _trainer(f"{tmp}/tp", 3, tp=2)
    assert tp.model.layers[0].attn.num_heads == CONFIG.num_heads // 2
    recomputed = _trainer(f"{tmp}/tp-block", 3, tp=2, recompute="block")
    split = _trainer(f"{tmp}/etp-block", 3, tp=2, expert_tp=True, recompute="block")
    assert split.model.expert_parallel.layers[0].w1.shape[2] * 2 == CONFIG.d_ff
    plain_records = _records(plain, 3)
    for other in (tp, recomputed, split):
        np.testing.assert_allclose(_records(other, 3), plain_records, rtol=1e-9)
        _assert_same(_weights(other), _weights(plain))
    assert plain_records[0][1] > 0.05  # the clip acted


def test_tp2_training_steps_equal_tp1(tmp_path):
    run_distributed(_tp_equals_plain, G, str(tmp_path))


def _resume_across_tp(rank: int, world_size: int, tmp: str) -> None:
    straight = _trainer(f"{tmp}/straight", 4)
    straight.run(resume=False, show_progress=False)
    for (first, etp_first), (then, etp_then) in (((1, False), (2, False)), ((2, False), (1, False)),
                                                 ((1, False), (2, True)), ((2, True), (1, False))):
        out = f"{tmp}/{first}{'e' * etp_first}-{then}{'e' * etp_then}"
        _trainer(out, 2, tp=first, expert_tp=etp_first).run(resume=False, show_progress=False)  # a checkpoint at step 2
        resumed = _trainer(out, 4, tp=then, expert_tp=etp_then)
        resumed.run(resume=True, show_progress=False)
        start = [r for r in read_metrics(Path(out) / "metrics.jsonl") if r["kind"] == "start"][-1]
        assert (start["step"], start["tp"], start["expert_tp"], Path(start["resumed_from"]).name) == \
            (2, then, etp_then, "step_00000002"), start
        assert resumed.step == 4
        _assert_same(_weights(resumed), _weights(straight))


def test_checkpoints_resume_across_a_change_of_tp(tmp_path):
    run_distributed(_resume_across_tp, G, str(tmp_path))


def _sharded_under_tp(rank: int, world_size: int, tmp: str) -> None:
    plain = _trainer(f"{tmp}/plain", 3, PLACEMENT4)  # TP 1, AdamW's state whole on every rank
    plain_records, plain_weights = _records(plain, 3), _weights(plain)
    for tp, sharding, etp in ((2, "none", False), (2, "dense", False), (2, "all", False), (2, "all", True)):
        run = _trainer(f"{tmp}/{tp}-{sharding}-{etp}", 3, PLACEMENT4, tp=tp, optimizer_sharding=sharding,
                       expert_tp=etp)
        if sharding != "none":  # this rank keeps a part of its dense shards' state
            assert run.optimizer.zero is not None and run.optimizer.dense_views
        np.testing.assert_allclose(_records(run, 3), plain_records, rtol=1e-9)
        _assert_same(_weights(run), plain_weights)
    straight = _trainer(f"{tmp}/straight", 4, PLACEMENT4)
    straight.run(resume=False, show_progress=False)
    for first, then in (((2, "all", False), (2, "all", False)), ((1, "dense", False), (2, "all", True)),
                        ((2, "dense", False), (1, "none", False))):
        out = f"{tmp}/{'-'.join(map(str, first + then))}"
        settings = [dict(tp=t, optimizer_sharding=s, expert_tp=e) for t, s, e in (first, then)]
        _trainer(out, 2, PLACEMENT4, **settings[0]).run(resume=False, show_progress=False)  # a checkpoint at step 2
        resumed = _trainer(out, 4, PLACEMENT4, **settings[1])
        resumed.run(resume=True, show_progress=False)
        assert resumed.step == 4
        _assert_same(_weights(resumed), _weights(straight))


def test_optimizer_sharding_under_tp_equals_the_unsharded_run_and_resumes(tmp_path):
    """TP 2 x DP 2, float64: AdamW's state sharded dense or all (with and without expert TP)
    gives the TP 1 unsharded run's losses, gradient norms and weights after clipped AdamW steps
    (``test_train_step`` compares that run with the single-device model); checkpoints written with
    sharding under TP resume under another sharding and TP degree, ending where the
    uninterrupted run ends."""
    run_distributed(_sharded_under_tp, 4, str(tmp_path))


def test_tp_that_splits_no_node_is_refused():
    from epplan.train.options import TrainOptions
    from epplan.train.job import check_tp

    job = Job(CONFIG, PLACEMENT, "h", (Node("n0", (0,)), Node("n1", (1,))))
    with pytest.raises(RuntimeSetupError, match=r"node n0's ranks \[0\] do not form groups of 2"):
        check_tp(job, TrainOptions.of(manifest="m.json", out="o", tp=2))
    one_node = Job(CONFIG, PLACEMENT, "h", (Node("n0", (0, 1)),))
    for kw, message in ((dict(tp=1), "--expert-tp splits the experts over each TP group, and --tp is 1"),
                        (dict(tp=2, dispatch="hierarchical"), "--expert-tp with --dispatch hierarchical: not supported"),
                        (dict(tp=2, replan_every=4), "--replan-every with --expert-tp: not supported")):
        with pytest.raises(RuntimeSetupError) as exc:
            check_tp(one_node, TrainOptions.of(manifest="m.json", out="o", expert_tp=True, **kw))
        assert message in exc.value.cli_message() and "--" not in str(exc.value)  # library words, CLI flags
    with pytest.raises(RuntimeSetupError, match="the experts' hidden size 33 does not split over tp=2") as exc:
        check_tp(Job(CONFIG.replace(d_ff=33), PLACEMENT, "h", (Node("n0", (0, 1)),)),
                 TrainOptions.of(manifest="m.json", out="o", tp=2, expert_tp=True))
    assert "the experts' hidden size 33 does not split over --tp 2" in exc.value.cli_message()


def test_run_takes_tp_from_the_manifest_unless_a_flag_overrides_it():
    from epplan.cli.run import run_settings

    none = dict(micro_batches=None, recompute=None, optimizer_sharding=None, tp=None, expert_tp=None)
    recorded = {"micro_batches": 1, "recompute": "none", "optimizer_sharding": "none", "tp": 2, "expert_tp": True}
    job = Job(CONFIG, PLACEMENT, "h", (Node("n0", (0, 1)),), recorded)
    assert run_settings(job, none) == (recorded, [])
    settings, overridden = run_settings(job, {**none, "expert_tp": False, "tp": 2})
    assert (settings["tp"], settings["expert_tp"], overridden) == (2, False, ["expert_tp"])
    older = Job(CONFIG, PLACEMENT, "h", (Node("n0", (0, 1)),), {"micro_batches": 2, "recompute": "block",
                                                                "optimizer_sharding": "none"})
    settings, overridden = run_settings(older, none)  # a manifest from before TP: 1, off
    assert (settings["tp"], settings["expert_tp"], settings["micro_batches"], overridden) == (1, False, 2, [])
    assert run_settings(older, {**none, "tp": 2})[1] == ["tp"]

"""Live re-placement: ``epplan run --replan-every K`` re-plans the experts from the routing the
run sees and moves them while it trains.

Shape legend: L = MoE layers, G = ranks, E = experts per layer, E_loc = experts a rank holds in
a layer (before or after the move).

The cycle, on step numbers only, so that every rank (and a resumed run) agrees on it:

1. Steps t - K + 1 .. t, t a multiple of K, make a window: the token-assignments [L, G, E] that
   every rank routed (``StepStats.tokens_per_expert``, gathered on every rank anyway).
2. After step t, rank 0 hands the window to a side process (``side_planner``, one per run):
   the planner (``epplan.placement.solve``, pure, one process, ``--replan-time-limit``) on the
   manifest's cluster, model and run settings, with the window's pattern as the routing;
   ``evaluate`` scores the placement in force and the new one on the same routing;
   ``plan_migration`` lists the replicas that must travel and predicts the move's seconds.
   Training goes on meanwhile.
3. After step t + lag (``--replan-lag``, default K // 4, at least 1) the result is used; if the
   solve is not done, training waits for it (the record's ``wait_s``; the time limit bounds it).
   Predicted gain: (step time in force - step time proposed) x K, the steps until the next
   re-plan. Cost: plan_migration's seconds before the first move; after it, those seconds scaled
   by the latest move's measured / predicted ratio (the move's real speed on this machine,
   Python, reading the manifest and creating process groups included; a conservative scale for
   a large move after a small one, whose seconds are mostly that fixed part). The experts move
   only if gain > cost.
4. A move: rank 0 writes the window's routing statistics and the new manifest (planned on
   them: ``epplan report`` and ``epplan place --routing`` read them) to ``OUT/manifests/``, and
   the manifest to ``OUT/manifest.json``, atomically and before any expert moves; every rank
   reads the manifest, and ``move_experts`` sends every moved replica's weights and AdamW state
   (moments and step) from the rank plan_migration names to its new rank, in one
   ``all_to_all_single`` over the run's process group; each layer then follows the new placement
   (``ExpertParallelExperts.follow``) and the replica groups are rebuilt (groups of sets seen
   before are reused; on NCCL a new group's communicator is set up lazily, at the first step
   after the move, outside the move's measured seconds). The state is copied, not recomputed,
   so training continues bitwise as if the run had been restarted on the new manifest.

Why not torch.distributed.checkpoint's resharding: it goes through storage (a save and a load of
the whole state); a move is an exchange, in memory, of the moved replicas only.

Every re-plan is a ``replan`` record in metrics.jsonl, moved or not. The window, a pending
re-plan and the measured cost ratio travel in checkpoints; ``job_in_force`` makes a resumed run
start on the manifest the checkpoint was written under.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from epplan.errors import RuntimeSetupError, param
from epplan.placement.types import Placement
from epplan.runfiles import IN_FORCE_MANIFEST, MANIFESTS_DIR
from epplan.runtime.expert_parallel import set_replica_groups
from epplan.runtime.experts import forget_copies
from epplan.train import checkpoint
from epplan.train.job import Job, job_from_manifest
from epplan.train.side_planner import Proposal, Request, SidePlanner

if TYPE_CHECKING:
    from epplan.cost.migration import Move
    from epplan.train.optim import TrainOptimizer
    from epplan.train.trainer import Trainer

MANIFESTS = MANIFESTS_DIR    # OUT/manifests/step_00000012-<hash>.json: every manifest put in force
IN_FORCE = IN_FORCE_MANIFEST  # OUT/manifest.json: the newest of them


# ------------------------------------------------------------------------------ the move

def _payload(module_name: str, module: nn.Module,
             moment_dtype: torch.dtype | None) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """What travels with one replica of ``module``'s layer, in order, as (entry name with ``{}``
    for the expert id, dtype, shape): per weight (w1, w2, w3), the weight and its AdamW state,
    named as ``checkpoint.expert_entries`` names them and laid out as ``adamw_state_like``
    (moments of ``moment_dtype``, None: the weight's)."""
    out = []
    for wname, w in module.named_parameters(recurse=False):
        key = checkpoint.expert_key(module_name, wname, "{}")  # type: ignore[arg-type]
        out.append((f"model.{key}", w.dtype, tuple(w.shape[1:])))
        for field in checkpoint.ADAMW_STATE:
            dtype, shape = (torch.float32, ()) if field == "step" else (moment_dtype or w.dtype, tuple(w.shape[1:]))
            out.append((f"optim.{key}.{field}", dtype, shape))
    return out


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()


@torch.no_grad()
def move_experts(model: nn.Module, optimizer: TrainOptimizer, placement: Placement,
                 moves: Sequence[Move]) -> int:
    """Collective: re-place ``model``'s experts to ``placement``, with their AdamW state.

    moves: ``plan_migration(old, placement, problem).moves``, the same on every rank; replica
        (layer, expert) goes from ``src_rank`` to ``dst_rank``. A rank keeps the replicas it
        holds in both placements and frees the ones it no longer holds.
    Call between optimizer steps (after ``zero_grad``). The state is addressed by logical id
    through the checkpoint's gather and scatter: ``checkpoint.expert_entries`` (views of every
    local slot's weight and AdamW state) before the move, ``checkpoint.expert_targets`` (writable
    views of the new slots, with the AdamW state laid out as a checkpoint's load lays it out)
    after; kept replicas are copied from the one to the other, moved ones travel as raw bytes in
    one ``all_to_all_single`` over the model's process group (uneven splits; gloo and NCCL alike),
    in (layer, expert, destination) order. Returns the bytes all ranks sent (every rank knows
    every move and its size).
    """
    state = model.expert_parallel
    rank, G = state.rank, state.num_ranks
    device = next(model.parameters()).device
    names = {id(m): n for n, m in model.named_modules()}
    payloads = [_payload(names[id(m)], m, optimizer.state_dtype) for m in state.layers]
    sizes = [sum(_nbytes(dtype, shape) for _, dtype, shape in p) for p in payloads]
    order = sorted(moves, key=lambda m: (m.layer, m.expert, m.dst_rank))
    held = checkpoint.expert_entries(model, optimizer, rank=rank, owned_only=False)  # views, old slots

    send_parts: list[list[torch.Tensor]] = [[] for _ in range(G)]
    input_splits, output_splits = [0] * G, [0] * G
    for m in order:
        assert m.src_rank != m.dst_rank and m.dst_rank in placement.layers[m.layer].replicas[m.expert], m
        if m.src_rank == rank:
            send_parts[m.dst_rank] += [held[name.format(m.expert)].to(device).reshape(-1).view(torch.uint8)
                                       for name, _, _ in payloads[m.layer]]  # (AdamW's step may be on the CPU)
            input_splits[m.dst_rank] += sizes[m.layer]
        if m.dst_rank == rank:
            output_splits[m.src_rank] += sizes[m.layer]
    flat = [t for parts in send_parts for t in parts]
    send = torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8, device=device)
    recv = torch.empty(sum(output_splits), dtype=torch.uint8, device=device)
    _kill_in_move_for_test(rank)
    dist.all_to_all_single(recv, send, output_splits, input_splits, group=state.group)

    # Received replicas by logical id; each source's rows arrive in the global move order.
    received: dict[str, torch.Tensor] = {}
    cursor = np.concatenate([[0], np.cumsum(output_splits)])[:-1].astype(np.int64)
    for m in (m for m in order if m.dst_rank == rank):
        for name, dtype, shape in payloads[m.layer]:
            size = _nbytes(dtype, shape)
            start = int(cursor[m.src_rank])
            # a copy: a slice's offset need not be aligned to the dtype
            received[name.format(m.expert)] = recv[start:start + size].clone().view(dtype).reshape(shape)
            cursor[m.src_rank] += size

    # New tensors where this rank's experts change (the old ones stay alive through ``held``),
    # then the checkpoint's scatter writes kept and received slots into them.
    changed = set()
    for module, layer in zip(state.layers, placement.layers):
        was = module.local_experts
        module.follow(layer)
        if module.local_experts == was:
            continue
        changed.add(names[id(module)])
        for wname, w in list(module.named_parameters(recurse=False)):
            new = nn.Parameter(w.new_empty((len(module.local_experts), *w.shape[1:])), requires_grad=w.requires_grad)
            optimizer.replace(w, new)
            setattr(module, wname, new)
    for key, target in checkpoint.expert_targets(model, optimizer, changed).items():
        source = received.get(key, held.get(key))
        assert source is not None, f"{key}: neither held nor received"
        target.copy_(source)
    set_replica_groups(state)
    forget_copies()  # the new tensors were written by copy_ into fresh storage; start the casts afresh
    return sum(sizes[m.layer] for m in order)


def _kill_in_move_for_test(rank: int) -> None:
    """Test hook: EPPLAN_TEST_KILL_MOVE=RANK makes that rank SIGKILL itself in the middle of its
    first move (state packed, nothing exchanged), on torchrun's first attempt only."""
    import os
    import signal

    spec = os.environ.get("EPPLAN_TEST_KILL_MOVE")
    if spec is not None and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and int(spec) == rank:
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------ the trainer's side

@dataclass
class _Pending:
    window: tuple[int, int]
    counts: np.ndarray   # int64 [L, G, E], summed over the window
    apply_at: int        # the step after which the result is used


class Replanner:
    """The re-planning cycle of one rank (module docstring). Every rank keeps the window and the
    schedule; rank 0 alone plans, decides and logs; ``boundary`` is collective."""

    def __init__(self, trainer: Trainer) -> None:
        opts = trainer.opts
        self.trainer = trainer
        self.every = opts.replan.replan_every
        self.lag = opts.replan.lag()
        if not 1 <= self.lag <= self.every:
            raise RuntimeSetupError(f"{param('replan_lag', self.lag)} must be between 1 and {param('replan_every', self.every)}")
        if opts.replan.topology is None:
            raise RuntimeSetupError(f"{param('replan_every')} plans on the cluster's topology: pass {param('topology', 'FILE')} "
                                    "(the file the manifest was planned on)")
        self.topology = opts.replan.topology
        self.routing, self.options = "ecmp", {}
        if trainer.rank == 0:  # the planner's settings are the manifest's
            from epplan.manifest import load_manifest

            manifest = load_manifest(opts.manifest)
            self.routing = manifest.routing
            self.options = {**manifest.problem_options(), "dispatch": trainer.dispatch}  # the run's exchange
        self.window = np.zeros_like(trainer.routing_counts)
        self.window_first = trainer.step + 1
        self.pending: _Pending | None = None
        self.cost_ratio: float | None = None  # measured / predicted seconds of the first move
        self.planner = SidePlanner() if trainer.rank == 0 else None

    # --- state that travels in checkpoints
    def state(self) -> dict[str, Any]:
        pending = self.pending
        return {"replan": {
            "window": torch.from_numpy(self.window.copy()), "window_first": self.window_first,
            "pending": None if pending is None else {"first": pending.window[0], "last": pending.window[1],
                                                     "counts": torch.from_numpy(pending.counts.copy()),
                                                     "apply_at": pending.apply_at},
            "cost_ratio": self.cost_ratio}}

    def load_state(self, extra: dict[str, Any]) -> None:
        saved = extra.get("replan")
        if not isinstance(saved, dict):  # written without --replan-every: a window starts now
            self.window_first = self.trainer.step + 1
            return
        self.window = saved["window"].numpy().astype(np.int64)
        self.window_first = int(saved["window_first"])
        self.cost_ratio = saved["cost_ratio"]
        p = saved["pending"]
        if p is not None:
            self._submit(_Pending((int(p["first"]), int(p["last"])), p["counts"].numpy().astype(np.int64),
                                  int(p["apply_at"])))

    # --- the cycle
    def observe(self, tokens_per_expert: np.ndarray) -> None:
        """tokens_per_expert: int64 [L, G, E] of the step just run (the same on every rank)."""
        self.window += tokens_per_expert

    def boundary(self) -> None:
        """Collective, after every optimizer step: use a result that is due, start a re-plan
        whose window just closed."""
        step = self.trainer.step
        if self.pending is not None and step >= self.pending.apply_at:
            self._apply()
        if step % self.every == 0 and step >= self.window_first:
            if step + self.lag <= self.trainer.opts.batch.steps:  # else the run ends before it could be used
                self._submit(_Pending((self.window_first, step), self.window.copy(), step + self.lag))
            self.window[:] = 0
            self.window_first = step + 1

    def close(self) -> None:
        if self.planner is not None:
            self.planner.close()
            self.planner = None

    def _submit(self, pending: _Pending) -> None:
        self.pending = pending
        if self.planner is None:
            return
        first, last = pending.window
        job = self.trainer.job
        self.planner.submit(Request(
            self.topology, self.routing, self.trainer.config, self.options,
            pending.counts.astype(np.float64) / (last - first + 1), pending.window, job.placement,
            self.trainer.opts.replan.replan_time_limit, str(self._routing_file(pending.window))))

    def _routing_file(self, window: tuple[int, int]) -> Path:
        return self.trainer.out / MANIFESTS / f"routing_steps_{window[0]:08d}-{window[1]:08d}.json"

    def _apply(self) -> None:
        trainer, pending = self.trainer, self.pending
        self.pending = None
        step = trainer.step
        decision: list[Any] = [None]
        if trainer.rank == 0:
            start = time.perf_counter()
            proposal = (self.planner.result(pending.window) if self.planner is not None
                        else Proposal(pending.window, error="the re-planning process ended earlier"))
            if proposal.error is not None and "process ended" in proposal.error:
                self.close()  # training goes on without re-plans
            decision[0] = self._decide(proposal, pending, step, wait_s=time.perf_counter() - start)
        dist.broadcast_object_list(decision, src=0, group=trainer.model.expert_parallel.group)
        record = decision[0]
        if record["moved"]:
            self._move(record)
        if trainer.log is not None:
            trainer.log.write(record)

    def _decide(self, proposal: Proposal, pending: _Pending, step: int, wait_s: float) -> dict[str, Any]:
        """Rank 0: whether to move; the metrics record, and for a move the window's routing
        statistics and the manifest written."""
        first, last = proposal.window
        record: dict[str, Any] = {"kind": "replan", "step": step, "window": [first, last], "wait_s": wait_s,
                                  "solve_s": proposal.solve_s, "moved": False}
        if proposal.error is not None:
            return {**record, "reason": f"no plan: {proposal.error}"}
        gain = (proposal.current_s - proposal.proposed_s) * self.every
        basis = "predicted" if self.cost_ratio is None else "measured"
        cost = proposal.predicted_move_s * (1.0 if self.cost_ratio is None else self.cost_ratio)
        record.update(current_step_s=proposal.current_s, proposed_step_s=proposal.proposed_s,
                      predicted_gain_s=gain, move_cost_s=cost, cost_basis=basis,
                      predicted_move_s=proposal.predicted_move_s, replicas_to_move=len(proposal.moves),
                      predicted_bytes=proposal.bytes_moved, bytes_moved=0, seconds=0.0)
        if not proposal.moves:
            return {**record, "reason": "the new plan holds every replica where it is"}
        if gain <= cost:
            return {**record, "reason": f"the predicted gain over the next {self.every} steps, {gain:.3g} s, "
                                        f"does not exceed the move's {basis} cost, {cost:.3g} s"}
        from epplan.manifest import manifest_hash, write_manifest
        from epplan.workload.routing_stats import write_routing_stats

        trainer = self.trainer
        (trainer.out / MANIFESTS).mkdir(parents=True, exist_ok=True)
        write_routing_stats(self._routing_file(pending.window), pending.counts, steps=last - first + 1,
                            model=trainer.config.name, top_k=trainer.config.top_k,
                            tokens_per_rank_per_step=float(trainer.batch_per_rank * trainer.config.seq_len),
                            manifest_hash=trainer.job.manifest_hash)
        digest = manifest_hash(proposal.doc)
        path = self.trainer.out / MANIFESTS / f"step_{step:08d}-{digest[:16]}.json"
        write_manifest(path, proposal.doc)
        write_manifest(self.trainer.out / IN_FORCE, proposal.doc)
        return {**record, "moved": True, "manifest": str(path), "manifest_hash": digest,
                "moves": [dataclasses.astuple(m)[:4] for m in proposal.moves],
                "reason": f"the predicted gain over the next {self.every} steps, {gain:.3g} s, exceeds the "
                          f"move's {basis} cost, {cost:.3g} s"}

    def _move(self, record: dict[str, Any]) -> None:
        """Every rank: read the manifest rank 0 wrote and move the experts to it."""
        from epplan.cost.migration import Move
        from epplan.manifest import load_manifest

        trainer = self.trainer
        start = time.perf_counter()
        manifest = load_manifest(record.pop("manifest"))
        if manifest.hash != record["manifest_hash"]:
            raise RuntimeSetupError(f"{manifest.path} changed while the run moved its experts to it; "
                                    f"continue with {param('resume')}")
        moves = [Move(*m, bytes=0.0) for m in record.pop("moves")]
        moved = move_experts(trainer.model, trainer.optimizer, manifest.placement, moves)
        trainer.job = job_from_manifest(manifest)
        trainer.opts = dataclasses.replace(trainer.opts, manifest=str(manifest.path))
        # routing_stats.json counts the steps run under one manifest (as after a resume that moved)
        trainer.routing_counts[:] = 0
        trainer.routing_steps = 0
        for rows in trainer.routing_rows.values():
            rows[:] = 0
        trainer.routing_rows_steps = 0
        if trainer.stager is not None:  # host buffers of experts this rank no longer checkpoints
            kept = set(checkpoint.state_to_save(trainer.model, trainer.optimizer, rank=trainer.rank, extra={}))
            for key in [k for k in trainer.stager.buffers if k not in kept]:
                del trainer.stager.buffers[key]
        seconds = time.perf_counter() - start
        record.update(manifest=str(manifest.path), bytes_moved=moved, seconds=seconds)
        if record["predicted_move_s"] > 0:
            self.cost_ratio = seconds / record["predicted_move_s"]


def job_in_force(job: Job, out: Path, rank: int) -> tuple[Job, str | None]:
    """Collective: the job of the manifest the newest checkpoint in ``out`` was written under and
    its path, when the run put that manifest in force (``OUT/manifests/``); else ``job`` (the
    manifest given) and None."""
    from epplan.manifest import load_manifest
    from epplan.train.checkpoint import latest

    found: list[Any] = [None]
    if rank == 0:
        info = latest(out / "checkpoints")
        digest = info.meta["manifest_hash"] if info is not None else None
        if digest is not None and digest != job.manifest_hash:
            found[0] = next((str(p) for p in sorted((out / MANIFESTS).glob(f"*-{digest[:16]}.json"))), None)
    dist.broadcast_object_list(found, src=0)
    if found[0] is None:
        return job, None
    return job_from_manifest(load_manifest(found[0])), found[0]

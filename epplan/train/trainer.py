"""The training loop of one rank: model, optimizer, data, checkpoints and metrics.

Shape legend: L = MoE layers, G = ranks, E = experts per layer, B = sequences per micro-batch on a
rank, T = sequence length.

A step: for each micro-batch, forward (on GPU: bf16 autocast, the residual stream and the MoE
token exchange in bf16) and backward of loss / M; then ``sync_gradients`` (dense gradients
averaged over all ranks, each expert's among its replicas); one all-gather of the loss and routing statistics; stop if the loss
or the gradient norm is not finite; clip by the global gradient norm; AdamW; router selection-bias
update. Everything but the timing is deterministic given the seed, the data and the number of
ranks, so a run restarted from a checkpoint ends with the same weights as one that never stopped
(bitwise on CPU; on GPU up to the nondeterminism of atomic adds in CUDA kernels).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from epplan.errors import RuntimeSetupError, TrainingDiverged, param
from epplan.runtime.expert_parallel import (build_expert_parallel_model, get_stats, set_exchange_timer,
                                            sync_gradients)
from epplan.runtime.experts import forget_copies
from epplan.runtime.model import Transformer
from epplan.runtime.recompute import RECOMPUTE, apply_recompute
from epplan.runtime import tensor_parallel
from epplan.train import checkpoint
from epplan.train.replan import Replanner
from epplan.train.data import make_data
from epplan.train.job import Job, check_batch_split, check_tp
from epplan.train.tensorboard import with_tensorboard
from epplan.runfiles import METRICS_FILE, ROUTING_STATS_FILE
from epplan.train.metrics import (FORMAT, VERSION, MetricsLog, ProgressDisplay, all_gather_single,
                                  gather_step_stats, matrix_every)
from epplan.train.optim import TrainOptimizer
from epplan.train.options import RESUME_KEYS, TrainOptions
from epplan.train.rundir import history, set_aside
from epplan.workload.memory import OPTIMIZER_SHARDING, optimizer_state_conflict
from epplan.train.timing import StepTimer, instrument, timing_record
from epplan.workload.flops import model_costs
from epplan.workload.routing_stats import write_routing_stats

# Dense bf16 peak of a GPU, TFLOP/s, by a substring of its name (datasheets; dense, no sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
# ModelConfig fields that decide tensor shapes: a checkpoint fits a model when these agree.
SHAPE_FIELDS = ("num_layers", "num_experts", "d_model", "d_ff", "num_heads", "head_dim", "num_kv_heads",
                "vocab_size", "seq_len", "activation", "num_dense_layers", "dense_d_ff", "num_shared_experts")
ROUTING_ROWS = ("pairs", "gpu_rows", "node_rows")  # ExpertParallelStats fields of routing_stats.json v2


def peak_tflops(opts: TrainOptions, device: torch.device) -> float | None:
    if opts.output.peak_tflops is not None:
        return opts.output.peak_tflops
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def lr_at(step: int, opts: TrainOptions, peak: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to the floor."""
    warmup = opts.optimizer.warmup(opts.batch.steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, opts.batch.steps - warmup)
    floor = peak * opts.optimizer.min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _at_least_fp32(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def global_grad_norm(model: Transformer) -> torch.Tensor:
    """Collective: the L2 norm of the whole (single-device) model's gradient, on every rank.

    Dense gradients are identical on all ranks after ``sync_gradients``; each expert's gradient is
    counted once, by the rank that owns it (its lowest replica).
    """
    state = model.expert_parallel
    expert_params, owned_sq = set(), None
    for layer in state.layers:
        is_owner = torch.tensor([layer.owner[e] == state.rank for e in layer.local_experts],
                                dtype=torch.float32)
        for w in layer.parameters(recurse=False):
            expert_params.add(id(w))
            # (E_loc,) squared norms, reduced in fp32 without a squared copy of the gradient
            per_slot = torch.linalg.vector_norm(w.grad.flatten(1), dim=1,
                                                dtype=_at_least_fp32(w.grad)).square()
            term = (per_slot * is_owner.to(per_slot.device)).sum()
            owned_sq = term if owned_sq is None else owned_sq + term
    dense = [p.grad for p in model.parameters() if id(p) not in expert_params and p.grad is not None]
    if getattr(model, "tensor_parallel", None) is not None:
        dense_sq = tensor_parallel.dense_grad_norm_sq(model, dense)
    else:
        dense_sq = torch.stack(torch._foreach_norm(dense, dtype=_at_least_fp32(dense[0]))).square().sum()
    owned_sq = owned_sq if owned_sq is not None else torch.zeros((), device=dense_sq.device)
    dist.all_reduce(owned_sq, group=state.group)
    return (dense_sq + owned_sq).sqrt()


def _kill_for_test(rank: int, step: int) -> None:
    """Test hook: EPPLAN_TEST_KILL=RANK:STEP makes that rank SIGKILL itself as it starts STEP
    (1-based), on torchrun's first attempt only."""
    spec = os.environ.get("EPPLAN_TEST_KILL")
    if spec and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        kill_rank, kill_step = (int(v) for v in spec.split(":"))
        if (rank, step) == (kill_rank, kill_step):
            os.kill(os.getpid(), signal.SIGKILL)


class Trainer:
    """One rank's training state. Build after ``dist.init_process_group``; collective methods
    (``resume``, ``train_step``, ``save``, ``run``) are entered by every rank in the same order."""

    def __init__(self, job: Job, opts: TrainOptions, rank: int, device: torch.device) -> None:
        G = job.num_ranks
        check_tp(job, opts)
        D = G // opts.parallel.tp  # data-parallel groups: each reads its own sequences
        config = job.config.replace(global_batch=opts.batch.size(job.config))
        check_batch_split(job, opts, config.global_batch)
        self.job, self.opts, self.rank, self.device, self.config = job, opts, rank, device, config
        self.out = Path(opts.out)
        self.ckpt_root = self.out / "checkpoints"
        self.batch_per_rank = opts.batch_per_group(config, G)  # of a TP group, whose ranks share them
        self.costs = model_costs(config)
        self.peak_tflops = peak_tflops(opts, device)
        self.lr = opts.optimizer.peak_lr(config.d_model)

        torch.manual_seed(opts.batch.seed)  # for any draw from the global generator
        # Only this rank's experts are ever allocated; the weights do not depend on the placement.
        self.overlap_ctas = opts.parallel.ctas()
        self.dispatch = opts.parallel.exchange(job.dispatch)
        mesh = tensor_parallel.tensor_parallel_mesh(opts.parallel.tp, device.type) if opts.parallel.tp > 1 else None
        # expert TP runs the unchunked exchange (runtime/expert_tensor_parallel.py)
        self.overlap = (opts.parallel.use_overlap(opts.device, len(job.nodes), job.schedule)
                        and not opts.parallel.expert_tp)
        self.model = build_expert_parallel_model(
            config, job.placement, seed=opts.batch.seed, device=device, capacity_factor=opts.parallel.capacity_factor,
            overlap=self.overlap,
            num_chunks=opts.parallel.chunks(opts.device, job.schedule),
            overlap_ctas=self.overlap_ctas, dispatch=self.dispatch, nodes=[n.ranks for n in job.nodes],
            expert_tp=mesh["tp"] if opts.parallel.expert_tp else None)
        if config.dtype == "fp64":  # CPU tests: exact comparisons between run settings
            self.model.to(torch.float64)
        if opts.memory.recompute not in RECOMPUTE:
            raise RuntimeSetupError(f"{param('recompute', repr(opts.memory.recompute))}: use {', '.join(RECOMPUTE)}")
        if opts.memory.optimizer_sharding not in OPTIMIZER_SHARDING:
            raise RuntimeSetupError(f"{param('optimizer_sharding', repr(opts.memory.optimizer_sharding))}: use "
                                    f"{', '.join(OPTIMIZER_SHARDING)}")
        conflict = optimizer_state_conflict(config, opts.memory.optimizer_sharding, opts.parallel.tp)
        if conflict:
            raise RuntimeSetupError(conflict)
        apply_recompute(self.model, opts.memory.recompute)
        self.model.fused_loss = True  # the LM head and loss in chunks (epplan.runtime.loss; vocab-parallel under TP)
        dp_rank = rank
        if mesh is not None:
            tensor_parallel.parallelize_tensor(self.model, mesh)
            dp_rank = self.model.tensor_parallel.dp_rank
        # Fused AdamW on GPUs: faster, and no temporaries the size of the moments.
        self.optimizer = TrainOptimizer(self.model, opts.memory.optimizer_sharding, lr=self.lr,
                                        weight_decay=opts.optimizer.weight_decay, fused=device.type == "cuda",
                                        state_dtype=torch.bfloat16 if config.optimizer_state_dtype == "bf16" else None)
        self.timer = StepTimer(device)
        instrument(self.model, self.timer)
        self.last_timing: tuple[int, dict[str, float]] | None = None  # of the step before the last
        self.data = make_data(opts.batch.data, vocab_size=config.vocab_size, seq_len=config.seq_len,
                              seed=opts.batch.seed, rank=dp_rank, num_ranks=D, batch_per_rank=self.batch_per_rank,
                              micro_batches=opts.batch.micro_batches)
        self.autocast = (functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
                         if device.type == "cuda" else contextlib.nullcontext)
        self.step = 0  # optimizer steps completed
        # Token-assignments [L, G, E] summed over routing_steps steps, for routing_stats.json.
        self.routing_counts = np.zeros((config.num_moe_layers, G, config.num_experts), np.int64)
        self.routing_steps = 0
        # This rank's rows of the v2 statistics (pairs [L, E, E], gpu_rows [L, G], node_rows
        # [L, nodes]), summed over routing_rows_steps steps; gathered only when the file is written.
        self.routing_rows = {k: np.zeros_like(getattr(get_stats(self.model), k)) for k in ROUTING_ROWS}
        self.routing_rows_steps = 0
        self.last_checkpoint: Path | None = None
        # Asynchronous checkpoints: DCP's host staging, kept from one checkpoint to the next, and a
        # gloo group (created here, collectively) for the background writer; the one in flight.
        use_async = opts.checkpoints.in_background(device.type)
        self.checkpoint_group = dist.new_group(backend="gloo") if use_async else None
        self.stager = checkpoint.HostStaging(pin_memory=device.type == "cuda") if use_async else None
        self.stager_ready = False  # the staging buffers exist (allocated after the first step)
        self._pending: tuple[threading.Thread | None, dict[str, Any]] | None = None
        self.log: MetricsLog | None = None
        self.last_step = 0  # the step of last_checkpoint
        # A checkpoint is known good once the step after it had a finite loss and gradient;
        # unconfirmed: the newest one, written after the last step, not yet confirmed.
        self.good_checkpoints: list[Path] = []
        self.unconfirmed: Path | None = None
        self.notes: list[str] = []  # lines about the resume, shown by rank 0
        self.changes: dict[str, dict[str, Any]] = {}  # --allow-change differences from the checkpoint
        if opts.replan.replan_every and opts.memory.optimizer_sharding == "all":
            raise RuntimeSetupError(f"{param('replan_every')} cannot move experts whose AdamW state is sharded over "
                                    f"their replicas ({param('optimizer_sharding', 'all')}): a re-plan changes the "
                                    f"replica sets; use {param('optimizer_sharding', 'dense')} with {param('replan_every')}")
        self.replanner = Replanner(self) if opts.replan.replan_every else None  # live re-placement

    # ----------------------------------------------------------------------------- checkpoints

    def resume(self, attempt: int = 0) -> tuple[checkpoint.CheckpointInfo, bool] | None:
        """Load the newest intact checkpoint, if any. Returns it and whether the placement
        differs from the one that wrote it (experts then move to their new ranks).

        Damaged checkpoints are skipped, each with a line in ``self.notes`` saying why. With no
        intact checkpoint where the directory holds an earlier run (damaged checkpoints, or on a
        first attempt its metrics), refuses unless ``--start-over``, which sets those records aside.
        """
        G = self.job.num_ranks
        found: list[Any] = [checkpoint.scan(self.ckpt_root) + (history(self.out),) if self.rank == 0 else None]
        dist.broadcast_object_list(found, src=0)  # every rank considers the ones rank 0 found
        complete, damaged, old = found[0]
        skipped = [f"skipped {line}" for line in damaged]
        info = None
        for candidate in reversed(complete):
            problem = checkpoint.verify(candidate.path, rank=self.rank, world_size=G)
            if problem is None:
                info = candidate
                break
            skipped.append(f"skipped {candidate.path}: {problem}")
        if info is not None and skipped:
            skipped.append(f"resuming from the newest intact checkpoint, {info.path.name}")
        self.notes += skipped
        if info is None:
            if damaged or complete or (attempt == 0 and old):
                what = "; ".join(skipped) if skipped else f"it holds an earlier run's {', '.join(old)}"
                if not self.opts.checkpoints.start_over:
                    raise checkpoint.CheckpointError(
                        f"no intact checkpoint in {self.ckpt_root} ({what}); pass {param('start_over')} to start at "
                        f"step 0 with the earlier records set aside in OUT/previous-N, or choose another {param('out')}")
                aside = set_aside(self.out) if self.rank == 0 else None
                self.notes.append(f"no intact checkpoint ({what}); starting at step 0, the earlier records "
                                  f"are set aside in {aside}")
                dist.barrier()
            return None
        saved = info.meta["model"]
        for name in SHAPE_FIELDS:
            if saved.get(name) != getattr(self.config, name):
                raise checkpoint.CheckpointError(
                    f"{info.path} is of a model with {name}={saved.get(name)!r}, this manifest's model has "
                    f"{getattr(self.config, name)!r}; resume with a manifest of the same model")
        self.changes = self._changes_from(info.meta)
        extra = checkpoint.load(info, self.model, self.optimizer, rank=self.rank, device=self.device)
        forget_copies()  # DCP may write weights without advancing their version counters
        self.step = self.last_step = info.step
        if self.replanner is not None:
            self.replanner.load_state(extra)
        moved = info.meta["manifest_hash"] != self.job.manifest_hash
        # routing_stats.json counts the steps run under one manifest and one batch size only
        if not moved and not {"global_batch", "micro_batches"} & set(self.changes):
            self.routing_counts = extra["routing_counts"].numpy().astype(np.int64)
            self.routing_steps = int(extra["routing_steps"])
            if all(f"routing_{k}" in extra for k in ROUTING_ROWS):  # checkpoints since version 2
                self.routing_rows = {k: extra[f"routing_{k}"].numpy()[:, self.rank].astype(np.int64)
                                     for k in ROUTING_ROWS}
                self.routing_rows_steps = int(extra["routing_rows_steps"])
        if info.meta["num_ranks"] == self.job.num_ranks and "rng" in extra:
            checkpoint.set_rng_state(extra["rng"])
        self.last_checkpoint = info.path
        # The resumed checkpoint is confirmed by the next step; the ones before it were.
        self.unconfirmed = info.path
        self.good_checkpoints = [c.path for c in complete if c.step < info.step][-1:]
        return info, moved

    def _run_facts(self) -> dict[str, Any]:
        """What a resume must agree on (``options.RESUME_KEYS``), as recorded in a checkpoint."""
        data = self.data.describe(0)
        model = {k: v for k, v in self.config.to_dict().items() if k not in ("global_batch",)}
        return {"seed": self.opts.batch.seed, "data": {k: data[k] for k in ("kind", "path", "files", "bytes") if k in data},
                "global_batch": self.config.global_batch, "micro_batches": self.opts.batch.micro_batches,
                "model": model}

    def _changes_from(self, meta: dict) -> dict[str, dict[str, Any]]:
        """The RESUME_KEYS in which this run differs from checkpoint ``meta``'s run; raises
        ``CheckpointError`` for one not allowed by ``--allow-change``."""
        saved = meta.get("run")
        if not isinstance(saved, dict):
            return {}  # written before checkpoints recorded their run's facts
        mine, changes = self._run_facts(), {}
        for key in RESUME_KEYS:
            if key in saved and saved[key] != mine[key]:
                changes[key] = {"checkpoint": saved[key], "now": mine[key]}
        for key, change in changes.items():
            if key not in self.opts.checkpoints.allowed_changes():
                was, now = change["checkpoint"], change["now"]
                if key == "model":
                    diff = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
                    was, now = ({k: d.get(k) for k in diff} for d in (was, now))
                raise checkpoint.CheckpointError(
                    f"{param('resume')}: {key} is {now!r} but the checkpoint {meta.get('step')} was written with "
                    f"{was!r}; resume with the same {key}, or pass {param('allow_change', key)} to change it knowingly")
        return changes

    def save(self) -> float:
        """Checkpoint the current step (collective); returns the seconds training stopped for.

        With asynchronous checkpoints, ``dcp.async_save`` first copies the state to the host
        (into pinned buffers kept from one checkpoint to the next, on GPUs); DCP's thread then
        writes the files while training goes on, and a thread of ours waits for them and seals
        and renames the checkpoint, over a gloo group of its own. The checkpoint counts
        (``last_checkpoint``, the metrics' "checkpoint" record) once complete.
        """
        self.finish_checkpoint()  # one checkpoint in flight at a time: its buffers are reused
        start = time.perf_counter()
        step = self.step
        meta = {"manifest_hash": self.job.manifest_hash, "manifest": self.opts.manifest,
                "model": self.config.to_dict(), "data": self.data.describe(step),  # rank 0's data position
                "run": self._run_facts()}
        routing_rows = self._gather_routing_rows()
        pending = checkpoint.begin_save(self.ckpt_root, step, self._checkpoint_state(routing_rows), rank=self.rank,
                                        facts=checkpoint.save_facts(self.model, self.optimizer),
                                        group=self.checkpoint_group, stager=self.stager)
        stall = time.perf_counter() - start
        result: dict[str, Any] = {"step": step, "stall": stall, "start": start}

        def work() -> None:
            try:
                result["path"] = checkpoint.complete_save(pending, meta=meta)
            except BaseException as exc:  # raised in the training thread by finish_checkpoint
                result["error"] = exc
            result["seconds"] = time.perf_counter() - start

        if self.stager is None:
            work()
            self._pending = (None, result)
            self.finish_checkpoint()
        else:
            thread = threading.Thread(target=work, name="epplan-checkpoint", daemon=True)
            thread.start()
            self._pending = (thread, result)
        if self.rank == 0:
            self.write_routing_stats(routing_rows)
        return stall

    def _checkpoint_state(self, routing_rows: dict[str, np.ndarray]) -> dict[str, Any]:
        """This rank's checkpoint entries (views of the live tensors, ``checkpoint.state_to_save``);
        routing_rows: ``_gather_routing_rows``, kept by rank 0 for every rank."""
        extra = {"routing_counts": torch.from_numpy(self.routing_counts.copy()), "routing_steps": self.routing_steps,
                 "routing_rows_steps": self.routing_rows_steps,
                 **{f"routing_{k}": torch.from_numpy(v) for k, v in routing_rows.items()}}
        if self.replanner is not None:
            extra.update(self.replanner.state())
        return checkpoint.state_to_save(self.model, self.optimizer, rank=self.rank, extra=extra)

    def finish_checkpoint(self, block: bool = True) -> None:
        """Complete the checkpoint in flight, if any (without ``block``, only if its writer is
        done): it becomes the newest, and rank 0 logs it. Raises the writer's error."""
        if self._pending is None:
            return
        thread, result = self._pending
        if thread is not None:
            if not block and thread.is_alive():
                return
            thread.join()
        self._pending = None
        if "error" in result:
            raise result["error"]
        path = result["path"]
        self.unconfirmed = path
        self.last_checkpoint, self.last_step = path, result["step"]
        if self.log is not None:
            self.log.write({"kind": "checkpoint", "step": result["step"], "path": str(path),
                            "seconds": result["stall"], "write_seconds": result["seconds"],
                            "async": thread is not None})

    def _gather_routing_rows(self) -> dict[str, np.ndarray]:
        """Collective: every rank's ``routing_rows``, stacked by rank: pairs [L, G, E, E],
        gpu_rows [L, G, G], node_rows [L, G, nodes]. NOTE: host sync (checkpoints and the end only)."""
        mine = torch.from_numpy(np.concatenate([self.routing_rows[k].ravel() for k in ROUTING_ROWS]))
        everyone = mine.new_empty(self.job.num_ranks * mine.numel(), device=self.device)
        all_gather_single(everyone, mine.to(self.device))  # flat: gloo wants (G * n,)
        rows = everyone.cpu().numpy().reshape(self.job.num_ranks, -1)
        out, start = {}, 0
        for k in ROUTING_ROWS:
            shape = self.routing_rows[k].shape  # (L, ...)
            size = int(np.prod(shape))
            out[k] = np.moveaxis(rows[:, start:start + size].reshape(-1, *shape), 0, 1)  # (L, G, ...)
            start += size
        return out

    def write_routing_stats(self, routing_rows: dict[str, np.ndarray]) -> Path | None:
        """routing_stats.json (format v2) from the counts and ``_gather_routing_rows``; the
        pair and row tables only when they cover the same steps as the counts (not after a
        resume from a checkpoint written before they were recorded)."""
        if self.routing_steps == 0:
            return None
        rows = routing_rows if self.routing_rows_steps == self.routing_steps else {}
        return write_routing_stats(
            self.out / ROUTING_STATS_FILE, self.routing_counts, steps=self.routing_steps, model=self.config.name,
            top_k=self.config.top_k,
            tokens_per_rank_per_step=self.config.global_batch * self.config.seq_len / self.job.num_ranks,
            manifest_hash=self.job.manifest_hash, dispatch=self.dispatch,
            nodes=[(n.name, list(n.ranks)) for n in self.job.nodes], **rows)

    def _confirm(self) -> None:
        """The step after the newest checkpoint was finite: it is good; prune the older ones."""
        if self.unconfirmed is None:
            return
        self.good_checkpoints.append(self.unconfirmed)
        if self.rank == 0:
            # Only up to this one: a newer checkpoint that the background writer completed since
            # is not known good yet, and must not push this one out of --keep-checkpoints.
            checkpoint.prune(self.ckpt_root, self.opts.checkpoints.keep_checkpoints, through_step=self.last_step)
        self.unconfirmed = None
        self.good_checkpoints = self.good_checkpoints[-1:]

    def _diverged(self, step: int) -> str:
        """Name the checkpoint to continue from after step ``step`` diverged. The newest checkpoint
        holds the weights that diverged (step - 1) and is renamed ``.diverged`` (kept, but skipped
        by --resume); the one before it was followed by a finite step."""
        if self.unconfirmed is not None and self.rank == 0:
            info = next((c for c in checkpoint.list_checkpoints(self.ckpt_root) if c.path == self.unconfirmed), None)
            if info is not None:
                checkpoint.set_diverged(info)
        good = self.good_checkpoints[-1] if self.good_checkpoints else None
        if good is None:
            return ("no checkpoint from before the divergence" +
                    (f" ({self.unconfirmed.name} holds the diverged weights, kept as "
                     f"{self.unconfirmed.name}{checkpoint.DIVERGED})" if self.unconfirmed else "") +
                    f"; lower {param('lr')} or {param('grad_clip')} and start again")
        path = good
        set_aside = (f"; {self.unconfirmed.name}, written after the weights diverged, is kept as "
                     f"{self.unconfirmed.name}{checkpoint.DIVERGED}" if self.unconfirmed else "")
        return (f"the last good checkpoint is {path} (step {int(path.name.split('_')[1])}){set_aside}; "
                f"lower {param('lr')} or {param('grad_clip')} and continue from it with {param('resume')}")

    # ----------------------------------------------------------------------------- one step

    def train_step(self) -> dict[str, Any]:
        """Run optimizer step ``self.step + 1`` (collective); returns its metrics record."""
        start = time.perf_counter()
        model, opts, timer = self.model, self.opts, self.timer
        timer.start("step")
        set_exchange_timer(timer)
        model.train()
        stats = get_stats(model)
        stats.reset()
        lr = lr_at(self.step, opts, self.lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = aux_sum = torch.zeros((), device=self.device)
        for micro in range(opts.batch.micro_batches):
            x, y = (t.to(self.device, non_blocking=True) for t in self.data.batch(self.step, micro))  # (B, T)
            with self.autocast():
                _, loss = model(x, y)
            aux = sum(moe.aux_loss for moe in model.moe_layers())
            (loss / opts.batch.micro_batches).backward()
            loss_sum = loss_sum + loss.detach()
            aux_sum = aux_sum + aux.detach()
        set_exchange_timer(None)
        timer.start("optimizer")
        (tensor_parallel.sync_gradients if self.opts.parallel.tp > 1 else sync_gradients)(model)
        step = self.step + 1
        with_matrices = step % matrix_every(self.job.num_ranks) == 0 or step == opts.batch.steps
        grad_norm = global_grad_norm(model)
        # The model's loss includes the auxiliary losses; report the language-model part apart.
        # NOTE: the step's host sync (the finite check below), with the gradient norm.
        gathered = gather_step_stats((loss_sum - aux_sum) / opts.batch.micro_batches,
                                     aux_sum / opts.batch.micro_batches, stats, self.job.num_ranks, with_matrices,
                                     expert_tp=opts.parallel.expert_tp, grad_norm=grad_norm)
        grad_norm_value = gathered.grad_norm
        bad = next((f"{what} is {value}" for what, value in
                    (("the loss", gathered.loss + gathered.aux_loss), ("the gradient norm", grad_norm_value))
                    if not math.isfinite(value)), None)
        if bad is not None:
            self.finish_checkpoint()
            raise TrainingDiverged(f"training stopped at step {step}: {bad}; {self._diverged(step)}")
        # The device waits from the sync until the update's kernels are launched: launch them
        # first, the host's bookkeeping after. Every grad exists: sync_gradients fills unused
        # ones with zeros.
        clip = (opts.optimizer.grad_clip / (grad_norm + 1e-6)).clamp(max=1.0) if opts.optimizer.grad_clip > 0 else None
        self.optimizer.step(grad_scale=clip)
        self.optimizer.zero_grad(set_to_none=True)
        self.last_timing = timer.collect()  # the previous step's marks are complete by now
        self.finish_checkpoint(block=False)
        self._confirm()
        staging_s = staging_bytes = None
        if self.stager is not None and self.device.type == "cuda" and not self.stager_ready:
            # Allocate (and pin) the staging buffers once, now that AdamW's state exists, so that no
            # checkpoint's stall includes the allocation (it shows in this step's record).
            t0 = time.perf_counter()
            shapes = {k: np.zeros((v.shape[0], self.job.num_ranks, *v.shape[1:]), np.int64)
                      for k, v in self.routing_rows.items()}  # as gathered (packed bytes, not staged)
            self.stager.stage(self._checkpoint_state(shapes))
            staging_s = time.perf_counter() - t0
            staging_bytes = self.stager.num_bytes
            self.stager_ready = True
        model.update_router_biases()
        timer.stop("optimizer")
        timer.stop("step")
        timer.finish_step(step)
        self.step = step

        self.routing_counts += gathered.tokens_per_expert
        self.routing_steps += 1
        for k in ROUTING_ROWS:
            self.routing_rows[k] += getattr(stats, k)
        self.routing_rows_steps += 1
        if self.replanner is not None:
            self.replanner.observe(gathered.tokens_per_expert)
        seconds = time.perf_counter() - start
        tflops = self.costs.model_flops_per_step / seconds / self.job.num_ranks / 1e12
        record = {
            "kind": "step", "step": step, "loss": gathered.loss, "aux_loss": gathered.aux_loss, "lr": lr,
            "grad_norm": grad_norm_value, "step_time_s": seconds,
            "tokens_per_s": self.config.tokens_per_step / seconds, "tflops_per_gpu": tflops,
            "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
            "tokens_per_expert": gathered.tokens_per_expert.sum(axis=1).tolist(),
            "expert_load_max_over_mean": [round(v, 4) for v in gathered.expert_load().tolist()],
        }
        if self.device.type == "cuda":  # the allocator's high-water mark so far (host-side, no sync)
            record["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        if staging_s is not None:
            record["checkpoint_staging_alloc_s"] = staging_s
            record["checkpoint_staging_bytes"] = staging_bytes
        if self.device.type == "cuda":  # this rank's peak since the start, as the caching allocator saw it
            record["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            record["gpu_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        if with_matrices:
            record["row_bytes"] = stats.row_bytes
            record["dispatch_bytes"] = gathered.dispatch_bytes.tolist()
            record["combine_bytes"] = gathered.combine_bytes.tolist()
            if gathered.expert_tp_bytes is not None:
                record["expert_tp_bytes"] = gathered.expert_tp_bytes.tolist()
        return record

    # ----------------------------------------------------------------------------- the run

    def run(self, *, resume: bool, attempt: int = 0, show_progress: bool = True) -> None:
        """Train up to ``opts.batch.steps`` (collective), resuming from the newest checkpoint if asked."""
        is_main = self.rank == 0
        resumed = self.resume(attempt) if resume else None
        display = ProgressDisplay(self.opts.batch.steps, self.step, enabled=is_main and show_progress)
        for note in self.notes:
            display.print(note)
        if resumed is not None:
            info, moved = resumed
            display.print(f"resumed from {info.path} (step {info.step})"
                          + ("; the placement differs from the checkpoint's: experts moved to their new ranks"
                             if moved else ""))
        elif resume:
            display.print(f"no checkpoint in {self.ckpt_root}; starting at step 0")
        log = MetricsLog(self.out / METRICS_FILE, self.step if resumed else None) if is_main else None
        log = self.log = with_tensorboard(log, self.opts.output.tensorboard, self.step + 1 if resumed else None)
        if log is not None:
            log.write(self._start_record(resumed, attempt))
        try:
            while self.step < self.opts.batch.steps:
                _kill_for_test(self.rank, self.step + 1)
                record = self.train_step()
                if log is not None:
                    log.write(record)
                    if self.last_timing is not None:
                        log.write(timing_record(*self.last_timing))
                display.update(record)
                if self.replanner is not None:  # may move experts (before the checkpoint of this step)
                    self.replanner.boundary()
                if self.step % self.opts.checkpoints.ckpt_every == 0 or self.step == self.opts.batch.steps:
                    self.save()
            self.finish_checkpoint()
        finally:
            display.close()
            if self.replanner is not None:
                self.replanner.close()
        if is_main:
            checkpoint.prune(self.ckpt_root, self.opts.checkpoints.keep_checkpoints)
        last = self.timer.flush()
        if log is not None and last is not None:
            log.write(timing_record(*last))
        routing_rows = self._gather_routing_rows()
        if log is not None:
            stats_path = self.write_routing_stats(routing_rows)
            log.write({"kind": "end", "step": self.step, "routing_stats": str(stats_path) if stats_path else None,
                       "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None})
            log.close()

    def _layout(self) -> dict[str, Any]:
        """The ranks' roles: TP groups (t consecutive ranks), the data-parallel degree (groups that
        read their own sequences), the ranks expert parallelism runs over, and whether each
        expert's hidden dimension is split over its TP group."""
        G, t = self.job.num_ranks, self.opts.parallel.tp
        return {"tp_groups": [list(range(g, g + t)) for g in range(0, G, t)], "dp": G // t,
                "ep_ranks": G, "expert_tp": self.opts.parallel.expert_tp}

    def _start_record(self, resumed: tuple | None, attempt: int) -> dict[str, Any]:
        c = self.config
        return {
            "format": FORMAT, "version": VERSION, "kind": "start", "step": self.step, "time": time.time(),
            "model": c.to_dict(), "num_ranks": self.job.num_ranks,
            "nodes": [{"name": n.name, "ranks": list(n.ranks)} for n in self.job.nodes],
            "manifest": self.opts.manifest, "manifest_hash": self.job.manifest_hash,
            "device": self.device.type,
            "compute": "bf16 autocast, bf16 residual stream" if self.device.type == "cuda" else "fp32",
            "global_batch": c.global_batch, "seq_len": c.seq_len, "micro_batches": self.opts.batch.micro_batches,
            "recompute": self.opts.memory.recompute, "optimizer_sharding": self.opts.memory.optimizer_sharding,
            "tp": self.opts.parallel.tp, "expert_tp": self.opts.parallel.expert_tp, "layout": self._layout(),
            "run_settings_overridden": self.opts.overridden.split(",") if self.opts.overridden else [],
            "tokens_per_step": c.tokens_per_step, "model_flops_per_step": self.costs.model_flops_per_step,
            "peak_tflops_per_gpu": self.peak_tflops, "data": self.data.describe(self.step),
            "overlap": self.overlap,
            "num_chunks": self.opts.parallel.chunks(self.opts.device, self.job.schedule),
            "overlap_ctas": self.overlap_ctas, "dispatch": self.dispatch,
            "resumed_from": str(resumed[0].path) if resumed else None,
            "placement_changed": resumed[1] if resumed else None, "attempt": attempt,
            "allowed_changes": self.changes or None, "resume_notes": self.notes or None,
        }

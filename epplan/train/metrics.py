"""Per-step measurements: gathered from every rank, written as JSON lines, shown on rank 0.

Shape legend: L = MoE layers, G = ranks (S = source, T = destination), E = experts per layer.

``OUT/metrics.jsonl`` (``epplan.runfiles`` names the files and reads them back), format
``epplan.metrics`` version 1: one JSON object per line, each with a
``kind`` and a ``step`` (optimizer steps completed):

- ``start``: written at each launch and restart; carries ``format`` and ``version`` and the run's
  facts: model, ranks, nodes, manifest hash, device, batch, ``model_flops_per_step``,
  ``peak_tflops_per_gpu``, ``overlap`` (chunked exchange under the expert GEMMs or not),
  ``num_chunks`` (null: the runtime's choice), ``overlap_ctas``, ``dispatch`` (flat or
  hierarchical; absent before it was recorded: flat), ``resumed_from`` (checkpoint
  path or null), ``placement_changed`` (whether that checkpoint was written under another
  placement), ``attempt`` (torchrun restart).
- ``step``: ``loss`` (cross-entropy, mean over the global batch), ``aux_loss`` (router balancing),
  ``lr``, ``grad_norm`` (before clipping), ``step_time_s``, ``tokens_per_s``, ``tflops_per_gpu``,
  ``mfu`` (null without a peak), ``tokens_per_expert`` [L][E] (token-assignments of the global
  batch), ``expert_load_max_over_mean`` [L], and the all-to-all bytes of the forward pass per layer
  and (source, destination) rank: ``dispatch_bytes`` [L][S][T] and ``combine_bytes`` [L][S][T]
  (diagonal: rows a rank keeps), with ``row_bytes``, the bytes of one row. Backward moves the
  same amounts again with dispatch and combine swapped, so a step's wire traffic is twice the
  off-diagonal sum. Under hierarchical dispatch the matrices hold both stages' rows
  (``ExpertParallelStats``). Under ``--expert-tp`` also ``expert_tp_bytes`` [L][S][T], the bytes
  rank S sent to rank T of its TP group in the forward gathers and reduce-scatters of the sliced
  experts (backward repeats them, a block recompute once more). Up to ``MATRIX_RANKS`` ranks
  every step carries them; beyond, every ``matrix_every(G)``-th step and the last do.
- ``checkpoint``: ``path`` and ``seconds`` of a checkpoint written after ``step``.
- ``replan`` (``--replan-every``): a re-plan used after ``step``: its ``window`` [first, last
  step], ``solve_s``, ``wait_s`` (training waited for the solve), ``current_step_s`` and
  ``proposed_step_s`` (predicted MoE time per step on the window's routing), ``predicted_gain_s``
  over the next window, ``move_cost_s`` (``cost_basis`` predicted or measured),
  ``replicas_to_move``, ``predicted_bytes``, ``moved``, ``bytes_moved`` and ``seconds`` of the
  move, ``reason``; for a move, the ``manifest`` put in force and its ``manifest_hash`` (the
  steps after it run under that manifest).
- ``end``: the last step, and the routing-statistics file.

On resume the file is cut back to the records of steps up to the checkpoint's, so that it reads as
one run; a ``start`` record marks each continuation.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from epplan.fileio import atomic_write_text
from epplan.runfiles import METRICS_FORMAT, METRICS_VERSION
from epplan.runtime.expert_parallel import ExpertParallelStats

FORMAT, VERSION = METRICS_FORMAT, METRICS_VERSION  # epplan.runfiles owns the run directory's formats


@dataclass
class StepStats:
    """One step's numbers from all ranks.

    tokens_per_expert: int64 [L, G, E], assignments each source rank routed to each expert.
    dispatch_bytes, combine_bytes: int64 [L, S, T], forward all-to-all bytes per layer; None on
        steps that do not gather them.
    expert_tp_bytes: int64 [L, S, T], ``--expert-tp``'s forward exchanges inside the TP groups
        (``ExpertParallelStats.expert_tp_bytes``); None on those steps and in runs without it.
    """

    loss: float
    aux_loss: float
    tokens_per_expert: np.ndarray
    dispatch_bytes: np.ndarray | None
    combine_bytes: np.ndarray | None
    expert_tp_bytes: np.ndarray | None = None
    grad_norm: float | None = None  # rank 0's ``grad_norm`` (the same on every rank), if given

    def expert_load(self) -> np.ndarray:
        """float64 [L]: per layer, the busiest expert's assignments over the mean."""
        load = self.tokens_per_expert.sum(axis=1).astype(np.float64)  # (L, E)
        mean = load.mean(axis=1)
        return np.divide(load.max(axis=1), mean, out=np.ones_like(mean), where=mean > 0)


# The all-to-all matrices are L G^2 numbers a step, gathered to every rank and written as JSON:
# 268 MB at 1,024 ranks and 16 layers. Beyond MATRIX_RANKS ranks they are gathered and written
# every matrix_every(G) steps, which keeps their volume per step at MATRIX_RANKS ranks' volume.
MATRIX_RANKS = 64


def matrix_every(num_ranks: int) -> int:
    """Steps between step records that carry the all-to-all matrices (1 up to MATRIX_RANKS)."""
    return math.ceil(num_ranks / MATRIX_RANKS) ** 2


# torch 2.13 renamed all_gather_into_tensor; the project supports torch >= 2.4.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def gather_step_stats(loss: torch.Tensor, aux_loss: torch.Tensor, stats: ExpertParallelStats,
                      num_ranks: int, with_matrices: bool = True, expert_tp: bool = False,
                      grad_norm: torch.Tensor | None = None) -> StepStats:
    """Collective: every rank's mean loss and routing statistics, in one all-gather, with the
    all-to-all byte matrices if ``with_matrices`` (and ``--expert-tp``'s if ``expert_tp``), and
    ``grad_norm`` (a () tensor, the same on every rank) brought back with them.

    NOTE: the step's device-to-host sync (the loss, counts and gradient norm come back to the CPU
    every step, together). The host's counts go to the device from pinned memory without waiting:
    a copy from pageable memory waits for the GPU, a second sync (call Z, docs/benchmarks.md).
    """
    L, E = stats.num_tokens_per_expert.shape
    G = num_ranks
    matrices = (2 + expert_tp) if with_matrices else 0
    parts = [[0.0, 0.0, 0.0], stats.num_tokens_per_expert.ravel()]
    if with_matrices:
        parts += [stats.dispatch_bytes.ravel(), stats.combine_bytes.ravel()]
        parts += [stats.expert_tp_bytes.ravel()] if expert_tp else []
    host = torch.from_numpy(np.concatenate(parts))  # float64: integers exact below 2**53
    if loss.is_cuda:
        host = host.pin_memory()
    mine = host.to(loss.device, non_blocking=True)
    mine[0], mine[1] = loss.detach().double(), aux_loss.detach().double()
    if grad_norm is not None:
        mine[2] = grad_norm.detach().double()
    everyone = mine.new_empty(G * mine.numel())  # flat: gloo wants (G * n,), not (G, n)
    all_gather_single(everyone, mine)
    rows = everyone.cpu().numpy().reshape(G, -1)  # (G, 3 + L*E [+ 2*L*G])
    counts = rows[:, 3:3 + L * E].reshape(G, L, E).transpose(1, 0, 2)  # [L, S, E]
    dispatch = combine = etp = None
    if with_matrices:
        a2a = np.rint(rows[:, 3 + L * E:].reshape(G, matrices, L, G).transpose(1, 2, 0, 3)).astype(np.int64)
        dispatch, combine = a2a[0], a2a[1]  # [L, S, T] each
        etp = a2a[2] if expert_tp else None
    return StepStats(float(rows[:, 0].mean()), float(rows[:, 1].mean()),
                     np.rint(counts).astype(np.int64), dispatch, combine, etp,
                     None if grad_norm is None else float(rows[0, 2]))


class MetricsLog:
    """metrics.jsonl, written by rank 0 only (one line per record, flushed)."""

    def __init__(self, path: Path, keep_through_step: int | None) -> None:
        """keep_through_step: None starts a new file; else keep records of steps <= it."""
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep_through_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and _step_of(line) <= keep_through_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        elif keep_through_step is None:
            atomic_write_text(path, "")
        self._fh = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, allow_nan=True, separators=(",", ":")) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", math.inf)
    except json.JSONDecodeError:  # a line cut short by a crash
        return math.inf




class ProgressDisplay:
    """Rank 0's view: a rich progress bar on a terminal, a plain line every so often elsewhere."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.enabled, self.total = enabled, total
        self.console = Console(file=sys.stdout, highlight=False, soft_wrap=True)
        self.every = max(1, total // 20)
        self.bar = None
        if enabled and self.console.is_terminal:
            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                console=self.console)
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def print(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, markup=False)

    def update(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        mfu = f"{record['mfu']:.1%}" if record["mfu"] is not None else "-"
        info = (f"loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tok/s  "
                f"{record['tflops_per_gpu']:.3g} TFLOP/s/GPU  MFU {mfu}  "
                f"expert load max/mean {max(record['expert_load_max_over_mean']):.2f}")
        if self.bar is not None:
            self.bar.update(self.task, completed=record["step"], info=info)
        elif record["step"] % self.every == 0 or record["step"] == self.total:
            self.console.print(f"step {record['step']}/{self.total}  {info}", markup=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()

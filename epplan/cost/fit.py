"""A plan that fits, or a clear refusal: the run settings ``place`` and ``estimate`` choose.

A run's settings are its micro-batches (gradient accumulation), ``recompute`` (none, attention,
block), ``optimizer_sharding`` (none, dense, all), the tensor-parallel degree ``tp`` and
``expert_tp`` (``epplan.workload.tensor_parallel``). Each is scored by ``evaluate`` (step time,
the sharded optimizer's all-gathers and TP's collectives included) and by ``workload.memory``
(bytes per GPU). ``choose_run_settings`` returns the cheapest that fits every GPU: the shortest
predicted step; among equal steps (micro-batches change no FLOPs or bytes in the model), the
fewest micro-batches, then no recompute before attention before block, then none before dense
before all, then the lower TP degree. Settings the user fixed are not varied; the TP degree is
1 unless asked to be chosen (``tp=None``: ``--tp auto``, among ``tp_degrees``).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass

import numpy as np

from epplan.cost.evaluate import Cost, evaluate, exchange_loads, memory_for
from epplan.errors import DoesNotFit, param, PlacementError
from epplan.placement.problem import PlacementProblem
from epplan.placement.types import Placement
from epplan.workload.memory import OPTIMIZER_SHARDING, RECOMPUTE
from epplan.workload.tensor_parallel import check_tp, tp_degrees

_GB = 1e9


@dataclass(frozen=True)
class RunSettings:
    micro_batches: int
    recompute: str
    optimizer_sharding: str
    tp: int = 1
    expert_tp: bool = False

    def describe(self) -> str:
        return (f"--micro-batches {self.micro_batches} --recompute {self.recompute} "
                f"--optimizer-sharding {self.optimizer_sharding} --tp {self.tp}"
                + (" --expert-tp" if self.expert_tp else ""))


def micro_batch_choices(problem: PlacementProblem, tp: int = 1) -> list[int]:
    """Micro-batch counts that split every data-parallel group's sequences evenly (1 .. sequences
    per group; a group is a rank, or a TP group of ``tp`` ranks that share their sequences)."""
    groups, batch = problem.num_gpus // tp, problem.config.global_batch
    if batch % groups:
        return [1]
    per_group = batch // groups
    return [m for m in range(1, per_group + 1) if per_group % m == 0]


@dataclass(frozen=True)
class Fit:
    """The settings chosen, the cost under them, and whether they fit; when nothing fits, the
    settings that come closest (lowest fill of the fullest GPU) and ``refusal``, the message."""

    settings: RunSettings
    cost: Cost
    fits: bool
    refusal: str = ""
    unscored: int = 0   # settings the deadline left unscored (the best of those scored was kept)

    def check(self) -> "Fit":
        """Raise ``DoesNotFit`` (the CLI exits 3) unless it fits."""
        if not self.fits:
            raise DoesNotFit(self.refusal)
        return self


def choose_run_settings(placement: Placement, problem: PlacementProblem, *, micro_batches: int | None = None,
                        recompute: str | None = None, optimizer_sharding: str | None = None,
                        tp: int | None = 1, expert_tp: bool = False, deadline: float | None = None,
                        first: RunSettings | None = None) -> Fit:
    """The cheapest settings under which ``placement`` fits every GPU's memory, with its cost
    (``evaluate`` of the problem under those settings). Arguments given fix that setting;
    ``tp`` None chooses the TP degree (``--tp auto``).

    deadline: ``time.monotonic()`` after which no more settings are scored once one that fits
    is in hand (``Fit.unscored`` counts those left; the search goes on until one fits).
    first:    settings scored first (those chosen for a stand-in plan: most often the choice)."""
    if recompute is not None and recompute not in RECOMPUTE:
        raise PlacementError(f"{param('recompute', repr(recompute))}: use {', '.join(RECOMPUTE)}")
    if optimizer_sharding is not None and optimizer_sharding not in OPTIMIZER_SHARDING:
        raise PlacementError(f"{param('optimizer_sharding', repr(optimizer_sharding))}: use {', '.join(OPTIMIZER_SHARDING)}")
    if tp is None:
        ts = [t for t in tp_degrees(problem.config, problem.gpus_per_node) if t > 1 or not expert_tp]
    else:
        check_tp(problem.config, problem.gpus_per_node, tp, expert_tp)
        ts = [tp]
    if not ts:
        raise PlacementError(f"{param('tp', 'auto')} with {param('expert_tp')}: no TP degree of 2 or more splits these nodes and heads")
    rs = [recompute] if recompute is not None else list(RECOMPUTE)
    cap = np.asarray(problem.topology.gpu_memory_gb, dtype=np.float64) * 1e9
    best: tuple[tuple, RunSettings, Cost | None] | None = None   # its cost where it is the one scored
    closest: tuple[float, RunSettings, np.ndarray] | None = None  # lowest fill of the fullest GPU
    loads = exchange_loads(placement, problem)   # the same under every run setting
    ms_of = {t: [micro_batches] if micro_batches is not None else micro_batch_choices(problem, t) for t in ts}
    ss = [optimizer_sharding] if optimizer_sharding is not None else list(OPTIMIZER_SHARDING)
    trials = [(t, r, s) for t in ts for r, s in itertools.product(rs, ss)]
    if first is not None and (first.tp, first.recompute, first.optimizer_sharding) in trials:
        head = (first.tp, first.recompute, first.optimizer_sharding)
        trials.remove(head)
        trials.insert(0, head)
    unscored = 0
    for n, (t, r, s) in enumerate(trials):
        if best is not None and deadline is not None and time.monotonic() >= deadline:
            unscored = len(trials) - n
            break
        ms = ms_of[t]
        cost = evaluate(placement, _with(problem, RunSettings(ms[0], r, s, t, expert_tp)), loads=loads)
        for m in ms:
            total = sum(memory_for(placement, problem, cost.expert_assignments, m, r, s, t, expert_tp).values())
            fill = float(np.max(total / cap))
            settings = RunSettings(m, r, s, t, expert_tp)
            if closest is None or fill < closest[0]:
                closest = (fill, settings, total)
            if fill > 1.0:
                continue
            key = (cost.step_time_s, m, RECOMPUTE.index(r), OPTIMIZER_SHARDING.index(s), t)
            if best is None or key < best[0]:
                best = (key, settings, cost if m == ms[0] else None)
            break  # more micro-batches only tie on time
    if best is None:
        _, settings, total = closest
        return Fit(settings, evaluate(placement, _with(problem, settings), loads=loads), False,
                   _refusal(problem, settings, total))
    _, settings, cost = best
    cost = cost or evaluate(placement, _with(problem, settings), loads=loads)
    return Fit(settings, cost, True, unscored=unscored)


def _with(problem: PlacementProblem, settings: RunSettings) -> PlacementProblem:
    return dataclasses.replace(problem, **dataclasses.asdict(settings))


def _refusal(problem: PlacementProblem, settings: RunSettings, total: np.ndarray) -> str:
    cap = np.asarray(problem.topology.gpu_memory_gb, dtype=np.float64)
    g = int(np.argmax(total / (cap * 1e9)))
    c = problem.config
    return (f"no run settings fit in GPU memory: the closest, {settings.describe()}, needs "
            f"{total[g] / _GB:.1f} GB on {problem.topology.gpu_names[g]}, which has {cap[g]:g} GB. "
            f"Use more GPUs (each then holds fewer expert replicas and tokens), shorter sequences "
            f"({param('set', f'seq_len={max(1, c.seq_len // 2)}')}), fewer or smaller experts "
            f"({param('set', 'num_experts=N')}, {param('set', 'd_ff=N')}; "
            f"{param('experts_per_gpu', problem.experts_per_gpu)} allows that many per GPU and layer), "
            + (f"tensor parallelism ({param('tp', 'auto')}), " if settings.tp == 1
               and len(tp_degrees(c, problem.gpus_per_node)) > 1 else "")
            + "or GPUs with more memory")

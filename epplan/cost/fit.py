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
from epplan.workload.memory import memory_per_gpu, optimizer_state_conflict, OPTIMIZER_SHARDING, RECOMPUTE
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
    trials, ms_of = _trials(problem, micro_batches, recompute, optimizer_sharding, tp, expert_tp)
    cap = np.asarray(problem.topology.gpu_memory_gb, dtype=np.float64) * 1e9
    best: tuple[tuple, RunSettings, Cost | None] | None = None   # its cost where it is the one scored
    closest: tuple[float, RunSettings, np.ndarray] | None = None  # lowest fill of the fullest GPU
    loads = exchange_loads(placement, problem)   # the same under every run setting
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
        g = int(np.argmax(total / cap))
        return Fit(settings, evaluate(placement, _with(problem, settings), loads=loads), False,
                   _refusal(problem, settings, float(total[g]), cap[g] / _GB,
                            fixed=_given(micro_batches, recompute, optimizer_sharding, tp), gpu=problem.topology.gpu_names[g]))
    _, settings, cost = best
    cost = cost or evaluate(placement, _with(problem, settings), loads=loads)
    return Fit(settings, cost, True, unscored=unscored)


def check_memory_floor(problem: PlacementProblem, *, micro_batches: int | None = None,
                       recompute: str | None = None, optimizer_sharding: str | None = None,
                       tp: int | None = 1, expert_tp: bool = False) -> None:
    """Raise ``DoesNotFit`` when no placement of ``problem`` fits under any run setting that
    ``choose_run_settings`` (same arguments) would try (``memory_floor`` over 1 for each, with
    the most micro-batches allowed: activations shrink with more, nothing grows): decided from
    the inputs, before a solve. A placement may still not fit where the floor does (its
    replicas fill up to ``experts_per_gpu`` slots, its tokens are not spread evenly):
    ``choose_run_settings`` decides on the solved plan."""
    trials, ms_of = _trials(problem, micro_batches, recompute, optimizer_sharding, tp, expert_tp)
    closest: tuple[float, RunSettings] | None = None
    for t, r, s in trials:
        settings = RunSettings(max(ms_of[t]), r, s, t, expert_tp)
        fill = memory_floor(problem, settings)
        if fill <= 1.0:
            return
        if closest is None or fill < closest[0]:
            closest = (fill, settings)
    fill, settings = closest
    capacity_gb = float(np.mean(problem.topology.gpu_memory_gb))
    raise DoesNotFit(_refusal(problem, settings, fill * capacity_gb * _GB, capacity_gb,
                              fixed=_given(micro_batches, recompute, optimizer_sharding, tp), floor=True))


def memory_floor(problem: PlacementProblem, settings: RunSettings) -> float:
    """The fill (bytes over capacity) of the fullest GPU that no placement of ``problem`` goes
    below under ``settings``: ``workload.memory``'s own model at the least any placement holds.

    Every expert held once (E replicas a layer, the fewest a placement has), every layer's
    assignments (fixed by the routing) spread evenly. Each column of the model grows with the
    replicas a GPU holds and the assignments it serves, linearly, or convexly (block
    recompute's fullest layer), so summed over the GPUs the even spread is the least any
    placement reaches; and the fullest GPU's fill is at least all GPUs' bytes over all their
    capacity. Under ``optimizer_sharding`` all, each expert's state is kept once whatever its
    replicas, as with one replica."""
    c, num_gpus = problem.config, problem.num_gpus
    num_layers, num_experts = problem.num_layers, problem.num_experts
    held = np.full(num_gpus, num_layers * num_experts / num_gpus)
    served = np.repeat(problem.traffic.counts.sum(axis=(1, 2))[:, None] / num_gpus, num_gpus, axis=1)  # [L, G]
    once = [[[(layer * num_experts + e) % num_gpus] for e in range(num_experts)] for layer in range(num_layers)]
    total = sum(memory_per_gpu(c, problem.costs, replicas_held=held, tokens_per_rank=c.tokens_per_step / num_gpus,
                               served=served, micro_batches=settings.micro_batches, recompute=settings.recompute,
                               optimizer_sharding=settings.optimizer_sharding, replicas=once, tp=settings.tp,
                               expert_tp=settings.expert_tp).values())
    return float(total.sum()) / (float(np.sum(problem.topology.gpu_memory_gb)) * _GB)


def _given(micro_batches: int | None, recompute: str | None, optimizer_sharding: str | None,
           tp: int | None) -> dict[str, bool]:
    """Which settings the caller fixed (None: chosen here)."""
    return {"micro_batches": micro_batches is not None, "recompute": recompute is not None,
            "optimizer_sharding": optimizer_sharding is not None, "tp": tp is not None}


def _trials(problem: PlacementProblem, micro_batches: int | None, recompute: str | None,
            optimizer_sharding: str | None, tp: int | None, expert_tp: bool,
            ) -> tuple[list[tuple[int, str, str]], dict[int, list[int]]]:
    """The (tp, recompute, optimizer sharding) settings to try and each TP degree's micro-batch
    counts, the given ones fixed; raises ``PlacementError`` for a value that is not a choice."""
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
    ss = [optimizer_sharding] if optimizer_sharding is not None else list(OPTIMIZER_SHARDING)
    if problem.config.optimizer_state_dtype != "fp32":  # bf16 moments: without TP
        conflict = optimizer_state_conflict(problem.config, optimizer_sharding or "none",
                                            2 if expert_tp else tp or 1)
        if conflict:
            raise PlacementError(conflict)
        ts = [1]
    ms_of = {t: [micro_batches] if micro_batches is not None else micro_batch_choices(problem, t) for t in ts}
    return [(t, r, s) for t in ts for r, s in itertools.product(rs, ss)], ms_of


def _with(problem: PlacementProblem, settings: RunSettings) -> PlacementProblem:
    return dataclasses.replace(problem, **dataclasses.asdict(settings))


def _refusal(problem: PlacementProblem, settings: RunSettings, need_bytes: float, has_gb: float, *,
             fixed: dict[str, bool], floor: bool = False, gpu: str = "") -> str:
    """The message of ``DoesNotFit``: what the closest settings need against what the GPU has,
    and what would change it: first the settings the user fixed (``fixed``: name -> given)
    where another value needs less, then the inputs. ``floor``: the need is
    ``check_memory_floor``'s, which no placement goes below."""
    c, caps = problem.config, np.asarray(problem.topology.gpu_memory_gb)
    largest = max(micro_batch_choices(problem, settings.tp))
    tries = ([param("micro_batches", largest)] if fixed.get("micro_batches") and settings.micro_batches < largest else []) \
        + ([param("recompute", "block")] if fixed.get("recompute") and settings.recompute != "block" else []) \
        + ([param("optimizer_sharding", "all")] if fixed.get("optimizer_sharding")
           and settings.optimizer_sharding != "all" else []) \
        + ([param("tp", "auto")] if fixed.get("tp") and settings.tp == 1 and len(tp_degrees(c, problem.gpus_per_node)) > 1 else [])
    has = f"the GPUs have {has_gb:g} GB" + ("" if np.all(caps == caps[0]) else " on average")
    where = (f"at least {need_bytes / _GB:.1f} GB a GPU under any placement (each expert held once, the "
             f"tokens spread evenly), and {has}; no plan can fit, so none was solved" if floor
             else f"{need_bytes / _GB:.1f} GB on {gpu}, which has {has_gb:g} GB")
    return (f"no run settings fit in GPU memory: the closest, {settings.describe()}, needs {where}. "
            + (f"Try {', '.join(tries)}; or use" if tries else "Use")
            + f" more GPUs (each then holds fewer expert replicas and tokens), shorter sequences "
            f"({param('set', f'seq_len={max(1, c.seq_len // 2)}')}), fewer or smaller experts "
            f"({param('set', 'num_experts=N')}, {param('set', 'd_ff=N')}"
            + ("), " if floor else f"; {param('experts_per_gpu', problem.experts_per_gpu)} allows that many per GPU "
               "and layer: fewer leave fewer replicas), ")
            + f"or GPUs with more memory ({param('memory_gb')} caps each GPU's memory, if given)")

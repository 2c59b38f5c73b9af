"""The placement problem: what the planner, the baselines and the cost function all take.

Shape legend: L = MoE layers, G = ranks (GPUs), E = routed experts per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from epplan.schedule import DISPATCH_MODES, MAX_CHUNKS, OVERLAP_MODES, Dispatch, Overlap, Schedule, default_schedule
from typing import TYPE_CHECKING

from epplan.errors import param, PlacementError, TrafficError
from epplan.topology import Topology
from epplan.workload.config import ModelConfig
from epplan.workload.flops import (EXCHANGES_PER_LAYER_PER_STEP, TRAINING_FLOPS_FACTOR, ModelCosts, model_costs,
                                   recompute_exchanges_per_layer, recompute_flops_per_token)
from epplan.workload.tensor_parallel import check_tp
from epplan.workload.traffic import Traffic


if TYPE_CHECKING:  # epplan.cost imports this module
    from epplan.cost.calibration import Calibration
    from epplan.workload.memory import OptimizerSharding, Recompute


@dataclass(eq=False)
class PlacementProblem:
    """A cluster, a model, its expected routing traffic, and the placement rules.

    experts_per_gpu:    at most this many experts (replicas included) per GPU per layer.
    compute_efficiency: achievable fraction of each GPU's datasheet bf16 TFLOP/s (0.6: the
                        founding spec's 60 % MFU target) ...
    achievable_tflops:  ... or, if given, the achievable TFLOP/s of every GPU, overriding it.
    micro_batches:      gradient-accumulation steps per optimizer step; divides the activation
                        memory, changes no traffic or FLOPs of the step.
    overlap:            the runtime's schedule of each MoE layer (``epplan.schedule``): auto
                        (what ``epplan run`` does on GPUs: overlap when the run spans nodes), on
                        or off; ``num_chunks`` fixes the chunk count when overlapping.
    recompute:          none, attention or block (``workload.memory``): less activation memory,
                        more FLOPs (and, for block, a second dispatch and combine) per step.
    optimizer_sharding: none, dense (ZeRO over all ranks; under TP over each TP rank's
                        data-parallel group) or all (also each expert's state over its replicas):
                        less optimizer memory, one all-gather of those weights per step.
    dispatch:           flat (one row per token and expert) or hierarchical (one row per token
                        and destination node over the network, forwarded inside the node;
                        ``epplan.cost.dispatch``): how the runtime's exchange is scored.
    tp:                 tensor-parallel degree (``epplan.workload.tensor_parallel``): attention,
                        the dense MLPs and the LM head sharded over groups of ``tp`` GPUs of a
                        node, their sequence parallelism's collectives on the node's links;
    expert_tp:          the routed experts TP-sharded over those groups too.
    calibration:        measured rates of the GPUs (``epplan.cost.calibration``), one per GPU;
                        None: the flat efficiency above. With it, ``gpu_flops`` is the grouped
                        expert rate at the plan's expected rows per expert and ``evaluate`` times
                        every part of the step from the measured rates (``epplan.cost.step``).
                        ``achievable_tflops`` still overrides the expert rate.
    """

    topology: Topology
    config: ModelConfig
    traffic: Traffic
    experts_per_gpu: int = 1
    compute_efficiency: float = 0.6
    achievable_tflops: float | None = None
    micro_batches: int = 1
    overlap: Overlap = "auto"
    num_chunks: int | None = None
    recompute: Recompute = "none"
    optimizer_sharding: OptimizerSharding = "none"
    calibration: list[Calibration] | None = None
    dispatch: Dispatch = "flat"
    tp: int = 1
    expert_tp: bool = False

    def __post_init__(self) -> None:
        if self.calibration is not None and len(self.calibration) != self.topology.num_gpus:
            raise PlacementError(f"calibration: {len(self.calibration)} entries for "
                                 f"{self.topology.num_gpus} GPUs; give one per GPU")
        g, e, layers = self.topology.num_gpus, self.config.num_experts, self.config.num_moe_layers
        if not _is_positive_int(self.experts_per_gpu):
            raise PlacementError(f"{param('experts_per_gpu')} must be a positive integer, got {self.experts_per_gpu!r}")
        if not _is_positive_int(self.micro_batches):
            raise PlacementError(f"{param('micro_batches')} must be a positive integer, got {self.micro_batches!r}")
        from epplan.workload.memory import OPTIMIZER_SHARDING, RECOMPUTE
        if self.recompute not in RECOMPUTE:
            raise PlacementError(f"{param('recompute', repr(self.recompute))}: use {', '.join(RECOMPUTE)}")
        if self.optimizer_sharding not in OPTIMIZER_SHARDING:
            raise PlacementError(f"{param('optimizer_sharding', repr(self.optimizer_sharding))}: use "
                                 f"{', '.join(OPTIMIZER_SHARDING)}")
        check_tp(self.config, self.gpus_per_node, self.tp, self.expert_tp)
        from epplan.workload.memory import optimizer_state_conflict
        conflict = optimizer_state_conflict(self.config, self.optimizer_sharding, self.tp)
        if conflict:
            raise PlacementError(conflict)
        if not (isinstance(self.compute_efficiency, (int, float))
                and 0 < self.compute_efficiency <= 1):
            raise PlacementError(
                f"compute efficiency must be in (0, 1] (a fraction of datasheet TFLOP/s), "
                f"got {self.compute_efficiency!r}")
        if self.achievable_tflops is not None and not (
                math.isfinite(self.achievable_tflops) and self.achievable_tflops > 0):
            raise PlacementError(f"achievable TFLOP/s must be > 0, got {self.achievable_tflops!r}")
        if self.dispatch not in DISPATCH_MODES:
            raise PlacementError(f"{param('dispatch', repr(self.dispatch))}: use one of {', '.join(DISPATCH_MODES)}")
        if self.overlap not in OVERLAP_MODES:
            raise PlacementError(f"{param('overlap', repr(self.overlap))}: use one of {', '.join(OVERLAP_MODES)}")
        if self.num_chunks is not None and not (_is_positive_int(self.num_chunks)
                                                and self.num_chunks <= MAX_CHUNKS):
            raise PlacementError(f"{param('num_chunks')} must be an integer in 1..{MAX_CHUNKS}, got {self.num_chunks!r}")
        shape = self.traffic.counts.shape
        if shape != (layers, g, e):
            raise TrafficError(
                f"traffic ({self.traffic.source}) has shape [layers, ranks, experts] = {list(shape)}, "
                f"the problem needs [{layers}, {g}, {e}] (model {self.config.name!r} on "
                f"{self.topology.name!r}); build it with make_traffic(spec, config, {g})")
        pairs = self.traffic.pairs
        if pairs is not None and pairs.shape != (layers, g, e, e):
            raise TrafficError(f"traffic ({self.traffic.source}) has pair counts of shape {list(pairs.shape)}, "
                               f"the problem needs [{layers}, {g}, {e}, {e}]")
        if e > g * self.experts_per_gpu:
            need = -(-e // g)
            raise PlacementError(
                f"model {self.config.name!r} has {e} experts per layer but {self.topology.name!r} "
                f"has {g} GPUs x {self.experts_per_gpu} expert(s) per GPU = "
                f"{g * self.experts_per_gpu} slots; allow several experts per GPU with "
                f"{param('experts_per_gpu', need)} (or more)")

    # --- sizes ---------------------------------------------------------------------------------
    @property
    def num_gpus(self) -> int:
        return self.topology.num_gpus

    @property
    def gpus_per_node(self) -> list[int]:
        return np.bincount(self.topology.gpu_node).tolist()

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def num_layers(self) -> int:
        """MoE layers (the placement's layers)."""
        return self.config.num_moe_layers

    @property
    def slots_per_gpu(self) -> int:
        """Experts per GPU that baselines fill: ceil(E / G), the fewest that fit, never more
        than ``experts_per_gpu`` (G >= E: 1, so every GPU holds exactly one expert)."""
        return -(-self.num_experts // self.num_gpus)

    # --- derived, cached -----------------------------------------------------------------------
    @cached_property
    def costs(self) -> ModelCosts:
        return model_costs(self.config)

    @property
    def bytes_per_assignment(self) -> int:
        """Bytes of one token-assignment on the wire, one exchange (dispatch or combine)."""
        return self.costs.bytes_per_assignment

    @property
    def exchange_scale(self) -> float:
        """Each MoE layer's exchanges per step over the four of a layer that is not recomputed
        (dispatch and combine, forward and backward): 1.5 under block recompute, which dispatches
        and combines again. Link times scale by it."""
        return (EXCHANGES_PER_LAYER_PER_STEP + recompute_exchanges_per_layer(self.recompute)) \
            / EXCHANGES_PER_LAYER_PER_STEP

    @cached_property
    def expert_flops_per_assignment(self) -> float:
        """FLOPs of one token-assignment's expert GEMMs per step: forward and backward, and the
        forward again where the recompute repeats it."""
        again = recompute_flops_per_token(self.costs, self.config, self.recompute)
        return self.costs.flops_per_assignment * TRAINING_FLOPS_FACTOR + again["per_assignment"]

    @cached_property
    def schedule(self) -> Schedule:
        """How the runtime will run each MoE layer, so how link and GPU times add up."""
        # --expert-tp runs every MoE layer's exchange unchunked (runtime.expert_parallel).
        return default_schedule(self.topology, self.config, self.costs, self.micro_batches,
                                overlap="off" if self.expert_tp else self.overlap, num_chunks=self.num_chunks)

    @cached_property
    def gpu_flops(self) -> np.ndarray:
        """float64[G] achievable FLOP/s of each GPU (efficiency x datasheet, or the override)."""
        if self.achievable_tflops is not None:
            return np.full(self.num_gpus, self.achievable_tflops * 1e12)
        if self.calibration is not None:
            c = self.config
            rows = self.expected_rows_per_expert
            path = "chunked" if self.schedule.overlap else "unchunked"
            # One lookup per distinct table (the GPUs of a node type share theirs): 1,024 lookups
            # took 0.07-0.3 s, paid again by every run setting choose_run_settings scores.
            rate = {id(cal): cal.expert_flops(c.d_model, c.d_ff, c.activation, rows, path)
                    for cal in {id(cal): cal for cal in self.calibration}.values()}
            return np.array([rate[id(cal)] for cal in self.calibration])
        return self.compute_efficiency * np.asarray(self.topology.gpu_tflops, dtype=np.float64) * 1e12

    @property
    def expected_rows_per_expert(self) -> float:
        """Rows one expert (replica) computes per grouped GEMM under balanced routing: a
        micro-batch's assignments over the experts, or over the GPUs when replicas fill them;
        with overlap, per chunk."""
        c = self.config
        rows = c.tokens_per_step * c.top_k / max(c.num_experts, self.num_gpus) / self.micro_batches
        return rows / self.schedule.num_chunks if self.schedule.overlap else rows

    @cached_property
    def expert_load(self) -> np.ndarray:
        """float64[L, E] assignments each expert receives per step, from all ranks."""
        return self.traffic.expert_load()


def _is_positive_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1

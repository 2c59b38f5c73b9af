"""``evaluate(placement, problem) -> Cost``: the one place a placement is scored.

Shape legend: L = MoE layers, G = ranks (GPUs), E = experts per layer, K = directed links.
Units: bytes and seconds per optimizer step; link capacities are GB/s (1e9 bytes/s).

The model (the planner minimises ``moe_time_s.sum()``, through ``epplan.schedule``; keep the two
in step):

all-to-all   Layer l's flows F[s, t] = placement.layers[l].flows(traffic.counts[l]) are the
             token-assignments s sends to t; b = bytes per assignment. Forward dispatch puts
             b F[s, t] on the wire s -> t, forward combine b F[t, s]; the backward pass repeats
             both reversed (the combine's gradient goes s -> t, the dispatch's t -> s). So the
             layer's a2a matrix is 2b (F + F^T) (the diagonal stays local), and per link
             ``dispatch_fwd_bytes`` = b loads(F) (= the combine's backward) and
             ``combine_fwd_bytes`` = b loads(F^T) (= the dispatch's backward).
hierarchical ``problem.dispatch == "hierarchical"``: the same four exchanges, but each carries
dispatch     one row per (token, destination node) over the network (to the rail peer) and one
             per (token, GPU) inside the node (``epplan.cost.dispatch``: rows predicted from the
             counts and the pair counts, put on links by the same link map); b = bytes per row
             (a row is one token's vector, as an assignment is).
link time    load / (capacity GB/s * 1e9).
expert time  per GPU: assignments it serves (F's column sum, local ones included) *
             flops_per_assignment * 3 (forward + backward) / achievable FLOP/s of the GPU.
MoE time     per layer, A = the a2a time of its busiest link, X = the expert time of its busiest
             GPU, under the runtime's schedule (``problem.schedule``, ``epplan.schedule``):
             serial A + X, or A / C + max(A (C - 1) / C, X) overlapped in C chunks.
             ``bottleneck_s`` = max(A, X) is reported beside it.

Reported beside the objective:

dense        per MoE layer and GPU: tokens per rank * (attention, router, shared experts FLOPs)
             * 3 / rate; ``other_compute_s``: dense layers and the LM head, once per step.
layer time   max_g dense_l[g] + moe_time_l: attention and the other dense work overlap nothing.
grad sync    expert replicas: a ring over each expert's replica ranks in sorted order, every hop
             carrying 2 (R - 1) / R * expert parameter bytes (model dtype); dense parameters: a
             ring over all G ranks in rank order, 2 (G - 1) / G * dense parameter bytes per hop.
             Both as link loads; ``sync_s`` = max link time of the two together (they share
             links). ``epplan run`` synchronises after the backward pass, overlapping nothing
             (``runtime.expert_parallel.sync_gradients``): the dense all-reduce, then every
             expert's replica all-reduce at once, so ``exposed_sync_s`` = ``dense_sync_s`` +
             ``expert_sync_s`` (each the max link time of its rings, all MoE layers together).
             NOTE: the planner's objective (``objective_s``, per layer) leaves this step-level
             term out.
tensor       ``problem.tp`` > 1 (``epplan.workload.tensor_parallel``): sequence parallelism's all-
parallel     gathers and reduce-scatters over each TP group (a ring over its t consecutive ranks,
             every hop carrying (t - 1) / t of each collective's gathered bytes), all layers and
             passes summed, as link loads ``tp_bytes`` (on the node's own links: the groups stay
             inside a node); ``tp_s`` = their busiest link's time, exposed (DTensor runs them on
             the compute stream, between the GEMMs that need them). With ``expert_tp`` the rows
             each rank receives go to the rest of its group and the partial outputs come back
             (``workload.tensor_parallel.expert_tp_traffic``, in the same loads), each rank
             computes 1 / t of its group's expert FLOPs, the MoE layers run unchunked (as the
             runtime runs them), and each expert slice's gradient ring spans the groups
             holding the expert (1 / t of its bytes on each). The dense gradient
             ring runs over each data-parallel group (the ranks of one TP index) for the sharded
             weights and the embeddings, over all G ranks for the norms, routers and shared
             experts (``runtime.tensor_parallel.sync_gradients``).
             Per rank the attention, dense MLP and LM-head FLOPs are the group's over t: those
             of a rank's own tokens, as without TP (``epplan.cost.step`` times their shapes).
step time    sum_l layer_time_l + max_g other_compute[g] + exposed_sync_s + tp_s.
MFU          model_flops_per_step / (step_time * sum over GPUs of the peak): ``mfu_datasheet``
             against each GPU's datasheet bf16 TFLOP/s, ``mfu_spec`` against the founding spec's
             400 TFLOP/s per GPU (target 60 %).
bandwidth    on the link busiest over the step (a2a of every layer + gradient sync, bytes /
utilisation  capacity): its bytes / (step time * capacity), i.e. the fraction of the step it
             moves data (target 80 %). ``a2a_utilisation[l]``: layer l's a2a bottleneck time /
             its layer time.
memory       per GPU: weights (model dtype) + gradients (model dtype) + AdamW states (fp32 master
             copy when the model dtype is narrower than fp32, plus two fp32 moments: 12 bytes per
             parameter for bf16, 8 for fp32) for the dense parameters (on every rank) and for
             every expert replica placed on the GPU; activations kept for backward (no
             recomputation): the per-token parts (attention, router, norms, dense MLP, LM head)
             for the rank's own tokens, the per-assignment part for the assignments it serves;
             divided by ``micro_batches``. Capacity: topology ``gpu_memory_gb`` * 1e9.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from epplan.cost.dispatch import hierarchical_link_loads, hierarchical_rows, hierarchical_traffic
from epplan.cost.linkmap import LinkMap, LowRank, link_map
from epplan.cost.step import StepParts, step_parts
from epplan.errors import PlacementError
from epplan.placement.problem import PlacementProblem
from epplan.placement.types import LayerPlacement, Placement
from epplan.schedule import Schedule
from epplan.workload.flops import (TRAINING_FLOPS_FACTOR, optimizer_sync_bytes, recompute_flops_per_token,
                                   tp_sharded_params)
from epplan.workload.memory import expert_tp_rows, memory_per_gpu, storage_bytes
from epplan.workload.tensor_parallel import (expert_tp_group_experts, expert_tp_held, expert_tp_rings,
                                             expert_tp_traffic, sp_collectives)

SPEC_PEAK_TFLOPS = 400.0   # founding spec: usable bf16 TFLOP/s per H100
MFU_TARGET = 0.60
BANDWIDTH_TARGET = 0.80


@dataclass
class Cost:
    """Every number ``evaluate`` derives; see the module docstring for the definitions."""

    topology: Any = field(repr=False)
    placement_method: str
    traffic_source: str
    num_gpus: int
    schedule: Schedule
    # --- per layer and link (bytes per step) ----------------------------------------------------
    dispatch_fwd_bytes: np.ndarray      # float32[L, K] b*loads(F); the combine's backward: same
    combine_fwd_bytes: np.ndarray       # float32[L, K] b*loads(F^T); the dispatch's backward: same
    # --- per layer -----------------------------------------------------------------------------
    a2a_link_s: np.ndarray              # float64[L] a2a time of the layer's most-loaded link
    a2a_link: np.ndarray                # int64[L]   that link
    expert_assignments: np.ndarray      # float64[L, G] assignments each GPU serves
    expert_compute_s: np.ndarray        # float64[L, G]
    expert_gpu: np.ndarray              # int64[L]   the GPU with the longest expert time
    bottleneck_s: np.ndarray            # float64[L] max(a2a_link_s, expert time of expert_gpu)
    moe_time_s: np.ndarray              # float64[L] the two under the schedule: the objective
    dense_compute_s: np.ndarray         # float64[L, G] attention, router, shared experts
    layer_time_s: np.ndarray            # float64[L] dense + MoE time
    # --- per step ------------------------------------------------------------------------------
    other_compute_s: np.ndarray         # float64[G] dense layers + LM head
    expert_sync_bytes: np.ndarray       # float32[K] expert replicas' gradient rings
    dense_sync_bytes: np.ndarray        # float32[K] dense parameters' data-parallel ring
    expert_sync_s: float
    dense_sync_s: float
    sync_s: float
    exposed_sync_s: float
    step_time_s: float
    optimizer_sync_bytes: np.ndarray    # float32[K] ZeRO's weight broadcasts (0 unsharded)
    a2a_passes: float                   # times each layer's dispatch and combine run: 2, 3 recomputed
    optimizer_sync_s: float
    serial_step_time_s: float
    model_flops_per_step: float
    mfu_datasheet: float
    mfu_spec: float
    busiest_link: int
    bandwidth_utilisation: float
    # --- memory per GPU (bytes) ----------------------------------------------------------------
    weight_bytes: np.ndarray            # float64[G]
    grad_bytes: np.ndarray
    optimizer_bytes: np.ndarray
    activation_bytes: np.ndarray
    memory_capacity_bytes: np.ndarray
    # --- with a calibration: the step's parts per GPU (epplan.cost.step) -------------------------
    step_parts: StepParts | None = None
    dispatch: str = "flat"              # flat | hierarchical (problem.dispatch)
    # --- tensor parallelism (problem.tp) -----------------------------------------------------------
    tp: int = 1
    expert_tp: bool = False
    tp_bytes: np.ndarray | None = None  # float32[K] the TP groups' collectives per step (None: tp 1)
    tp_s: float = 0.0                   # their busiest link's time, exposed

    # --- derived ---------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.bottleneck_s.size)

    @property
    def objective_s(self) -> float:
        """The planner's objective: the MoE layers' time under the schedule, summed."""
        return float(self.moe_time_s.sum())

    @property
    def binds(self) -> list[str]:
        """Per layer, what sets its MoE time: 'link', 'gpu' or 'both' (``Schedule.binds``)."""
        expert = self.expert_compute_s[np.arange(self.num_layers), self.expert_gpu]
        return [self.schedule.binds(float(a), float(x)) for a, x in zip(self.a2a_link_s, expert)]

    @property
    def capacity_bytes_per_s(self) -> np.ndarray:
        return np.asarray(self.topology.link_capacity, dtype=np.float64) * 1e9

    @property
    def a2a_bytes(self) -> np.ndarray:
        """float64[L, K] all four exchanges of each layer on each link (six under block recompute)."""
        return self.a2a_passes * (self.dispatch_fwd_bytes.astype(np.float64) + self.combine_fwd_bytes)

    @property
    def link_step_bytes(self) -> np.ndarray:
        """float64[K] everything a step puts on each link: a2a of all layers + gradient sync."""
        out = (self.a2a_bytes.sum(axis=0) + self.expert_sync_bytes.astype(np.float64)
               + self.dense_sync_bytes + self.optimizer_sync_bytes)
        return out if self.tp_bytes is None else out + self.tp_bytes

    @property
    def a2a_utilisation(self) -> np.ndarray:
        return self.a2a_link_s / self.layer_time_s

    @property
    def memory_bytes(self) -> np.ndarray:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes

    @property
    def fits_memory(self) -> bool:
        return bool(np.all(self.memory_bytes <= self.memory_capacity_bytes))

    @property
    def worst_memory_gpu(self) -> int:
        return int(np.argmax(self.memory_bytes / self.memory_capacity_bytes))

    def link_label(self, idx: int) -> dict[str, Any]:
        topo = self.topology
        return {"index": int(idx), "name": topo.link_name(int(idx)), "class": topo.link_class[int(idx)],
                "capacity_gbps": float(topo.link_capacity[int(idx)])}

    def to_dict(self, top_links: int = 10) -> dict[str, Any]:
        """Summary, per-layer arrays and the ``top_links`` busiest links, JSON-ready."""
        topo = self.topology
        cap = self.capacity_bytes_per_s
        step_bytes = self.link_step_bytes
        link_s = step_bytes / cap
        order = np.argsort(-link_s)[:top_links]
        g = self.worst_memory_gpu
        expert_max = self.expert_compute_s.max(axis=1)
        return {
            "topology": topo.name,
            "num_gpus": self.num_gpus,
            "num_moe_layers": self.num_layers,
            "placement": self.placement_method,
            "traffic": self.traffic_source,
            "schedule": self.schedule.to_dict(),
            "dispatch": self.dispatch,
            "step": {
                "step_time_s": self.step_time_s,
                "serial_step_time_s": self.serial_step_time_s,
                "objective_s": self.objective_s,
                "bottleneck_total_s": float(self.bottleneck_s.sum()),
                "moe_layers_s": float(self.layer_time_s.sum()),
                "dense_compute_s": float(self.dense_compute_s.max(axis=1).sum()),
                "expert_compute_s": float(expert_max.sum()),
                "a2a_s": float(self.a2a_link_s.sum()),
                "other_compute_s": float(self.other_compute_s.max()),
                "expert_sync_s": self.expert_sync_s,
                "dense_sync_s": self.dense_sync_s,
                "sync_s": self.sync_s,
                "exposed_sync_s": self.exposed_sync_s,
                "optimizer_sync_s": self.optimizer_sync_s,
                "tp_s": self.tp_s,
            },
            "tp": {"degree": self.tp, "expert_tp": self.expert_tp},
            "communication_bytes": {
                "dispatch_fwd": float(self.dispatch_fwd_bytes.sum(dtype=np.float64)),
                "combine_fwd": float(self.combine_fwd_bytes.sum(dtype=np.float64)),
                "dispatch_bwd": float(self.combine_fwd_bytes.sum(dtype=np.float64)),
                "combine_bwd": float(self.dispatch_fwd_bytes.sum(dtype=np.float64)),
                "expert_sync": float(self.expert_sync_bytes.sum(dtype=np.float64)),
                "dense_sync": float(self.dense_sync_bytes.sum(dtype=np.float64)),
                "optimizer_sync": float(self.optimizer_sync_bytes.sum(dtype=np.float64)),
                "tp": 0.0 if self.tp_bytes is None else float(self.tp_bytes.sum(dtype=np.float64)),
                "note": "summed over links (a byte crossing 3 links counts 3 times)",
            },
            "mfu": {
                "datasheet": self.mfu_datasheet,
                "spec_400_tflops": self.mfu_spec,
                "target": MFU_TARGET,
                "model_flops_per_step": self.model_flops_per_step,
            },
            "bandwidth": {
                "utilisation": self.bandwidth_utilisation,
                "target": BANDWIDTH_TARGET,
                "busiest_link": {**self.link_label(self.busiest_link),
                                 "bytes_per_step": float(step_bytes[self.busiest_link])},
            },
            "memory": {
                "fits": self.fits_memory,
                "worst_gpu": topo.gpu_names[g],
                "worst_gpu_bytes": {
                    "weights": float(self.weight_bytes[g]), "grads": float(self.grad_bytes[g]),
                    "optimizer": float(self.optimizer_bytes[g]),
                    "activations": float(self.activation_bytes[g]),
                    "total": float(self.memory_bytes[g]),
                    "capacity": float(self.memory_capacity_bytes[g]),
                },
                "max_total_bytes": float(self.memory_bytes.max()),
                "min_total_bytes": float(self.memory_bytes.min()),
            },
            "layers": [
                {
                    "layer": li,
                    "moe_time_s": float(self.moe_time_s[li]),
                    "bottleneck_s": float(self.bottleneck_s[li]),
                    "binds": self.binds[li],
                    "a2a_s": float(self.a2a_link_s[li]),
                    "a2a_link": self.link_label(self.a2a_link[li])["name"],
                    "expert_s": float(expert_max[li]),
                    "expert_gpu": topo.gpu_names[int(self.expert_gpu[li])],
                    "layer_time_s": float(self.layer_time_s[li]),
                }
                for li in range(self.num_layers)
            ],
            "top_links": [
                {**self.link_label(k), "bytes_per_step": float(step_bytes[k]), "time_s": float(link_s[k])}
                for k in order
            ],
        }


@dataclass(frozen=True)
class ExchangeLoads:
    """What a placement's all-to-all puts on the links, per MoE layer, before the run settings
    (recompute, bytes per assignment) scale it: the expensive part of ``evaluate``, computed once
    by ``exchange_loads`` when one placement is scored under several run settings.

    fwd:    float64[L, K] loads(F) of each layer's flows F (assignments, or rows under
            hierarchical dispatch); bwd: float64[L, K] loads(F^T).
    served: float64[L, G] assignments each GPU serves.
    """

    fwd: np.ndarray
    bwd: np.ndarray
    served: np.ndarray


def exchange_loads(placement: Placement, problem: PlacementProblem, *, fast: bool = True,
                   check: bool = True) -> ExchangeLoads:
    """The ``ExchangeLoads`` of ``placement`` on ``problem`` (``fast`` as in ``evaluate``).
    ``check=False`` skips ``Placement.validate`` (for the planner's own baselines: seconds at 1,024
    GPUs x 4,096 experts x 16 layers)."""
    topo = problem.topology
    num_layers = problem.num_layers
    if check:
        _check_fits(placement, problem)
    counts = problem.traffic.counts                        # [L, G, E]
    lm = link_map(topo) if fast else None
    fwd_all = np.empty((num_layers, topo.num_links))
    bwd_all = np.empty_like(fwd_all)
    served = np.empty((num_layers, problem.num_gpus))
    seen: list[int] = []  # layers computed so far whose inputs differ from each other
    hierarchical = problem.dispatch == "hierarchical"
    pairs = problem.traffic.pairs
    for li in range(num_layers):
        same = next((m for m in seen if _same_layer(placement.layers[m], placement.layers[li],
                                                    counts[m], counts[li])
                     and (not hierarchical or pairs is None or np.array_equal(pairs[m], pairs[li]))), None)
        if same is not None:  # identical placement and traffic: identical loads (uniform routing)
            fwd_all[li], bwd_all[li], served[li] = fwd_all[same], bwd_all[same], served[same]
            continue
        seen.append(li)
        layer = placement.layers[li]
        if hierarchical:
            fwd, bwd = hierarchical_loads(problem, layer, li, lm if fast else None)
            served[li] = served_assignments(layer, counts[li])
        elif fast:
            fwd, bwd, served[li] = layer_loads(lm, layer, counts[li])
        else:
            flows = layer.flows(counts[li])              # [G, G]
            served[li] = flows.sum(axis=0)
            fwd = topo.link_loads(flows)
            bwd = topo.link_loads(np.ascontiguousarray(flows.T))
        fwd_all[li], bwd_all[li] = fwd, bwd
    return ExchangeLoads(fwd_all, bwd_all, served)


def evaluate(placement: Placement, problem: PlacementProblem, *, fast: bool = True,
             loads: ExchangeLoads | None = None) -> Cost:
    """Score ``placement`` on ``problem``; see the module docstring for every definition.

    ``fast=False`` takes the plain path (``LayerPlacement.flows`` as dense [G, G] matrices,
    ``Topology.link_loads`` on each, no low-rank factors): same numbers, for tests.
    ``loads``: ``exchange_loads(placement, problem)`` computed before, for the same placement,
    traffic, topology and dispatch (only the run settings may differ).
    """
    topo, config, costs = problem.topology, problem.config, problem.costs
    num_gpus, num_layers = problem.num_gpus, problem.num_layers
    if loads is None:
        loads = exchange_loads(placement, problem, fast=fast)   # checks the placement fits
    b = float(problem.bytes_per_assignment)
    cap = np.asarray(topo.link_capacity, dtype=np.float64) * 1e9
    rate = problem.gpu_flops                               # [G]
    lm = link_map(topo) if fast else None

    def single(t: np.ndarray) -> np.ndarray:
        return lm.loads(t) if fast else topo.link_loads(t)

    # --recompute: a block recompute repeats each layer's dispatch and combine (4 -> 6 exchanges)
    # and backward repeats forward FLOPs (flops.recompute_flops_per_token).
    a2a_factor = 2.0 * problem.exchange_scale
    again = recompute_flops_per_token(costs, config, problem.recompute)
    a2a_time = a2a_factor * b * (loads.fwd + loads.bwd) / cap          # [L, K]
    a2a_link = np.argmax(a2a_time, axis=1)
    a2a_link_s = a2a_time[np.arange(num_layers), a2a_link]
    dispatch, combine = (b * loads.fwd).astype(np.float32), (b * loads.bwd).astype(np.float32)
    served = loads.served

    flops_train = TRAINING_FLOPS_FACTOR
    tp = problem.tp
    # --expert-tp: each rank computes 1 / t of its group's assignments (its hidden slice).
    computed = expert_tp_rows(served, tp, problem.expert_tp)
    expert_compute_s = computed * problem.expert_flops_per_assignment / rate
    # --- calibrated rates (epplan.cost.step): every part of the step from measured rates; the
    # expert GEMMs at each GPU's own rows per expert unless --tflops overrides the rate.
    parts = calibrated_step_parts(placement, problem, served) if problem.calibration is not None else None
    if parts is not None and problem.achievable_tflops is None:
        expert_compute_s = parts.experts
    expert_gpu = np.argmax(expert_compute_s, axis=1)
    expert_max = expert_compute_s[np.arange(num_layers), expert_gpu]
    bottleneck_s = np.maximum(a2a_link_s, expert_max)
    schedule = problem.schedule
    moe_time_s = schedule.moe_time(a2a_link_s, expert_max)

    tokens = config.tokens_per_step / num_gpus              # per rank (data parallel)
    dense_flops = costs.flops_fwd_moe_layer - costs.flops_routed_experts
    dense_compute_s = np.broadcast_to(tokens * (dense_flops * flops_train + again["moe_dense"]) / rate,
                                      (num_layers, num_gpus)).copy()
    other_flops = config.num_dense_layers * costs.flops_fwd_dense_layer + costs.flops_lm_head
    other_compute_s = tokens * (other_flops * flops_train + config.num_dense_layers * again["dense_layer"]) / rate
    if parts is not None:
        dense_compute_s = parts.attention + parts.moe_dense
        other_compute_s = parts.lm_head_loss + parts.embedding + parts.optimizer + parts.dense_layers
    layer_time_s = dense_compute_s.max(axis=1) + moe_time_s

    # Gradient synchronisation: one matrix each, all layers summed (links are shared anyway).
    param_bytes = config.dtype_bytes
    if problem.expert_tp:
        expert_ring = ring_traffic(expert_tp_rings([layer.replicas for layer in placement.layers], tp), num_gpus,
                                   costs.params_per_expert * param_bytes / tp)
    else:
        expert_ring = _expert_rings(placement, num_gpus, costs.params_per_expert * param_bytes)
    dense_ring = _dense_rings(problem, param_bytes)
    expert_sync = single(expert_ring) if expert_ring.nnz else np.zeros(topo.num_links)
    dense_sync = single(dense_ring) if dense_ring.nnz else np.zeros(topo.num_links)
    expert_sync_s = float((expert_sync / cap).max(initial=0.0))
    dense_sync_s = float((dense_sync / cap).max(initial=0.0))
    sync_s = float(((expert_sync + dense_sync) / cap).max(initial=0.0))
    compute_s = float(dense_compute_s.max(axis=1).sum() + expert_max.sum() + other_compute_s.max())
    exposed_sync_s = dense_sync_s + expert_sync_s
    # --optimizer-sharding dense: ZeRO broadcasts the updated dense weights after the step (an
    # all-gather ring over all ranks), exposed: nothing runs beside it; under "all" each replica
    # set's ZeRO does the same for its experts (an all-gather ring over the replicas).
    # Under TP both are over the ranks that hold the same shards: the data-parallel group of each
    # TP index for the dense shards, each hidden slice's replica set under --expert-tp.
    if tp == 1:
        opt_ring = _ring(np.arange(num_gpus), num_gpus,
                         optimizer_sync_bytes(costs, config, problem.optimizer_sharding) / 2)
    else:
        opt_ring = ring_traffic([np.arange(i, num_gpus, tp, dtype=np.int64) for i in range(tp)], num_gpus,
                                optimizer_sync_bytes(costs, config, problem.optimizer_sharding, tp) / 2)
    if problem.optimizer_sharding == "all" and problem.expert_tp:
        opt_ring = opt_ring + ring_traffic(expert_tp_rings([layer.replicas for layer in placement.layers], tp),
                                           num_gpus, costs.params_per_expert * storage_bytes(config) / tp / 2)
    elif problem.optimizer_sharding == "all":  # and each expert's replicas all-gather its weights
        opt_ring = opt_ring + _expert_rings(placement, num_gpus,
                                            costs.params_per_expert * storage_bytes(config) / 2)
    optimizer_sync = single(opt_ring) if opt_ring.nnz else np.zeros(topo.num_links)
    optimizer_sync_s = float((optimizer_sync / cap).max(initial=0.0))
    tp_bytes, tp_s = None, 0.0
    if tp > 1:
        tp_ring = tp_traffic(problem, served)
        tp_bytes = (single(tp_ring) if tp_ring.nnz else np.zeros(topo.num_links)).astype(np.float32)
        tp_s = float((tp_bytes / cap).max(initial=0.0))
    step_time_s = float(layer_time_s.sum() + other_compute_s.max() + exposed_sync_s + optimizer_sync_s + tp_s)
    serial_step_time_s = float(compute_s + a2a_link_s.sum() + exposed_sync_s + optimizer_sync_s + tp_s)

    peak = np.asarray(topo.gpu_tflops, dtype=np.float64) * 1e12
    mfu_datasheet = costs.model_flops_per_step / (step_time_s * peak.sum())
    mfu_spec = costs.mfu(step_time_s, num_gpus, SPEC_PEAK_TFLOPS * 1e12)

    # Sync bytes as the Cost stores them (float32), so that link_step_bytes gives the same numbers.
    expert_sync, dense_sync, optimizer_sync = (v.astype(np.float32).astype(np.float64)
                                               for v in (expert_sync, dense_sync, optimizer_sync))
    step_bytes = a2a_factor * (dispatch.sum(axis=0, dtype=np.float64) + combine.sum(axis=0, dtype=np.float64)) \
        + expert_sync + dense_sync + optimizer_sync + (0.0 if tp_bytes is None else tp_bytes.astype(np.float64))
    busiest = int(np.argmax(step_bytes / cap))
    utilisation = float(step_bytes[busiest] / (cap[busiest] * step_time_s))

    memory = _memory(placement, problem, served)
    return Cost(
        topology=topo, placement_method=placement.method, traffic_source=problem.traffic.source,
        num_gpus=num_gpus, schedule=schedule,
        dispatch_fwd_bytes=dispatch, combine_fwd_bytes=combine,
        a2a_link_s=a2a_link_s, a2a_link=a2a_link,
        expert_assignments=served, expert_compute_s=expert_compute_s, expert_gpu=expert_gpu,
        bottleneck_s=bottleneck_s, moe_time_s=moe_time_s, dense_compute_s=dense_compute_s, layer_time_s=layer_time_s,
        other_compute_s=other_compute_s,
        expert_sync_bytes=expert_sync.astype(np.float32), dense_sync_bytes=dense_sync.astype(np.float32),
        expert_sync_s=expert_sync_s, dense_sync_s=dense_sync_s, sync_s=sync_s,
        exposed_sync_s=exposed_sync_s, step_time_s=step_time_s,
        optimizer_sync_bytes=optimizer_sync.astype(np.float32), optimizer_sync_s=optimizer_sync_s,
        a2a_passes=a2a_factor,
        serial_step_time_s=serial_step_time_s,
        model_flops_per_step=float(costs.model_flops_per_step),
        mfu_datasheet=float(mfu_datasheet), mfu_spec=float(mfu_spec),
        busiest_link=busiest, bandwidth_utilisation=utilisation,
        **memory, step_parts=parts, dispatch=problem.dispatch,
        tp=tp, expert_tp=problem.expert_tp, tp_bytes=tp_bytes, tp_s=tp_s,
    )


def calibrated_step_parts(placement: Placement, problem: PlacementProblem, served: np.ndarray) -> StepParts:
    """``epplan.cost.step.step_parts`` of the placement: served float64[L, G] assignments."""
    if problem.expert_tp:  # the experts of each rank's group (step_parts takes 1 / t of them)
        held = expert_tp_group_experts([layer.replicas for layer in placement.layers], problem.num_gpus,
                                       problem.tp)
    else:
        held = np.zeros((problem.num_layers, problem.num_gpus), dtype=np.int64)
        for li, layer in enumerate(placement.layers):
            held[li] = np.bincount(np.concatenate([np.asarray(r) for r in layer.replicas]),
                                   minlength=problem.num_gpus)
    return step_parts(problem.config, problem.costs, problem.calibration,
                      problem.config.tokens_per_step / problem.num_gpus, served, held,
                      problem.micro_batches, chunks=problem.schedule.num_chunks if problem.schedule.overlap else 0,
                      recompute=problem.recompute, tp=problem.tp, expert_tp=problem.expert_tp)


def layer_loads(lm: LinkMap, layer: LayerPlacement, counts: np.ndarray) -> tuple[np.ndarray, ...]:
    """(loads(F), loads(F^T), served float64[G]) of one layer, F = layer.flows(counts).

    Experts whose split is the same for every source (all baselines) make a rank-E part
    C @ S of F, scored from its factors in O(G * E); the others are built densely.
    """
    low, dense_t = layer_flow_parts(layer, counts)
    fwd, bwd, served = np.zeros(lm.num_links), np.zeros(lm.num_links), np.zeros(counts.shape[0])
    if low is not None:
        f, f_t = lm.pair_loads(low)
        fwd += f
        bwd += f_t
        served += np.einsum("i,ij->j", low.a.sum(axis=0), low.b)  # column sums of C @ S
    if dense_t is not None:
        f_t, f = lm.pair_loads(dense_t)
        fwd += f
        bwd += f_t
        served += dense_t.sum(axis=1)
    return fwd, bwd, served


def hierarchical_loads(problem: PlacementProblem, layer: LayerPlacement, li: int,
                       lm: LinkMap | None) -> tuple[np.ndarray, np.ndarray]:
    """(loads float64[K] of the dispatch's rows, of the combine's) of layer ``li`` under
    hierarchical dispatch, in rows (``epplan.cost.dispatch``); lm None: ``Topology.link_loads``.

    The rows depend on the traffic, the layer's placement and the topology only, not on the run
    settings, so they are kept per traffic object (``choose_run_settings`` scores one plan under
    several settings; the planner scores each candidate once)."""
    topo = problem.topology
    pairs = problem.traffic.pairs
    key = (li, id(topo), problem.config.top_k, lm is None, _layer_key(layer))
    cache = _rows_cache(problem.traffic)
    hit = cache.get(key)
    if hit is not None:
        return hit
    node_rows, gpu_rows = hierarchical_rows(problem.traffic.counts[li], None if pairs is None else pairs[li],
                                            layer, topo.gpu_node, top_k=problem.config.top_k)
    if lm is not None:
        out = hierarchical_link_loads(lm, node_rows, gpu_rows, 1.0)
    else:
        network, intra = hierarchical_traffic(node_rows, gpu_rows, topo.gpu_node, topo.gpu_local)
        rows = network + intra
        out = topo.link_loads(rows), topo.link_loads(np.ascontiguousarray(rows.T))
    if len(cache) >= _ROWS_CACHE_SIZE:
        cache.pop(next(iter(cache)))
    cache[key] = out
    return out


_ROWS_CACHE: dict[tuple, tuple[Any, Any, dict]] = {}  # (id counts, id pairs) -> (weakrefs, {key: loads})
_ROWS_CACHE_SIZE = 4096


def _rows_cache(traffic) -> dict:
    """The loads cache of ``traffic``'s counts and pairs arrays (while both live; the last few)."""
    import weakref

    counts, pairs = traffic.counts, traffic.pairs
    key = (id(counts), id(pairs))
    entry = _ROWS_CACHE.get(key)
    if entry is None or entry[0]() is not counts or (pairs is not None and entry[1]() is not pairs):
        for k in [k for k, (ref, _, _) in _ROWS_CACHE.items() if ref() is None]:
            del _ROWS_CACHE[k]
        while len(_ROWS_CACHE) >= 8:
            _ROWS_CACHE.pop(next(iter(_ROWS_CACHE)))
        entry = _ROWS_CACHE[key] = (weakref.ref(counts), None if pairs is None else weakref.ref(pairs), {})
    return entry[2]


def _layer_key(layer: LayerPlacement) -> str:
    """A digest of the layer's replicas and splits."""
    digest = hashlib.sha1()
    for ranks, split in zip(layer.replicas, layer.split):
        digest.update(np.asarray(ranks, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(split, dtype=np.float64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def served_assignments(layer: LayerPlacement, counts: np.ndarray) -> np.ndarray:
    """float64[G] assignments each GPU serves: column sums of ``layer.flows(counts)``."""
    served = np.zeros(counts.shape[0])
    for e, (ranks, split) in enumerate(zip(layer.replicas, layer.split)):
        served[ranks] += counts[:, e] @ split                             # (G,) @ (G, R_e)
    return served


def layer_flow_parts(layer: LayerPlacement, counts: np.ndarray) -> tuple[LowRank | None, np.ndarray | None]:
    """``LayerPlacement.flows(counts)`` (counts float64[G, E]) as a sum of two parts:

    - ``LowRank(C, S)``: the experts whose split is the same for every source, C = their
      columns of counts [G, E_u], S[i, replicas] = the shared split of the i-th of them [E_u, G];
    - F_rest^T, float64[G, G] destination-major ([t, s] = assignments s sends to t), for the
      others: built row by row because an expert's replica ranks are distinct (no ``add.at``).
    Either is None when it has no expert.
    """
    num_ranks = counts.shape[0]
    shared = [e for e, split in enumerate(layer.split) if np.all(split == split[:1])]
    is_shared = np.zeros(len(layer.split), dtype=bool)
    is_shared[shared] = True
    low = None
    if shared:
        s_mat = np.zeros((len(shared), num_ranks))
        for i, e in enumerate(shared):
            s_mat[i, layer.replicas[e]] = layer.split[e][0]
        low = LowRank(counts[:, shared], s_mat)
    dense_t = None
    if not is_shared.all():
        dense_t = np.zeros((num_ranks, num_ranks))
        for e in np.flatnonzero(~is_shared):
            dense_t[layer.replicas[e]] += layer.split[e].T * counts[:, e]  # (R_e, G) * (G,)
    return low, dense_t


def _check_fits(placement: Placement, problem: PlacementProblem) -> None:
    want = (problem.num_gpus, problem.num_experts, problem.num_layers)
    have = (placement.num_ranks, placement.num_experts, placement.num_layers)
    if have != want:
        raise PlacementError(
            f"placement ({placement.method}) is for {have[0]} ranks, {have[1]} experts, {have[2]} MoE "
            f"layers; the problem has {want[0]} ranks, {want[1]} experts, {want[2]} MoE layers")
    # Validate each distinct layer object once (baselines reuse one layer for every layer).
    distinct = list({id(layer): layer for layer in placement.layers}.values())
    Placement(placement.num_ranks, placement.num_experts, distinct).validate(problem.experts_per_gpu)


def _same_layer(a: LayerPlacement, b: LayerPlacement, counts_a: np.ndarray, counts_b: np.ndarray) -> bool:
    if not np.array_equal(counts_a, counts_b):  # the cheap test first
        return False
    if a is b:
        return True
    return len(a.replicas) == len(b.replicas) and all(
        np.array_equal(ra, rb) and np.array_equal(sa, sb)
        for ra, rb, sa, sb in zip(a.replicas, b.replicas, a.split, b.split))


def _ring(ranks: np.ndarray, num_gpus: int, param_bytes: float) -> sp.csr_matrix:
    """float64[G, G] (sparse): a ring all-reduce of ``param_bytes`` over ``ranks`` in order,
    each hop ranks[i] -> ranks[i+1 mod R] carrying 2 (R - 1) / R * param_bytes."""
    return ring_traffic([np.asarray(ranks, dtype=np.int64)], num_gpus, param_bytes)


def tp_groups(num_gpus: int, tp: int) -> list[np.ndarray]:
    """The TP groups: ``tp`` consecutive ranks each (rank = dp * tp + tp_rank)."""
    return [np.arange(i, i + tp, dtype=np.int64) for i in range(0, num_gpus, tp)]


def tp_traffic(problem: PlacementProblem, served: np.ndarray) -> sp.csr_matrix:
    """float64[G, G] (sparse): every TP collective of a step as ring hops inside its group
    (``epplan.workload.tensor_parallel``): an all-gather or reduce-scatter of S bytes puts
    (t - 1) / t S on each hop; with --expert-tp, its all-to-alls (``expert_tp_traffic``).
    served: [L, G] assignments each rank serves."""
    c, t, num_gpus = problem.config, problem.tp, problem.num_gpus
    group_tokens = c.tokens_per_step / num_gpus * t    # a group's tokens per step, all micro-batches
    per_group = sum(x.count * x.bytes_per_token for x in sp_collectives(c, problem.recompute, t)) * group_tokens
    groups = tp_groups(num_gpus, t)
    out = ring_traffic(groups, num_gpus, per_group / 2)   # ring_traffic's hop is 2 (t - 1) / t of it
    if problem.expert_tp:
        src, dst, nbytes = expert_tp_traffic(served, t, problem.recompute, c.d_model * c.dtype_bytes)
        out = out + sp.coo_matrix((nbytes, (src, dst)), shape=(num_gpus, num_gpus)).tocsr()
    return out


def _dense_rings(problem: PlacementProblem, param_bytes: float) -> sp.csr_matrix:
    """float64[G, G] (sparse): the dense gradients' all-reduce rings. Without TP one ring over all
    ranks in rank order; under TP a ring over each data-parallel group (the ranks of one TP index,
    in rank order) for the sharded weights' shards and the embeddings, and one over all ranks
    for the weights that see only a rank's tokens (norms, routers, shared experts)."""
    c, costs, num_gpus, t = problem.config, problem.costs, problem.num_gpus, problem.tp
    if t == 1:
        return _ring(np.arange(num_gpus), num_gpus, costs.params_dense * param_bytes)
    sharded = tp_sharded_params(costs, c)
    over_world = (c.num_layers * costs.params_norms_per_layer + costs.params_final_norm
                  + c.num_moe_layers * (costs.params_router + costs.params_shared_experts))
    per_dp = sharded / t + costs.params_embedding   # a rank's shards (the mean over TP ranks) and the embedding
    dp_groups = [np.arange(i, num_gpus, t, dtype=np.int64) for i in range(t)]
    return (ring_traffic(dp_groups, num_gpus, per_dp * param_bytes)
            + _ring(np.arange(num_gpus), num_gpus, over_world * param_bytes))


def _expert_rings(placement: Placement, num_gpus: int, expert_bytes: float) -> sp.csr_matrix:
    """float64[G, G] (sparse): every expert's replica ring, all layers summed."""
    return ring_traffic([np.asarray(r, dtype=np.int64) for layer in placement.layers for r in layer.replicas],
                  num_gpus, expert_bytes)


def ring_traffic(rings: list[np.ndarray], num_gpus: int, param_bytes: float) -> sp.csr_matrix:
    """float64[G, G] (sparse): ring all-reduces of ``param_bytes`` over each int64[R] of
    ``rings`` in its order, every hop carrying 2 (R - 1) / R * param_bytes; hops summed."""
    sizes = np.array([r.size for r in rings], dtype=np.int64)
    if not rings or sizes.max() < 2:
        return sp.csr_matrix((num_gpus, num_gpus))
    ranks = np.concatenate(rings)
    ring = np.repeat(np.arange(sizes.size), sizes)          # ring of each entry of ranks
    starts = np.cumsum(sizes) - sizes
    pos = np.arange(ranks.size) - starts[ring]
    nxt = ranks[starts[ring] + (pos + 1) % sizes[ring]]    # the next rank around the ring
    hop = (2.0 * (sizes - 1) / sizes * param_bytes)[ring]
    is_ring = sizes[ring] >= 2
    # COO -> CSR sums duplicates: rings of several layers share hops.
    return sp.coo_matrix((hop[is_ring], (ranks[is_ring], nxt[is_ring])), shape=(num_gpus, num_gpus)).tocsr()


def _memory(placement: Placement, problem: PlacementProblem, served: np.ndarray) -> dict[str, np.ndarray]:
    """Memory per GPU under the problem's run settings (``workload.memory.memory_per_gpu``)."""
    return {**memory_for(placement, problem, served, problem.micro_batches, problem.recompute,
                         problem.optimizer_sharding, problem.tp, problem.expert_tp),
            "memory_capacity_bytes": np.asarray(problem.topology.gpu_memory_gb, dtype=np.float64) * 1e9}


def memory_for(placement: Placement, problem: PlacementProblem, served: np.ndarray, micro_batches: int,
               recompute: str, optimizer_sharding: str, tp: int | None = None,
               expert_tp: bool | None = None) -> dict[str, np.ndarray]:
    """The weight/grad/optimizer/activation bytes per GPU of ``placement`` under other run
    settings than the problem's (tp, expert_tp None: the problem's); served: [L, G] assignments
    each GPU serves per layer."""
    num_gpus = problem.num_gpus
    tp = problem.tp if tp is None else tp
    expert_tp = problem.expert_tp if expert_tp is None else expert_tp
    held = np.zeros(num_gpus)
    if expert_tp:
        held = expert_tp_held([layer.replicas for layer in placement.layers], num_gpus, tp)
    else:
        for layer in placement.layers:
            held += np.bincount(np.concatenate([np.asarray(r, dtype=np.int64) for r in layer.replicas]),
                                minlength=num_gpus)
    return memory_per_gpu(problem.config, problem.costs, replicas_held=held,
                          tokens_per_rank=problem.config.tokens_per_step / num_gpus, served=served,
                          micro_batches=micro_batches, recompute=recompute,
                          optimizer_sharding=optimizer_sharding,
                          replicas=[layer.replicas for layer in placement.layers],
                          tp=tp, expert_tp=expert_tp)

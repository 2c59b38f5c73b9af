"""The cost of moving from one placement to another: which replicas travel, how many bytes, over
which links, and how long the move takes.

Shape legend: G = ranks (GPUs), K = directed links (the cost model's link index, as in
``Cost.dispatch_fwd_bytes``), L = MoE layers.

A move happens between optimizer steps, after ``zero_grad``: a new replica (a rank that holds
expert e of layer l in NEW but not in OLD) receives a copy of the expert's training state from
one rank that holds it in OLD. A replica dropped in NEW (held in OLD, not in NEW) costs nothing:
its state is freed. A replica held in both stays where it is. Only replica sets matter: how the
sources split their tokens over the replicas (``LayerPlacement.split``) changes for free.

Bytes per moved replica (``replica_state_bytes``), from the memory model
(``epplan.workload.memory``), which is what the runtime holds:

weights    the expert's ``params_per_expert`` elements in the storage dtype (``storage_bytes``:
           fp32 for bf16/fp16/fp32 models, fp64 for fp64 ones). These fp32 weights are the
           master copy (GPUs compute under bf16 autocast), so there is no separate master copy
           to send; autocast's low-precision casts are rebuilt by the next forward.
optimizer  AdamW's ``exp_avg`` and ``exp_avg_sq`` of those elements (``state_bytes`` each);
           and the fp32 ``step`` counter of each of the expert's weight tensors (w1, w2, and w3
           for swiglu): ``mlp_matrices(activation)`` x 4 bytes.
gradients  none: they are freed by ``zero_grad`` before the move.

Source choice (deterministic; the runtime sends along exactly these moves, so that the bytes it
measures equal ``Migration.bytes_moved``): for each new replica, the OLD replica on the closest
rank: same node > same rail (the two ranks share a nearest NIC rail in the path model) > any;
ties by the lowest rank. (Same GPU cannot occur: a new replica's rank lacks the expert in OLD.)

Time of the move: every move of every layer is sent at once, as one exchange; the bytes of
src -> dst spread over the links as the path model routes them (``LinkMap.loads``, the same map
that scores the all-to-all), and ``seconds`` is the busiest link's bytes over its capacity. This
is a bandwidth estimate: it leaves out per-message latency and assumes the exchange runs at the
links' capacity, as the all-to-all estimate does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from epplan.cost.linkmap import link_map
from epplan.errors import PlacementError
from epplan.placement.problem import PlacementProblem
from epplan.placement.types import Placement
from epplan.workload.config import ModelConfig
from epplan.workload.flops import mlp_matrices, model_costs
from epplan.workload.memory import _STEP_BYTES, state_bytes, storage_bytes


@dataclass(frozen=True)
class Move:
    """One replica that must be copied to a rank that lacks it."""

    layer: int        # MoE layer index
    expert: int       # logical expert id
    src_rank: int     # rank that sends it (holds a replica in the OLD placement)
    dst_rank: int     # rank that receives it (holds it in NEW, not in OLD)
    bytes: float      # weights + the optimizer state that travels with them


@dataclass(frozen=True)
class Migration:
    """Every move from OLD to NEW; ``moves`` sorted by (layer, expert, dst_rank)."""

    moves: tuple[Move, ...]
    bytes_moved: float        # sum of moves' bytes
    link_bytes: np.ndarray    # float64[K] bytes per link
    seconds: float            # predicted time of the move on the problem's topology

    @property
    def num_moves(self) -> int:
        return len(self.moves)

    def seconds_per_layer(self, problem: PlacementProblem) -> np.ndarray:
        """float64[L] the predicted seconds of each layer's moves alone (their sum bounds
        ``seconds`` from above: moved together, layers share the links' time)."""
        g = problem.num_gpus
        traffic = np.zeros((problem.num_layers, g, g))
        for m in self.moves:
            traffic[m.layer, m.src_rank, m.dst_rank] += m.bytes
        return np.array([_seconds(t, problem) for t in traffic])

    def bytes_per_layer(self, num_layers: int) -> np.ndarray:
        """float64[L] bytes moved in each MoE layer."""
        out = np.zeros(num_layers)
        for m in self.moves:
            out[m.layer] += m.bytes
        return out


def replica_state_bytes(config: ModelConfig) -> dict[str, int]:
    """Bytes of one expert replica's training state that a move sends, by part (module
    docstring): ``weights``, ``exp_avg``, ``exp_avg_sq``, ``step``."""
    elements = model_costs(config).params_per_expert
    s, m = storage_bytes(config), state_bytes(config)
    return {"weights": elements * s, "exp_avg": elements * m, "exp_avg_sq": elements * m,
            "step": mlp_matrices(config.activation) * _STEP_BYTES}


def replica_bytes(config: ModelConfig) -> float:
    """Bytes one moved replica sends: the sum of ``replica_state_bytes``."""
    return float(sum(replica_state_bytes(config).values()))


def rank_rails(problem: PlacementProblem) -> list[frozenset[int]]:
    """Per rank, the rails of its nearest NICs in the path model (empty without NICs)."""
    topo = problem.topology
    if topo.num_nodes < 2:
        return [frozenset()] * topo.num_gpus
    pm = topo.paths
    near = pm.recv_near.tocsr()
    return [frozenset(int(pm.nic_rail[c]) for c in near.indices[near.indptr[g]:near.indptr[g + 1]])
            for g in range(topo.num_gpus)]


def closest_source(holders: np.ndarray, dst: int, gpu_node: np.ndarray,
                   rails: list[frozenset[int]]) -> int:
    """The rank among ``holders`` (int64, the OLD replica ranks) closest to ``dst``: same node >
    same rail > any, ties by the lowest rank."""
    def distance(g: int) -> tuple[int, int]:
        if g == dst:
            return (0, g)
        if gpu_node[g] == gpu_node[dst]:
            return (1, g)
        if rails[g] & rails[dst]:
            return (2, g)
        return (3, g)

    return min((int(g) for g in holders), key=distance)


def plan_migration(old: Placement, new: Placement, problem: PlacementProblem) -> Migration:
    """The moves that turn ``old`` into ``new`` on ``problem``'s cluster, their bytes, per-link
    bytes and predicted seconds (module docstring)."""
    for name, p in (("old", old), ("new", new)):
        if (p.num_ranks, p.num_experts, p.num_layers) != (problem.num_gpus, problem.num_experts,
                                                          problem.num_layers):
            raise PlacementError(
                f"{name} placement has {p.num_layers} layers x {p.num_experts} experts on "
                f"{p.num_ranks} ranks; the problem has {problem.num_layers} x "
                f"{problem.num_experts} on {problem.num_gpus}: plan a migration between "
                "placements of the same model and cluster")
    gpu_node = np.asarray(problem.topology.gpu_node)
    rails = rank_rails(problem)
    per_replica = replica_bytes(problem.config)
    g = problem.num_gpus
    traffic = np.zeros((g, g))
    moves: list[Move] = []
    for li, (lo, ln) in enumerate(zip(old.layers, new.layers)):
        for e, (held, wanted) in enumerate(zip(lo.replicas, ln.replicas)):
            held = np.asarray(held, dtype=np.int64)
            for dst in np.setdiff1d(np.asarray(wanted, dtype=np.int64), held):
                src = closest_source(held, int(dst), gpu_node, rails)
                moves.append(Move(li, e, src, int(dst), per_replica))
                traffic[src, dst] += per_replica
    link_bytes = _link_bytes(traffic, problem)
    return Migration(moves=tuple(moves), bytes_moved=float(sum(m.bytes for m in moves)),
                     link_bytes=link_bytes, seconds=_seconds(traffic, problem, link_bytes))


def _link_bytes(traffic: np.ndarray, problem: PlacementProblem) -> np.ndarray:
    """float64[K] the path model's routing of traffic[src, dst] bytes."""
    if not traffic.any():
        return np.zeros(problem.topology.num_links)
    return link_map(problem.topology).loads(traffic)


def _seconds(traffic: np.ndarray, problem: PlacementProblem, link_bytes: np.ndarray | None = None) -> float:
    """The busiest link's time for traffic[src, dst] bytes sent at once."""
    if link_bytes is None:
        link_bytes = _link_bytes(traffic, problem)
    capacity = np.asarray(problem.topology.link_capacity, dtype=np.float64) * 1e9
    return float((link_bytes / capacity).max(initial=0.0))

"""The MoE layer's clock: how its exchange and its expert GEMMs add up under the runtime's schedule.

One owner for the planner (``epplan.placement``), the cost function (``evaluate``) and the
runtime's chunk count (``epplan.runtime.overlap`` imports ``auto_num_chunks`` from here), so that
the time the planner minimises is the time ``evaluate`` reports and the runtime runs.

With A the layer's exchange time (its busiest link's time over the four exchanges, dispatch and
combine, forward and backward) and X its expert GEMM time (the busiest GPU's, forward and
backward), ``epplan run`` spends on the MoE part of a layer:

serial    (``--overlap off``)  A + X: the exchange waits for the GEMMs and they for it.
pipeline  (``--overlap on``, C chunks)  A / C + max(A (C - 1) / C, X): the first dispatch and
          the last combine of each pass (1 / C of the exchange) are exposed, the rest travels
          under the GEMMs and shows only where it is longer than they are
          (``epplan.runtime.overlap`` describes the schedule).

Both are ``exposed * A + max(hidden * A, X)``: serial has exposed 1 and hidden 0, the pipeline
1 / C and 1 - 1 / C. The attention and other dense work of a layer do not overlap either and add
to it (``evaluate``). ``default_schedule`` is what ``epplan run`` chooses on GPUs when not told:
overlap when the run spans nodes, the chunk count of ``auto_num_chunks``.

The time is convex and piecewise linear in (A, X), so a linear program minimises it with
z >= hidden * A, z >= X and objective exposed * A + z (``epplan.placement.splits``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

if TYPE_CHECKING:  # for the annotations only (no import cycle at run time)
    from epplan.topology import Topology
    from epplan.workload.config import ModelConfig
    from epplan.workload.flops import ModelCosts


# Tokens per chunk of the LM head's chunked cross-entropy (``epplan.runtime.loss``), here with
# the other schedule constants that the runtime and the cost model (``epplan.cost.step``) share:
# (8192, 32,000) fp32 logits are 1 GiB at a time.
LOSS_CHUNK_TOKENS = 8192

# Automatic chunk count: as many chunks as keep every local expert's GEMM at or above
# MIN_ROWS_PER_EXPERT rows per chunk, at most MAX_CHUNKS. Measured at the seed spec
# (docs/benchmarks.md): grouped 4096 x 16384 GEMMs run at least as fast at 1,250 rows per expert
# as at 20,000. The first dispatch and the last combine of a layer (and their backward mirrors)
# are not hidden, 1 / C of its exchange time: with the exchange through host memory at 39 GB/s
# (4 x H200, the cross-node bandwidth regime) 16 chunks left 0.17 of it exposed against 0.24 for 8;
# over NVLink 16 and 8 chunks were level within the step-to-step spread.
# Every chunk's forward expert GEMMs also do at least MIN_CHUNK_FLOPS (about 0.8 ms at 650 TF/s),
# so that the chunks' fixed costs (launches, index work, exchange latency) stay small: a model with
# d_model 2048 and 4.4 TFLOP of expert GEMMs per rank and layer trained 11 % faster through host
# memory with 8 chunks, and 1 % with 16 (4 x H200, docs/benchmarks.md).
MIN_ROWS_PER_EXPERT = 1024
MIN_CHUNK_FLOPS = 5e11
MAX_CHUNKS = 16
# CTAs of the communicator for hidden exchanges, and SMs the expert GEMMs leave free meanwhile:
# 4 hid 87-100 % of a chunk's all-to-all under its GEMM at a 5-7 % GEMM cost (docs/benchmarks.md).
DEFAULT_OVERLAP_CTAS = 4

# How the runtime runs a MoE layer's exchange: overlapped with the expert GEMMs (on), not (off), or
# as the cluster calls for (auto: on when the run spans nodes); and how it exchanges the tokens:
# flat (a row per token and expert) or hierarchical (a row per token and destination node).
Overlap = Literal["auto", "on", "off"]
OVERLAP_MODES: tuple[Overlap, ...] = get_args(Overlap)
Dispatch = Literal["flat", "hierarchical"]
DISPATCH_MODES: tuple[Dispatch, ...] = get_args(Dispatch)


def auto_num_chunks(num_assignments: int, num_ranks: int, num_experts: int,
                    flops_per_row: float | None = None) -> int:
    """Chunks proposed by a rank that routes num_assignments: an expert serves about
    num_assignments * num_ranks / num_experts rows when the load is balanced, and a rank computes
    about num_assignments rows, each flops_per_row forward GEMM FLOPs (None: no FLOPs limit)."""
    rows_per_expert = num_assignments * num_ranks // max(num_experts, 1)
    chunks = min(rows_per_expert // MIN_ROWS_PER_EXPERT, MAX_CHUNKS)
    if flops_per_row is not None:
        chunks = min(chunks, int(num_assignments * flops_per_row // MIN_CHUNK_FLOPS))
    return int(max(chunks, 1))


@dataclass(frozen=True)
class Schedule:
    """How the runtime runs a MoE layer: overlapped in ``num_chunks`` chunks, or serial."""

    overlap: bool
    num_chunks: int = 1

    def __post_init__(self) -> None:
        assert isinstance(self.num_chunks, int) and self.num_chunks >= 1, self.num_chunks

    @property
    def exposed(self) -> float:
        """Share of the exchange time that adds to the layer whatever the GEMMs take."""
        return 1.0 / self.num_chunks if self.overlap else 1.0

    @property
    def hidden(self) -> float:
        """Share of the exchange time that runs under the GEMMs."""
        return 1.0 - self.exposed

    def moe_time(self, a2a_s: float | np.ndarray, expert_s: float | np.ndarray) -> float | np.ndarray:
        """Seconds of the layer's MoE part from its exchange time A and expert GEMM time X
        (floats or arrays of one shape)."""
        a2a_s, expert_s = np.asarray(a2a_s, dtype=np.float64), np.asarray(expert_s, dtype=np.float64)
        out = self.exposed * a2a_s + np.maximum(self.hidden * a2a_s, expert_s)
        return float(out) if out.ndim == 0 else out

    def binds(self, a2a_s: float, expert_s: float) -> str:
        """What sets the layer's time: 'link', 'gpu', or 'both' (serial, one chunk included: the
        larger share; pipeline: whichever of the hidden exchange and the GEMMs shows; within
        1e-9: 'both')."""
        link = a2a_s if self.hidden == 0 else self.hidden * a2a_s
        if abs(link - expert_s) <= 1e-9 * max(link, expert_s):
            return "both"
        return "link" if link > expert_s else "gpu"

    def describe(self) -> str:
        chunks = "1 chunk" if self.num_chunks == 1 else f"{self.num_chunks} chunks"
        return f"overlapped in {chunks}" if self.overlap else "serial (no overlap)"

    def to_dict(self) -> dict:
        return {"overlap": self.overlap, "num_chunks": self.num_chunks}


def default_schedule(topology: Topology, config: ModelConfig, costs: ModelCosts, micro_batches: int = 1, *, overlap: Overlap = "auto",
                     num_chunks: int | None = None) -> Schedule:
    """The schedule ``epplan run`` uses on the topology's GPUs unless told: overlap when the run
    spans nodes (``auto``), and then the chunk count every rank proposes for its micro-batch
    (tokens per rank x top-k assignments, the expert GEMMs' forward FLOPs per row)."""
    if overlap not in OVERLAP_MODES:
        raise ValueError(f"overlap must be one of {OVERLAP_MODES}, got {overlap!r}")
    on = topology.num_nodes > 1 if overlap == "auto" else overlap == "on"
    # One GPU: the runtime keeps the rows in place and runs the unchunked path (nothing to
    # exchange, nothing to hide), whatever --overlap says.
    if not on or topology.num_gpus == 1:
        return Schedule(False, 1)
    if num_chunks is None:
        tokens = config.tokens_per_step // (topology.num_gpus * micro_batches)
        num_chunks = auto_num_chunks(tokens * config.top_k, topology.num_gpus, config.num_experts,
                                     costs.flops_per_assignment)
    return Schedule(True, int(num_chunks))

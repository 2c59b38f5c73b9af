"""Time ``epplan.cost.evaluate`` on the 1,024-GPU SuperPOD: one contiguous placement of the seed model.

Also times a random placement whose replicas split each source's tokens differently (as the
planner's topology-aware splits do), which takes the dense O(G^2) path instead of the low-rank one.

    python scripts/bench_cost.py [--topology FILE] [--routing uniform zipf:1.2] [--runs 5] [--reference]

Prints, per routing: the first call (which also builds the path model and the fast link map,
once per topology object) and the median of ``--runs`` further calls. The budget is 1 s for a
warm call. ``--reference`` also times the reference path (per-matrix ``Topology.link_loads``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from epplan.cost import evaluate  # noqa: E402
from epplan.placement.baselines import contiguous, random_placement  # noqa: E402
from epplan.placement.problem import PlacementProblem  # noqa: E402
from epplan.topology import load_topology  # noqa: E402
from epplan.workload import load_model_config, make_traffic  # noqa: E402

BUDGET_S = 1.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", default=str(ROOT / "topologies" / "h100-superpod-1024.yaml"))
    ap.add_argument("--routing", nargs="+", default=["uniform", "zipf:1.2"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--reference", action="store_true")
    args = ap.parse_args()

    t0 = time.perf_counter()
    topo = load_topology(args.topology)
    config = load_model_config("seed")
    print(f"{topo.name}: {topo.num_gpus} GPUs, {topo.num_links} links; model seed "
          f"({config.num_moe_layers} MoE layers x {config.num_experts} experts); "
          f"topology loaded in {time.perf_counter() - t0:.2f} s")
    worst = 0.0
    cases = [(routing, "contiguous") for routing in args.routing]
    cases.append((args.routing[-1], "random, per-source splits"))
    for routing, kind in cases:
        problem = PlacementProblem(topo, config, make_traffic(routing, config, topo.num_gpus))
        placement = contiguous(problem) if kind == "contiguous" else random_placement(problem, 0, even_split=False)
        t0 = time.perf_counter()
        cost = evaluate(placement, problem)
        first = time.perf_counter() - t0
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            evaluate(placement, problem)
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        if kind == "contiguous":  # the budget is for the contiguous placement
            worst = max(worst, median)
        print(f"  {kind}, routing {routing}: first call {first:.3f} s, median of {args.runs} {median:.3f} s "
              f"(min {min(times):.3f}, max {max(times):.3f}); step {cost.step_time_s:.4f} s, "
              f"objective {cost.objective_s:.4f} s, MFU@400 {cost.mfu_spec:.1%}")
        if args.reference:
            t0 = time.perf_counter()
            evaluate(placement, problem, fast=False)
            print(f"  {kind}, routing {routing}: reference path {time.perf_counter() - t0:.3f} s")
    verdict = "OK" if worst < BUDGET_S else "OVER BUDGET"
    print(f"{verdict}: slowest median {worst:.3f} s (budget {BUDGET_S:.1f} s)")
    return 0 if worst < BUDGET_S else 1


if __name__ == "__main__":
    sys.exit(main())

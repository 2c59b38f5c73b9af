"""Replay the SmartMoE routing trace with plans made once, robustly, and live, moves charged.

The trace (../shared/data/smartmoe-trace/counts.npz) samples iterations 1, 11, ..., 5001; each
sample stands for the 10 iterations from it. The cluster and model are those of
``bench_planner.py``'s instances 3 and 6: 8 x DGX H100 rail-optimised (RAIL8), the seed model at
the trace's 32 experts x 24 MoE layers (``--d-ff 2048``: instance 6, where the network binds).

Plans (every one by the planner, ``epplan.placement``):

  static   made once, on the first window (iterations 1..N), kept for the whole run;
  robust   made once, over the early windows (iterations 1..1000 cut into windows of
           ``--robust-width``), objective mean (``solve_robust``), kept for the whole run;
  live     starts from the static plan; every N iterations re-planned from the last window
           (iterations t-N..t-1, what a run has seen) with the plan in force as OLD and the move
           charged over the next N steps (``solve_robust(..., old, move_weight=1/N)``: a layer
           moves only where its predicted gain over N steps exceeds its move's predicted time);
  eplb     the serving frameworks' remedy at full strength: EPLB (global policy, as DeepSeek,
           vLLM and SGLang call it) re-balanced every N iterations from the last window, its
           tokens split by the planner's split LP (``eplb+lp``, stronger than EPLB's even split),
           every move charged the same way.

Each sample is scored by ``epplan.cost.evaluate`` on its own routing with the plan in force at
that iteration. Printed per plan: the summed predicted step time over iterations 1..5001 (each
sample x 10 iterations), the same over 1001..5001 (where no plan has seen the routing), the
MoE layers' part, the bytes moved and the predicted seconds of the moves (``plan_migration``),
which the live plans' totals include.

    python scripts/bench_drift.py --json drift.json
    python scripts/bench_drift.py --d-ff 2048 --json drift-2048.json

N (``--every``, default 500 iterations) was fixed before the first run, from the run side, not
from the trace: a re-plan runs beside training under a time limit of tens of seconds and its
move takes about a second, against about 2 s per step here, so a window must hold hundreds of
steps for both to vanish in it; 500 gives ten re-plans over the trace.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from epplan.cost import evaluate  # noqa: E402
from epplan.cost.migration import plan_migration  # noqa: E402
from epplan.placement.baselines import BASELINES  # noqa: E402
from epplan.placement.problem import PlacementProblem  # noqa: E402
from epplan.placement.robust import solve_robust, window_problems  # noqa: E402
from epplan.placement.solve import resplit, solve  # noqa: E402
from epplan.topology import build_topology, parse_spec  # noqa: E402
from epplan.workload import load_model_config  # noqa: E402
from epplan.workload.traffic import Traffic, fit_counts  # noqa: E402
from epplan.workload.windows import mean_traffic  # noqa: E402
from bench_planner import RAIL8, TRACE  # noqa: E402  (the same cluster and trace as instances 3 and 6)

SAMPLE_ITERATIONS = 10  # iterations each trace sample stands for


class Trace:
    """The trace fitted to the problem once: per sample, Traffic of its iteration."""

    def __init__(self, config, num_ranks: int) -> None:
        with np.load(TRACE) as data:
            counts = data["counts"].astype(np.float64)          # [I, L_f, S, E]
            self.iterations = data["iterations"].astype(np.int64)
        self.counts = np.stack([fit_counts(c, config, num_ranks, name="counts.npz")[0] for c in counts])

    def sample(self, i: int) -> Traffic:
        return Traffic(self.counts[i], f"counts.npz@{int(self.iterations[i])}")

    def window(self, first: int, last: int) -> Traffic:
        """The mean of the samples whose iteration lies in first..last (as make_traffic's @FIRST:LAST)."""
        sel = (self.iterations >= first) & (self.iterations <= last)
        return Traffic(self.counts[sel].mean(axis=0), f"counts.npz@{first}:{last}")


def replay(plans: list[tuple[int, object]], base: PlacementProblem, trace: Trace) -> dict:
    """Score the plans in force (a list of (first iteration, Placement)) on every sample."""
    step, moe = np.zeros(trace.iterations.size), np.zeros(trace.iterations.size)
    k = 0
    for i, it in enumerate(trace.iterations):
        while k + 1 < len(plans) and plans[k + 1][0] <= it:
            k += 1
        cost = evaluate(plans[k][1], dataclasses.replace(base, traffic=trace.sample(i)))
        step[i], moe[i] = cost.step_time_s, cost.objective_s
    late = trace.iterations >= 1001
    return {"step_s": float(step.sum() * SAMPLE_ITERATIONS), "moe_s": float(moe.sum() * SAMPLE_ITERATIONS),
            "step_s_from_1001": float(step[late].sum() * SAMPLE_ITERATIONS),
            "moe_s_from_1001": float(moe[late].sum() * SAMPLE_ITERATIONS),
            "mean_step_s": float(step.mean())}


def moves(plans: list[tuple[int, object]], base: PlacementProblem) -> dict:
    """Bytes and predicted seconds of every move between consecutive plans."""
    total_b, total_s, count, late_s = 0.0, 0.0, 0, 0.0
    for (_, a), (it, b) in zip(plans, plans[1:]):
        mig = plan_migration(a, b, base)
        total_b += mig.bytes_moved
        total_s += mig.seconds
        count += mig.num_moves
        late_s += mig.seconds if it >= 1001 else 0.0
    return {"bytes_moved": total_b, "move_s": total_s, "replicas_moved": count, "move_s_from_1001": late_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--every", type=int, default=500, help="N: iterations per window / between re-plans")
    ap.add_argument("--robust-width", type=int, default=250, help="window width of the robust plan's early windows")
    ap.add_argument("--d-ff", type=int, default=None, help="expert hidden size (2048: instance 6)")
    ap.add_argument("--time-limit", type=float, default=30.0, help="seconds per solve (the robust one: x its windows + 2)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    n = args.every
    overrides = {"num_experts": 32, "num_layers": 24}
    if args.d_ff:
        overrides["d_ff"] = args.d_ff
    topo = build_topology(parse_spec(RAIL8, source="bench_drift.py"))
    config = load_model_config("seed", overrides)
    trace = Trace(config, topo.num_gpus)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
          f"{topo.name}, seed {overrides}, N = {n}", flush=True)
    t0 = time.monotonic()

    def problem(traffic: Traffic) -> PlacementProblem:
        return PlacementProblem(topo, config, traffic)

    first = problem(trace.window(1, n))
    static = solve(first, time_limit=args.time_limit, workers=args.workers)
    print(f"static planned ({time.monotonic() - t0:.0f} s)", flush=True)

    early = [trace.window(a, min(a + args.robust_width - 1, 1000)) for a in range(1, 1001, args.robust_width)]
    early_base = problem(mean_traffic(early))
    robust = solve_robust(early_base, window_problems(early_base, early), objective="mean",
                          time_limit=args.time_limit * (len(early) + 2), workers=args.workers)
    print(f"robust planned over {len(early)} windows ({time.monotonic() - t0:.0f} s)", flush=True)

    live = [(1, static)]
    eplb = [(1, resplit(BASELINES["eplb"](first), first))]
    solve_s = []
    for t in range(1 + n, 5002, n):
        window = problem(trace.window(t - n, t - 1))
        s0 = time.monotonic()
        new = solve_robust(window, [window], old=live[-1][1], move_weight=1.0 / n,
                           time_limit=args.time_limit, workers=args.workers)
        solve_s.append(time.monotonic() - s0)
        live.append((t, new))
        eplb.append((t, resplit(BASELINES["eplb"](window), window)))
        print(f"  live re-plan at {t}: {new.info['migration']['moves']} replicas move "
              f"({new.info['migration']['seconds']:.3f} s predicted), solve {solve_s[-1]:.0f} s", flush=True)

    base = problem(trace.sample(0))
    rows = {}
    for name, plans in (("static", [(1, static)]), ("robust", [(1, robust)]), ("live", live), ("eplb live", eplb)):
        r = replay(plans, base, trace)
        r.update(moves(plans, base))
        r["total_s"] = r["step_s"] + r["move_s"]
        r["total_s_from_1001"] = r["step_s_from_1001"] + r["move_s_from_1001"]
        rows[name] = r
    print(f"\n{'plan':>10} {'step s (1-5001)':>16} {'+ moves s':>10} {'total s':>10} {'from 1001':>10} "
          f"{'MoE s':>10} {'GB moved':>9} {'replicas':>8}")
    for name, r in rows.items():
        print(f"{name:>10} {r['step_s']:>16.1f} {r['move_s']:>10.2f} {r['total_s']:>10.1f} "
              f"{r['total_s_from_1001']:>10.1f} {r['moe_s']:>10.1f} {r['bytes_moved'] / 1e9:>9.1f} "
              f"{r['replicas_moved']:>8}")
    s, lv = rows["static"], rows["live"]
    gain = s["step_s"] - lv["step_s"]
    print(f"\nlive vs static: saves {gain:.1f} s of steps ({gain / s['step_s']:.1%}), spends {lv['move_s']:.2f} s "
          f"on moves: net {gain - lv['move_s']:.1f} s; re-plans took {np.mean(solve_s):.0f} s each on this machine "
          f"(wall {time.monotonic() - t0:.0f} s)")
    if lv["move_s"] > 0:
        print(f"live stays ahead of static unless its moves cost more than {gain / lv['move_s']:.0f}x their "
              "predicted seconds")
    if args.json:
        args.json.write_text(json.dumps({"every": n, "overrides": overrides, "rows": rows,
                                         "solve_s": solve_s, "time_limit_s": args.time_limit}, indent=1))


if __name__ == "__main__":
    main()

"""Benchmark hierarchical (node-deduplicated) dispatch and co-activation-aware placement.

Part 1, per instance (correlated routing from ``coact:SIZE:SHARE[:ALPHA]``, seed 0), the plans
scored by ``epplan.cost.evaluate`` on the runtime's clock (overlap across nodes, as ``epplan
run`` does):

  ilp             the planner's plan for the flat exchange (co-activation-blind), under flat and
                  under hierarchical dispatch;
  ilp+coact       ``plan_hierarchical``: the planner for hierarchical dispatch (that plan and
                  EPLB's with co-activated experts swapped together, best per layer with every
                  baseline), under hierarchical dispatch;
  eplb            DeepSeek's EPLB as the serving frameworks call it, under both dispatches, and
  eplb+coact      the same placement after the co-activation swaps alone.

Columns: NIC bytes per step (every exchange of every MoE layer, summed over the NICs' uplinks),
the busiest link's a2a time summed over the layers, and the MoE layers' time (a2a and expert
GEMMs under the schedule, the planner's objective), and the layer time (+ attention and dense).

Part 2: the cost model's error against per-token simulation (``cost.dispatch.simulate_rows``,
the runtime's replica rule), with counts and pairs taken from the same tokens: network rows in
all and on the busiest source -> node pair, for top-8 without replicas and for top-2 and top-8
with EPLB's replicas.

    python scripts/bench_dispatch.py                    # everything
    python scripts/bench_dispatch.py --only 1 2 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_planner import RAIL32  # noqa: E402
from epplan.cost import evaluate  # noqa: E402
from epplan.cost.dispatch import hierarchical_rows, simulate_rows, token_statistics  # noqa: E402
from epplan.placement.baselines import BASELINES  # noqa: E402
from epplan.placement.hierarchical import improve_hierarchical  # noqa: E402
from epplan.placement.problem import PlacementProblem  # noqa: E402
from epplan.placement.solve import plan_hierarchical, solve  # noqa: E402
from epplan.topology import build_topology, load_topology, parse_spec  # noqa: E402
from epplan.workload import load_model_config, make_traffic  # noqa: E402
from epplan.workload.coact import layer_model, layer_rng, parse_coact, sample_tokens  # noqa: E402

RAIL8 = RAIL32.replace("32", "8").replace("2 SUs of 16", "1 SU of 8").replace(
    "nodes_per_su: 16, spines: 16", "nodes_per_su: 8, spines: 8")

INSTANCES = {
    1: dict(name="seed top-2, 2 x DGX H100", topology="topologies/dgx-h100-2node.yaml", model="seed",
            overrides={}, routing="coact:4:0.8", experts_per_gpu=1, limit=60),
    2: dict(name="seed top-2 d_ff 2048, 8 x DGX H100 2:1", topology="topologies/h100-8node-oversub.yaml",
            model="seed", overrides={"d_ff": 2048}, routing="coact:4:0.8", experts_per_gpu=1, limit=60),
    3: dict(name="V3-like top-8, 32 x DGX H100", topology=RAIL32, model="deepseek-v3",
            overrides={"num_layers": 5}, routing="coact:8:0.7", experts_per_gpu=1, limit=120),
    4: dict(name="V3-like top-8 zipf, 32 x DGX H100", topology=RAIL32, model="deepseek-v3",
            overrides={"num_layers": 5}, routing="coact:16:0.5:1.0", experts_per_gpu=1, limit=120),
}


def topology_of(spec: str):
    return load_topology(ROOT / spec) if spec.endswith(".yaml") else build_topology(parse_spec(spec))


def score(cost, topo) -> dict:
    nic = np.array([c == "nic_up" for c in topo.link_class])
    return {"nic_gb": float(cost.a2a_bytes[:, nic].sum()) / 1e9, "a2a_s": float(cost.a2a_link_s.sum()),
            "moe_s": float(cost.objective_s), "layers_s": float(cost.layer_time_s.sum())}


def run_instance(spec: dict) -> dict:
    topo = topology_of(spec["topology"])
    config = load_model_config(spec["model"], spec["overrides"])
    traffic = make_traffic(spec["routing"], config, topo.num_gpus, seed=0)
    flat = PlacementProblem(topo, config, traffic, experts_per_gpu=spec["experts_per_gpu"])
    hier = dataclasses.replace(flat, dispatch="hierarchical")
    t0 = time.monotonic()
    ilp = solve(flat, time_limit=spec["limit"])
    flat_s = time.monotonic() - t0
    t0 = time.monotonic()
    aware = plan_hierarchical(ilp, hier, deadline=time.monotonic() + spec["limit"])
    coact_s = time.monotonic() - t0
    eplb = BASELINES["eplb"](flat)
    eplb_coact = improve_hierarchical(eplb, hier)
    rows = {
        "ilp, flat": score(evaluate(ilp, flat), topo),
        "ilp, hierarchical": score(evaluate(ilp, hier), topo),
        "ilp+coact, hierarchical": score(evaluate(aware, hier), topo),
        "eplb, flat": score(evaluate(eplb, flat), topo),
        "eplb, hierarchical": score(evaluate(eplb, hier), topo),
        "eplb+coact, hierarchical": score(evaluate(eplb_coact, hier), topo),
    }
    return {"name": spec["name"], "gpus": topo.num_gpus, "routing": spec["routing"],
            "moe_layers": config.num_moe_layers, "schedule": flat.schedule.describe(),
            "flat_solve_s": flat_s, "coact_s": coact_s, "rows": rows,
            "layer_starts": [layer["start"] for layer in aware.info["layers"]]}


# ------------------------------------------------------------------------------ part 2

ERROR_CASES = {
    "top-8, 4 experts per GPU, no replicas": dict(model="deepseek-v3", experts=256, top_k=8, routing="coact:8:0.7",
                                                  experts_per_gpu=4, placement="contiguous"),
    "top-8, EPLB replicas": dict(model="deepseek-v3", experts=256, top_k=8, routing="coact:8:0.7",
                                 experts_per_gpu=5, placement="eplb-hier"),
    "top-2, EPLB replicas": dict(model="seed", experts=16, top_k=2, routing="coact:4:0.8", experts_per_gpu=1,
                                 placement="eplb"),
}
TOKENS_PER_SOURCE = (512, 4096)   # a run's rank routes 5,000-80,000 tokens per micro-batch and layer


def model_error(case: dict, tokens_per_source: int) -> dict:
    """Predicted vs simulated network rows on 8 x DGX H100 (64 GPUs), counts and pairs from the
    simulated tokens themselves (so the error is the model's, not sampling's)."""
    topo = build_topology(parse_spec(RAIL8))
    config = load_model_config(case["model"], {"num_layers": 4 if case["model"] == "deepseek-v3" else 1})
    traffic = make_traffic(case["routing"], config, topo.num_gpus, seed=0)
    problem = PlacementProblem(topo, config, traffic, experts_per_gpu=case["experts_per_gpu"])
    layer = BASELINES[case["placement"]](problem).layers[0]
    params = parse_coact(case["routing"])
    rng = layer_rng(0, 0)
    model = layer_model(params, case["experts"], rng)
    num_gpus = topo.num_gpus
    topk = sample_tokens(params, case["experts"], case["top_k"], tokens_per_source * num_gpus, rng, model)
    source = np.repeat(np.arange(num_gpus), tokens_per_source)
    counts, pairs = token_statistics(topk, source, num_gpus, case["experts"])
    predicted, _ = hierarchical_rows(counts.astype(float), pairs.astype(float), layer, topo.gpu_node,
                                     top_k=case["top_k"])
    simulated, _ = simulate_rows(topk, source, layer, topo.gpu_node, num_gpus)
    remote = np.arange(topo.num_nodes)[None, :] != np.asarray(topo.gpu_node)[:, None]
    pred, sim = predicted[remote], simulated[remote].astype(float)
    busiest = int(np.argmax(sim))
    # The busiest NIC: rows leaving each source's node on its rail = row sums per source.
    nic_pred, nic_sim = (predicted * remote).sum(axis=1), (simulated * remote).sum(axis=1)
    g = int(np.argmax(nic_sim))
    replicated = sum(r.size > 1 for r in layer.replicas)
    return {"tokens": int(topk.shape[0]), "replicated_experts": int(replicated),
            "total_rel_error": float((pred.sum() - sim.sum()) / sim.sum()),
            "busiest_pair_rel_error": float((pred[busiest] - sim[busiest]) / sim[busiest]),
            "busiest_source_rel_error": float((nic_pred[g] - nic_sim[g]) / nic_sim[g]),
            "max_abs_rel_error": float(np.abs(pred - sim).max() / sim.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", type=int, nargs="*", help="instance numbers of part 1 (default: all)")
    parser.add_argument("--no-errors", action="store_true", help="skip part 2")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    out = {"machine": f"{platform.node()} ({platform.processor() or platform.machine()})", "instances": {},
           "errors": {}}
    for num in args.only or list(INSTANCES):
        res = run_instance(INSTANCES[num])
        out["instances"][num] = res
        print(f"\n{num}. {res['name']} ({res['gpus']} GPUs, {res['moe_layers']} MoE layers, {res['routing']}, "
              f"{res['schedule']}); flat ILP {res['flat_solve_s']:.0f} s, co-activation search {res['coact_s']:.0f} s")
        print(f"  {'plan, dispatch':28s} {'NIC GB/step':>12s} {'a2a s':>9s} {'MoE s':>9s} {'layers s':>9s}")
        for name, r in res["rows"].items():
            print(f"  {name:28s} {r['nic_gb']:12.1f} {r['a2a_s']:9.4f} {r['moe_s']:9.4f} {r['layers_s']:9.4f}")
        sys.stdout.flush()
    if not args.no_errors:
        print("\ncost model vs per-token simulation (64 GPUs, network rows):")
        for (name, case), tokens in itertools.product(ERROR_CASES.items(), TOKENS_PER_SOURCE):
            err = model_error(case, tokens)
            out["errors"][f"{name}, {tokens} tokens per source"] = err
            print(f"  {name:40s} {tokens:5d} tokens/source: total {err['total_rel_error']:+.2%}, busiest source {err['busiest_source_rel_error']:+.2%}, "
                  f"busiest pair {err['busiest_pair_rel_error']:+.2%}, max |err| / max {err['max_abs_rel_error']:.2%} "
                  f"({err['tokens']:,} tokens, {err['replicated_experts']} replicated experts)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""The report's predicted tables agree with the cost function; rendering and plotting work.

Every number a report prints about a placement comes from ``epplan.cost.evaluate``: these tests
compare the tables (and their JSON) with the ``Cost`` fields directly, and check the GPU x GPU
heatmap against the link loads through the path model.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from epplan.cost import evaluate
from epplan.placement.baselines import contiguous, eplb, random_placement
from epplan.placement.problem import PlacementProblem
from epplan.report import PlanView, ReportError, build_report
from epplan.report.predicted import COMPONENTS, class_summary, gpu_table, link_table, pair_bytes
from epplan.report.plot import plotted_series, write_plot
from epplan.report.render import csv_rows, print_rich, to_csv, to_markdown
from epplan.topology import load_topology
from epplan.workload import load_model_config, make_traffic


def _plan(topo_file: str, method, model: str = "seed", routing: str = "zipf:1.2", **overrides) -> PlanView:
    topo = load_topology(f"topologies/{topo_file}")
    config = load_model_config(model, overrides)
    problem = PlacementProblem(topo, config, make_traffic(routing, config, topo.num_gpus), micro_batches=8)
    placement = method(problem)
    return PlanView(placement.method, placement, problem, evaluate(placement, problem), manifest_hash=None)


@pytest.fixture(scope="module")
def two_node() -> PlanView:
    return _plan("dgx-h100-2node.yaml", eplb, num_experts=8)


@pytest.fixture(scope="module")
def two_node_random() -> PlanView:
    return _plan("dgx-h100-2node.yaml", lambda p: random_placement(p, 3, even_split=False), num_experts=8)


def test_step_table_is_the_cost_functions(two_node):
    cost = two_node.cost
    table = link_table(cost)
    np.testing.assert_array_equal(table.total_bytes, cost.link_step_bytes)
    parts = sum(table.bytes[c] for c in COMPONENTS)
    np.testing.assert_allclose(parts, cost.link_step_bytes, rtol=1e-12)
    np.testing.assert_allclose(table.bytes["dispatch"] + table.bytes["combine"], cost.a2a_bytes.sum(axis=0),
                               rtol=1e-12)
    # Hottest first, and the hottest is the cost function's busiest link.
    assert np.all(np.diff(table.time_s[table.order]) <= 0)
    assert table.bottleneck == cost.busiest_link
    assert table.time_s[table.bottleneck] * 1e9 * cost.topology.link_capacity[table.bottleneck] == \
        pytest.approx(cost.link_step_bytes[cost.busiest_link], rel=1e-12)
    assert table.busy[table.bottleneck] == pytest.approx(cost.bandwidth_utilisation, rel=1e-12)
    assert table.vs_bottleneck.max() == 1.0


def test_layer_table_is_the_cost_functions(two_node_random):
    cost = two_node_random.cost
    for layer in range(cost.num_layers):
        table = link_table(cost, layer)
        assert table.bottleneck == cost.a2a_link[layer]
        assert table.bottleneck_s == pytest.approx(cost.a2a_link_s[layer], rel=1e-6)  # float32 storage
        assert table.period_s == cost.layer_time_s[layer]
        assert not table.bytes["expert_sync"].any() and not table.bytes["dense_sync"].any()
    summed = sum(link_table(cost, layer).total_bytes for layer in range(cost.num_layers))
    np.testing.assert_allclose(summed, cost.a2a_bytes.sum(axis=0), rtol=1e-6)
    with pytest.raises(ReportError, match="MoE layers 0..15"):
        link_table(cost, cost.num_layers)


def test_heatmap_pairs_load_the_links_as_predicted(two_node_random):
    """pair_bytes (2 b (F + F^T) per layer) through Topology.link_loads = the a2a components."""
    plan = two_node_random
    table = link_table(plan.cost)
    pairs = pair_bytes(plan.placement, plan.problem)
    assert pairs.shape == (16, 16) and np.all(np.diag(pairs) == 0)
    np.testing.assert_allclose(plan.problem.topology.link_loads(pairs),
                               table.bytes["dispatch"] + table.bytes["combine"], rtol=1e-6)
    layer = link_table(plan.cost, 5)
    np.testing.assert_allclose(plan.problem.topology.link_loads(pair_bytes(plan.placement, plan.problem, 5)),
                               layer.total_bytes, rtol=1e-6)


def test_class_and_gpu_tables(two_node):
    cost = two_node.cost
    table = link_table(cost)
    classes = class_summary(cost, table)
    assert {c.cls for c in classes} == {"nvlink", "pcie", "nic_up", "nic_down"}
    assert sum(c.num_links for c in classes) == cost.topology.num_links
    assert sum(c.total_bytes for c in classes) == pytest.approx(cost.link_step_bytes.sum(), rel=1e-12)
    # the binding class first (links of equal time may tie for the bottleneck)
    assert classes[0].max_time_s == pytest.approx(table.time_s[table.bottleneck], rel=1e-12)
    gpus = gpu_table(cost, two_node.placement)
    np.testing.assert_array_equal(gpus.assignments, cost.expert_assignments.T)
    np.testing.assert_allclose(gpus.expert_s, cost.expert_compute_s.sum(axis=0))
    np.testing.assert_array_equal(gpus.memory_bytes, cost.memory_bytes)
    assert gpus.order[0] == int(np.argmax(cost.expert_compute_s.sum(axis=0)))
    one = gpu_table(cost, two_node.placement, 3)
    held = two_node.placement.layers[3].experts_on_rank(16)
    assert one.experts == held and one.assignments.shape == (16, 1)


def test_json_numbers_equal_the_cost_function(two_node):
    cost = two_node.cost
    data = json.loads(json.dumps(build_report(two_node, top=5).to_dict()))
    assert data["cost"] == json.loads(json.dumps(cost.to_dict(top_links=5)))
    # Same times in the same order (ties may list equal links in another order).
    assert [row["time_s"] for row in data["links"]] == [t["time_s"] for t in data["cost"]["top_links"]]
    by_index = {t["index"]: t for t in cost.to_dict(top_links=cost.topology.num_links)["top_links"]}
    for row in data["links"]:
        top = by_index[row["index"]]
        assert row["total_bytes"] == top["bytes_per_step"] == float(cost.link_step_bytes[row["index"]])
        assert row["time_s"] == top["time_s"]
        assert row["src"] + " -> " + row["dst"] == top["name"]
        assert row["class"] == top["class"] and row["capacity_gbps"] == top["capacity_gbps"]
    assert data["view"]["bottleneck_link"] == data["cost"]["bandwidth"]["busiest_link"]["name"]
    assert data["gpus"][0]["assignments_per_layer"] == cost.expert_assignments[:, data["gpus"][0]["rank"]].tolist()
    assert data["measured"] is None and data["compare"] is None
    everything = build_report(two_node, top=None).to_dict()
    assert len(everything["links"]) == cost.topology.num_links and len(everything["gpus"]) == 16


def test_comparison_side_by_side(two_node):
    other = _plan("dgx-h100-2node.yaml", contiguous, num_experts=8)
    elsewhere = _plan("dgx-h100-1node.yaml", contiguous, num_experts=8)
    report = build_report(two_node, top=6, others=[other])
    data = report.to_dict()["compare"]
    assert data["same_topology"] and [p["label"] for p in data["plans"]] == ["eplb", "contiguous"]
    assert [p["step_time_s"] for p in data["plans"]] == [two_node.cost.step_time_s, other.cost.step_time_s]
    assert len(data["links"]) == 6
    for row in data["links"]:
        k = row["index"]
        assert row["total_bytes"] == [float(two_node.cost.link_step_bytes[k]), float(other.cost.link_step_bytes[k])]
    worst = [max(r["time_s"]) for r in data["links"]]
    assert worst == sorted(worst, reverse=True)
    apart = build_report(two_node, others=[elsewhere]).to_dict()
    assert apart["compare"]["links"] == [] and not apart["compare"]["same_topology"]
    assert any("different topologies" in n for n in apart["notes"])


def test_renderers(two_node, tmp_path):
    other = _plan("dgx-h100-2node.yaml", contiguous, num_experts=8)
    report = build_report(two_node, top=4, others=[other])
    md = to_markdown(report)
    assert "### links, hottest first (top 4 of 96" in md and "| NIC down |" in md
    assert "### placements side by side" in md
    header, rows = csv_rows(report)
    parsed = list(csv.reader(io.StringIO(to_csv(report))))
    assert parsed[0] == header and len(parsed) == 5
    k = int(parsed[1][1])
    assert float(parsed[1][header.index("total_bytes")]) == float(two_node.cost.link_step_bytes[k])
    assert "time_s[contiguous]" in header
    from rich.console import Console

    console = Console(file=io.StringIO(), width=200)
    print_rich(report, console)
    text = console.file.getvalue()
    assert "bottleneck link switch -> dgx" in text and "per link class" in text
    layer = build_report(two_node, layer=2, top=3)
    assert "MoE layer 2" in to_markdown(layer) and "expert grad" not in to_markdown(layer).split("###")[1]


def test_plot_png(two_node, tmp_path):
    path = write_plot(build_report(two_node, top=12), tmp_path / "r.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with pytest.raises(ReportError, match="png"):
        write_plot(build_report(two_node), tmp_path / "r.svg")


def test_plot_draws_every_compared_plan_or_says_why_not(two_node, two_node_random, tmp_path):
    other_cluster = _plan("h100-16node-rail.yaml", eplb, num_experts=8)
    report = build_report(two_node, top=5, others=[two_node_random, other_cluster])
    links, series, refused = plotted_series(report)
    assert list(links) == list(report.links.order[:5])
    assert len(series) == 2 and np.allclose(series[two_node.label], report.links.busy[links])
    (drawn,) = [v for k, v in series.items() if k != two_node.label]
    assert np.allclose(drawn, report.comparison.tables[1].busy[links])
    assert len(refused) == 1 and other_cluster.label in refused[0] and "another topology" in refused[0]
    write_plot(report, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 10_000


def test_superpod_1024_report(tmp_path):
    plan = _plan("h100-superpod-1024.yaml", eplb)
    placement = contiguous(plan.problem)
    other = PlanView("contiguous", placement, plan.problem, evaluate(placement, plan.problem))
    report = build_report(plan, top=20, others=[other])
    data = report.to_dict()
    write_plot(report, tmp_path / "big.png")
    assert len(data["links"]) == 20 and data["plan"]["num_gpus"] == 1024
    assert data["links"][0]["index"] == plan.cost.busiest_link
    assert (tmp_path / "big.png").stat().st_size > 10_000

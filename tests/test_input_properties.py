"""Property tests over every input a user hands epplan: the outcome is asserted, not just survived.

For a topology, model config, routing statistics, manifest, run metrics or checkpoint with one
value replaced (infinities, NaN, huge or negative numbers, booleans, strings, nesting), either the
input is accepted and the object built from it keeps its invariants (finite positive capacities,
the GPUs the file declares, counts that are non-negative integers of the declared shape), or the
project's own error names the key that is wrong; through the CLI, exit code 1 and one line.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from epplan.cli import app
from epplan.errors import ConfigError, ManifestError, TopologyError, TrafficError
from epplan.workload.config import MAX_SIZES, load_model_config

runner = CliRunner()
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

# Values a careless or hostile user writes where a number belongs.
hostile = st.one_of(
    st.sampled_from([math.inf, -math.inf, math.nan, 0, -1, True, False, None, "fast", [1], {"a": 1},
                     1e308, 10**30, 10**9, 1.5, 0.5]),
    st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True))

TOPOLOGY = {
    "name": "prop",
    "node_types": {"box": {
        "gpus": 2,
        "gpu": {"model": "H100", "memory_gb": 80, "bf16_tflops": 989, "hbm_gbps": 3350},
        "fabric": {"kind": "nvswitch", "gbps": 450, "latency_us": 1.0},
        "nics": {"gbps": 50, "attach": [0, 1], "pcie_gbps": 64},
    }},
    "nodes": [{"prefix": "n", "count": 2, "type": "box"}],
    "fabric": {"kind": "rail_optimized", "nodes_per_su": 2, "spines": 1, "oversubscription": 1.0},
}
TOPOLOGY_NUMBERS = [("node_types", "box", "gpus"), ("node_types", "box", "gpu", "memory_gb"),
                    ("node_types", "box", "gpu", "bf16_tflops"), ("node_types", "box", "gpu", "hbm_gbps"),
                    ("node_types", "box", "fabric", "gbps"), ("node_types", "box", "fabric", "latency_us"),
                    ("node_types", "box", "nics", "gbps"), ("node_types", "box", "nics", "pcie_gbps"),
                    ("nodes", 0, "count"), ("fabric", "nodes_per_su"), ("fabric", "spines"),
                    ("fabric", "oversubscription")]


def _replaced(doc: dict, path: tuple, value) -> dict:
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@SETTINGS
@given(path=st.sampled_from(TOPOLOGY_NUMBERS), value=hostile)
def test_topology_numbers_through_topo_show(tmp_path_factory, path, value):
    file = tmp_path_factory.mktemp("topo") / "t.yaml"
    file.write_text(yaml.safe_dump(_replaced(TOPOLOGY, path, value)))
    result = runner.invoke(app, ["topo", "show", str(file), "--json"], terminal_width=300)
    if result.exit_code == 0:
        from epplan.topology import load_topology

        topo = load_topology(file)
        assert np.all(np.isfinite(topo.link_capacity)) and np.all(topo.link_capacity > 0)
        assert np.all(np.isfinite(topo.link_latency_us)) and np.all(topo.link_latency_us >= 0)
        info = json.loads(result.output)
        assert info["gpus"] == topo.num_gpus == sum(
            len([n for n in topo.gpu_node if n == i]) for i in range(topo.num_nodes))
        assert not isinstance(value, bool)
        assert math.isfinite(info["bisection_gbps"])
        return
    line = _one_line_error(result)
    key = str(path[-1])
    assert key in line or "nodes:" in line, line  # the key that is wrong, or the size limit


@SETTINGS
@given(field=st.sampled_from(sorted(MAX_SIZES) + ["top_k", "router_aux_loss_coef", "router_bias_rate"]),
       value=hostile)
def test_model_fields(field, value):
    try:
        config = load_model_config("tiny", {field: value})
    except ConfigError as exc:
        assert field in str(exc) or "model name" in str(exc), str(exc)
        return
    got = getattr(config, field)
    assert not isinstance(got, bool) and math.isfinite(got) and got >= 0
    for name, most in MAX_SIZES.items():
        assert 0 <= getattr(config, name) <= most
    assert config.top_k <= config.num_experts


def _stats_doc() -> dict:
    counts = np.arange(2 * 2 * 4).reshape(2, 2, 4).tolist()
    return {"format": "epplan.routing-stats", "version": 1, "model": "tiny", "num_moe_layers": 2,
            "num_ranks": 2, "num_experts": 4, "top_k": 2, "steps": 3, "tokens_per_rank_per_step": 128.0,
            "manifest_hash": None, "counts": counts}


@SETTINGS
@given(key=st.sampled_from(["version", "num_moe_layers", "num_ranks", "num_experts", "top_k", "steps",
                            "tokens_per_rank_per_step", "counts.0.0.0", "counts.1.1.3"]), value=hostile)
def test_routing_statistics(tmp_path_factory, key, value):
    from epplan.workload.routing_stats import read_routing_stats

    doc = _stats_doc()
    path = tuple(int(p) if p.isdigit() else p for p in key.split("."))
    text = json.dumps(_replaced(doc, path, value))  # NaN and Infinity written as JSON can write them
    file = tmp_path_factory.mktemp("stats") / "s.json"
    file.write_text(text)
    try:
        stats = read_routing_stats(file)
    except TrafficError as exc:
        assert path[0] in str(exc) or "JSON" in str(exc) or "version" in str(exc), str(exc)
        return
    assert stats.counts.dtype == np.int64 and stats.counts.shape == (2, 2, 4) and stats.counts.min() >= 0
    assert stats.steps >= 1 and math.isfinite(stats.tokens_per_rank_per_step) and stats.tokens_per_rank_per_step > 0
    assert not isinstance(value, bool)


@pytest.fixture(scope="module")
def manifest_doc(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("planned")
    (root / "t.yaml").write_text(yaml.safe_dump(TOPOLOGY))
    result = runner.invoke(app, ["place", "--topology", str(root / "t.yaml"), "--model", "tiny", "--placement",
                                 "contiguous", "--out", str(root / "m.json")])
    assert result.exit_code == 0, result.output
    return json.loads((root / "m.json").read_text())


@SETTINGS
@given(key=st.sampled_from(["world_size", "schema_version", "problem.experts_per_gpu", "problem.micro_batches",
                            "problem.compute_efficiency", "placement.num_experts",
                            "placement.layers.0.experts.0.replicas.0", "placement.layers.0.experts.1.rows.0.0.1",
                            "placement.layers.1.experts.2.row_of", "ranks.node.1", "ranks.local_gpu.0",
                            "model.num_experts", "model.router_aux_loss_coef"]), value=hostile)
def test_manifest_numbers(manifest_doc, tmp_path_factory, key, value):
    from epplan.manifest import load_manifest

    path = tuple(int(p) if p.isdigit() else p for p in key.split("."))
    doc = _replaced(manifest_doc, path, value)
    file = tmp_path_factory.mktemp("manifest") / "m.json"
    file.write_text(json.dumps(doc))
    try:
        manifest = load_manifest(file)
    except ManifestError as exc:
        message = str(exc).replace("schema version", "schema_version")
        assert str(path[-1]) in message or str(path[0]) in message or "JSON" in message or "layer" in message \
            or "rank" in message, message
        return
    manifest.placement.validate(manifest.experts_per_gpu)
    assert manifest.world_size == len(manifest.rank_local_gpus) == manifest.placement.num_ranks
    assert not isinstance(value, bool)


@SETTINGS
@given(key=st.sampled_from(["step", "step_time_s", "dispatch_bytes.0.0.1", "combine_bytes.1.1.0",
                            "tokens_per_expert.0.2"]), value=hostile)
def test_run_metrics(tmp_path_factory, key, value):
    from epplan.report.measured import ReportError, read_run

    L, G, E = 2, 2, 4
    a2a = [[[100, 200], [300, 400]] for _ in range(L)]
    start = {"format": "epplan.metrics", "version": 1, "kind": "start", "step": 0, "manifest_hash": "h"}
    step = {"kind": "step", "step": 1, "step_time_s": 0.5, "tokens_per_expert": [[8] * E for _ in range(L)],
            "dispatch_bytes": a2a, "combine_bytes": copy.deepcopy(a2a)}
    path = tuple(int(p) if p.isdigit() else p for p in key.split("."))
    run = tmp_path_factory.mktemp("run")
    (run / "metrics.jsonl").write_text(json.dumps(start) + "\n" + json.dumps(_replaced(step, path, value)) + "\n")
    try:
        metrics = read_run(run, manifest_hash="h", num_layers=L, num_ranks=G)
    except ReportError as exc:
        assert path[0] in str(exc), str(exc)
        return
    for arr in (metrics.dispatch_bytes, metrics.combine_bytes, metrics.assignments):
        assert arr.dtype == np.int64 and arr.min() >= 0
    assert np.all(np.isfinite(metrics.step_time_s)) and np.all(metrics.step_time_s > 0)
    assert not isinstance(value, bool)


@settings(max_examples=80, deadline=None)
@given(file=st.sampled_from(["dense.pt", "rank00000.pt", "meta.json", "sub/part.distcp"]),
       offset=st.integers(0, 10_000), length=st.integers(1, 4096), how=st.sampled_from(["flip", "zero", "cut"]))
def test_any_damage_to_a_sealed_checkpoint_is_found_and_named(tmp_path_factory, file, offset, length, how):
    from epplan.train.checkpoint import seal, verify

    ckpt = tmp_path_factory.mktemp("ckpt") / "step_00000001"
    (ckpt / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("dense.pt", "rank00000.pt", "meta.json", "sub/part.distcp"):
        (ckpt / name).write_bytes(rng.integers(1, 255, size=12_000, dtype=np.uint8).tobytes())
    seal(ckpt)
    assert verify(ckpt) is None
    data = bytearray((ckpt / file).read_bytes())
    offset %= len(data)
    if how == "cut":
        del data[offset:]
    else:
        end = min(len(data), offset + length)
        data[offset:end] = bytes(b ^ 0xFF for b in data[offset:end]) if how == "flip" else bytes(end - offset)
    (ckpt / file).write_bytes(bytes(data))
    problem = verify(ckpt)
    assert problem is not None and file in problem, problem


def test_names_are_printed_as_text_not_markup(tmp_path):
    doc = _replaced(TOPOLOGY, ("name",), "[/]evil[bold]")
    doc["nodes"][0]["prefix"] = "[red]n"
    file = tmp_path / "t.yaml"
    file.write_text(yaml.safe_dump(doc))
    result = runner.invoke(app, ["topo", "show", str(file)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "[/]evil[bold]" in result.output
    result = runner.invoke(app, ["estimate", "--topology", str(file), "--model", "tiny"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "[/]evil[bold]" in result.output


def test_yaml_duplicate_keys_alias_bombs_and_special_files(tmp_path):
    from epplan.topology import load_topology

    text = yaml.safe_dump(TOPOLOGY)
    (tmp_path / "dup.yaml").write_text(text.replace("    gpus: 2\n", "    gpus: 2\n    gpus: 8\n"))
    with pytest.raises(TopologyError, match="duplicate key 'gpus'"):
        load_topology(tmp_path / "dup.yaml")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
    (tmp_path / "bomb.yaml").write_text(bomb)
    with pytest.raises(TopologyError, match="expands to more than"):
        load_topology(tmp_path / "bomb.yaml")
    with pytest.raises(TopologyError, match="not a regular file"):
        load_topology("/dev/zero")
    import os

    os.mkfifo(tmp_path / "fifo.yaml")
    with pytest.raises(TopologyError, match="not a regular file"):
        load_topology(tmp_path / "fifo.yaml")
    (tmp_path / "m.yaml").write_text("base: [tiny]\n")
    with pytest.raises(ConfigError, match="base: unknown preset"):
        load_model_config(str(tmp_path / "m.yaml"))

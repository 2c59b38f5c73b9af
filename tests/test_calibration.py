"""Calibration files: ``epplan calibrate`` (tiny dims on CPU), lookups, errors, shipped tables, and
the cost model reading them (estimate --calibration, a topology node type naming one)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from epplan.cli import app
from epplan.cost import evaluate
from epplan.cost.calibration import (Calibration, CalibrationError, load_calibration, resolve_calibrations,
                                     shipped_for, shipped_tables)
from epplan.cost.step import master_bytes, moe_local_bytes, norm_bytes, num_param_tensors, optimizer_bytes
from epplan.placement.baselines import contiguous
from epplan.placement.problem import PlacementProblem
from epplan.topology import load_topology
from epplan.workload import load_model_config, make_traffic

runner = CliRunner()
TOPOLOGY = """\
name: one-box
node_types:
  box:
    gpus: 2
    gpu: {model: L40S-48GB, memory_gb: 48, bf16_tflops: 362, hbm_gbps: 864}
    fabric: {kind: nvswitch, gbps: 100}
    calibration: cal.json
nodes:
  - {name: n0, type: box}
"""


@pytest.fixture(scope="module")
def tiny_calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("cal") / "cal.json"
    result = runner.invoke(app, ["calibrate", "--model", "tiny", "--device", "cpu", "--tokens", "64",
                                 "--rows", "8,32", "--iters", "1", "--experts", "2", "--out", str(path)])
    assert result.exit_code == 0, result.output
    return path


def test_calibrate_writes_a_file_the_cost_model_reads(tiny_calibration, tmp_path):
    cal = load_calibration(tiny_calibration)
    data = json.loads(tiny_calibration.read_text())
    assert data["format"] == "epplan.calibration" and data["version"] == 1
    assert {r["path"] for r in cal.expert} == {"unchunked", "chunked"}
    assert [p[0] for p in cal.expert[0]["points"]] == [8, 32]
    assert set(cal.memory) == {"norm", "cast", "loss", "optimizer", "embedding", "moe_local"}
    assert all(v > 0 for v in cal.memory.values()) and cal.attention[0]["tflops"] > 0
    # A node type names the file (relative to the topology): the L40S has no shipped table.
    (tmp_path / "cal.json").write_text(tiny_calibration.read_text())
    (tmp_path / "topo.yaml").write_text(TOPOLOGY)
    topo = load_topology(tmp_path / "topo.yaml")
    cals, notes = resolve_calibrations(topo)
    assert len(cals) == 2 and cals[0] is cals[1] and "cal.json" in notes[0]
    config = load_model_config("tiny")
    problem = PlacementProblem(topo, config, make_traffic("uniform", config, 2), experts_per_gpu=2,
                               calibration=cals)
    cost = evaluate(contiguous(problem), problem)
    parts = cost.step_parts
    rate = cals[0].expert_flops(32, 64, "gelu", problem.expected_rows_per_expert)
    assert problem.gpu_flops[0] == pytest.approx(rate)
    served = cost.expert_assignments
    expect = served * problem.costs.flops_per_assignment * 3 / parts.expert_rate \
        + master_bytes(2 * problem.costs.params_per_expert, 1) / cals[0].memory_rate("cast")
    np.testing.assert_allclose(cost.expert_compute_s, expect)
    tokens = config.tokens_per_step / 2
    held = 2 * 2 * problem.costs.params_per_expert
    # The step's fixed cost was measured on the model's own parameter tensors (at tiny sizes).
    assert [r["num_tensors"] for r in cal.optimizer_fixed] == [num_param_tensors(config)]
    fixed = cal.optimizer_fixed[0]["seconds"]
    assert fixed > 0 and cal.optimizer_fixed_seconds(num_param_tensors(config)) == pytest.approx(fixed)
    before = cal.optimizer_fixed[0]["before_sync_seconds"]
    assert 0 < before <= fixed and cal.optimizer_before_sync_seconds(num_param_tensors(config)) == pytest.approx(before)
    # the device waits for the host up to the norm's sync; the rest runs beside the passes
    assert parts.optimizer[0] == pytest.approx(before + max(
        optimizer_bytes(problem.costs.params_dense + held, held + problem.costs.params_lm_head)
        / cals[0].memory_rate("optimizer"), fixed - before))
    # The LM head and loss were measured as run (chunked) at the model's shape.
    assert [(r["d_model"], r["vocab_size"]) for r in cal.lm_head] == [(32, config.vocab_size)]
    assert parts.lm_head_loss[0] == pytest.approx(
        tokens * 3 * problem.costs.flops_lm_head / cal.lm_head_flops(32, config.vocab_size)
        + norm_bytes(tokens, 32) / cal.memory_rate("norm"))  # one micro-batch: no accumulation
    assert cal.lm_head_flops(64, config.vocab_size) is None  # another shape: composed
    assert parts.moe_dense[0, 0] > moe_local_bytes(tokens, 32, 2) / cals[0].moe_local_rate(32, 4, 2)
    # The attention half and the routing work were measured at the model's own shape.
    assert [(r["d_model"], r["num_kv_heads"]) for r in cal.attention_block] == [(32, config.num_kv_heads)]
    assert cal.attention_block_flops(32, config.seq_len, config.num_heads, config.num_kv_heads,
                                     config.head_dim) == pytest.approx(cal.attention_block[0]["tflops"] * 1e12)
    assert cal.attention_block_flops(64, config.seq_len, config.num_heads, config.num_kv_heads,
                                     config.head_dim) is None  # another shape: composed
    assert cal.moe_local_rate(32, config.num_experts, 2) == pytest.approx(cal.moe_local[0]["gbps"] * 1e9)
    # The routing work: its fixed cost per call (measured at two token counts) and its bytes.
    fixed_local = cal.moe_local[0]["fixed_seconds"]
    assert fixed_local >= 0
    assert parts.moe_dense[0, 0] == pytest.approx(
        norm_bytes(tokens, 32) / cal.memory_rate("norm") + fixed_local
        + moe_local_bytes(tokens, 32, 2) / cal.moe_local_rate(32, config.num_experts, 2))
    att = config.seq_len and (problem.costs.flops_attention_proj + problem.costs.flops_attention_scores)
    assert parts.attention[0, 0] == pytest.approx(
        tokens * 3 * att / cal.attention_block_flops(32, config.seq_len, config.num_heads,
                                                     config.num_kv_heads, config.head_dim))
    est = runner.invoke(app, ["estimate", "--topology", str(tmp_path / "topo.yaml"), "--model", "tiny",
                              "--experts-per-gpu", "2", "--json"])
    assert est.exit_code == 0, est.output
    out = json.loads(est.output)
    assert out["step"]["step_time_s"] == pytest.approx(cost.step_time_s)
    assert any("cal.json" in n for n in out["notes"])
    flat = json.loads(runner.invoke(app, ["estimate", "--topology", str(tmp_path / "topo.yaml"), "--model",
                                          "tiny", "--experts-per-gpu", "2", "--achievable-tflops", "100", "--json"]).output)
    assert any("flat 100 TFLOP/s" in n for n in flat["notes"])


def test_lookups_interpolate_and_name_the_nearest_shape():
    cal = shipped_tables()["h200"]
    seed = [r for r in cal.expert if r["d_model"] == 4096 and r["activation"] == "gelu" and r["path"] == "unchunked"][0]
    pts = dict((int(a), b) for a, b in seed["points"])
    mid = cal.expert_flops(4096, 16384, "gelu", np.sqrt(1024 * 2048))  # halfway in log(rows)
    assert mid == pytest.approx((pts[1024] + pts[2048]) / 2 * 1e12)
    assert cal.expert_flops(4096, 16384, "gelu", 10) == pytest.approx(pts[128] * 1e12)  # held outside
    assert not cal.notes
    cal.expert_flops(7168, 2048, "swiglu", 4096)
    assert "not measured" in cal.notes[0]
    assert shipped_for("H100-SXM5-80GB").source == "shipped:h100"
    assert shipped_for("L40S-48GB") is None
    for table in shipped_tables().values():
        assert table.provenance and "docs/benchmarks.md" in table.provenance


@pytest.mark.parametrize("shape", [(4096, 16384, "gelu", "unchunked"), (4096, 16384, "gelu", "chunked"),
                                   (7168, 2048, "swiglu", "unchunked"), (4096, 2048, "gelu", "chunked")])
def test_expert_rates_at_many_rows_equal_the_one_row_lookup(shape):
    """The array lookup step_parts uses equals the scalar one at every point (inside the table,
    at its points, and held constant outside)."""
    d_model, d_ff, activation, path = shape
    rows = np.concatenate([np.geomspace(1.0, 1e6, 101), [128.0, 1024.0, 2048.0, 65536.0]]).reshape(-1, 15)
    for cal in shipped_tables().values():
        many = cal.expert_flops_at(d_model, d_ff, activation, rows, path)
        one = np.vectorize(lambda r: cal.expert_flops(d_model, d_ff, activation, float(r), path))(rows)
        assert many.shape == rows.shape
        np.testing.assert_allclose(many, one, rtol=1e-12)


def test_bad_calibration_files(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(CalibrationError, match="not an epplan calibration file"):
        load_calibration(bad)
    doc = shipped_tables()["h200"].to_dict()
    bad.write_text(json.dumps({**doc, "version": 99}))
    with pytest.raises(CalibrationError, match="version 99"):
        load_calibration(bad)
    fixed = dict(doc["optimizer_fixed"][0])
    for before in (-1e-3, fixed["seconds"] * 2, "x"):
        bad.write_text(json.dumps({**doc, "optimizer_fixed": [{**fixed, "before_sync_seconds": before}]}))
        with pytest.raises(CalibrationError, match="optimizer_fixed|malformed"):
            load_calibration(bad)
    local = dict(doc["moe_local"][0])
    for value in (-1e-3, float("inf"), "x"):
        bad.write_text(json.dumps({**doc, "moe_local": [{**local, "fixed_seconds": value}]}))
        with pytest.raises(CalibrationError, match="moe_local|malformed"):
            load_calibration(bad)
    doc["memory"] = {"norm": -1}
    bad.write_text(json.dumps(doc))
    with pytest.raises(CalibrationError, match="positive"):
        load_calibration(bad)
    result = runner.invoke(app, ["estimate", "--topology", "topologies/h100-pair.yaml", "--model", "tiny",
                                 "--experts-per-gpu", "2", "--calibration", str(tmp_path / "none.json")])
    assert result.exit_code == 1 and "does not exist" in result.output
    assert isinstance(Calibration.from_dict(shipped_tables()["h100"].to_dict(), "x"), Calibration)


@pytest.mark.parametrize("name", ["seed", "mixtral-8x7b", "deepseek-v3", "tiny"])
def test_num_param_tensors_counts_the_model(name):
    """The cost model's count of parameter tensors (the key of the step's fixed cost) against
    the model's own, with dense layers, shared experts and SwiGLU where the preset has them."""
    import torch

    from epplan.runtime.model import Transformer
    from epplan.workload.config import PRESETS

    c = PRESETS[name]
    c = c.replace(num_layers=min(c.num_layers, 3), num_dense_layers=min(c.num_dense_layers, 1))
    with torch.device("meta"):
        model = Transformer(c)
    assert num_param_tensors(c) == len(list(model.parameters()))


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_calibrate_refuses_a_sustain_that_is_not_a_duration(value, tmp_path):
    result = runner.invoke(app, ["calibrate", "--model", "tiny", "--device", "cpu", "--sustain", value,
                                 "--out", str(tmp_path / "cal.json")])
    assert result.exit_code == 1 and "--sustain" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "cal.json").exists()


def test_the_routing_work_is_a_fixed_cost_and_a_rate_through_two_points():
    """``fixed_and_rate`` recovers the line through two (bytes, seconds) points; a negative fixed
    cost or a slope of noise falls back to the rate through the larger point; a calibration row
    without ``fixed_seconds`` (files before 2026-12-05) reads as no fixed cost."""
    from epplan.runtime.calibrate import fixed_and_rate

    fixed, rate = fixed_and_rate([(4e9, 2e-3 + 4e9 / 1e12), (2e9, 2e-3 + 2e9 / 1e12)])
    assert fixed == pytest.approx(2e-3) and rate == pytest.approx(1e12)
    assert fixed_and_rate([(1e9, 1e-3), (2e9, 3e-3)]) == (0.0, pytest.approx(2e9 / 3e-3))  # fixed < 0
    assert fixed_and_rate([(1e9, 2e-3), (2e9, 2e-3)]) == (0.0, pytest.approx(1e12))  # flat: no slope
    assert fixed_and_rate([(1e9, 3e-3), (2e9, 2e-3)]) == (0.0, pytest.approx(1e12))  # falling: noise
    doc = shipped_tables()["h200"].to_dict()
    row = {k: v for k, v in doc["moe_local"][0].items() if k != "fixed_seconds"}
    cal = Calibration.from_dict({**doc, "moe_local": [row]}, "old")
    d, e, k = row["d_model"], row["num_experts"], row["top_k"]
    assert cal.moe_local_seconds(d, e, k, 1e9) == pytest.approx(1e9 / (row["gbps"] * 1e9))
    cal = Calibration.from_dict({**doc, "moe_local": [{**row, "fixed_seconds": 1e-3}]}, "new")
    assert cal.moe_local_seconds(d, e, k, 1e9) == pytest.approx(1e-3 + 1e9 / (row["gbps"] * 1e9))
    assert cal.moe_local_seconds(d + 1, e, k, 1e9) == pytest.approx(1e9 / cal.memory_rate("moe_local"))


def test_a_part_timed_in_its_context_runs_that_context_for_the_sustain():
    """``Timer.seconds(ahead=...)``: the sustain is the context repeated for ``sustain_s`` (not
    GEMMs), and the part still times itself alone; ``_one_block`` is forward + backward of one of
    the model's MoE blocks."""
    import time

    import torch
    import torch.distributed as dist

    from epplan.runtime.calibrate import Timer, _one_block

    calls = []

    def ahead() -> None:
        calls.append(time.perf_counter())
        time.sleep(0.002)
    timer = Timer(torch.device("cpu"), iters=3, warmup=1, sustain_s=0.05)
    seconds = timer.seconds(lambda: time.sleep(0.001), ahead=ahead)
    assert 3 <= len(calls) <= 40 and calls[-1] - calls[0] >= 0.03  # about 0.05 s of it, however slow the sleeps
    assert 0.0009 < seconds < 0.02  # the part alone
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        block = _one_block(load_model_config("tiny"), torch.device("cpu"), torch.float32, 16)
        block()
    finally:
        if created:
            dist.destroy_process_group()

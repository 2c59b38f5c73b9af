"""--routing from plain arrays and the records SGLang, vLLM and Megatron-Core write."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from epplan.errors import TrafficError
from epplan.workload.config import PRESETS
from epplan.workload.routing_stats import write_routing_stats
from epplan.workload.traffic import make_traffic

TINY = PRESETS["tiny"]  # 2 MoE layers x 4 experts, top-2
RNG = np.random.default_rng(0)
LOGICAL = RNG.integers(0, 1000, size=(2, 4)).astype(np.int64)  # [L, E]


def _reference(tmp_path, counts_lse: np.ndarray, ranks: int = 2) -> np.ndarray:
    """The same counts through epplan's own routing-statistics file (the slow, known path)."""
    path = write_routing_stats(tmp_path / "ref.json", counts_lse, steps=1, model="tiny", top_k=2,
                               tokens_per_rank_per_step=1.0)
    return make_traffic(str(path), TINY, ranks).counts


def test_npy_layers_by_experts_is_one_pattern_for_every_rank(tmp_path):
    np.save(tmp_path / "load.npy", LOGICAL)
    t = make_traffic(str(tmp_path / "load.npy"), TINY, 2)
    np.testing.assert_allclose(t.counts, _reference(tmp_path, LOGICAL[:, None, :]))
    assert np.allclose(t.counts[:, 0], t.counts[:, 1])
    assert any("scale" in n for n in t.notes)  # the rescaling note, as for any file


def test_npy_with_sources_and_a_step_window(tmp_path):
    steps = RNG.integers(0, 50, size=(5, 2, 2, 4)).astype(np.float32)  # [W, L, S, E]
    np.save(tmp_path / "w.npy", steps)
    t = make_traffic(f"{tmp_path / 'w.npy'}@1:3", TINY, 2)
    mean = steps[1:4].mean(axis=0)
    np.testing.assert_allclose(t.counts, _reference(tmp_path, np.rint(mean * 1e6).astype(np.int64)), rtol=1e-6)
    with pytest.raises(TrafficError, match="outside its steps 0..4"):
        make_traffic(f"{tmp_path / 'w.npy'}@3:9", TINY, 2)


def test_npz_with_one_array_and_pt_tensor(tmp_path):
    np.savez(tmp_path / "a.npz", load=LOGICAL)
    torch.save(torch.from_numpy(LOGICAL), tmp_path / "a.pt")
    ref = _reference(tmp_path, LOGICAL[:, None, :])
    np.testing.assert_allclose(make_traffic(str(tmp_path / "a.npz"), TINY, 2).counts, ref)
    np.testing.assert_allclose(make_traffic(str(tmp_path / "a.pt"), TINY, 2).counts, ref)


def test_sglang_stat_dump(tmp_path):
    torch.save({"rank": 0, "logical_count": torch.from_numpy(LOGICAL)[None].repeat(3, 1, 1),
                "average_utilization_rate_over_window": 0.8}, tmp_path / "expert_distribution.pt")
    t = make_traffic(str(tmp_path / "expert_distribution.pt"), TINY, 2)
    np.testing.assert_allclose(t.counts, _reference(tmp_path, LOGICAL[:, None, :]))
    assert "SGLang logical_count, 3 step(s)" in t.source
    # Over every decoder layer, as SGLang counts them: a leading dense layer is dropped.
    torch.save({"logical_count": torch.cat([torch.zeros(1, 4), torch.from_numpy(LOGICAL).float()])},
               tmp_path / "with_dense.pt")
    t = make_traffic(str(tmp_path / "with_dense.pt"), TINY, 2)
    np.testing.assert_allclose(t.counts, _reference(tmp_path, LOGICAL[:, None, :]))
    assert any("first 1 layer(s) route nothing" in n for n in t.notes)


def test_vllm_eplb_state_folds_physical_into_logical(tmp_path):
    # 6 physical experts on 2 ranks: logical 0 and 1 have two replicas each.
    p2l = torch.tensor([[0, 1, 2, 3, 0, 1], [0, 2, 0, 1, 3, 1]])
    window = torch.from_numpy(RNG.integers(0, 100, size=(4, 2, 6))).to(torch.int32)
    torch.save({"expert_load_window": window, "physical_to_logical_map": p2l}, tmp_path / "eplb.pt")
    t = make_traffic(str(tmp_path / "eplb.pt"), TINY, 2)
    mean = window.double().mean(0).numpy()
    logical = np.zeros((2, 4))
    for layer in range(2):  # slow reference: one physical expert at a time
        for p in range(6):
            logical[layer, int(p2l[layer, p])] += mean[layer, p]
    np.testing.assert_allclose(t.counts, _reference(tmp_path, np.rint(logical * 4).astype(np.int64)[:, None, :]))
    assert any("6 physical experts' loads summed into 4 logical experts" in n for n in t.notes)
    torch.save({"expert_load_window": window}, tmp_path / "bad.pt")
    with pytest.raises(TrafficError, match="save the state's physical_to_logical_map"):
        make_traffic(str(tmp_path / "bad.pt"), TINY, 2)


def test_megatron_router_buffers_in_layer_order(tmp_path):
    buffers = {f"decoder.layers.{i}.mlp.router.local_tokens_per_expert": torch.from_numpy(LOGICAL[j]).float()
               for j, i in ((1, 10), (0, 2))}  # dict order is not layer order
    torch.save(buffers, tmp_path / "tpe.pt")
    t = make_traffic(str(tmp_path / "tpe.pt"), TINY, 2)
    np.testing.assert_allclose(t.counts, _reference(tmp_path, LOGICAL[:, None, :]))
    torch.save([torch.from_numpy(r) for r in LOGICAL], tmp_path / "list.pt")
    np.testing.assert_allclose(make_traffic(str(tmp_path / "list.pt"), TINY, 2).counts, t.counts)


@pytest.mark.parametrize("obj, match", [
    ({"weights": torch.zeros(2)}, "none of logical_count"),
    (torch.zeros(2, 3, 4, 5, 6), "expected \\[layers, experts\\]"),
    (torch.full((2, 4), -1.0), "non-negative"),
    ({"decoder.mlp.tokens_per_expert": torch.zeros(4)}, "names no layer"),
])
def test_bad_records_are_clear_errors(tmp_path, obj, match):
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(TrafficError, match=match):
        make_traffic(str(tmp_path / "x.pt"), TINY, 2)


def test_expert_count_mismatch_names_the_fix(tmp_path):
    np.save(tmp_path / "e8.npy", np.ones((2, 8)))
    with pytest.raises(TrafficError, match="num_experts=8"):
        make_traffic(str(tmp_path / "e8.npy"), TINY, 2)

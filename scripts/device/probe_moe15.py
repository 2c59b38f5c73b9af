"""Why the cost model over-predicts the MoE layer (issue 15: +6 to +16 % in calls Y, AC, AD).

    torchrun --nproc-per-node 1 scripts/device/probe_moe15.py MODEL TOKENS [MODEL TOKENS ...]

For each model (a preset or YAML, every expert on this GPU) at TOKENS tokens a micro-batch (as
its training run has them), one MoE layer forward + backward as ``epplan calibrate`` times it
(``measure_moe_local``: a rank of its own, no overlap), in variants that each change one thing:

    cal         calibrate's own number: the layer less its GEMMs alone, as GB/s and as ms at TOKENS
    gemms       the expert GEMMs alone at the balanced rows (calibrate's reference), ms
    layer       the whole layer, bf16 expert weights, fresh routing each run (calibrate's run), ms
    fixed       the same tokens every run (row counts repeat), ms
    fp32        fp32 expert weights under autocast, as training holds them (their casts in), ms
    cool        ``layer`` without the 1 s of sustained GEMMs before it, ms
    queued      ``layer`` with 20 ms of GEMMs queued ahead of each run inside its timing, less
                those GEMMs timed alone: the layer's device time when the host runs ahead, ms

and what the cost model predicts at TOKENS from those tables (the expert GEMM table at the rows,
the local bytes at calibrate's rate). Prints one line per model; writes nothing.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from epplan.cost import step as bytes_of  # noqa: E402
from epplan.placement.types import LayerPlacement, Placement  # noqa: E402
from epplan.runtime.calibrate import PAIRS, Timer, _backward, _rand, measure_moe_local  # noqa: E402
from epplan.runtime.expert_parallel import parallelize_experts  # noqa: E402
from epplan.runtime.experts import expert_mlp  # noqa: E402
from epplan.runtime.model import Transformer  # noqa: E402
from epplan.workload.config import load_model_config  # noqa: E402


def layer_of(c, dev, bf16: bool):
    group = dist.new_group([0])
    E = c.num_experts
    one = LayerPlacement(replicas=[np.array([0]) for _ in range(E)], split=[np.ones((1, 1)) for _ in range(E)])
    with torch.device(dev):
        model = Transformer(c)
    parallelize_experts(model, Placement(1, E, [one]), group=group, overlap=False)
    moe = model.layers[0].ffn
    if bf16:
        moe.experts.to(torch.bfloat16 if dev.type == "cuda" else torch.float32)
    return moe


def probe(spec: str, tokens: int, dev: torch.device) -> None:
    c = load_model_config(spec).replace(num_layers=1, num_dense_layers=0, num_shared_experts=0)
    d, E = c.d_model, c.num_experts
    warm, cool = Timer(dev, PAIRS, 2, sustain_s=1.0), Timer(dev, PAIRS, 2, sustain_s=0.0)
    gbps = measure_moe_local(warm, c, tokens, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    local_ms = bytes_of.moe_local_bytes(tokens, d, c.top_k) / gbps / 1e9 * 1e3
    out = {"cal_gbps": gbps, "cal_local": local_ms}
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    x = _rand(tokens, d, device=dev, dtype=dtype, requires_grad=True)
    g = _rand(tokens, d, device=dev, dtype=dtype)
    rows = tokens * c.top_k // E
    for name, bf16 in (("layer", True), ("fp32", False)):
        moe = layer_of(c, dev, bf16)

        def run(fresh=True, moe=moe):
            if fresh:
                with torch.no_grad():
                    x.normal_()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                y = moe(x.view(1, tokens, d)).view(tokens, d)
            _backward(y, g, x, *moe.parameters())
        out[name] = warm.seconds(run) * 1e3
        if bf16:
            out["fixed"] = warm.seconds(lambda: run(False)) * 1e3
            out["cool"] = cool.seconds(run) * 1e3
            a = torch.randn(8192, 8192, device=dev, dtype=dtype) if dev.type == "cuda" else torch.randn(256, 256)
            o = torch.empty_like(a)
            per = warm.seconds(lambda: torch.mm(a, a, out=o))
            n = max(1, int(0.020 / per))

            def ahead():
                for _ in range(n):
                    torch.mm(a, a, out=o)
            lead = warm.seconds(ahead)
            out["queued"] = (warm.seconds(lambda: (ahead(), run())) - lead) * 1e3
            experts = moe.experts
            ws = [w for w in (experts.w1, experts.w2, experts.w3) if w is not None]
            xe = _rand(rows * E, d, device=dev, dtype=dtype, requires_grad=True)
            ge = _rand(rows * E, d, device=dev, dtype=dtype)
            out["gemms"] = warm.seconds(
                lambda: _backward(expert_mlp(xe, [rows] * E, experts.w1, experts.w2, experts.w3, c.activation),
                                  ge, xe, *ws)) * 1e3
            del xe, ge, a, o
        del moe
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    out["predicted"] = out["gemms"] + local_ms
    print(spec, tokens, " ".join(f"{k} {v:.2f}" for k, v in out.items()), flush=True)


def main(args: list[str]) -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")  # the CPU: a smoke test only
    if cuda:
        torch.cuda.set_device(dev)
    for spec, tokens in zip(args[::2], args[1::2]):
        probe(spec, int(tokens), dev)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])

"""The one-pass AdamW step (``epplan.train.adamw``, compiled) against torch's fused AdamW followed
by the bf16 re-cast, on one GPU: correctness against float64, then the time of each.

    python3 scripts/device/probe_adamw.py [--params 1073741824] [--first-params N]

Correctness: random weights, gradients and moments (never zeros), three steps of the compiled
update against ``torch.optim.AdamW`` (unfused) in float64 on the same values; ||a - b|| / ||b||
of the weights, the moments and the bf16 copy (against the float64 weight rounded to bf16).
Timing: two tensors of ``--params / 2`` fp32 parameters, each with a bf16 copy, the clipping
scale applied; medians of CUDA-event timings after warm-up, each variant timed twice,
interleaved (the smaller is printed); GB/s over 30 bytes per parameter (the bytes the one-pass
step must move), for both. The compiled update (``dynamic=True``) is first called by the
correctness check, on 1 M parameters; ``--first-params N`` calls it first on N parameters (as
training first calls its with-copy form on the experts' 1.07 G), in a fresh process: whether the size of the
first call decides the kernel's speed at every size.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from epplan.runtime.calibrate import Timer  # noqa: E402
from epplan.runtime.experts import compute_copy, forget_copies  # noqa: E402
from epplan.train.adamw import step_with_copies  # noqa: E402


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check(dev):
    torch.manual_seed(0)
    n = 1 << 20
    p = torch.randn(n, device=dev, requires_grad=True)
    q = p.detach().double().clone().requires_grad_()
    opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.1, fused=True)
    ref = torch.optim.AdamW([q], lr=1e-3, weight_decay=0.1, foreach=False)
    compute_copy(p, torch.bfloat16)
    for i in range(3):
        g = torch.randn(n, device=dev)
        scale = torch.tensor(0.5, device=dev)
        p.grad, q.grad = g.clone(), g.double() * 0.5
        step_with_copies(opt, scale)
        ref.step()
    copy = compute_copy(p, torch.bfloat16)
    errs = {"weight": rel(p, q), "exp_avg": rel(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"]),
            "exp_avg_sq": rel(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"]),
            "copy": rel(copy, q.detach().to(torch.bfloat16))}
    print("correctness (rel err vs float64 torch AdamW, 3 steps):",
          " ".join(f"{k} {v:.2e}" for k, v in errs.items()), flush=True)
    assert all(v < 1e-5 for k, v in errs.items() if k != "copy") and errs["copy"] < 1e-2, errs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=1 << 30)
    ap.add_argument("--first-params", type=int, default=0)
    args = ap.parse_args()
    dev = torch.device("cuda")
    if args.first_params:
        first = torch.nn.Parameter(torch.zeros(args.first_params, device=dev))
        first.grad = torch.zeros_like(first)
        compute_copy(first, torch.bfloat16)  # the graph with a copy, as the timed tensors have
        step_with_copies(torch.optim.AdamW([first], lr=1e-4, fused=True), None)
        del first
        forget_copies()
        print(f"first compiled call on {args.first_params} parameters", flush=True)
    check(dev)
    forget_copies()
    n = args.params // 2
    ps = [torch.nn.Parameter(torch.randn(n, device=dev) * 0.02) for _ in range(2)]
    for p in ps:
        p.grad = torch.randn(n, device=dev) * 1e-3
    scale = torch.tensor(0.7, device=dev)
    fused = torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.1, fused=True)
    copies = [p.detach().to(torch.bfloat16) for p in ps]

    def torch_fused():
        fused.grad_scale = scale.reciprocal()
        fused.step()
        fused.grad_scale = None
        for c, p in zip(copies, ps):
            c.copy_(p)  # the re-cast the next forward would make

    def torch_fused_only():
        fused.grad_scale = scale.reciprocal()
        fused.step()
        fused.grad_scale = None

    ours = torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.1, fused=True)
    for p in ps:
        compute_copy(p, torch.bfloat16)
    timer = Timer(dev, iters=7, warmup=5)
    ms = {}  # each timed twice, interleaved (the first timing after idle ran slow in call F)
    for name, fn in (("ours", lambda: step_with_copies(ours, scale)), ("fused", torch_fused),
                     ("fused_only", torch_fused_only)) * 2:
        ms.setdefault(name, []).append(timer.seconds(fn) * 1e3)
    print("ms per step, first and second timing:", {k: [round(v, 2) for v in vs] for k, vs in ms.items()})
    t_ours, t_fused, t_fused_only = (min(ms[k]) for k in ("ours", "fused", "fused_only"))
    nbytes = 30 * args.params
    print(f"adamw {args.params / 1e9:.2f} G params: one pass (compiled) {t_ours:.2f} ms "
          f"({nbytes / t_ours / 1e6:.0f} GB/s over 30 B/param); torch fused + re-cast {t_fused:.2f} ms "
          f"({nbytes / t_fused / 1e6:.0f}); torch fused alone {t_fused_only:.2f} ms "
          f"({28 * args.params / t_fused_only / 1e6:.0f} GB/s over 28 B/param)", flush=True)


if __name__ == "__main__":
    main()

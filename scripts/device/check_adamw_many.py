"""The multi-tensor AdamW step (epplan.train.adamw, MANY_BELOW) against the per-tensor one, on a GPU.

    python3 scripts/device/check_adamw_many.py

Two copies of one set of parameters (the medium model's 20 tensors, odd sizes around the
kernel's block, and slot views of a stacked tensor; some with a bf16 copy), each with its own
torch.optim.AdamW (two groups: decay and none), stepped 4 times with the same gradients and
clipping scales: one with the small tensors together (the default), one with every tensor by
itself (MANY_BELOW = 0). Prints the largest differences of weights, moments, copies and step
counters, then the host time of the call and its time to completion (median of 20) for both.
"""

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from epplan.runtime.experts import compute_copy  # noqa: E402
from epplan.train import adamw  # noqa: E402

MEDIUM = [(32000, 2048), (2048, 2048)] + [(2048,), (2048, 2048), (4096, 2048), (2048, 2048), (2048,), (8, 2048),
                                          (8, 2048, 8192), (8, 8192, 2048)] * 2 + [(2048,), (32000, 2048)]
ODD = [(1,), (2047,), (2048,), (2049,), (4097, 3), (5, 7, 11)]
COPIED = {8, 9, 16, 17, 19}  # the experts and the LM head of MEDIUM carry a bf16 copy


def build(dev):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, device=dev) * 0.02) for s in MEDIUM + ODD]
    stacked = torch.nn.Parameter(torch.randn(4, 3000, device=dev) * 0.02)
    views = [stacked.detach()[j] for j in range(4)]  # as TrainOptimizer's slot views
    every = ps + views
    copies = {i: compute_copy(every[i], torch.bfloat16) for i in COPIED | {len(ps) + 1}}
    opt = torch.optim.AdamW([{"params": [p for p in every if p.dim() >= 2 or p.numel() == 3000], "weight_decay": 0.1},
                             {"params": [p for p in every if not (p.dim() >= 2 or p.numel() == 3000)],
                              "weight_decay": 0.0}], lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    return every, copies, opt


def main():
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(dev), torch.__version__, flush=True)
    a, a_copies, a_opt = build(dev)
    b, b_copies, b_opt = build(dev)
    gen = torch.Generator(device=dev).manual_seed(1)
    for step in range(4):
        grads = [torch.randn(p.shape, device=dev, generator=gen) * 1e-3 for p in a]
        scale = torch.tensor(0.5 + 0.1 * step, device=dev)
        for ps, opt, below in ((a, a_opt, 1 << 24), (b, b_opt, 0)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            for group in opt.param_groups:
                group["lr"] = 3e-4 * (step + 1)
            adamw.MANY_BELOW = below
            adamw.step_with_copies(opt, scale)
    torch.cuda.synchronize()
    adamw.MANY_BELOW = 1 << 24
    print("multi-tensor kernel:", "failed: " + adamw._many.failed if adamw._many.failed else "ran", flush=True)

    def worst(xs, ys):
        return max(((x.float() - y.float()).abs().max() / y.float().abs().max().clamp(min=1e-30)).item()
                   for x, y in zip(xs, ys))
    print("largest relative difference, together vs one by one (4 steps): weights %.2e, exp_avg %.2e, "
          "exp_avg_sq %.2e, copies %.2e, steps %.0f" % (
              worst(a, b), worst([a_opt.state[p]["exp_avg"] for p in a], [b_opt.state[p]["exp_avg"] for p in b]),
              worst([a_opt.state[p]["exp_avg_sq"] for p in a], [b_opt.state[p]["exp_avg_sq"] for p in b]),
              worst([compute_copy(a[i], torch.bfloat16) for i in sorted(a_copies)],
                    [compute_copy(b[i], torch.bfloat16) for i in sorted(b_copies)]),
              max(abs(a_opt.state[p]["step"].item() - b_opt.state[q]["step"].item()) for p, q in zip(a, b))),
          flush=True)
    copies_valid = all(compute_copy(a[i], torch.bfloat16) is a_copies[i] for i in a_copies)
    print("copies kept valid (the same tensors):", copies_valid, flush=True)

    # the medium model's 20 tensors alone: host time and time to completion of one step
    med, _, opt = build(dev)
    opt.param_groups[0]["params"] = [p for p in opt.param_groups[0]["params"] if any(p is q for q in med[:len(MEDIUM)])]
    opt.param_groups[1]["params"] = [p for p in opt.param_groups[1]["params"] if any(p is q for q in med[:len(MEDIUM)])]
    for p in med[:len(MEDIUM)]:
        p.grad = torch.randn_like(p) * 1e-3
    scale = torch.tensor(0.7, device=dev)
    for below in (1 << 24, 0, 1 << 24, 0):
        adamw.MANY_BELOW = below
        host, whole = [], []
        for _ in range(23):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            adamw.step_with_copies(opt, scale)
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            host.append(t1 - t0)
            whole.append(t2 - t0)
        print(f"medium's 20 tensors, MANY_BELOW={below}: host {statistics.median(host[3:]) * 1e3:.3f} ms, "
              f"to completion {statistics.median(whole[3:]) * 1e3:.3f} ms", flush=True)
    adamw.MANY_BELOW = 1 << 24


if __name__ == "__main__":
    main()

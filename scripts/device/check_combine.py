"""The combine's compiled gather-sum against its eager form and a float64 reference, on the GPU.

    python3 scripts/device/check_combine.py

At the seed dims' shape (40,000 tokens, top-2, d 4096, bf16) and with dropped assignments: the
largest difference of each from the float64 sum, and each one's time (CUDA events, median of 20).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from epplan.runtime import combine  # noqa: E402


def timed(fn, iters=20):
    times = []
    for _ in range(iters + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times[3:])[iters // 2]


def main():
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    for num_tokens, top_k, width, drop in ((40_000, 2, 4096, 0.0), (40_000, 2, 4096, 0.1), (8_192, 8, 7168, 0.0)):
        num_assignments = num_tokens * top_k
        kept = torch.rand(num_assignments, device=device, generator=gen) >= drop
        order = torch.nonzero(kept).squeeze(1)[torch.randperm(int(kept.sum()), device=device, generator=gen)]
        y = torch.randn(order.numel(), width, device=device, generator=gen).to(torch.bfloat16)
        weight = torch.rand(order.numel(), device=device, generator=gen).to(torch.bfloat16)
        ref = y.new_zeros(num_tokens, width, dtype=torch.float64).index_add(
            0, order // top_k, y.double() * weight.double()[:, None])
        fast = combine.combine(y, weight, order, num_tokens, top_k)
        combine._gather_sum.failed = True  # the eager form, as after a compiler failure
        slow = combine.combine(y, weight, order, num_tokens, top_k)
        combine._gather_sum.failed = False
        scatter = lambda: y.new_zeros(num_tokens, width).index_add(0, order // top_k, y * weight[:, None])  # noqa: E731
        print(f"N={num_tokens} k={top_k} D={width} drop={drop}: max |compiled - float64| "
              f"{(fast.double() - ref).abs().max().item():.3e}, |eager - float64| {(slow.double() - ref).abs().max().item():.3e}, "
              f"|index_add - float64| {(scatter().double() - ref).abs().max().item():.3e}; "
              f"ms compiled {timed(lambda: combine.combine(y, weight, order, num_tokens, top_k)):.3f}, "
              f"index_add {timed(scatter):.3f}", flush=True)


if __name__ == "__main__":
    main()

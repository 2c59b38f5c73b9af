"""AdamW with bf16 moments (``optimizer_state_dtype`` bf16) as training steps it on CUDA
(``step_with_copies``: the Triton kernel, or inductor's where a tensor's size is not a multiple of
8), against the same update run eagerly on the GPU (``adamw_update``), over five steps of
tensors of 4,096, 2**22 + 8 and 2**22 + 3 elements, with and without a bf16 copy.

    python3 scripts/device/check_adamw_bf16.py

Prints the largest difference of the weights and of the moments relative to their largest
value: the weights must agree to 1e-5, the moments to one bf16 rounding step (2**-7 relative;
the two paths round fp32 values computed in another order). Then ms and TB/s of one step of
2**28 elements with a copy, fp32 moments (inductor's kernel) against bf16 (Triton's).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from epplan.runtime.calibrate import Timer  # noqa: E402
from epplan.runtime.experts import compute_copy  # noqa: E402
from epplan.train import adamw  # noqa: E402


def setup(n, copy, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(n, device="cuda", generator=g))
    p.grad = torch.randn(n, device="cuda", generator=g) * 1e-2
    if copy:
        compute_copy(p, torch.bfloat16)
    return p, torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def main():
    worst_w = worst_m = 0.0
    for n in (4096, (1 << 22) + 8, (1 << 22) + 3):
        for copy in (False, True):
            p, opt = setup(n, copy, n)
            w = p.detach().clone()
            m = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
            v = torch.zeros_like(m)
            step = torch.zeros((), device="cuda")
            lr, scale = torch.full((), 1e-3, device="cuda"), torch.full((), 0.7, device="cuda")
            for _ in range(5):
                adamw.step_with_copies(opt, scale, state_dtype=torch.bfloat16)
                step += 1
                adamw.adamw_update(w, p.grad, m, v, None, lr, step, scale, 0.9, 0.95, 1e-8, 0.1)
            state = opt.state[p]
            dw = ((p.detach() - w).abs().max() / w.abs().max()).item()
            dm = max(((state[k].float() - r.float()).abs().max() / r.float().abs().max()).item()
                     for k, r in (("exp_avg", m), ("exp_avg_sq", v)))
            worst_w, worst_m = max(worst_w, dw), max(worst_m, dm)
            via = "triton" if adamw._together(p, p.grad, state, None) else "inductor"
            print(f"n {n} copy {copy} ({via}): weights {dw:.2e}, moments {dm:.2e}, step {state['step'].item():.0f}, "
                  f"moments {state['exp_avg'].dtype}", flush=True)
            if copy:
                assert torch.equal(compute_copy(p, torch.bfloat16), p.detach().to(torch.bfloat16))
    assert adamw._many.failed is None, adamw._many.failed
    timer = Timer(torch.device("cuda"), iters=10, warmup=3)
    n = 1 << 28
    for state_dtype, moment in ((None, 4), (torch.bfloat16, 2)):
        p, opt = setup(n, True, 0)
        scale = torch.full((), 0.7, device="cuda")
        s = timer.seconds(lambda: adamw.step_with_copies(opt, scale, state_dtype=state_dtype))
        nbytes = n * (12 + 4 * moment + 2)
        print(f"moments {state_dtype or torch.float32}: {s * 1e3:.2f} ms, {nbytes / s / 1e12:.2f} TB/s over "
              f"{nbytes / 1e9:.1f} GB", flush=True)
        del p, opt
    ok = worst_w < 1e-5 and worst_m < 2 ** -7
    print("check", "ok" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

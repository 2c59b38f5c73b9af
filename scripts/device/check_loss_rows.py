"""The cross-entropy's Triton kernel (``epplan.runtime.loss._rows``) against the eager
``_chunk_loss``, and its time against ``torch.compile``'s, on one GPU.

    python3 scripts/device/check_loss_rows.py

Shapes: the seed dims' chunk (8,192 x 32,000 bf16), a vocabulary that is not a multiple of the
kernel's block (50,257), one below it (1,000), fp32 logits, targets outside the vocabulary (no
logit is theirs), a non-finite logit (the loss must not be finite) and no rows. Prints the
largest relative error of the loss sum and the largest absolute error of the gradient against
the eager function in fp32 (the gradient's dtype is the logits'), then ms and GB/s (reads of the
logits twice, one write of their gradient) of both kernels at the seed dims' chunk.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from epplan.runtime import loss as L  # noqa: E402
from epplan.runtime.calibrate import Timer  # noqa: E402


def case(n, V, dtype, *, outside=False, nonfinite=False):
    torch.manual_seed(n + V)
    logits = (torch.randn(n, V, device="cuda") * 3).to(dtype)
    targets = torch.randint(0, V, (n,), device="cuda")
    if outside and n:
        targets[::3] = -100
        targets[1::3] = V + 7
    if nonfinite and n:
        logits[n // 2, V // 2] = float("inf")
    got = L._chunk_loss_rows(logits, targets)
    assert got is not None, L._rows
    want = L._chunk_loss(logits.float(), targets)
    loss_err = (abs(got[0].item() - want[0].item()) / max(abs(want[0].item()), 1e-30)) if n else abs(got[0].item())
    grad_err = (got[1].float() - want[1]).abs().max().item() if n else 0.0
    finite = bool(torch.isfinite(got[0]).item())
    print(f"n {n:>6} V {V:>6} {str(dtype):>15} outside {outside!s:>5} nonfinite {nonfinite!s:>5}: "
          f"loss rel err {loss_err:.2e}, grad max abs err {grad_err:.2e}, loss finite {finite}", flush=True)
    return loss_err, grad_err, finite


def main():
    ok = True
    for n, V, dtype, kw in [(8192, 32000, torch.bfloat16, {}), (1000, 50257, torch.bfloat16, {}),
                            (333, 1000, torch.bfloat16, {}), (512, 32000, torch.float32, {}),
                            (600, 32000, torch.bfloat16, {"outside": True}),
                            (64, 32000, torch.bfloat16, {"nonfinite": True}), (0, 32000, torch.bfloat16, {})]:
        loss_err, grad_err, finite = case(n, V, dtype, **kw)
        if kw.get("nonfinite"):
            ok &= not finite
        else:
            ok &= loss_err < 1e-5 and grad_err < (1e-6 if dtype == torch.float32 else 8e-3)
    timer = Timer(torch.device("cuda"), iters=20, warmup=3)
    logits = torch.randn(8192, 32000, device="cuda").to(torch.bfloat16)
    targets = torch.randint(0, 32000, (8192,), device="cuda")
    gb = 3 * logits.numel() * logits.element_size() / 1e9
    for name, fn in (("torch.compile", L._chunk_loss_compiled), ("triton rows", L._chunk_loss_rows)):
        s = timer.seconds(lambda: fn(logits, targets))
        print(f"{name:>14}: {s * 1e3:.3f} ms, {gb / s:.0f} GB/s", flush=True)
    print("check", "ok" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

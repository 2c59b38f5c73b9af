"""Weight-gradient accumulation over chunks: bf16 output with beta = 1 (the chunked path today)
vs an fp32 accumulator filled by the GEMM itself (addmm with out_dtype), on one expert's shape.
Prints each variant's time and its error against an fp32 reference."""

import statistics

import torch

D, F, C, ROWS = 4096, 16384, 16, 1250
torch.manual_seed(0)
x = torch.randn(C * ROWS, D, device="cuda").bfloat16()
dh = torch.randn(C * ROWS, F, device="cuda").bfloat16()
ref = x.float().t() @ dh.float()


def bf16_beta1():
    acc = torch.empty(D, F, device="cuda", dtype=torch.bfloat16)
    for c in range(C):
        rows = slice(c * ROWS, (c + 1) * ROWS)
        if c == 0:
            torch.mm(x[rows].t(), dh[rows], out=acc)
        else:
            acc.addmm_(x[rows].t(), dh[rows])
    return acc


def fp32_out_dtype():
    acc = torch.zeros(D, F, device="cuda", dtype=torch.float32)
    for c in range(C):
        rows = slice(c * ROWS, (c + 1) * ROWS)
        torch.addmm(acc, x[rows].t(), dh[rows], out_dtype=torch.float32, out=acc)
    return acc


def unchunked():
    return x.t() @ dh


for name, fn in (("unchunked bf16", unchunked), ("chunked bf16 beta=1", bf16_beta1),
                 ("chunked fp32 out_dtype", fp32_out_dtype)):
    try:
        out = fn()
        times = []
        for _ in range(10):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); fn(); e.record(); e.synchronize()
            times.append(s.elapsed_time(e))
        err = float((out.float() - ref).norm() / ref.norm())
        err_b = float((out.bfloat16().float() - ref).norm() / ref.norm())
        print(f"{name:<24} {statistics.median(times):7.3f} ms  rel err {err:.2e}  after bf16 rounding {err_b:.2e}")
    except Exception as exc:
        print(f"{name:<24} failed: {type(exc).__name__}: {str(exc)[:200]}")

"""The loop's expert GEMMs on rows rounded up (``experts.ROW_QUANTUM``) against exact shapes, on
the GPU in bf16: forward and backward of ``segment_mlp`` at the medium model's expert shape with
uneven row counts, and the host time of the forward's GEMM launches over fresh counts.

    python3 scripts/device/check_row_quantum.py
"""

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from epplan.runtime import experts  # noqa: E402


def run(quantum, x, g, ws, bounds):
    experts.ROW_QUANTUM = quantum
    xi = x.detach().clone().requires_grad_()
    wi = [w.detach().clone().requires_grad_() for w in ws]
    y = experts.segment_mlp(xi, bounds, None, wi[0], wi[1], None, "gelu")
    y.backward(g)
    torch.cuda.synchronize()
    return y.detach(), xi.grad, [w.grad for w in wi]


def main():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    E, D, F = 8, 2048, 8192
    ws = [(torch.randn(E, D, F, device=dev) * 0.02).bfloat16(), (torch.randn(E, F, D, device=dev) * 0.02).bfloat16()]
    counts = torch.distributions.Dirichlet(2 * torch.ones(E)).sample() * 65536
    counts = counts.round().long().tolist()
    counts[-1] += 65536 - sum(counts)
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    x = torch.randn(65536, D, device=dev).bfloat16()
    g = torch.randn(65536, D, device=dev).bfloat16()
    exact = run(0, x, g, ws, bounds)
    rounded = run(128, x, g, ws, bounds)
    print("rows per expert", counts)
    for name, a, b in (("y", exact[0], rounded[0]), ("dx", exact[1], rounded[1]),
                       ("dw1", exact[2][0], rounded[2][0]), ("dw2", exact[2][1], rounded[2][1])):
        diff = (a.float() - b.float()).abs().max().item()
        rel = ((a.float() - b.float()).norm() / a.float().norm()).item()
        print(f"{name}: max |exact - rounded| {diff:.3g}, relative norm {rel:.3g}, equal {torch.equal(a, b)}")
    # host seconds of the forward GEMMs' launches at fresh counts (the GPU kept busy)
    for quantum in (0, 128):
        experts.ROW_QUANTUM = quantum
        host = []
        spread = max(1, min(counts) // 3)
        for i in range(40):
            shift = torch.randint(-spread, spread, (E - 1,)).tolist()
            b = [0] + [bounds[e + 1] + shift[e] for e in range(E - 1)] + [65536]
            busy = torch.empty(8192, 8192, device=dev, dtype=torch.bfloat16)
            torch.mm(busy, busy)  # a queue ahead, so that no launch waits for the GPU
            t0 = time.perf_counter()
            experts._segment_mm(x, ws[0], b, None)
            host.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
        print(f"ROW_QUANTUM {quantum}: host ms per forward GEMM set of {E} experts, median "
              f"{statistics.median(host[10:]) * 1e3:.3f}, mean {statistics.mean(host[10:]) * 1e3:.3f}")


if __name__ == "__main__":
    main()

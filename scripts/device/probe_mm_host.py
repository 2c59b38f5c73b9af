"""Host time of one expert GEMM launch (``torch.mm``, bf16) by how its row count varies, on the GPU.

    python3 scripts/device/probe_mm_host.py

The experts' GEMMs in training take about 0.7 ms of host time each (``profile_train.py``, call L):
is that the library choosing a kernel for each new row count? For (M, 4096) @ (4096, 16384) and the
transposed weight-gradient shape, 200 launches each with M fixed, M new on every call (4,000-6,000),
M from 16 values, and M of few rows (8-512, new each call); the GPU is kept busy behind a queue of
large GEMMs so that no launch waits for the device. Prints the median and mean host microseconds
per launch.
"""

import statistics
import time

import torch


def host_us(shapes, fn, queue):
    torch.cuda.synchronize()
    for _ in range(8):
        queue()  # a few seconds of device work ahead of the launches timed
    times = []
    for m in shapes:
        t0 = time.perf_counter()
        fn(m)
        times.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times), statistics.fmean(times)


def main():
    dev = torch.device("cuda")
    D, F, n = 4096, 16384, 200
    w = torch.randn(D, F, device=dev, dtype=torch.bfloat16)
    x = torch.randn(8192, D, device=dev, dtype=torch.bfloat16)
    dh = torch.randn(8192, F, device=dev, dtype=torch.bfloat16)
    acc = torch.zeros(D, F, device=dev)
    big = torch.randn(16384, 16384, device=dev, dtype=torch.bfloat16)
    queue = lambda: big @ big  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    cases = {
        "fixed 5000": [5000] * n,
        "new each call 4000-6000": torch.randint(4000, 6001, (n,), generator=gen).tolist(),
        "16 values 4000-6000": [4000 + 128 * (i % 16) for i in range(n)],
        "few rows 8-512, new each call": torch.randint(8, 513, (n,), generator=gen).tolist(),
    }
    for name, shapes in cases.items():
        fwd = host_us(shapes, lambda m: torch.mm(x[:m], w), queue)
        wgrad = host_us(shapes, lambda m: torch.addmm(acc, x[:m].t(), dh[:m], out_dtype=torch.float32, out=acc), queue)
        print(f"host us per launch, {name}: forward (M, D) @ (D, F) median {fwd[0]:.1f} mean {fwd[1]:.1f}; "
              f"weight gradient (D, M) @ (M, F) into fp32 median {wgrad[0]:.1f} mean {wgrad[1]:.1f}", flush=True)


if __name__ == "__main__":
    main()

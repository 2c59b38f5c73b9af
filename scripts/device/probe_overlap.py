"""How much of the AdamW update can hide under compute-bound GEMMs on another stream (issue 15).

    python3 scripts/device/probe_overlap.py

The update behind the forward (``epplan/train/step_behind.py``, removed after this probe's call
V) hid 15 of its 41 ms and slowed the rest of the step by 7.5 ms (docs/benchmarks.md, call R).
This probe times, on one GPU, a chain of expert-MLP GEMMs (the forward's shape at the seed dims:
5,000 rows, 4,096 x 16,384, GELU between) and the one-pass AdamW update of 1.07 G parameters
(fp32 weight, gradient and moments, bf16 copy), alone and together on two streams:

- the update as ``epplan.train.adamw`` runs it (inductor's kernel, one per tensor, a grid that
  covers the tensor), and as a persistent Triton kernel with K programs that loop over the tensor
  (K from 16 to 4 per SM), which leaves the other SMs to the GEMMs;
- both streams at the default priority, and the GEMMs on a high-priority stream (the block
  scheduler then starts the GEMMs' blocks first whenever an SM frees).

Prints each case's milliseconds (median of 7): GEMMs alone, update alone, the two together (wall
from a common start to both done) and the GEMM stream's own span, and what the overlap saved
against running them one after the other. Also checks the Triton kernel against the eager
update (largest difference).
"""

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from epplan.train.adamw import _update, adamw_update  # noqa: E402

BETA1, BETA2, EPS, WD = 0.9, 0.95, 1e-8, 0.1


@triton.jit
def _adamw_persistent(p_ptr, g_ptr, m_ptr, v_ptr, c_ptr, n, lr_ptr, step_ptr, scale_ptr,
                      beta1, beta2, eps, wd, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lr = tl.load(lr_ptr)
    t = tl.load(step_ptr)
    scale = tl.load(scale_ptr)
    bias1 = 1.0 - tl.exp(t * tl.log(beta1))
    bias2 = 1.0 - tl.exp(t * tl.log(beta2))
    step_size = lr / bias1
    rbias2 = 1.0 / tl.sqrt(bias2)
    start = pid.to(tl.int64) * BLOCK
    stride = nprog.to(tl.int64) * BLOCK
    for off in tl.range(start, n, stride):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask)
        g = tl.load(g_ptr + offs, mask=mask) * scale
        m = tl.load(m_ptr + offs, mask=mask)
        v = tl.load(v_ptr + offs, mask=mask)
        p = p * (1.0 - lr * wd)
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * g * g
        p = p - step_size * m / (tl.sqrt(v) * rbias2 + eps)
        tl.store(p_ptr + offs, p, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        tl.store(c_ptr + offs, p.to(tl.bfloat16), mask=mask)


def triton_update(k):
    def run(p, g, m, v, c, lr, step, scale):
        _adamw_persistent[(k,)](p, g, m, v, c, p.numel(), lr, step, scale, BETA1, BETA2, EPS, WD, BLOCK=2048)
    return run


def inductor_update(p, g, m, v, c, lr, step, scale):
    _update(p, g, m, v, c, lr, step, scale, BETA1, BETA2, EPS, WD)


def main():
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    print(torch.cuda.get_device_name(dev), sms, "SMs", torch.__version__, "triton", triton.__version__, flush=True)
    torch.manual_seed(0)
    # the check: Triton kernel against the eager update, one step, 1 M elements
    n = 1 << 20
    ref = [torch.randn(n, device=dev) * s for s in (0.02, 1e-3, 1e-4, 1e-6)]
    ref[3] = ref[3].abs()
    lr = torch.full((), 3e-4, device=dev)
    step = torch.full((), 7.0, device=dev)
    scale = torch.full((), 0.8, device=dev)
    a = [t.clone() for t in ref] + [torch.empty(n, device=dev, dtype=torch.bfloat16)]
    b = [t.clone() for t in ref] + [torch.empty(n, device=dev, dtype=torch.bfloat16)]
    adamw_update(a[0], a[1], a[2], a[3], a[4], lr, step, scale, BETA1, BETA2, EPS, WD)
    triton_update(64)(b[0], b[1], b[2], b[3], b[4], lr, step, scale)
    print("triton vs eager, largest difference: param %.2e m %.2e v %.2e copy %.2e" % tuple(
        (x.float() - y.float()).abs().max().item() for x, y in ((a[0], b[0]), (a[2], b[2]), (a[3], b[3]), (a[4], b[4]))),
        flush=True)

    # the update's tensors: 8 x 134 M parameters (the seed dims' experts of one layer, in halves)
    numel = 4096 * 16384 * 2
    state = [[torch.randn(numel, device=dev) * 0.02, torch.randn(numel, device=dev) * 1e-3,
              torch.zeros(numel, device=dev), torch.zeros(numel, device=dev),
              torch.empty(numel, device=dev, dtype=torch.bfloat16)] for _ in range(8)]
    x = torch.randn(5000, 4096, device=dev, dtype=torch.bfloat16)
    w1 = torch.randn(4096, 16384, device=dev, dtype=torch.bfloat16) * 0.01
    w2 = torch.randn(16384, 4096, device=dev, dtype=torch.bfloat16) * 0.01

    def gemms():
        y = x
        for _ in range(12):
            y = torch.nn.functional.gelu(y @ w1) @ w2
        return y

    def update(fn):
        for p, g, m, v, c in state:
            fn(p, g, m, v, c, lr, step, scale)

    variants = {"inductor": inductor_update}
    for k in (16, 33, 66, sms, 2 * sms, 4 * sms):
        variants[f"triton K={k}"] = triton_update(k)
    for fn in variants.values():  # compile / warm
        update(fn)
    gemms()
    torch.cuda.synchronize()

    def timed(body, reps=7):
        out = []
        for _ in range(reps):
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            body()
            e.record()
            torch.cuda.synchronize()
            out.append(s.elapsed_time(e))
        return statistics.median(out)

    t_gemm = timed(gemms)
    print(f"GEMMs alone {t_gemm:.2f} ms", flush=True)
    alone = {name: timed(lambda fn=fn: update(fn)) for name, fn in variants.items()}
    for name, t in alone.items():
        print(f"update alone, {name}: {t:.2f} ms ({30 * numel * 8 / t / 1e9:.2f} TB/s)", flush=True)

    def together(fn, compute_priority):
        comp = torch.cuda.Stream(dev, priority=compute_priority)
        side = torch.cuda.Stream(dev, priority=0)
        walls, spans = [], []
        for _ in range(7):
            torch.cuda.synchronize()
            s = torch.cuda.Event(enable_timing=True)
            s.record()
            comp.wait_event(s)
            side.wait_event(s)
            cs, ce, se = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            with torch.cuda.stream(side):
                update(fn)
                se.record()
            with torch.cuda.stream(comp):
                cs.record()
                gemms()
                ce.record()
            torch.cuda.synchronize()
            walls.append(max(s.elapsed_time(ce), s.elapsed_time(se)))
            spans.append(cs.elapsed_time(ce))
        return statistics.median(walls), statistics.median(spans)

    hi = torch.cuda.Stream(dev, priority=-100).priority  # torch maps it to the highest there is
    print("highest stream priority", hi, flush=True)
    for pname, prio in (("equal", 0), ("GEMMs high", hi)):
        for name, fn in variants.items():
            wall, span = together(fn, prio)
            serial = t_gemm + alone[name]
            print(f"together, {pname}, {name}: wall {wall:.2f} ms, GEMM span {span:.2f} (alone {t_gemm:.2f}), "
                  f"saved {serial - wall:.2f} of {alone[name]:.2f} ms", flush=True)


if __name__ == "__main__":
    main()

"""Where the training loop's blocks lose time against the block benchmark, on one GPU.

    torchrun --nproc-per-node 1 scripts/device/probe_gap15.py [--out DIR] [--small]

One seed block (d_model 4096, 16 experts, top-2, 8 sequences of 10,000 tokens), its attention
half and its MoE half (norm included, forward + backward) timed in four modes:

  block       bf16 weights, no autocast, 8 sequences at once (``bench_runtime.py``'s halves)
  block-2mb   the same in two micro-batches of 4 sequences
  loop-1mb    fp32 master weights under bf16 autocast on the bf16 stream (``epplan run``), 8 at once
  loop        the same in two micro-batches of 4 (``epplan run`` at seed dims, 2 micro-batches)

and, for ``block`` and ``loop``, the kernels of one step of each half by device time
(DIR/probe-prof.txt). Then the experts' weight-gradient GEMM at its shape (x[rows].T @ dh,
(D, R) @ (R, F)) for R = 5,000 and 10,000 rows per expert: bf16 output (the block), fp32 output
written (``torch.mm(..., out_dtype=)``), fp32 output accumulated (``torch.addmm(..., out_dtype=,
out=)``, beta = 1), and fp32 into a temporary then added; TF/s of each. Then the experts alone
(``expert_mlp``, forward + backward, fp32 masters of bf16 rows as in training) at R rows per
expert, with torch._grouped_mm and with one cuBLAS GEMM per expert (``experts.LOOP_MIN_ROWS``
set either way): where the runtime should switch. ``--small`` runs tiny dimensions (a CPU check
of the script); ``--skip-halves`` leaves out the halves and the GEMM variants.
"""

import argparse
import os
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench_runtime import even_placement  # noqa: E402
from epplan.runtime import experts  # noqa: E402
from epplan.runtime.calibrate import Timer  # noqa: E402
from epplan.runtime.expert_parallel import ExpertParallelExperts, ExpertParallelStats, _all_reduce_sum  # noqa: E402
from epplan.runtime.model import Block  # noqa: E402
from epplan.workload.config import PRESETS  # noqa: E402

MODES = {"block": (torch.bfloat16, False, 1), "block-2mb": (torch.bfloat16, False, 2),
         "loop-1mb": (torch.float32, True, 1), "loop": (torch.float32, True, 2)}


def build(config, dtype, device):
    torch.manual_seed(0)
    with torch.device(device):
        block = Block(config, is_moe=True, capacity_factor=None, expert_impl="grouped")
    block.to(dtype)
    moe = block.ffn
    stats = ExpertParallelStats.zeros(1, config.num_experts, 1)
    moe.experts = ExpertParallelExperts(moe.experts, even_placement(config.num_experts, 1), 0,
                                        dist.group.WORLD, stats)
    moe.router.reduce_load = partial(_all_reduce_sum, group=dist.group.WORLD)
    return block


def halves(block, x, g, autocast, micro, device):
    """(attention half, MoE half) step functions over ``micro`` micro-batches of x (B, T, D)."""
    xs, gs = x.chunk(micro), g.chunk(micro)
    ctx = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=autocast)

    def run(part):
        for p in block.parameters():
            p.grad = None
        for xi, gi in zip(xs, gs):
            h = xi.detach().requires_grad_()
            with ctx():
                y = h + block.attn(block.attn_norm(h)) if part == "attention" else block.ffn(block.ffn_norm(h))
            y.backward(gi)
    return partial(run, "attention"), partial(run, "moe")


def kernels(fn, device, rows=20):
    if device.type != "cuda":
        return ""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=90)


def wgrad(device, D, F, rows_list, timer):
    out = []
    for R in rows_list:
        x = torch.randn(2 * R, D, device=device).to(torch.bfloat16)  # (M, D), the expert's rows in the middle
        dh = torch.randn(R, F, device=device).to(torch.bfloat16)
        left = x[R // 2:R // 2 + R].t()  # (D, R), as expert_mlp_backward_weight slices it
        acc = torch.zeros(D, F, device=device)
        flops = 2 * D * F * R
        variants = {
            "bf16 out (block)": lambda: torch.mm(left, dh),
            "fp32 out, mm out_dtype": lambda: torch.mm(left, dh, out_dtype=torch.float32, out=acc),
            "fp32 accumulate, addmm out_dtype beta 1": lambda: torch.addmm(acc, left, dh, out_dtype=torch.float32, out=acc),
            "fp32 temp + add_": lambda: acc.add_(torch.mm(left, dh, out_dtype=torch.float32)),
            "bf16 out + fp32 add_": lambda: acc.add_(torch.mm(left, dh)),
            "addmm out_dtype, contiguous left": lambda: torch.addmm(acc, left.contiguous(), dh, out_dtype=torch.float32, out=acc),
        }
        for name, fn in variants.items():
            try:
                s = timer.seconds(fn)
                out.append(f"wgrad R={R} {name}: {s * 1e3:.3f} ms, {flops / s / 1e12:.0f} TF/s")
            except (RuntimeError, TypeError) as exc:
                out.append(f"wgrad R={R} {name}: failed ({type(exc).__name__}: {str(exc)[:120]})")
            print(out[-1], flush=True)
    return out


def crossover(device, config, rows_list, timer):
    """Per rows per expert: ms and TF/s of the experts' forward + backward, grouped vs loop."""
    E, D, F = config.num_experts, config.d_model, config.d_ff
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(E, D, F, device=device) * 0.02)
    w2 = torch.nn.Parameter(torch.randn(E, F, D, device=device) * 0.02)
    out, default = [], experts.LOOP_MIN_ROWS
    for R in rows_list:
        x = torch.randn(E * R, D, device=device).to(torch.bfloat16).requires_grad_()
        g = (torch.randn(E * R, D, device=device) * 1e-3).to(torch.bfloat16)

        def run():
            x.grad = w1.grad = w2.grad = None
            experts.expert_mlp(x, [R] * E, w1, w2, None, config.activation).backward(g)
        flops = 3 * 2 * 2 * E * R * D * F
        for name, loop_min in (("grouped", 10**12), ("loop", 0)):
            experts.LOOP_MIN_ROWS = loop_min
            try:
                s = timer.seconds(run)
            finally:
                experts.LOOP_MIN_ROWS = default
            out.append(f"experts R={R} {name}: {s * 1e3:.2f} ms, {flops / s / 1e12:.0f} TF/s")
            print(out[-1], flush=True)
        del x, g
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--skip-halves", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(0)
    config = PRESETS["seed"].replace(num_layers=1)
    batch = 8
    if args.small:
        config = config.replace(d_model=64, d_ff=128, num_heads=4, head_dim=16, num_kv_heads=4, seq_len=64)
    timer = Timer(device, iters=args.iters, warmup=2)
    lines, prof = [], []
    for mode, (dtype, autocast, micro) in ({} if args.skip_halves else MODES).items():
        block = build(config, dtype, device)
        gen = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(batch, config.seq_len, config.d_model, device=device, generator=gen).to(torch.bfloat16)
        g = (torch.randn(batch, config.seq_len, config.d_model, device=device, generator=gen) * 1e-3).to(torch.bfloat16)
        attn, moe = halves(block, x, g, autocast, micro, device)
        ms = {name: timer.seconds(fn) * 1e3 for name, fn in (("attention", attn), ("moe", moe))}
        lines.append(f"halves {mode}: attention {ms['attention']:.1f} ms, moe {ms['moe']:.1f} ms")
        print(lines[-1], flush=True)
        if mode in ("block", "loop"):
            for name, fn in (("attention", attn), ("moe", moe)):
                prof.append(f"== {mode} {name}\n{kernels(fn, device)}")
        del block, attn, moe
        if device.type == "cuda":
            torch.cuda.empty_cache()
    D, F = config.d_model, config.d_ff
    if not args.skip_halves:
        lines += wgrad(device, D, F, [50, 100] if args.small else [5000, 10000], timer)
    lines += crossover(device, config, [16, 32] if args.small else [2048, 4096, 5000, 6144, 8192, 10000], timer)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "probe-gap15.txt").write_text("\n".join(lines) + "\n")
    Path(args.out, "probe-prof.txt").write_text("\n\n".join(prof) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Where one GPU's MoE layer time goes: ours (per expert-GEMM choice) vs Megatron-Core's, op tables.

    torchrun --nproc-per-node 1 scripts/device/profile_moe.py --out DIR

The seed block's MoE layer (80,000 tokens, 16 experts on the GPU, forward + backward), as
``bench_runtime.py --peer megatron`` times it. Ours is timed with the expert GEMMs as the runtime
picks them (``experts.LOOP_MIN_ROWS``), always grouped, and always one GEMM per expert; then
both layers are profiled (torch.profiler, CUDA time per op) and the tables written to DIR.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
spec = importlib.util.spec_from_file_location("bench_runtime", ROOT / "scripts" / "bench_runtime.py")
bench_runtime = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_runtime)

from epplan.runtime import experts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="out/profile")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=80_000)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    bench_runtime.DEVICE = device
    bench = bench_runtime.BlockBench(dist.group.WORLD, device, args.tokens, 10_000)
    moe, theirs, ours = bench_runtime.megatron_and_ours(bench)
    default_min = experts.LOOP_MIN_ROWS
    result = {}
    for label, fn, loop_min in (("megatron", theirs, default_min), ("ours_default", ours, default_min),
                                ("ours_grouped", ours, 10**12), ("ours_loop", ours, 0),
                                ("megatron_again", theirs, default_min), ("ours_default_again", ours, default_min)):
        experts.LOOP_MIN_ROWS = loop_min
        result[label] = statistics.median(bench_runtime.events_ms(fn, args.iters, 2))
        print(label, round(result[label], 2), "ms", flush=True)
    experts.LOOP_MIN_ROWS = default_min
    from torch.profiler import ProfilerActivity, profile
    for label, fn in (("megatron", theirs), ("ours", ours)):
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30)
        (out / f"profile_{label}.txt").write_text(table)
        print(f"== {label}\n" + "\n".join(table.splitlines()[:22]), flush=True)
    (out / "profile_moe.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

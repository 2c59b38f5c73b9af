"""Benchmark one MoE transformer block of the founding spec, expert-parallel, forward + backward.

    torchrun --nproc-per-node 2 scripts/bench_runtime.py --out DIR

Dimensions: the ``seed`` preset (d_model 4096, expert hidden 16384, 32 x 128 heads, top-2, bf16,
sequences of 10,000 tokens, 16 experts), one block, experts split evenly over the ranks (8 per
GPU on 2 GPUs), ``--tokens-per-gpu`` tokens on every rank. Everything is measured in this one
run, on these GPUs:

  check     the chunked grouped path vs the reference paths at small dimensions (bf16 vs an fp32
            loop reference, and vs the unchunked bf16 path): forward and gradients;
  gemm      grouped expert GEMMs vs a dense GEMM of the same per-expert shape;
  sdpa      the fused attention kernels at 10,000 tokens (the fastest is used below);
  a2a       the runtime's uneven row exchange vs a raw even all_to_all_single of the same bytes,
            and a GEMM with an all-to-all beside it (what NCCL takes from the GEMM);
  block     step time per variant (reference = unchunked, no overlap; chunked C = 1, 2, ...):
            full step, compute-only step (row exchanges replaced by local copies), and a replay of
            the step's exchanges alone (comm-only); exposed = (full - compute) / comm.

Writes DIR/bench_runtime.json (every number) and prints a summary table last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from functools import partial
from pathlib import Path

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                      ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_name] = _value  # NVLink multicast stays off on shared hosts

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from epplan.placement.types import LayerPlacement  # noqa: E402
from epplan.runtime import overlap  # noqa: E402
from epplan.runtime.experts import GroupedExperts  # noqa: E402
from epplan.runtime.expert_parallel import (ExpertParallelExperts, ExpertParallelStats,  # noqa: E402
                                            _all_reduce_sum)
from epplan.runtime.model import Block  # noqa: E402
from epplan.workload.config import PRESETS  # noqa: E402
from epplan.workload.flops import model_costs  # noqa: E402

H100_PEAK = 989e12  # dense bf16, datasheet
SPEC_PEAK, SPEC_MFU = 400e12, 0.60  # the founding spec's usable rate and target


def log(*args) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


DEVICE = torch.device("cpu")  # set in main()


def events_ms(fn, iters: int, warmup: int = 1) -> list[float]:
    """Per-iteration times of fn on the current stream (device events), after warmup calls."""
    for _ in range(warmup):
        fn()
    if DEVICE.type != "cuda":  # --smoke on CPU
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def slowest(value: float) -> float:
    """Max over ranks (a step is as slow as its slowest rank)."""
    t = torch.tensor([value], dtype=torch.float64, device=DEVICE)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def even_placement(num_experts: int, num_ranks: int) -> LayerPlacement:
    per = num_experts // num_ranks
    return LayerPlacement(replicas=[np.array([e // per]) for e in range(num_experts)],
                          split=[np.ones((num_ranks, 1)) for _ in range(num_experts)])


# --- row exchanges: real, recorded, or replaced by local copies -----------------------------

REAL_EXCHANGE = overlap.exchange_rows


class _Done:
    def wait(self) -> None:
        pass


def local_exchange(out, x, output_splits, input_splits, group):
    """Compute-only stand-in: fill out from x's rows on this GPU (no communication)."""
    filled = 0
    while filled < out.shape[0] and x.shape[0] > 0:
        n = min(out.shape[0] - filled, x.shape[0])
        out[filled:filled + n].copy_(x[:n])
        filled += n
    return _Done()


def recording_exchange(log_list, out, x, output_splits, input_splits, group):
    log_list.append((list(output_splits), list(input_splits), x.shape[1], x.dtype, group))
    return REAL_EXCHANGE(out, x, output_splits, input_splits, group)


def replay_ms(recorded, iters: int) -> float:
    """Time the recorded exchanges alone, back to back, as the step issued them (same groups)."""
    rows = max(max(sum(o), sum(i)) for o, i, _, _, _ in recorded)
    dim, dtype = recorded[0][2], recorded[0][3]
    src = torch.randn(rows, dim, device=DEVICE).to(dtype)
    dst = torch.empty_like(src)

    def run():
        works = [REAL_EXCHANGE(dst[:sum(o)], src[:sum(i)], o, i, g) for o, i, _, _, g in recorded]
        for w in works:
            w.wait()
    return statistics.median(events_ms(run, iters, warmup=2))


# --- stages ------------------------------------------------------------------------------------

def check_correctness(group, device, small: bool = False) -> dict:
    """Small dimensions, same code paths: chunked grouped bf16 vs fp32 loop and bf16 unchunked."""
    G, rank = dist.get_world_size(group), dist.get_rank(group)
    E, D, F, N, k = (16, 32, 64, 64, 2) if small else (16, 1024, 4096, 8192, 2)
    torch.manual_seed(0)
    experts = GroupedExperts(E, D, F, "gelu").to(device, torch.bfloat16)
    layer = even_placement(E, G)
    stats = ExpertParallelStats.zeros(1, E, G)
    gen = torch.Generator(device=device).manual_seed(100 + rank)
    x = torch.randn(N, D, device=device, generator=gen).to(torch.bfloat16)
    scores = torch.rand(N, E, device=device, generator=gen)
    topk_idx = scores.topk(k, dim=1).indices
    topk_weight = torch.rand(N, k, device=device, generator=gen).softmax(dim=1)
    grad = torch.randn(N, D, device=device, generator=gen).to(torch.bfloat16)

    def run(module, dtype):
        xi = x.detach().to(dtype).clone().requires_grad_()
        y = module(xi, topk_idx, topk_weight)
        y.backward(grad.to(dtype))
        return y.detach(), xi.grad, module.w1.grad, module.w2.grad

    ref32 = ExpertParallelExperts(GroupedExperts(E, D, F, "gelu", impl="loop").to(device), layer, 0,
                                  group, stats, overlap=False)
    with torch.no_grad():
        ref32.w1.copy_(experts.w1[ref32.local_experts].float())
        ref32.w2.copy_(experts.w2[ref32.local_experts].float())
    expected = run(ref32, torch.float32)
    unchunked = run(ExpertParallelExperts(experts, layer, 0, group, stats, overlap=False), torch.bfloat16)
    out = {}
    thin = overlap.new_overlap_group(list(range(G)), max_ctas=4)
    for C, og, reserve in ((1, None, 0), (4, None, 0), (7, None, 0), (4, thin, 4)):
        got = run(ExpertParallelExperts(experts, layer, 0, group, stats, num_chunks=C,
                                        overlap_group=og, reserve_sms=reserve), torch.bfloat16)
        if og is not None:
            C = f"{C},ctas=4,reserve=4"
        names = ("out", "grad_x", "grad_w1", "grad_w2")
        out[f"chunks={C} vs fp32 loop"] = {n: slowest(rel_err(a, b)) for n, a, b in zip(names, got, expected)}
        out[f"chunks={C} vs bf16 unchunked"] = {n: slowest(rel_err(a, b))
                                                for n, a, b in zip(names, got, unchunked)}
    out["bf16 unchunked vs fp32 loop"] = {n: slowest(rel_err(a, b)) for n, a, b in
                                          zip(("out", "grad_x", "grad_w1", "grad_w2"), unchunked, expected)}
    return out


def bench_gemm(device, rows_per_expert: list[int], num_local: int, D: int, F: int) -> list[dict]:
    """Grouped GEMMs over num_local experts vs torch.mm of one expert's shape, TFLOP/s."""
    results = []
    w1 = torch.randn(num_local, D, F, device=device).to(torch.bfloat16) * 0.02
    w2 = torch.randn(num_local, F, D, device=device).to(torch.bfloat16) * 0.02
    for m in rows_per_expert:
        x = torch.randn(m * num_local, D, device=device).to(torch.bfloat16)
        a = torch.randn(m * num_local, F, device=device).to(torch.bfloat16)
        offs = torch.arange(1, num_local + 1, device=device, dtype=torch.int32) * m
        flops = 2 * m * num_local * D * F
        row = {"rows_per_expert": m}
        for name, fn in (
                ("grouped_up", lambda: torch._grouped_mm(x, w1, offs=offs)),
                ("grouped_down", lambda: torch._grouped_mm(a, w2, offs=offs)),
                ("dense_up", lambda: torch.mm(x[:m], w1[0])),
                ("dense_down", lambda: torch.mm(a[:m], w2[0]))):
            ms = statistics.median(events_ms(fn, 20, warmup=3))
            f = flops if name.startswith("grouped") else flops / num_local
            row[name] = f / (ms * 1e-3) / 1e12
        results.append(row)
        del x, a
    return results


def bench_sdpa(device, B: int, H: int, T: int, Dh: int) -> dict:
    out = {}
    q, k, v = (torch.randn(B, H, T, Dh, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    g = torch.randn(B, H, T, Dh, device=device, dtype=torch.bfloat16)
    flops = 3 * 2 * B * H * T * T * Dh  # causal: half of 4 B H T^2 Dh forward, x3 for training
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        def step():
            with sdpa_kernel([backend]):
                y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            y.backward(g)
        try:
            ms = statistics.median(events_ms(step, 5, warmup=2))
            out[backend.name] = {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}
        except RuntimeError as exc:
            out[backend.name] = {"error": str(exc).splitlines()[0][:200]}
    del q, k, v, g
    return out


def bench_a2a(group, device, rows: int, D: int, send_rows: list[int], recv_rows: list[int],
              limited: dict[int, object]) -> dict:
    """Uneven runtime exchange vs even raw all_to_all_single of the same bytes, and the raw one on
    each CTA-limited communicator in ``limited`` (CTAs -> group)."""
    G = dist.get_world_size(group)
    out = {}
    x = torch.randn(max(sum(send_rows), rows), D, device=device).to(torch.bfloat16)
    y = torch.empty(max(sum(recv_rows), rows), D, device=device, dtype=torch.bfloat16)
    nbytes = sum(send_rows) * D * 2
    common = torch.tensor([sum(send_rows)], device=device)
    dist.all_reduce(common, op=dist.ReduceOp.MIN, group=group)
    even = int(common.item()) // G * G  # the same on every rank
    raw = statistics.median(events_ms(
        lambda: dist.all_to_all_single(y[:even], x[:even], group=group), 10, warmup=3))
    ours = statistics.median(events_ms(
        lambda: REAL_EXCHANGE(y[:sum(recv_rows)], x[:sum(send_rows)], recv_rows, send_rows, group).wait(),
        10, warmup=3))
    out["bytes_per_rank"] = nbytes
    out["raw_even_ms"] = slowest(raw)
    out["runtime_uneven_ms"] = slowest(ours)
    out["raw_GBps"] = even * D * 2 / (out["raw_even_ms"] * 1e-3) / 1e9
    out["runtime_GBps"] = nbytes / (out["runtime_uneven_ms"] * 1e-3) / 1e9
    # Bytes that leave the GPU (the rest is a local copy): the fabric's share of the exchange.
    out["off_gpu_bytes_per_rank"] = nbytes - send_rows[dist.get_rank(group)] * D * 2
    for ctas, pg in sorted(limited.items()):
        ms = slowest(statistics.median(events_ms(
            lambda: dist.all_to_all_single(y[:even], x[:even], group=pg), 10, warmup=3)))
        out[f"raw_ctas{ctas}_ms"] = ms
        out[f"raw_ctas{ctas}_GBps"] = even * D * 2 / (ms * 1e-3) / 1e9
    return out


def bench_interference(group, device, D: int, F: int, m_per_expert: int, num_local: int,
                       a2a_rows: int, reserve_sms: int = 0) -> dict:
    """GEMM alone, all-to-all alone, both at once (the all-to-all issued first, on NCCL's stream).

    reserve_sms: the GEMM leaves that many SMs free (overlap.sm_carveout)."""
    x = torch.randn(m_per_expert * num_local, D, device=device).to(torch.bfloat16)
    w = torch.randn(num_local, D, F, device=device).to(torch.bfloat16) * 0.02
    offs = torch.arange(1, num_local + 1, device=device, dtype=torch.int32) * m_per_expert
    src = torch.randn(a2a_rows, D, device=device).to(torch.bfloat16)
    dst = torch.empty_like(src)
    def gemm():
        with overlap.sm_carveout(reserve_sms):
            torch._grouped_mm(x, w, offs=offs)
    comm = lambda: dist.all_to_all_single(dst, src, group=group)  # noqa: E731

    def both():
        work = dist.all_to_all_single(dst, src, group=group, async_op=True)
        gemm()
        work.wait()
    res = {name: slowest(statistics.median(events_ms(fn, 10, warmup=3)))
           for name, fn in (("gemm_ms", gemm), ("a2a_ms", comm), ("both_ms", both))}
    res["hidden_fraction"] = (res["gemm_ms"] + res["a2a_ms"] - res["both_ms"]) / res["a2a_ms"]
    return res


class BlockBench:
    """One seed-spec block, expert-parallel over ``group``, on ``tokens`` tokens per rank."""

    def __init__(self, group, device, tokens: int, seq: int, preset: str = "seed") -> None:
        self.group, self.device = group, device
        G = dist.get_world_size(group)
        self.config = PRESETS[preset].replace(num_layers=1, seq_len=seq)
        c = self.config
        torch.manual_seed(0)
        with torch.device(device):
            self.block = Block(c, is_moe=True, capacity_factor=None, expert_impl="grouped")
        self.block.to(torch.bfloat16)  # the router still computes in fp32
        moe = self.block.ffn
        self.stats = ExpertParallelStats.zeros(1, c.num_experts, G)
        moe.experts = ExpertParallelExperts(moe.experts, even_placement(c.num_experts, G), 0, group,
                                            self.stats)
        moe.router.reduce_load = partial(_all_reduce_sum, group=group)
        self.experts = moe.experts
        if device.type == "cuda":
            torch.cuda.empty_cache()
        self.batch = tokens // seq
        gen = torch.Generator(device=device).manual_seed(1 + dist.get_rank())
        self.x = torch.randn(self.batch, seq, c.d_model, device=device, generator=gen).to(torch.bfloat16)
        self.grad = (torch.randn(self.batch, seq, c.d_model, device=device, generator=gen) * 1e-3
                     ).to(torch.bfloat16)
        self.x.requires_grad_()
        self.sdpa_backends = None

    @property
    def tokens(self) -> int:
        return self.batch * self.config.seq_len

    def step(self) -> torch.Tensor:
        self.x.grad = None
        for p in self.block.parameters():
            p.grad = None
        with sdpa_kernel(self.sdpa_backends):
            out = self.block(self.x)
        out.backward(self.grad)
        return out

    def configure(self, overlap_on: bool, num_chunks: int | None, group=None, overlap_group=None,
                  reserve_sms: int = 0) -> None:
        self.experts.overlap, self.experts.num_chunks = overlap_on, num_chunks
        self.experts.group = group or self.group
        self.experts.overlap_group, self.experts.reserve_sms = overlap_group, reserve_sms

    def time_paired(self, rounds: int, warmup: int) -> dict:
        """Alternate full and compute-only steps; medians of each and of their differences."""
        full, compute = [], []
        for r in range(rounds + warmup):
            t_full = events_ms(self.step, 1, warmup=0)[0]
            overlap.exchange_rows = local_exchange
            try:
                t_compute = events_ms(self.step, 1, warmup=0)[0]
            finally:
                overlap.exchange_rows = REAL_EXCHANGE
            if r >= warmup:
                full.append(t_full)
                compute.append(t_compute)
        diffs = [a - b for a, b in zip(full, compute)]
        return {"step_ms": slowest(statistics.median(full)),
                "compute_only_ms": slowest(statistics.median(compute)),
                "exposed_ms": slowest(statistics.median(diffs)),
                "step_ms_spread": slowest(max(full) - min(full))}

    def time_step(self, iters: int, warmup: int, exchange=REAL_EXCHANGE) -> float:
        overlap.exchange_rows = exchange
        try:
            return slowest(statistics.median(events_ms(self.step, iters, warmup)))
        finally:
            overlap.exchange_rows = REAL_EXCHANGE

    def record_exchanges(self) -> list:
        recorded = []
        overlap.exchange_rows = partial(recording_exchange, recorded)
        try:
            self.step()
        finally:
            overlap.exchange_rows = REAL_EXCHANGE
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return recorded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens-per-gpu", type=int, default=None,
                        help="default: 80,000 (the spec's most); 256 with --smoke")
    parser.add_argument("--seq", type=int, default=None, help="default: 10,000; 32 with --smoke")
    parser.add_argument("--variants", default="reference,1,8,16,8/4,16/4,auto",
                        help="reference | C (chunks) | C/k (k-CTA overlap group, k SMs reserved) | auto")
    parser.add_argument("--rounds", type=int, default=6, help="paired rounds per variant")
    parser.add_argument("--peer", default="", help="megatron: also time Megatron-Core's MoELayer")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip", default="nccl",
                        help="comma list of stages to skip: check,gemm,sdpa,a2a,nccl,interference")
    parser.add_argument("--overlap-ctas", default="4,8",
                        help="CTA limits of the overlap communicator (interference stage)")
    parser.add_argument("--sdpa", default="fastest",
                        help="attention kernel of the block: fastest (of those the sdpa stage timed; "
                             "FLASH_ATTENTION when it is skipped) or a torch SDPBackend name")
    parser.add_argument("--out", default="out/bench")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, gloo, the tiny preset: exercise the script without a GPU")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if args.tokens_per_gpu is None:
        args.tokens_per_gpu = 256 if args.smoke else 80_000
    if args.seq is None:
        args.seq = 32 if args.smoke else 10_000
    if args.sdpa not in ("fastest", *SDPBackend.__members__):
        parser.error(f"--sdpa {args.sdpa}: use fastest or one of {', '.join(SDPBackend.__members__)}")

    global DEVICE
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.smoke:
        DEVICE = device = torch.device("cpu")
        dist.init_process_group("gloo")
        skip |= {"gemm", "sdpa", "nccl", "interference"}
        preset = "tiny"
    else:
        DEVICE = device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timedelta(seconds=180))
        preset = "seed"
    group = dist.group.WORLD
    G = dist.get_world_size()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"argv": sys.argv, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "device": torch.cuda.get_device_name(device) if not args.smoke else "cpu",
                    "num_gpus": G, "torch": torch.__version__, "cuda": torch.version.cuda,
                    "nccl": ".".join(map(str, torch.cuda.nccl.version())) if not args.smoke else "-",
                    # The transport NCCL may use (NCCL_P2P_DISABLE=1: through host memory).
                    "env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}}
    log(json.dumps(result))

    def save() -> None:
        if dist.get_rank() == 0:
            (out_dir / "bench_runtime.json").write_text(json.dumps(result, indent=1))

    if "check" not in skip:
        result["check"] = check_correctness(group, device, small=args.smoke)
        log("check", json.dumps(result["check"], indent=1))
        save()

    seed = PRESETS[preset]
    D, F, E = seed.d_model, seed.d_ff, seed.num_experts
    num_local = E // G
    rows_per_expert = args.tokens_per_gpu * seed.top_k * G // E  # balanced routing
    chunk_counts = sorted({int(v.split("/")[0]) for v in args.variants.split(",")
                           if v[0].isdigit()} | {8})
    if "sdpa" not in skip:
        result["sdpa"] = bench_sdpa(device, args.tokens_per_gpu // args.seq, seed.num_heads, args.seq,
                                    seed.head_dim)
        log("sdpa", json.dumps(result["sdpa"]))
        save()
    if "gemm" not in skip:
        sizes = sorted({max(rows_per_expert // c, 64) for c in chunk_counts} | {2048, 4096})
        result["gemm"] = bench_gemm(device, sizes, num_local, D, F)
        for row in result["gemm"]:
            log("gemm", json.dumps({k: round(v, 1) for k, v in row.items()}))
        save()
    if not args.smoke:
        torch.cuda.empty_cache()

    bench = BlockBench(group, device, args.tokens_per_gpu, args.seq, preset)
    sdpa_ok = {k: v for k, v in result.get("sdpa", {}).items() if "ms" in v}
    if args.sdpa != "fastest":
        best_sdpa = args.sdpa
    else:
        best_sdpa = min(sdpa_ok, key=lambda k: sdpa_ok[k]["ms"]) if sdpa_ok else "FLASH_ATTENTION"
    bench.sdpa_backends = [SDPBackend.__members__[best_sdpa]]
    costs = model_costs(bench.config)
    flops = 3 * costs.flops_fwd_moe_layer * bench.tokens  # per GPU, per step
    result["block"] = {"tokens_per_gpu": bench.tokens, "sdpa_backend": best_sdpa,
                       "model_flops_per_gpu": flops, "variants": {}}
    log(f"block: {bench.tokens} tokens/GPU, {flops / 1e12:.1f} TFLOP/GPU/step, sdpa {best_sdpa}")

    # Reference output of the unchunked path, for a full-size consistency check of each variant.
    bench.configure(False, None)
    ref_out = bench.step().detach().clone()
    ref_grad_x = bench.x.grad.detach().clone()
    # Variants: "reference" (unchunked, no overlap), "C" (C chunks, every exchange on the main
    # group), "C/k" (hidden exchanges on a k-CTA communicator, k SMs reserved), "auto" (what
    # parallelize_experts does by default: automatic C, DEFAULT_OVERLAP_CTAS).
    thin_groups: dict[int, object] = {}

    def thin(ctas: int):
        if ctas not in thin_groups:
            thin_groups[ctas] = overlap.new_overlap_group(list(range(G)), max_ctas=ctas)
        return thin_groups[ctas]

    for name in args.variants.split(","):
        if name == "reference":
            bench.configure(False, None)
        elif name == "auto":
            ctas = overlap.DEFAULT_OVERLAP_CTAS
            bench.configure(True, None, overlap_group=thin(ctas), reserve_sms=ctas)
        elif "/" in name:
            C, ctas = map(int, name.split("/"))
            bench.configure(True, C, overlap_group=thin(ctas), reserve_sms=ctas)
        else:
            bench.configure(True, int(name))
        out = bench.step()
        row = {"out_rel_err_vs_reference": slowest(rel_err(out.detach(), ref_out)),
               "grad_x_rel_err_vs_reference": slowest(rel_err(bench.x.grad, ref_grad_x))}
        del out
        recorded = bench.record_exchanges()
        row["num_exchanges"] = len(recorded)
        if name == "reference" and recorded:  # one rank exchanges nothing
            dispatch_splits = recorded[0][:2]  # (output_splits, input_splits) of the dispatch
        # Full steps and compute-only steps alternate, so that clock drift between them cancels.
        row.update(bench.time_paired(args.rounds, args.warmup))
        row["comm_only_ms"] = slowest(replay_ms(recorded, args.iters)) if recorded else 0.0
        row["exposed_fraction"] = row["exposed_ms"] / row["comm_only_ms"] if recorded else 0.0
        row["tflops_per_gpu"] = flops / (row["step_ms"] * 1e-3) / 1e12
        row["mfu_989"] = row["tflops_per_gpu"] * 1e12 / H100_PEAK
        row["peak_mem_gib"] = slowest(torch.cuda.max_memory_allocated() / 2**30
                                      if device.type == "cuda" else 0.0)
        result["block"]["variants"][name] = row
        log(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
        save()
    reference_comm = result["block"]["variants"]["reference"]["comm_only_ms"]
    for row in result["block"]["variants"].values():
        row["exposed_fraction_of_unchunked_comm"] = row["exposed_ms"] / reference_comm if reference_comm else 0.0
    del ref_out, ref_grad_x

    # NCCL stream priority and CTA limits (all exchanges on one group), at the best chunk count.
    timed = {k: v for k, v in result["block"]["variants"].items() if k.isdigit()}
    best_c = int(min(timed, key=lambda k: timed[k]["step_ms"])) if timed else 8
    if "nccl" not in skip:
        result["nccl_options"] = {}
        for label, hi, max_ctas in (("high_priority", True, None), ("max_ctas=8", False, 8),
                                    ("high_priority,max_ctas=16", True, 16)):
            try:
                opts = dist.ProcessGroupNCCL.Options()
                opts.is_high_priority_stream = hi
                if max_ctas:
                    opts.config.max_ctas = max_ctas
                pg = dist.new_group(list(range(G)), pg_options=opts)
                dist.barrier()
            except Exception as exc:  # an option this torch does not have
                result["nccl_options"][label] = {"error": repr(exc)[:200]}
                continue
            for C in sorted({best_c, 2 * best_c}):
                bench.configure(True, C, group=pg)
                row = {"step_ms": bench.time_step(args.iters, args.warmup)}
                recorded = bench.record_exchanges()
                row["comm_only_ms"] = slowest(replay_ms(recorded, args.iters))
                result["nccl_options"][f"{label} chunks={C}"] = row
                log("nccl", label, C, json.dumps(row))
            save()
    if "interference" not in skip:
        # One chunk's up-projection (C = 8) with one chunk's dispatch beside it.
        result["interference"] = {}
        m = max(rows_per_expert // 8, 64)
        setups = [("default group, no reserve", group, 0)]
        for ctas in [int(k) for k in args.overlap_ctas.split(",")]:
            og = overlap.new_overlap_group(list(range(G)), max_ctas=ctas)
            setups += [(f"ctas={ctas}, no reserve", og, 0), (f"ctas={ctas}, reserve={ctas}", og, ctas)]
        for label, pg, reserve in setups:
            result["interference"][label] = bench_interference(pg, device, D, F, m, num_local,
                                                                m * num_local, reserve)
            log("interference", label, json.dumps(result["interference"][label]))
        save()

    # Attention and MoE halves of the block, default settings (where the time goes).
    bench.configure(True, None, overlap_group=thin(overlap.DEFAULT_OVERLAP_CTAS),
                    reserve_sms=overlap.DEFAULT_OVERLAP_CTAS)
    h = bench.x.detach().requires_grad_()
    blk = bench.block

    def attn_half():
        h.grad = None
        for p in blk.parameters():
            p.grad = None
        with sdpa_kernel(bench.sdpa_backends):
            y = h + blk.attn(blk.attn_norm(h))
        y.backward(bench.grad)

    def moe_half():
        h.grad = None
        for p in blk.parameters():
            p.grad = None
        y = blk.ffn(blk.ffn_norm(h))
        y.backward(bench.grad)
    result["block"]["halves_ms"] = {
        "attention": slowest(statistics.median(events_ms(attn_half, args.iters, args.warmup))),
        "moe": slowest(statistics.median(events_ms(moe_half, args.iters, args.warmup)))}
    log("halves", json.dumps(result["block"]["halves_ms"]))

    if "a2a" not in skip and G > 1:
        recv_rows, send_rows = dispatch_splits
        for ctas in [int(k) for k in args.overlap_ctas.split(",")]:
            thin(ctas)
        result["a2a"] = bench_a2a(group, device, bench.tokens * seed.top_k, D, send_rows, recv_rows,
                                  thin_groups)
        log("a2a", json.dumps(result["a2a"]))
    save()

    if dist.get_rank() == 0:
        print_summary(result)
    if args.peer == "megatron":
        try:
            result["peer"] = bench_peer_megatron(bench, args.iters, args.warmup)
        except Exception as exc:  # the peer's import or setup; ours is measured already
            result["peer"] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        log("peer", json.dumps(result["peer"]))
        save()
    dist.destroy_process_group()


def bench_peer_megatron(bench: "BlockBench", iters: int, warmup: int) -> dict:
    """Megatron-Core's MoELayer (alltoall dispatcher) vs ours, MoE layer only, same tokens.

    Megatron-Core without Transformer Engine (not installable on the device): experts are its
    SequentialMLP (one cuBLAS GEMM per expert), router in fp32; its attention path would need
    TE's fused attention at 10,000 tokens, so only the MoE layers are compared.
    """
    import megatron.core

    moe, theirs, ours = megatron_and_ours(bench)
    c = bench.config
    costs = model_costs(c)
    flops = 3 * (costs.flops_routed_experts + costs.flops_router) * bench.tokens
    res = {"megatron_core": megatron.core.__version__,
           "experts": type(moe.experts).__name__, "dispatcher": type(moe.token_dispatcher).__name__}
    for name, fn in (("megatron_ms", theirs), ("ours_ms", ours)):
        res[name] = slowest(statistics.median(events_ms(fn, iters, warmup)))
        res[name.replace("_ms", "_tflops")] = flops / (res[name] * 1e-3) / 1e12
    return res


def megatron_and_ours(bench: "BlockBench"):
    """(Megatron-Core's MoELayer, a forward + backward of it, a forward + backward of ours) on
    the bench's tokens, the same layer shape."""
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    G = dist.get_world_size()
    c = bench.config
    parallel_state.initialize_model_parallel(expert_model_parallel_size=G)
    model_parallel_cuda_manual_seed(0)
    cfg = TransformerConfig(
        num_layers=1, hidden_size=c.d_model, num_attention_heads=c.num_heads,
        ffn_hidden_size=c.d_ff, moe_ffn_hidden_size=c.d_ff, num_moe_experts=c.num_experts,
        moe_router_topk=c.top_k, moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=c.router_aux_loss_coef,
        moe_router_dtype="fp32", add_bias_linear=False, gated_linear_unit=False,
        activation_func=F.gelu, bf16=True, params_dtype=torch.bfloat16,
        expert_model_parallel_size=G)
    builder = get_moe_module_spec_for_backend(LocalSpecProvider(), num_experts=c.num_experts,
                                              moe_grouped_gemm=False)
    moe = builder(config=cfg).cuda()
    hidden = bench.x.detach().transpose(0, 1).contiguous().requires_grad_()  # (T, B, D)
    grad = bench.grad.transpose(0, 1).contiguous()

    def theirs():
        hidden.grad = None
        for p in moe.parameters():
            p.grad = None
        out, _ = moe(hidden)
        out.backward(grad)

    ours_x = bench.x.detach().requires_grad_()

    def ours():
        ours_x.grad = None
        for p in bench.block.ffn.parameters():
            p.grad = None
        bench.block.ffn(ours_x).backward(bench.grad)
    return moe, theirs, ours


def print_summary(r: dict) -> None:
    b = r["block"]
    print(f"\n== {r['device']} x{r['num_gpus']}, torch {r['torch']}, NCCL {r['nccl']}, "
          f"{b['tokens_per_gpu']} tokens/GPU, {b['model_flops_per_gpu'] / 1e12:.1f} TFLOP/GPU/step")
    print(f"{'variant':<10}{'step ms':>9}{'compute':>9}{'exposed':>9}{'comm':>8}{'exp/comm':>9}"
          f"{'TF/s':>6}{'MFU989':>8}{'mem GiB':>8}{'err':>9}")
    for name, v in b["variants"].items():
        print(f"{name:<10}{v['step_ms']:9.1f}{v['compute_only_ms']:9.1f}{v['exposed_ms']:9.2f}"
              f"{v['comm_only_ms']:8.2f}{v['exposed_fraction']:9.2f}{v['tflops_per_gpu']:6.0f}"
              f"{v['mfu_989']:8.3f}{v['peak_mem_gib']:8.1f}{v['out_rel_err_vs_reference']:9.1e}")
    if "halves_ms" in b:
        print("halves ms", b["halves_ms"])
    for row in r.get("gemm", []):
        print("gemm", {k: round(v) for k, v in row.items()})
    if "a2a" in r:
        print("a2a", {k: round(v, 2) for k, v in r["a2a"].items()})
    for k, v in r.get("nccl_options", {}).items():
        print("nccl", k, v)
    for k, v in r.get("interference", {}).items():
        print("interference", k, {kk: round(vv, 3) for kk, vv in v.items()})


if __name__ == "__main__":
    main()

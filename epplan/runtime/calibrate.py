"""``epplan calibrate``'s measurements: the step's parts, timed on this GPU with the runtime's code.

Every timing is the median of ``iters`` runs after ``warmup`` runs, with CUDA events (host clocks
on CPU), on random data (never zeros); on CUDA each follows ``sustain_s`` seconds of GEMMs, so
that it sees the clock of a card under training's sustained load (``Timer``). Each result is
stored as a rate in the units of ``epplan.cost.calibration``: FLOP-bound parts as TFLOP/s (FLOPs
as ``epplan.workload.flops`` counts them), memory-bound parts as GB/s over ``epplan.cost.step``'s
byte count for that part.

What is timed (forward + backward unless said):

    gemm       F.linear on bf16 (tokens, k) x (n, k) for the model's attention projections and LM head
    expert     ``expert_mlp`` (grouped GEMMs, the activation) over ``num_local`` experts, at rows
               per expert from 128 to 16,384; "unchunked" is the path ``epplan run`` takes without
               overlap (and on one GPU), "chunked" one chunk of the overlap path
    attention  SDPA with the kernel order ``epplan run`` uses (``model.SDPA_BACKENDS``)
    attention_block  per model: a block's norm + attention as ``epplan run`` runs them (fp32
               weights, bf16 residual stream under bf16 autocast)
    lm_head    per model: the LM head and its loss as ``epplan run`` runs them
               (``linear_cross_entropy`` in chunks, the fp32 weight's bf16 copy kept, its fp32
               gradient made), forward + backward of one micro-batch, on CUDA after and behind
               one of the model's MoE blocks as in a step (the card at that model's clock)
    norm       F.rms_norm on the residual stream (bf16 on CUDA)
    cast       an fp32 weight cast to bf16, its gradient accumulated into the fp32 gradient
    loss       one chunk of ``epplan.runtime.loss``'s cross-entropy (bf16 logits in, their
               gradient out; compiled on CUDA as in training)
    moe_local  per model: the MoE layer on one rank (router, permutation, exchange, combine)
               minus its expert GEMMs (fresh tokens at every run; each the median of ``PAIRS``
               runs with work queued ahead, ``Timer.seconds(lead=True)``), at ``tokens`` and
               twice as many: a fixed cost per call and a rate over the bytes
    optimizer  gradient norm and ``TrainOptimizer.step`` with the clipping scale (on CUDA the
               one-pass AdamW that writes the bf16 copies, ``epplan.train.adamw``) over large
               tensors, half of them with a bf16 copy
    optimizer_fixed  per model: the trainer's whole step after backward (gradient sync, the
               statistics' all-gather, the gradient norm and its host sync, clipping, AdamW, the
               router-bias update) on the model's parameter tensors at tiny sizes: the per-step
               cost that does not scale with bytes (launches, host round trips), in seconds
               (the median of ``PAIRS`` runs); and its part up to the gradient norm's host sync
               (``before_sync_seconds``), which the device waits for in a step
    embedding  token + position embeddings
    collectives (several ranks, under torchrun): all_to_all_single and all_reduce over the world
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from epplan.cost import step as bytes_of
from epplan.runtime.experts import (expert_mlp, expert_mlp_backward_input, expert_mlp_backward_weight,
                                    expert_mlp_forward)
from epplan.runtime.loss import CHUNK_TOKENS, chunk_loss, linear_cross_entropy
from epplan.runtime.model import SDPA_BACKENDS, Attention, RMSNorm
from epplan.workload.config import ModelConfig
from epplan.workload.flops import model_costs

ROWS_PER_EXPERT = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# Runs of the two host-bound measurements (the MoE layer less its GEMMs, the step's fixed cost):
# their medians of 3 moved by 2x between calls on one H200 (docs/benchmarks.md, call Q).
PAIRS = 9
# Seconds of GEMMs queued ahead of a part timed with ``lead``: longer than the host takes to
# launch the part up to its first host sync (the LM head's chunks, the MoE layer's routing).
LEAD_S = 0.02


class Timer:
    """Median seconds of a callable on ``device``, ``iters`` timed runs after ``warmup``.

    ``sustain_s`` (CUDA only): before each measurement, that many seconds of back-to-back bf16
    GEMMs are queued ahead of it, so that the part is timed at the clock a training step runs at,
    not a cool card's. Measured on an H200 (docs/benchmarks.md, 2026-12-03 call P): the card
    idles at 1,980 MHz and holds 1,410-1,455 MHz at its 700 W limit within about a second of
    sustained GEMMs (the board's power average fills over that second); the attention half timed
    right after 5 s idle ran 9.2 % faster (Mixtral dims) than after 20 s of GEMMs. Nothing torch
    ships holds a clock for a benchmark (``torch.utils.benchmark`` warms up by run count), hence
    this.

    ``lead`` (``seconds``; CUDA only): each run is timed from behind ``LEAD_S`` of GEMMs queued
    ahead of it, so that the host launches it while the device is still busy, as in a training
    step, where the host runs ahead of the device between its syncs; from an idle stream the
    host's launch time adds to the device's wherever it is the longer. Measured on an H200
    (docs/benchmarks.md, 2026-12-05 call AG, ``probe_moe15.py``): the medium model's MoE layer took
    27.06 ms from an idle stream, 25.65 ms with work queued ahead and 25.8-26.9 ms a layer in
    training; at the seed dims, where the GEMMs are long, 219.6, 219.3 and 220.8 ms."""

    def __init__(self, device: torch.device, iters: int, warmup: int, sustain_s: float = 0.0) -> None:
        self.device, self.iters, self.warmup, self.sustain_s = device, iters, warmup, sustain_s
        self._heat: tuple[torch.Tensor, torch.Tensor, float] | None = None  # (a, out, seconds per GEMM)

    def _queue(self, seconds: float) -> None:
        """Queue about ``seconds`` of bf16 GEMMs on the current stream (no host sync after)."""
        if self._heat is None:
            a = torch.randn(8192, 8192, device=self.device, dtype=torch.bfloat16)
            out = torch.empty_like(a)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.mm(a, a, out=out)
            start.record()
            for _ in range(20):
                torch.mm(a, a, out=out)
            end.record()
            end.synchronize()
            # a cool card's GEMM is the fastest it will be: the count below errs on the long side
            self._heat = (a, out, start.elapsed_time(end) * 1e-3 / 20)
        a, out, per_gemm = self._heat
        for _ in range(max(1, math.ceil(seconds / per_gemm))):
            torch.mm(a, a, out=out)

    def _sustain(self) -> None:
        """Queue ``sustain_s`` seconds of GEMMs on the current stream (no host sync after)."""
        if self.sustain_s > 0 and self.device.type == "cuda":
            self._queue(self.sustain_s)

    def _once(self, fn: Callable[[], Any], lead: bool = False,
              ahead: Callable[[], Any] | None = None) -> float:
        """Seconds of one fn() on the device: from an idle stream, where the host's launch time
        shows where it binds; with ``lead``, from behind ``LEAD_S`` of queued GEMMs; with
        ``ahead``, from behind one ahead()."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if ahead is not None:
                ahead()
            elif lead:
                self._queue(LEAD_S)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e-3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def _prepare(self, *fns: Callable[[], Any], ahead: Callable[[], Any] | None = None) -> None:
        if ahead is None:
            self._sustain()
        else:
            self._repeat(ahead, self.sustain_s)
        for _ in range(self.warmup):
            for fn in fns:
                fn()
        if self.device.type == "cuda":
            # the first timed run must not be queued behind the sustaining GEMMs, or its host
            # time would hide under them
            torch.cuda.synchronize(self.device)

    def _repeat(self, fn: Callable[[], Any], seconds: float) -> None:
        """Run fn() back to back for about ``seconds`` (counted from one timed run; none if 0)."""
        if seconds <= 0:
            return
        once = max(self._once(fn), 1e-6)
        for _ in range(math.ceil(seconds / once)):
            fn()

    def seconds(self, fn: Callable[[], Any], iters: int | None = None, lead: bool = False,
                ahead: Callable[[], Any] | None = None) -> float:
        """Median seconds of fn() on the device over ``iters`` runs (default: the timer's), each
        from an idle stream or, with ``lead``, launched while queued work runs (class docstring).
        ``ahead``: the work training runs before fn, to time fn in its context: the sustain is
        ahead() repeated for ``sustain_s`` (on any device) in place of GEMMs, and on CUDA each run
        is launched behind one ahead() in place of ``LEAD_S`` of GEMMs."""
        self._prepare(fn, ahead=ahead)
        return statistics.median(self._once(fn, lead, ahead) for _ in range(iters or self.iters))


def _rand(*shape: int, device: torch.device, dtype: torch.dtype, scale: float = 1.0,
          requires_grad: bool = False) -> torch.Tensor:
    t = (torch.randn(*shape, device=device) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def _backward(y: torch.Tensor, g: torch.Tensor, *inputs: torch.Tensor) -> None:
    torch.autograd.backward(y, g)
    for t in inputs:
        t.grad = None


def measure_gemm(timer: Timer, k: int, n: int, tokens: int, dtype: torch.dtype) -> dict[str, Any]:
    dev = timer.device
    x = _rand(tokens, k, device=dev, dtype=dtype, requires_grad=True)
    w = _rand(n, k, device=dev, dtype=dtype, scale=0.02, requires_grad=True)
    g = _rand(tokens, n, device=dev, dtype=dtype)
    s = timer.seconds(lambda: _backward(F.linear(x, w), g, x, w))
    return {"k": k, "n": n, "tokens": tokens, "tflops": 3 * 2 * tokens * k * n / s / 1e12}


def measure_expert(timer: Timer, config: ModelConfig, num_local: int, rows: tuple[int, ...],
                   dtype: torch.dtype, chunked: bool) -> dict[str, Any]:
    dev, d, f = timer.device, config.d_model, config.d_ff
    w1 = _rand(num_local, d, f, device=dev, dtype=dtype, scale=0.02, requires_grad=True)
    w2 = _rand(num_local, f, d, device=dev, dtype=dtype, scale=0.02, requires_grad=True)
    w3 = (_rand(num_local, d, f, device=dev, dtype=dtype, scale=0.02, requires_grad=True)
          if config.activation == "swiglu" else None)
    flops_per_row = 2 * (3 if w3 is not None else 2) * d * f
    points = []
    for m in rows:
        counts = [m] * num_local
        x = _rand(m * num_local, d, device=dev, dtype=dtype, requires_grad=not chunked)
        g = _rand(m * num_local, d, device=dev, dtype=dtype)
        if chunked:
            bounds = [i * m for i in range(num_local + 1)]
            grouped = dev.type == "cuda" and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            offs = torch.tensor(bounds[1:], dtype=torch.int32, device=dev) if grouped else None
            grads = tuple(None if w is None else torch.empty_like(w) for w in (w1, w2, w3))

            def run() -> None:
                with torch.no_grad():
                    y, saved = expert_mlp_forward(x, bounds, offs, w1, w2, w3, config.activation)
                    dx, dh, dg = expert_mlp_backward_input(g, saved, bounds, offs, w1, w2, w3,
                                                           config.activation)
                    expert_mlp_backward_weight(x, g, dh, dg, saved, bounds, grads, accumulate=False)
        else:
            def run() -> None:
                y = expert_mlp(x, counts, w1, w2, w3, config.activation)
                _backward(y, g, x, w1, w2, *(() if w3 is None else (w3,)))
        s = timer.seconds(run)
        points.append([m, 3 * flops_per_row * m * num_local / s / 1e12])
        del x, g
    return {"d_model": d, "d_ff": f, "activation": config.activation, "num_local": num_local,
            "path": "chunked" if chunked else "unchunked", "points": points}


def measure_attention(timer: Timer, config: ModelConfig, tokens: int, dtype: torch.dtype) -> dict[str, Any]:
    dev, c = timer.device, config
    batch = max(1, tokens // c.seq_len)
    q, k, v = (_rand(batch, c.num_heads, c.seq_len, c.head_dim, device=dev, dtype=dtype, requires_grad=True)
               for _ in range(3))
    g = _rand(batch, c.num_heads, c.seq_len, c.head_dim, device=dev, dtype=dtype)
    backend = "none"
    for b in SDPA_BACKENDS:  # the first kernel that runs these inputs is the one run picks
        try:
            with sdpa_kernel([b]):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
            backend = b.name
            break
        except RuntimeError:
            continue

    def run() -> None:
        with sdpa_kernel(SDPA_BACKENDS, set_priority=True):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        _backward(y, g, q, k, v)
    s = timer.seconds(run)
    flops = 3 * model_costs(c).flops_attention_scores * batch * c.seq_len
    return {"seq_len": c.seq_len, "num_heads": c.num_heads, "head_dim": c.head_dim, "batch": batch,
            "backend": backend, "tflops": flops / s / 1e12}


def _stream_dtype(dev: torch.device) -> torch.dtype:
    """The residual stream's dtype in ``epplan run`` on this device (bf16 under CUDA autocast)."""
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


def measure_attention_block(timer: Timer, config: ModelConfig, tokens: int) -> dict[str, Any]:
    """A block's attention half (``RMSNorm`` + ``Attention``) as ``epplan run`` trains it: fp32
    weights, the residual stream in bf16 under bf16 autocast on CUDA; TFLOP/s over the
    projections' and the scores' FLOPs."""
    dev, c = timer.device, config
    batch = max(1, tokens // c.seq_len)
    with torch.device(dev):
        norm, attn = RMSNorm(c.d_model), Attention(c)
    for w in attn.parameters():
        nn.init.normal_(w, std=0.02)
    x = _rand(batch, c.seq_len, c.d_model, device=dev, dtype=_stream_dtype(dev), requires_grad=True)
    g = _rand(batch, c.seq_len, c.d_model, device=dev, dtype=_stream_dtype(dev))

    def run() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            y = attn(norm(x))
        _backward(y, g.to(y.dtype), x, *norm.parameters(), *attn.parameters())
    s = timer.seconds(run)
    costs = model_costs(c)
    flops = 3 * batch * c.seq_len * (costs.flops_attention_proj + costs.flops_attention_scores)
    return {"d_model": c.d_model, "seq_len": c.seq_len, "num_heads": c.num_heads,
            "num_kv_heads": c.num_kv_heads, "head_dim": c.head_dim, "batch": batch,
            "tflops": flops / s / 1e12}


def measure_lm_head(timer: Timer, config: ModelConfig, tokens: int, dtype: torch.dtype = torch.bfloat16,
                    context: bool = True) -> dict[str, Any]:
    """The LM head and loss of one micro-batch of ``tokens`` as ``epplan run`` trains them
    (``linear_cross_entropy`` under bf16 autocast on CUDA: the fp32 weight's bf16 copy kept
    across calls, as the optimizer keeps it, chunks of ``CHUNK_TOKENS``, the fp32 weight gradient
    written); TFLOP/s over the head's training FLOPs.

    With ``context`` (on CUDA), timed where training runs it: after one of the model's own MoE
    blocks (``_one_block``, forward + backward at the same tokens), which is the sustained load
    before it and the work each run is launched behind (``Timer.seconds``' ``ahead``), rather
    than GEMMs a step does not run. Measured on one H100 (2026-12-07, call AM, docs/benchmarks.md):
    the medium model's head 626.5 and 662.8 TFLOP/s after its block against 624.0 and 648.7 after
    GEMMs (+0.4 %, +2.2 %), the seed dims' 691.7 against 686.2, though the card held 1,665 MHz
    during the medium block against 1,410 during the GEMMs (a 100 ms log: the head's own 20 ms
    GEMMs seem to set the clock it runs at). A small change, kept because it is the step's own
    context; the medium model's training ran its head 7-9 % faster than AM calibrated it (calls
    AF, AH, AJ: 10-18 %), not explained. Without ``context``, behind ``Timer``'s GEMMs (``lead``).
    """
    dev, c = timer.device, config
    w = _rand(c.vocab_size, c.d_model, device=dev, dtype=torch.float32, scale=0.02, requires_grad=True)
    h = _rand(tokens, c.d_model, device=dev, dtype=_stream_dtype(dev), requires_grad=True)
    target = torch.randint(0, c.vocab_size, (tokens,), device=dev)

    def run() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = linear_cross_entropy(h, w, target)
        _backward(loss, torch.ones((), device=dev), h, w)
    ahead = _one_block(c, dev, dtype, tokens) if context and dev.type == "cuda" else None
    s = timer.seconds(run, lead=True, ahead=ahead)
    return {"d_model": c.d_model, "vocab_size": c.vocab_size, "tokens": tokens,
            "tflops": 3 * model_costs(c).flops_lm_head * tokens / s / 1e12}


def _one_layer_model(config: ModelConfig, dev: torch.device, dtype: torch.dtype) -> nn.Module:
    """A ``Transformer`` of ``config``'s first MoE block alone (no dense layers), its experts
    all on this rank as a one-node ``epplan run`` holds them (``parallelize_experts`` on a group
    of this process alone, no overlap), in ``dtype``."""
    from epplan.placement.types import Placement, LayerPlacement
    from epplan.runtime.expert_parallel import parallelize_experts
    from epplan.runtime.model import Transformer
    import numpy as np

    c = config.replace(num_layers=1, num_dense_layers=0)
    group = dist.new_group([dist.get_rank()])
    E = c.num_experts
    layer = LayerPlacement(replicas=[np.array([0]) for _ in range(E)], split=[np.ones((1, 1)) for _ in range(E)])
    with torch.device(dev):
        model = Transformer(c)
    # parallelize_experts checks the placement against the group's size (1), not the world's.
    parallelize_experts(model, Placement(1, E, [layer]), group=group, overlap=False)
    model.layers[0].ffn.experts.to(dtype)  # bf16 expert weights: their casts are timed as "cast"
    return model


def _one_block(config: ModelConfig, dev: torch.device, dtype: torch.dtype, tokens: int) -> Callable[[], None]:
    """Forward + backward of one of ``config``'s MoE blocks (``_one_layer_model``) over
    ``tokens`` fresh tokens of the residual stream in sequences of ``seq_len``, as a training
    step runs it."""
    block = _one_layer_model(config, dev, dtype).layers[0]
    seq = min(config.seq_len, tokens)  # sequences of the model's length, as in a micro-batch
    x = _rand(max(tokens // seq, 1), seq, config.d_model, device=dev, dtype=_stream_dtype(dev), requires_grad=True)
    g = _rand(*x.shape, device=dev, dtype=_stream_dtype(dev))

    def run() -> None:
        with torch.no_grad():
            x.normal_()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            y = block(x)
        _backward(y, g, x, *block.parameters())
    return run


def tiny_like(config: ModelConfig) -> ModelConfig:
    """``config`` with every parameter tensor it has, at tiny sizes (the same tensors, layers and
    experts; d_model 64, d_ff 64, one head of 64, vocab 512, 64 positions)."""
    return config.replace(d_model=64, d_ff=64, dense_d_ff=64 if config.dense_d_ff else 0, num_heads=1,
                          num_kv_heads=1, head_dim=64, vocab_size=512, seq_len=64)


def measure_optimizer_fixed(timer: Timer, config: ModelConfig) -> dict[str, Any]:
    """``Trainer.train_step`` after the backward, on one rank (a group of this process alone),
    for ``config``'s parameter tensors at tiny sizes: the step's cost that bytes do not capture
    (kernel launches per tensor, the statistics' all-gather and the gradient norm's host sync),
    seconds. The calls are the trainer's own, in its order."""
    from epplan.placement.types import Placement, LayerPlacement
    from epplan.runtime.expert_parallel import get_stats, parallelize_experts, sync_gradients
    from epplan.runtime.model import Transformer
    from epplan.train.metrics import gather_step_stats
    from epplan.train.optim import TrainOptimizer
    from epplan.train.trainer import global_grad_norm
    import numpy as np

    dev, c = timer.device, tiny_like(config)
    group = dist.new_group([dist.get_rank()])
    E = c.num_experts
    layer = LayerPlacement(replicas=[np.array([0]) for _ in range(E)], split=[np.ones((1, 1)) for _ in range(E)])
    with torch.device(dev):
        model = Transformer(c)
    parallelize_experts(model, Placement(1, E, [layer] * c.num_moe_layers), group=group, overlap=False)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = TrainOptimizer(model, "none", lr=1e-4, weight_decay=0.1, fused=dev.type == "cuda")
    loss = torch.zeros((), device=dev)

    def to_sync() -> torch.Tensor:
        sync_gradients(model)
        grad_norm = global_grad_norm(model)
        # the trainer's host sync, the gradient norm with the statistics
        gather_step_stats(loss, loss, get_stats(model), 1, with_matrices=False, grad_norm=grad_norm)
        return grad_norm

    def run() -> None:
        grad_norm = to_sync()
        opt.step(grad_scale=(1.0 / (grad_norm + 1e-6)).clamp(max=1.0))
        model.update_router_biases()
    runs = max(timer.iters, PAIRS)
    whole = timer.seconds(run, iters=runs)
    return {"num_tensors": len(params), "seconds": whole,
            "before_sync_seconds": min(timer.seconds(to_sync, iters=runs), whole)}


def measure_memory(timer: Timer, config: ModelConfig, tokens: int, dtype: torch.dtype) -> dict[str, float]:
    """GB/s of each memory-bound part over its byte count (``epplan.cost.step``)."""
    dev, c, out = timer.device, config, {}
    d = c.d_model
    def autocast() -> torch.autocast:
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    x = _rand(tokens, d, device=dev, dtype=_stream_dtype(dev), requires_grad=True)
    w = torch.ones(d, device=dev, requires_grad=True)
    gy = _rand(tokens, d, device=dev, dtype=_stream_dtype(dev))
    norm_module = RMSNorm(d).to(dev)

    def norm() -> None:
        with autocast():
            y = norm_module(x)
        _backward(y, gy, x, *norm_module.parameters())
    out["norm"] = bytes_of.norm_bytes(tokens, d) / timer.seconds(norm) / 1e9
    del x, gy

    params = 64 * 2**20 if dev.type == "cuda" else 2**20
    master = _rand(params, device=dev, dtype=torch.float32, scale=0.02, requires_grad=True)
    gcast = _rand(params, device=dev, dtype=dtype)
    master.grad = torch.zeros_like(master)

    def cast() -> None:
        master.to(dtype).backward(gcast)  # accumulates into master.grad, as a later micro-batch does
    out["cast"] = bytes_of.cast_bytes(params) / timer.seconds(cast) / 1e9
    del master, gcast

    # One chunk of the chunked LM-head loss, as training runs it (compiled on CUDA: the first
    # warm-up call compiles).
    loss_tokens = min(tokens, CHUNK_TOKENS)
    logits = _rand(loss_tokens, c.vocab_size, device=dev, dtype=dtype)
    target = torch.randint(0, c.vocab_size, (loss_tokens,), device=dev)
    out["loss"] = (bytes_of.loss_bytes(loss_tokens, c.vocab_size)
                   / timer.seconds(lambda: chunk_loss(logits, target)) / 1e9)
    del logits

    # Large tensors: at 64 Mi parameters the step ran at 2.4-2.6 TB/s over its bytes, against
    # 3.4 TB/s in training with 4.7 G parameters (one H200, docs/benchmarks.md). Half of them
    # have a bf16 copy (the experts and the LM head do in training), which the step rewrites.
    from epplan.runtime.experts import compute_copy
    from epplan.train.optim import TrainOptimizer

    opt_params = 8 * params if dev.type == "cuda" else params
    tensors = nn.ParameterList(nn.Parameter(_rand(opt_params // 8, device=dev, dtype=torch.float32, scale=0.02))
                               for _ in range(8))
    for t in tensors:
        t.grad = _rand(*t.shape, device=dev, dtype=torch.float32, scale=1e-3)
    copied = list(tensors)[:4]
    for t in copied:
        compute_copy(t, dtype)
    opt = TrainOptimizer(tensors, "none", lr=1e-4, weight_decay=0.1, fused=dev.type == "cuda")

    def optimizer() -> None:  # as Trainer.train_step: the norm, the clip, TrainOptimizer.step
        grads = [t.grad for t in tensors]
        norm = torch.stack(torch._foreach_norm(grads, dtype=torch.float32)).square().sum().sqrt()
        opt.step(grad_scale=(1.0 / (norm + 1e-6)).clamp(max=1.0))
        for t in copied:  # the unfused step drops the copies; training makes them again
            compute_copy(t, dtype)
    nbytes = bytes_of.optimizer_bytes(opt_params, sum(t.numel() for t in copied) if dtype != torch.float32 else 0)
    out["optimizer"] = nbytes / timer.seconds(optimizer) / 1e9
    del tensors, opt, copied

    emb = nn.Embedding(c.vocab_size, d, device=dev)
    pos = nn.Embedding(c.seq_len, d, device=dev)
    seqs = max(1, tokens // c.seq_len)
    idx = torch.randint(0, c.vocab_size, (seqs, c.seq_len), device=dev)
    ge = _rand(seqs, c.seq_len, d, device=dev, dtype=_stream_dtype(dev))

    def embedding() -> None:  # as the model: the sum, cast to the residual stream's dtype
        y = (emb(idx) + pos(torch.arange(c.seq_len, device=dev))).to(_stream_dtype(dev))
        _backward(y, ge, emb.weight, pos.weight)
    out["embedding"] = bytes_of.embedding_bytes(seqs * c.seq_len, d) / timer.seconds(embedding) / 1e9
    del emb, pos, ge

    return out


def fixed_and_rate(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(seconds per call, bytes/s) of the line through two measured (bytes, seconds) points:
    the fixed cost where the bytes are nil, and the rate over them. A line with a negative
    fixed cost or no positive slope (noise: the two differ by less than it) is replaced by the
    rate through the larger point alone, with no fixed cost."""
    (b1, s1), (b2, s2) = sorted(points)
    slope = (s2 - s1) / (b2 - b1) if b2 > b1 else 0.0
    if slope <= 0 or s1 - b1 * slope < 0:
        return 0.0, b2 / s2
    return s1 - b1 * slope, 1.0 / slope


def measure_moe_local(timer: Timer, config: ModelConfig, tokens: int, dtype: torch.dtype) -> dict[str, float]:
    """The MoE layer on one rank (``parallelize_experts`` on a group of this process alone, no
    overlap: the path of a one-node ``epplan run``) minus its expert GEMMs alone, at ``tokens``
    and twice as many: {"gbps", "fixed_seconds"} (``fixed_and_rate``; GB/s over
    ``epplan.cost.step.moe_local_bytes``). Every run routes fresh tokens, so the GEMMs see new
    row counts as they do at every training step (a count the library has not seen costs 100-185
    us of host time per launch: docs/benchmarks.md, call L). The layer and the GEMMs alone are
    each the median of ``PAIRS`` runs launched behind queued work (``Timer``'s ``lead``), as a
    training step launches them. Not the median of alternated differences, which on an H200 came
    out 1.4-2.1 ms above the difference of the medians on three shapes and put the medium model's
    layer 11-16 % over its training time (2026-12-05, calls AF and AG)."""
    dev, c = timer.device, config.replace(num_layers=1, num_dense_layers=0, num_shared_experts=0)
    E = c.num_experts
    moe = _one_layer_model(c, dev, dtype).layers[0].ffn
    experts = moe.experts
    ws = [w for w in (experts.w1, experts.w2, experts.w3) if w is not None]
    d = c.d_model
    points = []
    for t in (tokens, 2 * tokens):
        # As in training: the residual stream (bf16 on CUDA) under autocast (the router upcasts it).
        x = _rand(t, d, device=dev, dtype=_stream_dtype(dev), requires_grad=True)
        g = _rand(t, d, device=dev, dtype=_stream_dtype(dev))

        def run() -> None:
            with torch.no_grad():  # new tokens: new routing, new row counts per expert, as at every step
                x.normal_()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                y = moe(x.view(1, t, d)).view(t, d)
            _backward(y, g, x, *moe.parameters())
        # The expert GEMMs alone at the same rows (balanced: the rows the router gives are close).
        rows = t * c.top_k // E
        xe = _rand(rows * E, d, device=dev, dtype=dtype, requires_grad=True)
        ge = _rand(rows * E, d, device=dev, dtype=dtype)

        def gemms() -> None:
            _backward(expert_mlp(xe, [rows] * E, experts.w1, experts.w2, experts.w3, c.activation), ge, xe, *ws)
        runs = max(timer.iters, PAIRS)
        local_s = timer.seconds(run, iters=runs, lead=True) - timer.seconds(gemms, iters=runs, lead=True)
        points.append((bytes_of.moe_local_bytes(t, d, c.top_k), max(local_s, 1e-6)))
        del x, g, xe, ge
    fixed, rate = fixed_and_rate(points)
    return {"gbps": rate / 1e9, "fixed_seconds": fixed}


def measure_collectives(timer: Timer, sizes: tuple[int, ...]) -> dict[str, list[dict[str, Any]]]:
    """all_to_all_single and all_reduce over the world, bytes per rank in ``sizes``, GB/s algbw."""
    dev, G = timer.device, dist.get_world_size()
    a2a, ar = [], []
    for nbytes in sizes:
        n = max(G, nbytes // 2 // G * G)
        x = torch.randn(n, device=dev).to(torch.bfloat16)
        y = torch.empty_like(x)
        a2a.append([n * 2, n * 2 / timer.seconds(lambda: dist.all_to_all_single(y, x)) / 1e9])
        ar.append([n * 2, n * 2 / timer.seconds(lambda: dist.all_reduce(x)) / 1e9])
    return {"all_to_all": [{"group_size": G, "points": a2a}], "all_reduce": [{"group_size": G, "points": ar}]}


def calibrate(configs: list[ModelConfig], device: torch.device, tokens: int = 32768,
              num_local: int = 8, iters: int = 5, warmup: int = 2,
              rows: tuple[int, ...] = ROWS_PER_EXPERT, sustain_s: float = 0.0) -> dict[str, Any]:
    """Every table of a calibration file for ``configs``' shapes, on ``device`` (a dict; the
    caller adds provenance), each part timed after ``sustain_s`` seconds of load (``Timer``).
    Needs ``torch.distributed`` initialised (a group of one is fine)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    timer = Timer(device, iters, warmup, sustain_s)
    gemm, expert, attention, memory, blocks, moe_local, heads, fixed = {}, [], {}, {}, {}, {}, {}, {}
    seen_expert = set()
    for c in configs:
        q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        for k, n in ((c.d_model, q_width), (c.d_model, 2 * kv_width), (q_width, c.d_model),
                     (c.d_model, c.vocab_size)):
            if (k, n) not in gemm:
                gemm[(k, n)] = measure_gemm(timer, k, n, min(tokens, 16384) if n > 65536 else tokens, dtype)
        shapes = [(c.d_model, c.d_ff, c.activation)]
        for shape in shapes:
            if shape not in seen_expert:
                seen_expert.add(shape)
                for chunked in (False, True):
                    expert.append(measure_expert(timer, c, num_local, rows, dtype, chunked))
        key = (c.seq_len, c.num_heads, c.head_dim)
        if key not in attention:
            attention[key] = measure_attention(timer, c, tokens, dtype)
        key = (c.d_model, c.seq_len, c.num_heads, c.num_kv_heads, c.head_dim)
        if key not in blocks:
            blocks[key] = measure_attention_block(timer, c, tokens)
        key = (c.d_model, c.vocab_size)
        if key not in heads:
            heads[key] = measure_lm_head(timer, c, tokens, dtype)
        row = measure_optimizer_fixed(timer, c)
        fixed.setdefault(row["num_tensors"], row)
        if not memory:
            memory = measure_memory(timer, c, tokens, dtype)
        key = (c.d_model, c.num_experts, c.top_k)
        if key not in moe_local:
            moe_local[key] = measure_moe_local(timer, c, tokens, dtype)
            memory.setdefault("moe_local", moe_local[key]["gbps"])  # the rate of shapes not measured
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = {"gemm": list(gemm.values()), "expert": expert, "attention": list(attention.values()),
           "memory": memory, "collectives": {}, "attention_block": list(blocks.values()),
           "moe_local": [{"d_model": d, "num_experts": e, "top_k": k, **v} for (d, e, k), v in moe_local.items()],
           "lm_head": list(heads.values()), "optimizer_fixed": list(fixed.values())}
    if dist.get_world_size() > 1:
        out["collectives"] = measure_collectives(timer, (2**20, 2**24, 2**28))
    return out

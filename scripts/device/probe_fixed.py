"""Where the step's host-bound time goes after the backward (issue 15, the medium model).

    python3 scripts/device/probe_fixed.py scripts/device/medium.yaml [--full]

Builds the model as ``epplan.runtime.calibrate.measure_optimizer_fixed`` does (one rank, a group
of this process alone), at ``tiny_like`` sizes and (``--full``) at the model's own, with random
gradients, then times each call of ``Trainer.train_step`` after the backward, in its order, 15
times: per call the host seconds (perf_counter, no sync), and the seconds to the device's
completion of everything queued (a sync after it). Prints the medians, and the whole sequence
timed as calibrate times it (CUDA events around it from an idle stream, median of 9).
"""

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from epplan.placement.types import LayerPlacement, Placement  # noqa: E402
from epplan.runtime.calibrate import Timer, tiny_like  # noqa: E402
from epplan.runtime.expert_parallel import get_stats, parallelize_experts, sync_gradients  # noqa: E402
from epplan.runtime.model import Transformer  # noqa: E402
from epplan.train.metrics import gather_step_stats  # noqa: E402
from epplan.train.optim import TrainOptimizer  # noqa: E402
from epplan.train.trainer import global_grad_norm  # noqa: E402
from epplan.workload.config import load_model_config  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(c, dev):
    group = dist.new_group([0])
    E = c.num_experts
    layer = LayerPlacement(replicas=[np.array([0]) for _ in range(E)], split=[np.ones((1, 1)) for _ in range(E)])
    with torch.device(dev):
        model = Transformer(c)
    parallelize_experts(model, Placement(1, E, [layer] * c.num_moe_layers), group=group, overlap=False)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = TrainOptimizer(model, "none", lr=1e-4, weight_decay=0.1, fused=dev.type == "cuda")
    return model, opt


def parts(model, opt, loss):
    state = {}

    def norm():
        state["n"] = global_grad_norm(model)

    def item():
        state["n"].item()

    def step():
        opt.step(grad_scale=(1.0 / (state["n"] + 1e-6)).clamp(max=1.0))

    return [("sync_gradients", lambda: sync_gradients(model)),
            ("gather_step_stats", lambda: gather_step_stats(loss, loss, get_stats(model), 1, with_matrices=False)),
            ("global_grad_norm", norm), ("item", item), ("optimizer.step", step),
            ("update_router_biases", model.update_router_biases)]


def probe(name, c, dev):
    model, opt = build(c, dev)
    loss = torch.zeros((), device=dev)
    calls = parts(model, opt, loss)
    for _ in range(3):
        for _, fn in calls:
            fn()
    sync()
    host = {k: [] for k, _ in calls}
    done = {k: [] for k, _ in calls}
    for _ in range(15):
        for k, fn in calls:
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            sync()
            host[k].append(t1 - t0)
            done[k].append(time.perf_counter() - t0)
    timer = Timer(dev, iters=9, warmup=2, sustain_s=0.0)
    whole = timer.seconds(lambda: [fn() for _, fn in calls], iters=9)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {len(list(model.parameters()))} tensors, {n_params / 1e6:.1f} M parameters; "
          f"whole sequence (calibrate's timing) {whole * 1e3:.3f} ms", flush=True)
    for k, _ in calls:
        print(f"  {k:22s} host {statistics.median(host[k]) * 1e3:8.3f} ms   to completion "
              f"{statistics.median(done[k]) * 1e3:8.3f} ms", flush=True)
    del model, opt


def main():
    cfg = load_model_config(sys.argv[1], {})
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    probe("tiny_like", tiny_like(cfg), dev)
    if "--full" in sys.argv:
        probe("full", cfg, dev)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

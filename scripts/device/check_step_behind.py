"""The update behind the next forward (epplan.train.step_behind) against the inline step, on a GPU.

    python3 scripts/device/check_step_behind.py

The medium dims' Transformer (2 layers, 8 experts, d 2048, bf16 autocast, fp32 masters), 4 steps
of forward, backward, gradient norm, clipping and the one-pass AdamW, three times from the same
weights and data: inline, inline again (is the GPU run deterministic at all?), and with the update
on the side stream gated into the next forward. Deterministic algorithms, SDPA's math kernel. A
gate that let a forward read a weight before its update would change the losses and the weights;
prints the largest weight difference of each run from the first and every step's loss.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from epplan.runtime.model import Transformer  # noqa: E402
from epplan.train.adamw import step_with_copies  # noqa: E402
from epplan.train.step_behind import StepBehind  # noqa: E402
from epplan.workload.config import load_model_config  # noqa: E402

STEPS = 4


def run(behind: bool, init: dict, batches: list) -> tuple[list[float], dict]:
    config = load_model_config(str(Path(__file__).with_name("medium.yaml")))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(config)
    model.load_state_dict(init)
    model.fused_loss = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    gated = StepBehind(model, opt, torch.device("cuda")) if behind else None
    losses = []
    for x, y in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.MATH):
            _, loss = model(x, y)
        loss.backward()
        norm = torch.stack(torch._foreach_norm([p.grad for p in model.parameters() if p.grad is not None])).norm()
        clip = (1.0 / (norm + 1e-6)).clamp(max=1.0)
        losses.append(loss.item())
        if gated is not None:
            gated.step(clip)
        else:
            step_with_copies(opt, clip)
        opt.zero_grad(set_to_none=True)
    if gated is not None:
        gated.settle()
    torch.cuda.synchronize()
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def main() -> None:
    torch.use_deterministic_algorithms(True)
    config = load_model_config(str(Path(__file__).with_name("medium.yaml")))
    torch.manual_seed(0)
    with torch.device("cuda"):
        init = {k: v.detach().clone() for k, v in Transformer(config).state_dict().items()}
    g = torch.Generator(device="cuda").manual_seed(1)
    batches = [tuple(torch.randint(0, config.vocab_size, (4, config.seq_len), device="cuda", generator=g)
                     for _ in range(2)) for _ in range(STEPS)]
    ref_losses, ref = run(False, init, batches)
    for label, behind in (("inline again", False), ("behind", True)):
        losses, weights = run(behind, init, batches)
        diff = max((weights[k].float() - ref[k].float()).abs().max().item() for k in ref)
        same = all(torch.equal(weights[k], ref[k]) for k in ref)
        print(f"{label}: weights bitwise equal {same}, largest difference {diff:.3e}; losses "
              + " ".join(f"{a:.6f}/{b:.6f}" for a, b in zip(losses, ref_losses)), flush=True)


if __name__ == "__main__":
    main()

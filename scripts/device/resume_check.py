"""A DCP checkpoint written asynchronously on the GPU resumes into a fresh trainer, exactly.

    python3 scripts/device/resume_check.py MANIFEST --out DIR [--cpu] [--json FILE]

One process (NCCL on the GPU; gloo with ``--cpu``, a dry run). Trainer A runs 2 steps,
checkpoints through ``dcp.async_save`` (pinned staging on the GPU), changes its weights right
after ``save`` returns (step 3, while the files are written), and runs step 4. Trainer B, fresh,
resumes from the checkpoint and runs steps 3 and 4: its losses and final weights and AdamW
state must equal A's (fused AdamW's step counter on the GPU included).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from epplan.train.job import load_job
from epplan.train.options import TrainOptions
from epplan.train.trainer import Trainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("manifest")
    p.add_argument("--out", required=True)
    p.add_argument("--json")
    p.add_argument("--cpu", action="store_true")
    a = p.parse_args()
    cuda = not a.cpu
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1, device_id=device if cuda else None)
    job = load_job(a.manifest)
    opts = TrainOptions.of(manifest=a.manifest, out=a.out, steps=4, device=device.type, ckpt_every=10 ** 9,
                           async_checkpoints="on", keep_checkpoints=0, warmup_steps=1, **dict(job.run_settings))
    first = Trainer(job, opts, 0, device)
    losses_a = [first.train_step()["loss"] for _ in range(2)]
    stall = first.save()
    losses_a += [first.train_step()["loss"] for _ in range(2)]  # step 3 beside the writer
    first.finish_checkpoint()
    second = Trainer(job, opts, 0, device)
    info, _ = second.resume()
    losses_b = [second.train_step()["loss"] for _ in range(2)]

    def state(t: Trainer) -> dict[str, torch.Tensor]:
        out = {f"w/{n}": p.detach() for n, p in t.model.named_parameters()}
        for n, p in t.model.named_parameters():
            for k, v in (t.optimizer.state_of(p) or {}).items():
                out[f"{k}/{n}"] = v
        return out

    sa, sb = state(first), state(second)
    diff = max(float((sa[k].double() - sb[k].double().to(sa[k].device)).abs().max()) for k in sa if sa[k].numel())
    steps_on = {str(v.device) for k, v in sb.items() if k.startswith("step/")}
    out = {"resumed_step": info.step, "losses_a": losses_a, "losses_b": losses_b,
           "losses_equal": losses_a[2:] == losses_b, "keys_equal": sa.keys() == sb.keys(),
           "max_abs_diff": diff, "adamw_step_devices": sorted(steps_on), "stall_s": stall,
           "files": sorted(f.name for f in info.path.iterdir())}
    print(json.dumps(out), flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)
    os._exit(0 if out["losses_equal"] and out["keys_equal"] and diff == 0.0 else 1)


if __name__ == "__main__":
    main()

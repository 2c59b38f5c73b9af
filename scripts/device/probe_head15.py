"""Call AL (issue 15): is the LM head's calibrated rate set by the load before it?

The medium model's head (d_model 2048, vocab 32,000, 32,768 tokens) was calibrated at 588 TFLOP/s
in call AJ (624 in AH) and ran at 667 in training; AF (H200) over-predicted it by 16-18 % too,
while the seed dims' head (d_model 4096) stayed within -6 to +5 %. Calibrate timed the head after
1 s of back-to-back 8192 x 8192 bf16 GEMMs (the card at its power limit), each run behind 20 ms
more of them; in training it follows the model's own blocks. Here each head is timed by
``measure_lm_head`` two ways: "gemms", as calibrate did (``context=False``); "block", its new
default, after and behind one of the model's own MoE blocks (``context=True``). The medium model
twice, the seed dims once, with the UTC time of each measurement printed so that the clock log beside it
(``nvidia-smi ... -lms 100``, dev15al.sh) can be read at the same moments.

    python3 scripts/device/probe_head15.py
"""

from datetime import datetime, timezone

import torch
import torch.distributed as dist

from epplan.runtime.calibrate import Timer, measure_lm_head
from epplan.workload.config import load_model_config

dev = torch.device("cuda", 0)
torch.cuda.set_device(dev)
dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
models = {"medium": load_model_config("scripts/device/medium.yaml"), "seed": load_model_config("scripts/device/seed2e8.yaml")}
for rep in range(2):
    for name, config in models.items():
        if name == "seed" and rep > 0:
            continue
        for way in ("gemms", "block"):
            timer = Timer(dev, iters=5, warmup=2, sustain_s=1.0)
            start = datetime.now(timezone.utc).strftime("%H:%M:%S.%f")[:-3]
            row = measure_lm_head(timer, config, 32768, context=way == "block")
            end = datetime.now(timezone.utc).strftime("%H:%M:%S.%f")[:-3]
            print(f"head {name} rep {rep} {way:6s} {start}-{end}  {row['tflops']:.1f} TFLOP/s", flush=True)
            torch.cuda.empty_cache()
dist.destroy_process_group()

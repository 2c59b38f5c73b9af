"""Is the run's attention slower than ``epplan calibrate``'s attention half because of the clock?

    python3 scripts/device/probe_attn_clock.py

The attention half (``RMSNorm`` + ``Attention``, forward + backward, fp32 weights under bf16
autocast) at Mixtral-8x7b and seed dims, timed as ``epplan calibrate`` times it (``Timer``, 2
warm-up runs, median of 3) on a cold GPU, then the same after 20 s of back-to-back large GEMMs (the
sustained load a training step puts on the card), then the median of 30 right after. The SM clock
and power are sampled by nvidia-smi every 100 ms into $OUT/smi.csv.
"""

import subprocess
import os
import time

import torch

from epplan.runtime.calibrate import Timer, measure_attention_block
from epplan.workload.config import load_model_config


def heat(seconds: float) -> None:
    a = torch.randn(16384, 16384, device="cuda", dtype=torch.bfloat16)
    end = time.time() + seconds
    while time.time() < end:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def main() -> None:
    out = os.environ.get("OUT", "/tmp")
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu",
                            "--format=csv,noheader", "-lms", "100"], stdout=open(f"{out}/smi.csv", "w"))
    dev = torch.device("cuda")
    for name in ("mixtral-8x7b", "seed"):
        c = load_model_config(name)
        torch.cuda.synchronize()
        time.sleep(5)  # let the card cool back towards idle clocks
        t = time.time()
        cold = measure_attention_block(Timer(dev, 3, 2), c, 32768)
        heat(20)
        t2 = time.time()
        hot = measure_attention_block(Timer(dev, 3, 2), c, 32768)
        long = measure_attention_block(Timer(dev, 30, 2), c, 32768)
        print(f"{name}: TFLOP/s cold {cold['tflops']:.1f} (at {t:.1f}), after 20 s of GEMMs "
              f"{hot['tflops']:.1f} (at {t2:.1f}), median of 30 right after {long['tflops']:.1f}", flush=True)
    smi.terminate()


if __name__ == "__main__":
    main()

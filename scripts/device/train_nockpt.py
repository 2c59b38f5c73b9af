"""``epplan run``'s worker with checkpoints switched off, for timing on a small disk.

    torchrun --nproc-per-node 1 scripts/device/train_nockpt.py MANIFEST --out DIR --device cuda ...

Arguments are the worker's (``python -m epplan.train.worker --help``; ``epplan run
--print-launch torchrun`` prints them). A seed-dims run's checkpoint is about 57 GB (fp32 weights
and AdamW moments), more than the lent machine's disk holds twice; the training loop is the
same ``Trainer.train_step``. With ``LOOP_MIN_ROWS=N`` in the environment the experts switch from
torch._grouped_mm to one GEMM per expert at N rows per expert (``experts.LOOP_MIN_ROWS``), to time
the other choice in the same call; ``STEP_BEHIND=1`` runs the optimizer's update behind the next
forward, ``STEP_BEHIND=0`` inline (``trainer.STEP_BEHIND``, off by default); ``ROW_QUANTUM=N``
rounds the loop's expert GEMMs' rows up to a multiple of N (``experts.ROW_QUANTUM``; 0: exact);
``HIGH_PRIORITY=1`` runs the whole worker on a high-priority CUDA stream (the update behind then
takes only what the compute stream leaves: ``scripts/device/probe_overlap.py``).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from epplan.runtime import experts  # noqa: E402
from epplan.train import trainer, worker  # noqa: E402

if os.environ.get("LOOP_MIN_ROWS"):
    experts.LOOP_MIN_ROWS = int(os.environ["LOOP_MIN_ROWS"])
    print("experts.LOOP_MIN_ROWS =", experts.LOOP_MIN_ROWS, flush=True)

if os.environ.get("ROW_QUANTUM"):
    experts.ROW_QUANTUM = int(os.environ["ROW_QUANTUM"])
    print("experts.ROW_QUANTUM =", experts.ROW_QUANTUM, flush=True)

if os.environ.get("STEP_BEHIND") in ("0", "1"):  # the update inline or behind, to time both in one call
    trainer.STEP_BEHIND = os.environ["STEP_BEHIND"] == "1"
    print("trainer.STEP_BEHIND =", trainer.STEP_BEHIND, flush=True)

if os.environ.get("HIGH_PRIORITY") == "1":
    import torch

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    stream = torch.cuda.Stream(priority=-100)  # torch maps it to the highest priority there is
    torch.cuda.set_stream(stream)
    print("the worker's stream: priority", stream.priority, flush=True)

trainer.Trainer.save = lambda self: 0.0
sys.exit(worker.main())

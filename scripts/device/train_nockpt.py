"""``epplan run``'s worker with checkpoints switched off, for timing on a small disk.

    torchrun --nproc-per-node 1 scripts/device/train_nockpt.py MANIFEST --out DIR --device cuda ...

Arguments are the worker's (``python -m epplan.train.worker --help``; ``epplan run
--print-launch torchrun`` prints them). A seed-dims run's checkpoint is about 57 GB (fp32 weights
and AdamW moments), more than the lent machine's disk holds twice; the training loop is the
same ``Trainer.train_step``. With ``LOOP_MIN_ROWS=N`` in the environment the experts switch from
torch._grouped_mm to one GEMM per expert at N rows per expert (``experts.LOOP_MIN_ROWS``), to time
the other choice in the same call; ``ROW_QUANTUM=N`` rounds the loop's expert GEMMs' rows up to a
multiple of N (``experts.ROW_QUANTUM``; 0: exact); ``ADAMW_MANY_BELOW=N`` steps AdamW's tensors
under N elements in one kernel per group (``epplan.train.adamw.MANY_BELOW``; 0: each by itself).
(Call V's ``STEP_BEHIND`` and ``HIGH_PRIORITY`` switches went with the update behind the
forward, which gave nothing: docs/benchmarks.md.)
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

if os.environ.get("ADAMW_MANY_BELOW"):
    from epplan.train import adamw

    adamw.MANY_BELOW = int(os.environ["ADAMW_MANY_BELOW"])
    print("adamw.MANY_BELOW =", adamw.MANY_BELOW, flush=True)

trainer.Trainer.save = lambda self: 0.0
sys.exit(worker.main())

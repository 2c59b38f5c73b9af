"""``epplan run``'s worker with checkpoints switched off, for timing on a small disk.

    torchrun --nproc-per-node 1 scripts/device/train_nockpt.py MANIFEST --out DIR --device cuda ...

Arguments are the worker's (``python -m epplan.train.worker --help``; ``epplan run
--print-launch torchrun`` prints them). A seed-dims run's checkpoint is about 57 GB (fp32 weights
and AdamW moments), more than the lent machine's disk holds twice; the training loop is the
same ``Trainer.train_step``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from epplan.train import trainer, worker  # noqa: E402

trainer.Trainer.save = lambda self: 0.0
sys.exit(worker.main())

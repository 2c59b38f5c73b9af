"""``epplan run``'s worker without checkpoints (as ``train_nockpt.py``), with ``torch.profiler``
over two of its steps: the CUDA kernels by total time, to see where the training loop's time goes.

    torchrun --nproc-per-node 1 scripts/device/profile_train.py MANIFEST --out DIR --device cuda ...

Writes DIR/profile.txt (the table; PROFILE_STEPS=a,b picks the steps, 1-based, default 6,7)
and prints its first rows; with PROFILE_SHAPES=1 also DIR/profile-shapes.txt, the same grouped by
the operators' input shapes (which GEMM is which); with PROFILE_TRACE=1 also DIR/trace.json.gz, the
profiled steps as a Chrome trace (every kernel's start and end: the GPU's idle gaps). The other steps' metrics are the plain run's.
"""

import gzip
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from epplan.runtime import experts  # noqa: E402
from epplan.train import trainer, worker  # noqa: E402

FIRST, LAST = (int(v) for v in os.environ.get("PROFILE_STEPS", "6,7").split(","))
SHAPES = os.environ.get("PROFILE_SHAPES") == "1"
TRACE = os.environ.get("PROFILE_TRACE") == "1"
_train_step = trainer.Trainer.train_step
_state = {}


def train_step(self):
    step = self.step + 1
    if step == FIRST:
        cuda = [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
        _state["prof"] = profile(activities=[ProfilerActivity.CPU, *cuda], record_shapes=SHAPES)
        _state["prof"].__enter__()
    record = _train_step(self)
    if step == LAST:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof = _state.pop("prof")
        prof.__exit__(None, None, None)
        events = prof.key_averages()
        key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = events.table(sort_by=key, row_limit=45, max_name_column_width=70)
        Path(self.opts.out, "profile.txt").write_text(table)
        if SHAPES:
            by_shape = prof.key_averages(group_by_input_shape=True).table(
                sort_by=key, row_limit=40, max_name_column_width=40, max_shapes_column_width=110)
            Path(self.opts.out, "profile-shapes.txt").write_text(by_shape)
        if TRACE:
            raw = Path(self.opts.out, "trace.json")
            prof.export_chrome_trace(str(raw))
            with open(raw, "rb") as src, gzip.open(raw.with_suffix(".json.gz"), "wb") as dst:
                shutil.copyfileobj(src, dst)
            raw.unlink()
        print("\n".join(table.splitlines()[:40]), flush=True)
    return record


trainer.Trainer.train_step = train_step
trainer.Trainer.save = lambda self: 0.0
if torch.cuda.is_available():
    print("bf16 GEMMs with fp32 output (torch.mm out_dtype):",
          experts._has_mm_out_dtype(torch.device("cuda")), flush=True)
sys.exit(worker.main())

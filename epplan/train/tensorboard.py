"""``epplan run --tensorboard DIR``: the metrics records as TensorBoard scalars, on rank 0.

Written with ``torch.utils.tensorboard.SummaryWriter`` (which needs the ``tensorboard`` package:
``pip install 'epplan[tensorboard]'``). Every ``step`` record of ``metrics.jsonl`` becomes the
scalars ``train/loss``, ``train/aux_loss``, ``train/lr``, ``train/grad_norm``,
``perf/step_time_s``, ``perf/tokens_per_s``, ``perf/tflops_per_gpu``, ``perf/mfu`` and, per MoE
layer l, ``moe/load_max_over_mean/layer{l}`` at its step; a ``checkpoint`` record adds
``perf/checkpoint_s``; a ``start`` record the run's facts as text. metrics.jsonl stays the record
of the run; this is a view of it. A resumed run purges the events after its checkpoint's step,
as metrics.jsonl is cut back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from epplan.errors import EpplanError, param

_SCALARS = {"loss": "train/loss", "aux_loss": "train/aux_loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
            "step_time_s": "perf/step_time_s", "tokens_per_s": "perf/tokens_per_s",
            "tflops_per_gpu": "perf/tflops_per_gpu", "mfu": "perf/mfu", "peak_memory_gb": "perf/peak_memory_gb"}


def check_available() -> None:
    """Raise a one-line error naming the install command if tensorboard is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise EpplanError(f"{param('tensorboard')} needs the tensorboard package: pip install 'epplan[tensorboard]' "
                        "(or pip install tensorboard)") from None


class TensorBoardLog:
    """A sink for metrics records, beside ``MetricsLog`` (same ``write`` / ``close``)."""

    def __init__(self, logdir: str | Path, purge_step: int | None = None) -> None:
        check_available()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(logdir), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        kind, step = record.get("kind"), int(record.get("step", 0))
        if kind == "step":
            for key, tag in _SCALARS.items():
                value = record.get(key)
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(tag, value, step)
            for layer, ratio in enumerate(record.get("expert_load_max_over_mean") or []):
                self.writer.add_scalar(f"moe/load_max_over_mean/layer{layer}", ratio, step)
        elif kind == "checkpoint":
            self.writer.add_scalar("perf/checkpoint_s", record.get("seconds", 0.0), step)
        elif kind == "start":
            facts = {k: v for k, v in record.items() if k not in ("kind", "format", "version")}
            self.writer.add_text("run/start", "```\n" + json.dumps(facts, indent=1, default=str) + "\n```", step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Sinks:
    """metrics.jsonl and, if asked, TensorBoard: one ``write`` for both."""

    def __init__(self, *sinks: Any) -> None:
        self.sinks = [s for s in sinks if s is not None]

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def with_tensorboard(log: Any, logdir: str | None, purge_step: int | None) -> Any:
    """``log`` itself without a logdir, else both ``log`` and a ``TensorBoardLog``."""
    if log is None or logdir is None:
        return log
    return Sinks(log, TensorBoardLog(logdir, purge_step))

"""The project's exception types.

Every error a user can cause by bad input is an ``EpplanError`` (or a subclass) whose message
names what was wrong and how to fix it. The CLI prints the message and exits 1 (3 for ``DoesNotFit``); internal
invariants use ``assert`` instead. Every class lives here; the modules that raise them import them.

The library names its parameters, not the CLI's flags: a message marks a parameter with
``param("time_limit")`` (or ``param("experts_per_gpu", 3)`` for a setting to give; a model field
is ``param("set", "seq_len=N")``). ``str()`` of the error reads ``time_limit`` /
``experts_per_gpu=3`` / ``seq_len=N``, as a caller of the Python functions passes them;
``cli_message()`` reads ``--time-limit`` / ``--experts-per-gpu 3`` / ``--set seq_len=N``, the
CLI's flags (a parameter whose flag is not its name with dashes is mapped by the CLI).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_PARAM = re.compile(r"\{\{([a-z_][a-z0-9_]*)(?:=([^{}]*))?\}\}")  # {{name}} or {{name=value}}


def param(name: str, value: object = None) -> str:
    """A parameter named in an error message: ``name`` (``name=value`` with a value), shown as its
    flag when the CLI prints the error (``EpplanError.cli_message``)."""
    return f"{{{{{name}}}}}" if value is None else f"{{{{{name}={value}}}}}"


class EpplanError(Exception):
    """Base class of every user-facing error."""

    exit_code = 1  # what the CLI exits with

    def __str__(self) -> str:
        return _PARAM.sub(lambda m: m[1] if m[2] is None else m[2] if m[1] == "set" else f"{m[1]}={m[2]}",
                          super().__str__())

    def cli_message(self, flags: Mapping[str, str] | None = None) -> str:
        """The message with each parameter as its CLI flag: ``flags[name]``, else ``--`` and the
        name with dashes (``time_limit`` -> ``--time-limit``)."""
        def flag(m: re.Match) -> str:
            name = (flags or {}).get(m[1], "--" + m[1].replace("_", "-"))
            return name if m[2] is None else f"{name} {m[2]}"

        return _PARAM.sub(flag, super().__str__())


class TopologyError(EpplanError):
    """A topology file or topology object is malformed."""


class ConfigError(EpplanError):
    """A model config, preset name or override is invalid."""


class TrafficError(EpplanError):
    """Routing statistics could not be read or do not fit the problem."""


class PlacementError(EpplanError):
    """A placement problem cannot be solved as asked, or a placement is invalid."""


class DoesNotFit(PlacementError):
    """No run settings (micro-batches, recompute, optimizer sharding) fit every GPU's memory."""

    exit_code = 3


class ManifestError(EpplanError):
    """A manifest file is missing, corrupted, or of another schema version."""


class RuntimeSetupError(EpplanError):
    """The distributed runtime was launched inconsistently with its manifest."""


class ReportError(EpplanError):
    """A report was asked for something its inputs cannot give (bad layer, unusable run data)."""


class CalibrationError(EpplanError):
    """A calibration file is missing, malformed, or does not cover what is asked of it."""


class DataError(EpplanError):
    """``--data`` cannot be read or does not fit the model."""


class CheckpointError(EpplanError):
    """A checkpoint cannot be written, or does not fit the run that wants to load it."""


class TrainingDiverged(EpplanError):
    """The loss or the gradient norm became NaN or infinite."""


class OutOfGPUMemory(EpplanError):
    """A rank ran out of GPU memory: the batch, model or placement does not fit."""


class RunDirBusy(RuntimeSetupError):
    """Another run holds the run directory."""


class Interrupted(RuntimeSetupError):
    """``epplan run`` was stopped by a signal; torchrun and its workers were stopped with it."""

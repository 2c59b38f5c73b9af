"""The project's exception types.

Every error a user can cause by bad input is an ``EpplanError`` (or a subclass) whose message
names what was wrong and how to fix it. The CLI prints the message and exits 1 (3 for ``DoesNotFit``); internal
invariants use ``assert`` instead. Every class lives here; the modules that raise them import them.
"""


class EpplanError(Exception):
    """Base class of every user-facing error."""

    exit_code = 1  # what the CLI exits with


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

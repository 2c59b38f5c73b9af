"""The project's exception types.

Every error a user can cause by bad input is an ``EpplanError`` (or a subclass) whose message
names what was wrong and how to fix it. The CLI prints the message and exits 1 (3 for ``DoesNotFit``); internal
invariants use ``assert`` instead.
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

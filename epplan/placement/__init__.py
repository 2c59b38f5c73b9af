"""Expert placement: the ``Placement`` value, the planner and its baselines."""

from epplan.placement.types import LayerPlacement, Placement

__all__ = ["LayerPlacement", "Placement"]

"""Scoring placements: ``evaluate(placement, problem) -> Cost``, the one cost function that the
planner's objective, every baseline, ``epplan estimate`` and the report agree with."""

from epplan.cost.evaluate import (
    BANDWIDTH_TARGET, MFU_TARGET, SPEC_PEAK_TFLOPS, Cost, evaluate, layer_flow_parts,
)
from epplan.cost.linkmap import LinkMap, LowRank, link_map

__all__ = ["BANDWIDTH_TARGET", "MFU_TARGET", "SPEC_PEAK_TFLOPS", "Cost", "LinkMap", "LowRank", "evaluate",
           "layer_flow_parts", "link_map"]

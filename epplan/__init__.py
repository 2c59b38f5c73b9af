"""epplan: topology-aware expert parallelism for Mixture-of-Experts training.

The package is layered one way (see docs/design.md):
topology -> workload (model config, traffic) -> placement -> cost -> manifest -> runtime -> report.
"""

__version__ = "0.2.0"

"""``epplan report``'s library: per-link, per-class and per-GPU tables of a placement's predicted
load (from ``epplan.cost.evaluate``), a run's measured all-to-all bytes beside them, several
placements side by side, and their rendering (rich, JSON, CSV, markdown, PNG).

Modules: ``predicted`` (tables of one ``Cost``), ``measured`` (reading a run directory and the
comparison), ``compare`` (placements side by side), ``build`` (the ``Report`` value and its
JSON), ``render`` (rich, markdown, CSV), ``plot`` (matplotlib, headless).
"""

from epplan.report.build import Report, build_report
from epplan.report.compare import PlanView, compare_plans
from epplan.report.measured import RunMetrics, compare_measured, read_run
from epplan.report.predicted import ReportError, class_summary, gpu_table, link_table

__all__ = ["PlanView", "Report", "ReportError", "RunMetrics", "build_report", "class_summary",
           "compare_measured", "compare_plans", "gpu_table", "link_table", "read_run"]

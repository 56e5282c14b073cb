"""The Corral SDK data scientists import: submit jobs from notebooks and scripts, follow them, explain them."""

from notebooks.outputs import log_metrics, record_lineage

__all__ = ["log_metrics", "record_lineage"]

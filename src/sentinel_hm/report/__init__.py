"""Human-facing views of traces: summary tables (plots come with the plot extra)."""

from sentinel_hm.report.summary import summarize

__all__ = ["summarize"]

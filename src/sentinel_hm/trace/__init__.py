"""Trace: the profiled step as data, its file format, the tracer, and timeline export."""

from sentinel_hm.trace.chrome import save_chrome_trace, to_chrome_trace
from sentinel_hm.trace.io import SCHEMA_VERSION, load_trace, save_trace
from sentinel_hm.trace.layers import find_layers
from sentinel_hm.trace.marks import add_layer
from sentinel_hm.trace.model import (
    Kind,
    LayerRecord,
    LayerStats,
    OpRecord,
    Phase,
    Segment,
    StorageRecord,
    Trace,
)
from sentinel_hm.trace.profiling import end_profile, profile, start_profile

__all__ = [
    "SCHEMA_VERSION",
    "Kind",
    "LayerRecord",
    "LayerStats",
    "OpRecord",
    "Phase",
    "Segment",
    "StorageRecord",
    "Trace",
    "add_layer",
    "end_profile",
    "find_layers",
    "load_trace",
    "profile",
    "save_chrome_trace",
    "save_trace",
    "start_profile",
    "to_chrome_trace",
]

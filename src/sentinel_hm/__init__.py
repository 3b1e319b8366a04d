"""sentinel-hm: train with a small fraction of the step's memory in fast memory.

Profile one step (`profile`), plan where each long-lived tensor lives, and
migrate tensors ahead of need. Importing this package never initialises CUDA.
"""

from sentinel_hm.errors import SentinelError
from sentinel_hm.trace import (
    Trace,
    add_layer,
    end_profile,
    load_trace,
    profile,
    save_trace,
    start_profile,
)

__version__ = "0.1.0"

__all__ = [
    "SentinelError",
    "Trace",
    "__version__",
    "add_layer",
    "end_profile",
    "load_trace",
    "profile",
    "save_trace",
    "start_profile",
]

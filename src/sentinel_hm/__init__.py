"""sentinel-hm: train with a small fraction of the step's memory in fast memory.

Profile one step (`profile`), plan where each long-lived tensor lives (`plan`),
predict the result (`simulate`), and migrate tensors ahead of need. Importing this package never initialises CUDA.
"""

from sentinel_hm.core import Plan
from sentinel_hm.errors import SentinelError
from sentinel_hm.planning import load_plan, save_plan
from sentinel_hm.planning import make_plan as plan
from sentinel_hm.runtime import Sentinel
from sentinel_hm.sim import SimResult, simulate
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
    "Plan",
    "Sentinel",
    "SentinelError",
    "SimResult",
    "Trace",
    "__version__",
    "add_layer",
    "end_profile",
    "load_plan",
    "load_trace",
    "plan",
    "profile",
    "save_plan",
    "save_trace",
    "simulate",
    "start_profile",
]

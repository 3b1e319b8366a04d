"""Runtime: the `Sentinel` manager that executes plans during real training."""

from sentinel_hm.runtime.audit import fast_bytes_curve
from sentinel_hm.runtime.manager import Sentinel

__all__ = ["Sentinel", "fast_bytes_curve"]

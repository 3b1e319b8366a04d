"""Runtime: the `Sentinel` manager that executes plans during real training."""

from sentinel_hm.runtime.manager import Sentinel, fast_bytes_curve

__all__ = ["Sentinel", "fast_bytes_curve"]

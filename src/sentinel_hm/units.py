"""Sizes, rates and times for humans, both ways: ``format_bytes(3 << 20) == '3.0 MiB'``,
``parse_bytes('4GiB') == 4 << 30``, ``parse_bandwidth('20GB/s') == 20e9``.

Hardware presets, command-line options and the user's hardware files all go through
these parsers, so a figure is spelled the same way everywhere. Decimal prefixes are
powers of 1000 (``GB = 1e9``, as in datasheets), binary ones powers of 1024
(``GiB = 2**30``, as allocators count).
"""

from __future__ import annotations

import math
import re

from sentinel_hm.errors import SentinelError

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")

_DECIMAL = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_BINARY = {"KI": 2.0**10, "MI": 2.0**20, "GI": 2.0**30, "TI": 2.0**40, "PI": 2.0**50}
_SECONDS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9}

_NUMBER = r"(?P<num>[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"
_BYTES_RE = re.compile(rf"^{_NUMBER}\s*(?P<prefix>[kKmMgGtTpP][iI]?)?(?P<b>[bB])?$")
_SECONDS_RE = re.compile(rf"^{_NUMBER}\s*(?P<unit>s|ms|us|µs|μs|ns)?$")
_FLOPS_RE = re.compile(
    rf"^{_NUMBER}\s*(?P<prefix>[kKmMgGtTpP])?\s*(?:flops|flop/s)?$", re.IGNORECASE
)


def format_bytes(n: float) -> str:
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_bandwidth(bytes_per_s: float) -> str:
    """Decimal units, as link and memory datasheets quote them: ``'20.0 GB/s'``."""
    value = float(bytes_per_s)
    for unit in ("B/s", "KB/s", "MB/s", "GB/s"):
        if abs(value) < 1000:
            return f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB/s"


def _text(value: object, what: str, example: str) -> str:
    if not isinstance(value, str):
        raise SentinelError(f"{what} {value!r} is not text; write it as e.g. {example!r}")
    text = value.strip()
    if text.startswith("-"):
        raise SentinelError(f"{what} {value!r} is negative; give a positive one, e.g. {example!r}")
    return text


def _byte_count(text: str) -> float | None:
    """Bytes for ``'4GiB'``/``'1.5GB'``/``'1000'``, or None when it is not a size."""
    m = _BYTES_RE.match(text)
    if m is None:
        return None
    prefix = (m["prefix"] or "").upper()
    scale = _BINARY[prefix] if prefix.endswith("I") else _DECIMAL[prefix]
    return float(m["num"]) * scale


def parse_bytes(text: str) -> int:
    """``'4GiB'``, ``'512MiB'``, ``'1.5GB'``, ``'64KiB'``, ``'1000'`` (bytes) -> bytes."""
    example = "16GiB"
    value = _byte_count(_text(text, "byte size", example))
    if value is None or not math.isfinite(value):
        raise SentinelError(
            f"byte size {text!r} is not a size; write a number with an optional unit "
            f"(B, KB, MB, GB, TB decimal; KiB, MiB, GiB, TiB binary), e.g. {example!r}"
        )
    return round(value)


def parse_bandwidth(text: str) -> float:
    """``'20GB/s'``, ``'900 MB/s'``, ``'25GiB/s'``, or a plain number of bytes/s -> bytes/s."""
    example = "20GB/s"
    raw = _text(text, "bandwidth", example)
    size = raw[:-2].rstrip() if raw.endswith("/s") else raw
    value = _byte_count(size) if size else None
    if value is None or not math.isfinite(value):
        raise SentinelError(
            f"bandwidth {text!r} is not a rate; write a size per second, e.g. {example!r}, "
            "'900MB/s' or '25GiB/s'"
        )
    if value <= 0:
        raise SentinelError(f"bandwidth {text!r} is zero; give a positive rate, e.g. {example!r}")
    return value


def parse_seconds(text: str) -> float:
    """``'10us'``, ``'2ms'``, ``'1.5s'``, ``'300ns'``, or a plain number of seconds -> seconds."""
    example = "10us"
    raw = _text(text, "time", example)
    m = _SECONDS_RE.match(raw)
    if m is None or not math.isfinite(float(m["num"])):
        raise SentinelError(
            f"time {text!r} is not a duration; write a number with s, ms, us or ns, "
            f"e.g. {example!r}"
        )
    return float(m["num"]) * _SECONDS[m["unit"] or ""]


def parse_flops(text: str) -> float:
    """``'989T'``, ``'50G'``, ``'19.5TFLOPS'``, ``'1e12'`` -> floating-point operations per s."""
    example = "989T"
    raw = _text(text, "compute rate", example)
    m = _FLOPS_RE.match(raw)
    value = float(m["num"]) * _DECIMAL[(m["prefix"] or "").upper()] if m else math.nan
    if not math.isfinite(value) or value <= 0:
        raise SentinelError(
            f"compute rate {text!r} is not a positive FLOP/s figure; write a number with an "
            f"optional K, M, G, T or P, e.g. {example!r} or '50G'"
        )
    return value


def parse_budget(text: str | int, all_fast_peak_bytes: int) -> int:
    """Fast-tier budget in bytes: ``'20%'`` of the all-fast peak, or an absolute size.

    A percentage is how the Sentinel paper states budgets (fast memory as a share of
    the peak), so plans for models of different sizes can be compared; above 100% the
    plan is trivially all-fast, so it is refused rather than silently clamped.
    """
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise SentinelError(
            f"budget {text!r} is neither a byte count nor text; give e.g. '20%' or '4GiB'"
        )
    if isinstance(text, int):
        budget = text
    else:
        raw = text.strip()
        if raw.startswith("-"):
            raise SentinelError(
                f"budget {text!r} is negative; give e.g. '20%' or an absolute size such as '4GiB'"
            )
        if raw.endswith("%"):
            try:
                share = float(raw[:-1])
            except ValueError:
                share = math.nan
            if not 0 < share <= 100:
                raise SentinelError(
                    f"budget {text!r} is not a percentage in (0, 100]; give e.g. '20%' of the "
                    "all-fast peak, or an absolute size such as '4GiB'"
                )
            return round(all_fast_peak_bytes * share / 100)
        try:
            budget = parse_bytes(raw)
        except SentinelError:
            raise SentinelError(
                f"budget {text!r} is neither a percentage nor a size; give e.g. '20%' of the "
                "all-fast peak, or an absolute size such as '4GiB'"
            ) from None
    if budget <= 0:
        raise SentinelError(
            f"budget {text!r} is not positive; give e.g. '20%' or an absolute size such as '4GiB'"
        )
    return budget

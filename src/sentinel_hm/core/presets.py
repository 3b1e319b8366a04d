"""Named hardware descriptions, and parsing of ``--hardware`` specs and hardware files.

Every figure below names where it comes from. Datasheet peaks are upper bounds: real
copies and kernels reach some fraction of them, so a plan made with a preset is an
estimate; for numbers from your own machine, override fields (``"h100-sxm,h2d=52GB/s"``)
or write a JSON file. Decimal units (GB = 1e9) where a datasheet quotes them; DIMM and
HBM capacities are binary (GiB), as the parts are built.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sentinel_hm.core.hardware import Access, Hardware, LinkSpec, TierSpec
from sentinel_hm.errors import SentinelError
from sentinel_hm.units import parse_bandwidth, parse_bytes, parse_flops, parse_seconds

GiB = 2**30

# --- dram-optane --------------------------------------------------------------------------
# One socket of the platform of the Sentinel paper (Ren et al., HPCA 2021): Intel Xeon Gold
# 6252 with DDR4 DRAM and Optane DC PMMs in App Direct mode, each a NUMA node, 6 DIMMs of
# each per socket. Memory figures: Izraelevitz et al. 2019, "Basic Performance Measurements
# of the Intel Optane DC Persistent Memory Module" (arXiv:1903.05714), measured per socket
# with 6 interleaved DIMMs of each kind.
_OPTANE_DRAM_READ = 104e9  # ~104 GB/s local DRAM read, Izraelevitz et al. bandwidth figure
_OPTANE_DRAM_WRITE = 80e9  # ~80 GB/s local DRAM write, same figure (read off the plot)
_OPTANE_READ = 39.4e9  # "six interleaved Optane DC PMMs' maximum read bandwidth is 39.4 GB/sec"
_OPTANE_WRITE = 13.9e9  # "... and their maximum write bandwidth is 13.9 GB/sec" (same paper)

DRAM_OPTANE = Hardware(
    name="dram-optane",
    fast=TierSpec(
        name="DRAM",
        capacity_bytes=6 * 32 * GiB,  # 6 x 32 GB DDR4 DIMMs per socket (Izraelevitz et al.)
        read_bytes_per_s=_OPTANE_DRAM_READ,
        write_bytes_per_s=_OPTANE_DRAM_WRITE,
        # ~101 ns random / ~81 ns sequential idle load latency (Izraelevitz et al.; the
        # text: Optane random reads are "about 3x slower than local DRAM")
        latency_s=101e-9,
    ),
    slow=TierSpec(
        name="Optane",
        capacity_bytes=6 * 256 * GiB,  # 6 x 256 GB Optane DC PMMs per socket (same paper)
        read_bytes_per_s=_OPTANE_READ,
        write_bytes_per_s=_OPTANE_WRITE,
        latency_s=305e-9,  # "read latency of random Optane DC memory loads is 305 ns" (same)
    ),
    # A migration is the CPU copying between NUMA nodes, so each direction runs at the
    # slower of the source's read and the destination's write bandwidth:
    # h2d = min(Optane read 39.4, DRAM write ~80) GB/s; d2h = min(DRAM read ~104, Optane
    # write 13.9) GB/s.
    link=LinkSpec(
        h2d_bytes_per_s=min(_OPTANE_READ, _OPTANE_DRAM_WRITE),
        d2h_bytes_per_s=min(_OPTANE_DRAM_READ, _OPTANE_WRITE),
        latency_s=2e-6,  # assumption: ~2 us to start a (multi-threaded) memcpy
        copy_engines=1,  # one copy at a time per direction (a copy uses many cores already)
    ),
    access=Access.DIRECT,  # ops load/store Optane in place
    # FP32 peak of one Xeon Gold 6252 (Intel ARK: 24 cores, 2.1 GHz base, AVX-512 with two
    # FMA units): 24 cores x 2.1e9 Hz x 64 FLOP/cycle (2 FMA x 16 lanes x 2) = 3.23e12.
    # One socket, matching the per-socket memory figures; an upper bound (AVX-512 clocks
    # run below base under load).
    flops_per_s=24 * 2.1e9 * 64,
    op_overhead_s=5e-6,  # assumption: ~5 us framework dispatch per op on a CPU
)

# --- dram-cxl -----------------------------------------------------------------------------
# A 4th-generation Xeon (Sapphire Rapids), the kind of host Sun et al., MICRO 2023,
# "Demystifying CXL Memory with Genuine CXL-Ready Systems and Devices" evaluate, with
# local DDR5 and one CXL Type-3 memory expander as a CPU-less NUMA node. Bandwidths are
# interface peaks (measured ones are lower), latencies a published ratio (see below).
_DDR5_PEAK = 8 * 4800e6 * 8  # 8 channels x DDR5-4800 x 8 B = 307.2 GB/s (JEDEC DDR5-4800)
_CXL_X8 = 32e9  # PCIe 5.0 x8: 32 GT/s x 8 lanes / 8 bit = 32 GB/s per direction (PCI-SIG)

DRAM_CXL = Hardware(
    name="dram-cxl",
    fast=TierSpec(
        name="DDR5",
        capacity_bytes=8 * 32 * GiB,  # 8 x 32 GB DDR5 RDIMMs, one per channel (example)
        read_bytes_per_s=_DDR5_PEAK,
        write_bytes_per_s=_DDR5_PEAK,
        latency_s=100e-9,  # assumption: ~100 ns idle local DRAM load on Sapphire Rapids
    ),
    slow=TierSpec(
        # Samsung CMM-D / Micron CZ120 class: DDR5 behind a PCIe 5.0 x8 CXL link
        name="CXL",
        capacity_bytes=256 * GiB,  # one 256 GB expander (CMM-D: 128/256/512 GB)
        read_bytes_per_s=_CXL_X8,
        write_bytes_per_s=_CXL_X8,
        # 2.5x local: inside the "2-5x higher latency than local DRAM" measured on three
        # CXL cards by "Exploring and Evaluating Real-world CXL" (arXiv:2405.14209)
        latency_s=250e-9,
    ),
    # CPU copies between NUMA nodes: h2d = min(CXL read 32, DDR5 write 307.2) GB/s,
    # d2h = min(DDR5 read 307.2, CXL write 32) GB/s.
    link=LinkSpec(
        h2d_bytes_per_s=min(_CXL_X8, _DDR5_PEAK),
        d2h_bytes_per_s=min(_DDR5_PEAK, _CXL_X8),
        latency_s=2e-6,  # assumption: ~2 us to start a (multi-threaded) memcpy
        copy_engines=1,
    ),
    access=Access.DIRECT,  # ops load/store CXL memory in place
    # FP32 peak of a Xeon Platinum 8480+ (Intel ARK: 56 cores, 2.0 GHz base, AVX-512 with
    # two FMA units): 56 x 2.0e9 x 64 FLOP/cycle = 7.17e12, one socket; an upper bound.
    flops_per_s=56 * 2.0e9 * 64,
    op_overhead_s=5e-6,  # assumption: ~5 us framework dispatch per op on a CPU
)

# --- h100-sxm -----------------------------------------------------------------------------
# NVIDIA H100 Tensor Core GPU datasheet, SXM5 column; host side per DGX H100 datasheet
# (2x Xeon Platinum 8480C, 2 TB system memory for 8 GPUs).
H100_SXM = Hardware(
    name="h100-sxm",
    fast=TierSpec(
        name="HBM3",
        capacity_bytes=80 * GiB,  # "GPU memory: 80GB" HBM3 (5 x 16 GB stacks)
        read_bytes_per_s=3.35e12,  # "GPU memory bandwidth: 3.35TB/s"
        write_bytes_per_s=3.35e12,  # same figure; the datasheet gives one number
        latency_s=500e-9,  # assumption: ~0.5 us global-memory load; kernels hide it
    ),
    slow=TierSpec(
        name="host DRAM (pinned)",
        capacity_bytes=2048 * GiB // 8,  # DGX H100: "2TB" system memory / 8 GPUs = 256 GB
        read_bytes_per_s=_DDR5_PEAK,  # 8ch DDR5-4800 per 8480C socket = 307.2 GB/s (JEDEC)
        write_bytes_per_s=_DDR5_PEAK,
        latency_s=1e-6,  # assumption: ~1 us for the GPU to load host memory over PCIe
    ),
    link=LinkSpec(
        # "PCIe Gen5: 128GB/s" (datasheet) is both directions: 64 GB/s each way; pinned
        # cudaMemcpy typically measures ~50-55 GB/s, override h2d/d2h with yours
        h2d_bytes_per_s=64e9,
        d2h_bytes_per_s=64e9,
        latency_s=10e-6,  # assumption: ~10 us per copy (launch + DMA setup + sync)
        copy_engines=1,  # one DMA engine per direction in use
    ),
    access=Access.MIGRATE,  # kernels read HBM; host data must be copied in first
    # "BF16 Tensor Core: 1,979 teraFLOPS" is with sparsity; dense is half, 989 TFLOPS.
    # An upper bound (real kernels reach a fraction); FP32 (non-tensor) is 67 TFLOPS.
    flops_per_s=989e12,
    op_overhead_s=5e-6,  # assumption: ~5 us kernel launch + framework dispatch per op
)

# --- a100 ---------------------------------------------------------------------------------
# NVIDIA A100 Tensor Core GPU datasheet, "A100 80GB SXM" column; host side per DGX A100
# datasheet (2x AMD EPYC 7742, 1 TB system memory for 8 GPUs).
A100 = Hardware(
    name="a100",
    fast=TierSpec(
        name="HBM2e",
        capacity_bytes=80 * GiB,  # "GPU memory: 80GB HBM2e" (5 x 16 GB stacks)
        read_bytes_per_s=2.039e12,  # "GPU memory bandwidth: 2,039GB/s"
        write_bytes_per_s=2.039e12,  # same figure; the datasheet gives one number
        latency_s=500e-9,  # assumption: ~0.5 us global-memory load; kernels hide it
    ),
    slow=TierSpec(
        name="host DRAM (pinned)",
        capacity_bytes=1024 * GiB // 8,  # DGX A100: "1TB" system memory / 8 GPUs = 128 GB
        read_bytes_per_s=8 * 3200e6 * 8,  # EPYC 7742: 8ch DDR4-3200 x 8 B = 204.8 GB/s
        write_bytes_per_s=8 * 3200e6 * 8,
        latency_s=1e-6,  # assumption: ~1 us for the GPU to load host memory over PCIe
    ),
    link=LinkSpec(
        # "PCIe Gen4: 64GB/s" (datasheet) is both directions: 32 GB/s each way; pinned
        # cudaMemcpy typically measures ~25 GB/s, override h2d/d2h with yours
        h2d_bytes_per_s=32e9,
        d2h_bytes_per_s=32e9,
        latency_s=10e-6,  # assumption: ~10 us per copy (launch + DMA setup + sync)
        copy_engines=1,  # one DMA engine per direction in use
    ),
    access=Access.MIGRATE,
    # "BF16 Tensor Core: 312 TFLOPS" dense (624 with sparsity); an upper bound.
    # FP32 (non-tensor) is 19.5 TFLOPS.
    flops_per_s=312e12,
    op_overhead_s=5e-6,  # assumption: ~5 us kernel launch + framework dispatch per op
)

# --- host ---------------------------------------------------------------------------------
# This machine: two DRAM arenas in ordinary memory, for testing the planner and runtime
# without tiered hardware. Rough figures for a 2-core cloud VM, not measurements;
# ``sentinel`` measures real op times on the machine (measured_op_times=True).
HOST = Hardware(
    name="host",
    fast=TierSpec(
        name="DRAM arena (fast)",
        capacity_bytes=16 * GiB,  # arbitrary: large enough for the reference workloads
        read_bytes_per_s=10e9,  # rough: ~10 GB/s single-core streaming on a small VM
        write_bytes_per_s=10e9,
        latency_s=100e-9,  # rough: ~100 ns DRAM load
    ),
    slow=TierSpec(
        name="DRAM arena (slow)",
        capacity_bytes=16 * GiB,  # same memory, a second arena
        read_bytes_per_s=10e9,  # same DRAM: same rough figures
        write_bytes_per_s=10e9,
        latency_s=100e-9,
    ),
    link=LinkSpec(
        h2d_bytes_per_s=5e9,  # rough: memcpy reads and writes on one shared core, ~half
        d2h_bytes_per_s=5e9,  # of streaming bandwidth
        latency_s=5e-6,  # rough: a framework copy op's dispatch
        copy_engines=1,
    ),
    access=Access.MIGRATE,  # the runtime moves tensors between arenas, as on a GPU
    flops_per_s=50e9,  # rough: 2 cores x ~3 GHz x AVX2 FMA, well below peak in practice
    op_overhead_s=5e-6,  # rough: eager PyTorch dispatch per op
    measured_op_times=True,
)

PRESETS: dict[str, Hardware] = {hw.name: hw for hw in (DRAM_OPTANE, DRAM_CXL, H100_SXM, A100, HOST)}


# --- validation and conversion ------------------------------------------------------------


def _number(value: object, where: str, example: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SentinelError(f"{where} = {value!r} is not a number; write e.g. {example!r}")
    return float(value)


def _bandwidth(value: object, where: str) -> float:
    if isinstance(value, str):
        return _reraise(parse_bandwidth, value, where)
    bps = _number(value, where, "20GB/s")
    if bps <= 0:
        raise SentinelError(f"{where} = {value!r} is not positive; give a rate such as '20GB/s'")
    return bps


def _time(value: object, where: str) -> float:
    if isinstance(value, str):
        return _reraise(parse_seconds, value, where)
    seconds = _number(value, where, "10us")
    if seconds < 0:
        raise SentinelError(f"{where} = {value!r} is negative; give a time such as '10us'")
    return seconds


def _capacity(value: object, where: str) -> int:
    if isinstance(value, str):
        size = _reraise(parse_bytes, value, where)
    elif isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        raise SentinelError(
            f"{where} = {value!r} is not a whole number of bytes; write e.g. 85899345920 or '80GiB'"
        )
    if size <= 0:
        raise SentinelError(f"{where} = {value!r} is not positive; give a size such as '80GiB'")
    return size


def _flops(value: object, where: str) -> float:
    if isinstance(value, str):
        return _reraise(parse_flops, value, where)
    flops = _number(value, where, "989T")
    if flops <= 0:
        raise SentinelError(f"{where} = {value!r} is not positive; give a rate such as '989T'")
    return flops


def _engines(value: object, where: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SentinelError(f"{where} = {value!r} is not a positive whole number; give e.g. 1 or 2")
    return value


def _access(value: object, where: str) -> Access:
    choices = ", ".join(a.value for a in Access)
    if isinstance(value, str):
        try:
            return Access(value.strip().lower())
        except ValueError:
            pass
    raise SentinelError(
        f"{where} = {value!r} is not an access mode; choose one of {choices} "
        "(direct: ops read the slow tier in place; migrate: it is copied to fast first)"
    )


def _flag(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise SentinelError(f"{where} = {value!r} is not true or false; write true or false")
    return value


def _name(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SentinelError(f"{where} = {value!r} is not a non-empty name; write e.g. 'HBM3'")
    return value


def _reraise(parse: Callable[[str], Any], value: str, where: str) -> Any:
    """Run a unit parser, prefixing its message with the field it was parsing."""
    try:
        return parse(value)
    except SentinelError as e:
        raise SentinelError(f"{where}: {e}") from None


# --- overrides ----------------------------------------------------------------------------

# key -> (the field it sets, as (part, field) with part "" for Hardware itself; converter)
_OVERRIDES: dict[str, tuple[str, str, Callable[[object, str], Any]]] = {
    "h2d": ("link", "h2d_bytes_per_s", _bandwidth),
    "d2h": ("link", "d2h_bytes_per_s", _bandwidth),
    "link_latency": ("link", "latency_s", _time),
    "copy_engines": ("link", "copy_engines", _engines),
    "fast_capacity": ("fast", "capacity_bytes", _capacity),
    "slow_capacity": ("slow", "capacity_bytes", _capacity),
    "fast_read": ("fast", "read_bytes_per_s", _bandwidth),
    "fast_write": ("fast", "write_bytes_per_s", _bandwidth),
    "slow_read": ("slow", "read_bytes_per_s", _bandwidth),
    "slow_write": ("slow", "write_bytes_per_s", _bandwidth),
    "fast_latency": ("fast", "latency_s", _time),
    "slow_latency": ("slow", "latency_s", _time),
    "flops": ("", "flops_per_s", _flops),
    "op_overhead": ("", "op_overhead_s", _time),
    "access": ("", "access", _access),
}
OVERRIDE_KEYS: tuple[str, ...] = tuple(_OVERRIDES)


def apply_overrides(hw: Hardware, overrides: Mapping[str, object], name: str) -> Hardware:
    """``hw`` with the named fields replaced (see ``parse_hardware`` for the keys).

    Values are text with units (``"20GB/s"``) or plain numbers in bytes, bytes/s,
    seconds and FLOP/s, so JSON files and command lines share one vocabulary.
    """
    parts: dict[str, dict[str, Any]] = {"": {}, "fast": {}, "slow": {}, "link": {}}
    for key, value in overrides.items():
        if key not in _OVERRIDES:
            raise SentinelError(
                f"unknown hardware override {key!r}; use one of {', '.join(OVERRIDE_KEYS)}"
            )
        part, field, convert = _OVERRIDES[key]
        parts[part][field] = convert(value, key)
    return dataclasses.replace(
        hw,
        name=name,
        fast=dataclasses.replace(hw.fast, **parts["fast"]),
        slow=dataclasses.replace(hw.slow, **parts["slow"]),
        link=dataclasses.replace(hw.link, **parts["link"]),
        **parts[""],
    )


# --- dict form ----------------------------------------------------------------------------

_TIER_FIELDS: dict[str, Callable[[object, str], Any]] = {
    "name": _name,
    "capacity_bytes": _capacity,
    "read_bytes_per_s": _bandwidth,
    "write_bytes_per_s": _bandwidth,
    "latency_s": _time,
}
_LINK_FIELDS: dict[str, Callable[[object, str], Any]] = {
    "h2d_bytes_per_s": _bandwidth,
    "d2h_bytes_per_s": _bandwidth,
    "latency_s": _time,
    "copy_engines": _engines,
}
_HARDWARE_FIELDS: dict[str, Callable[[object, str], Any]] = {
    "name": _name,
    "access": _access,
    "flops_per_s": _flops,
    "op_overhead_s": _time,
    "measured_op_times": _flag,
}
_OPTIONAL = {"measured_op_times", "copy_engines"}


def hardware_to_dict(hw: Hardware) -> dict[str, Any]:
    """A JSON-able dict (numbers in bytes, bytes/s, seconds), the form plan files embed."""
    d = dataclasses.asdict(hw)
    d["access"] = hw.access.value
    return d


def _fields(
    d: object, schema: Mapping[str, Callable[[object, str], Any]], where: str
) -> dict[str, Any]:
    """Convert the fields of one JSON object; ``where`` is its path ("" at the top)."""
    label = f"{where}: " if where else ""
    if not isinstance(d, Mapping):
        raise SentinelError(
            f"{label}a JSON {type(d).__name__} where an object is needed; write {{...}}"
        )
    unknown = [k for k in d if k not in schema]
    if unknown:
        raise SentinelError(
            f"{label}unknown field {unknown[0]!r}; allowed fields: {', '.join(schema)}"
        )
    required = [k for k in schema if k not in _OPTIONAL]
    missing = [k for k in required if k not in d]
    if missing:
        raise SentinelError(
            f"{label}missing field {missing[0]!r}; give all of {', '.join(required)}"
        )
    prefix = f"{where}." if where else ""
    return {k: convert(d[k], f"{prefix}{k}") for k, convert in schema.items() if k in d}


def hardware_from_dict(d: Mapping[str, Any], *, source: str = "hardware") -> Hardware:
    """The inverse of ``hardware_to_dict``, checking every field's type and sign.

    Fields may also be text with units (``"capacity_bytes": "80GiB"``) for hand-written
    files. ``source`` (e.g. the file's path) starts every error message.
    """
    try:
        top_schema: dict[str, Callable[[object, str], Any]] = {
            **_HARDWARE_FIELDS,
            "fast": lambda v, w: TierSpec(**_fields(v, _TIER_FIELDS, w)),
            "slow": lambda v, w: TierSpec(**_fields(v, _TIER_FIELDS, w)),
            "link": lambda v, w: LinkSpec(**_fields(v, _LINK_FIELDS, w)),
        }
        return Hardware(**_fields(d, top_schema, ""))
    except SentinelError as e:
        raise SentinelError(f"{source}: {e}") from None


# --- specs --------------------------------------------------------------------------------


def _preset_with_overrides(spec: str) -> Hardware:
    head, *items = (part.strip() for part in spec.split(","))
    if head not in PRESETS:
        raise SentinelError(
            f"unknown hardware preset {head!r}; choose one of {', '.join(PRESETS)}, "
            "or give a path to a .json hardware file"
        )
    overrides: dict[str, str] = {}
    for item in items:
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not key or not value:
            raise SentinelError(
                f"hardware override {item!r} in {spec!r} is not key=value; "
                "write e.g. 'h100-sxm,h2d=20GB/s'"
            )
        if key in overrides:
            raise SentinelError(f"hardware override {key!r} is given twice in {spec!r}; keep one")
        overrides[key] = value
    if not overrides:
        return PRESETS[head]
    name = ",".join([head, *(f"{k}={v}" for k, v in overrides.items())])
    return apply_overrides(PRESETS[head], overrides, name=name)


def _from_file(path: Path) -> Hardware:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SentinelError(
            f"{path}: no such hardware file; give an existing .json file or one of the "
            f"presets {', '.join(PRESETS)}"
        ) from None
    except OSError as e:
        raise SentinelError(f"{path}: cannot read hardware file: {e}") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise SentinelError(
            f"{path}: not valid JSON ({e}); write an object such as "
            '{"base": "h100-sxm", "h2d": "20GB/s"}'
        ) from None
    if not isinstance(d, dict):
        raise SentinelError(
            f"{path}: holds a JSON {type(d).__name__}, not an object; write an object such as "
            '{"base": "h100-sxm", "h2d": "20GB/s"}'
        )
    if "base" not in d:
        return hardware_from_dict({"name": path.stem, **d}, source=str(path))
    base = d.pop("base")
    name = d.pop("name", None)
    try:
        if not isinstance(base, str):
            raise SentinelError(
                f"base = {base!r} is not a preset name; choose one of {', '.join(PRESETS)}"
            )
        hw = _preset_with_overrides(base)
        return apply_overrides(hw, d, name=_name(name, "name") if name is not None else path.stem)
    except SentinelError as e:
        raise SentinelError(f"{path}: {e}") from None


def parse_hardware(spec: str) -> Hardware:
    """The hardware a ``--hardware`` spec names.

    Forms:
      - a preset: ``"h100-sxm"`` (one of ``PRESETS``);
      - a preset with comma-separated overrides: ``"h100-sxm,h2d=20GB/s,d2h=18GB/s"``
        (the result is named by the spec, spaces around ``,`` and ``=`` removed);
      - a JSON file (a path ending in ``.json``, or any existing file): either every
        field of ``Hardware`` as ``hardware_to_dict`` writes it (nested ``fast``,
        ``slow``, ``link``; ``"access": "direct"|"migrate"``; ``name`` defaults to the
        file's stem), or ``{"base": "h100-sxm", <override>: <value>, ...}``.

    Override keys: ``h2d``, ``d2h`` (link bandwidth per direction, e.g. ``20GB/s``),
    ``link_latency`` (per copy, e.g. ``10us``), ``copy_engines`` (concurrent copies per
    direction, e.g. ``2``), ``fast_capacity``, ``slow_capacity`` (e.g. ``80GB``,
    ``16GiB``), ``fast_read``, ``fast_write``, ``slow_read``, ``slow_write``
    (bandwidth), ``fast_latency``, ``slow_latency`` (e.g. ``300ns``), ``flops`` (e.g.
    ``989T``), ``op_overhead`` (per op, e.g. ``5us``), ``access`` (``direct`` or
    ``migrate``).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SentinelError(
            f"hardware spec {spec!r} is empty; give one of {', '.join(PRESETS)} or a .json file"
        )
    spec = spec.strip()
    head = spec.split(",", 1)[0].strip()
    if head not in PRESETS and (spec.endswith(".json") or Path(spec).is_file()):
        return _from_file(Path(spec))
    return _preset_with_overrides(spec)

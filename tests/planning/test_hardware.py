"""Hardware presets are sane, specs and files parse, and every bad input fails with a hint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from sentinel_hm.core.hardware import Access, Hardware
from sentinel_hm.core.presets import (
    OVERRIDE_KEYS,
    PRESETS,
    hardware_from_dict,
    hardware_to_dict,
    parse_hardware,
)
from sentinel_hm.errors import SentinelError
from sentinel_hm.units import (
    format_bandwidth,
    parse_bandwidth,
    parse_budget,
    parse_bytes,
    parse_flops,
    parse_seconds,
)

GiB = 2**30

# --- presets ------------------------------------------------------------------------------


def test_the_documented_presets_exist() -> None:
    assert set(PRESETS) == {"dram-optane", "dram-cxl", "h100-sxm", "a100", "host"}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_figures_are_positive_and_named(name: str) -> None:
    hw = PRESETS[name]
    assert hw.name == name
    for tier in (hw.fast, hw.slow):
        assert tier.name
        assert isinstance(tier.capacity_bytes, int) and tier.capacity_bytes > 0
        assert tier.read_bytes_per_s > 0 and tier.write_bytes_per_s > 0
        assert tier.latency_s > 0
    assert hw.link.h2d_bytes_per_s > 0 and hw.link.d2h_bytes_per_s > 0
    assert hw.link.latency_s > 0 and hw.link.copy_engines >= 1
    assert hw.flops_per_s > 0 and hw.op_overhead_s > 0
    assert parse_hardware(name) is hw


@pytest.mark.parametrize("name", ["h100-sxm", "a100"])
def test_gpus_migrate_over_a_pcie_link_slower_than_hbm(name: str) -> None:
    hw = PRESETS[name]
    assert hw.access is Access.MIGRATE
    assert not hw.measured_op_times
    assert hw.fast.read_bytes_per_s > 10 * hw.link.h2d_bytes_per_s
    assert hw.fast.capacity_bytes < hw.slow.capacity_bytes


@pytest.mark.parametrize("name", ["dram-optane", "dram-cxl"])
def test_numa_tiers_are_direct_and_copies_run_at_the_slower_side(name: str) -> None:
    hw = PRESETS[name]
    assert hw.access is Access.DIRECT
    assert hw.fast.read_bytes_per_s > hw.slow.read_bytes_per_s
    assert hw.fast.write_bytes_per_s > hw.slow.write_bytes_per_s
    assert hw.fast.latency_s < hw.slow.latency_s
    assert hw.link.h2d_bytes_per_s == min(hw.slow.read_bytes_per_s, hw.fast.write_bytes_per_s)
    assert hw.link.d2h_bytes_per_s == min(hw.fast.read_bytes_per_s, hw.slow.write_bytes_per_s)


def test_optane_figures_are_the_published_ones() -> None:
    hw = PRESETS["dram-optane"]
    assert hw.slow.read_bytes_per_s == 39.4e9
    assert hw.slow.write_bytes_per_s == 13.9e9
    assert hw.slow.latency_s == pytest.approx(305e-9)


def test_h100_figures_are_the_datasheet_ones() -> None:
    hw = PRESETS["h100-sxm"]
    assert hw.fast.capacity_bytes == 80 * GiB
    assert hw.fast.read_bytes_per_s == 3.35e12
    assert hw.link.h2d_bytes_per_s == hw.link.d2h_bytes_per_s == 64e9
    assert hw.flops_per_s == 989e12


def test_host_preset_is_measured_and_symmetric() -> None:
    hw = PRESETS["host"]
    assert hw.measured_op_times
    assert hw.access is Access.MIGRATE
    assert hw.fast.read_bytes_per_s == hw.slow.read_bytes_per_s


# --- overrides ----------------------------------------------------------------------------

# key, text, (part, field), value it must become
OVERRIDES = [
    ("h2d", "20GB/s", ("link", "h2d_bytes_per_s"), 20e9),
    ("d2h", "18 GB/s", ("link", "d2h_bytes_per_s"), 18e9),
    ("link_latency", "20us", ("link", "latency_s"), 20e-6),
    ("copy_engines", "2", ("link", "copy_engines"), 2),
    ("fast_capacity", "40GiB", ("fast", "capacity_bytes"), 40 * GiB),
    ("slow_capacity", "1TB", ("slow", "capacity_bytes"), 10**12),
    ("fast_read", "1.5TB/s", ("fast", "read_bytes_per_s"), 1.5e12),
    ("fast_write", "1TB/s", ("fast", "write_bytes_per_s"), 1e12),
    ("slow_read", "900MB/s", ("slow", "read_bytes_per_s"), 9e8),
    ("slow_write", "25GiB/s", ("slow", "write_bytes_per_s"), 25 * GiB),
    ("fast_latency", "300ns", ("fast", "latency_s"), 300e-9),
    ("slow_latency", "2ms", ("slow", "latency_s"), 2e-3),
    ("flops", "500T", ("", "flops_per_s"), 500e12),
    ("op_overhead", "1.5s", ("", "op_overhead_s"), 1.5),
    ("access", "direct", ("", "access"), Access.DIRECT),
]


def _flat(hw: Hardware) -> dict[tuple[str, str], object]:
    out: dict[tuple[str, str], object] = {}
    for f in dataclasses.fields(hw):
        value = getattr(hw, f.name)
        if dataclasses.is_dataclass(value):
            out.update(
                {(f.name, g.name): getattr(value, g.name) for g in dataclasses.fields(value)}
            )
        else:
            out[("", f.name)] = value
    return out


def test_every_documented_override_key_is_tested() -> None:
    assert sorted(OVERRIDE_KEYS) == sorted(key for key, *_ in OVERRIDES)


@pytest.mark.parametrize(("key", "text", "field", "expected"), OVERRIDES)
def test_override_changes_exactly_the_named_field(
    key: str, text: str, field: tuple[str, str], expected: object
) -> None:
    base = PRESETS["h100-sxm"]
    hw = parse_hardware(f"h100-sxm,{key}={text}")
    before, after = _flat(base), _flat(hw)
    assert after[field] == (pytest.approx(expected) if isinstance(expected, float) else expected)
    assert after[field] != before[field]
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {field, ("", "name")}
    assert hw.name == f"h100-sxm,{key}={text}"


def test_several_overrides_and_spaces() -> None:
    hw = parse_hardware(" h100-sxm , h2d = 20GB/s , d2h=18GB/s ")
    assert hw.link.h2d_bytes_per_s == 20e9
    assert hw.link.d2h_bytes_per_s == 18e9
    assert hw.name == "h100-sxm,h2d=20GB/s,d2h=18GB/s"
    assert PRESETS["h100-sxm"].link.h2d_bytes_per_s == 64e9  # the preset is untouched


# --- dicts and files ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_dict_round_trip_through_json(name: str) -> None:
    hw = PRESETS[name]
    d = json.loads(json.dumps(hardware_to_dict(hw)))
    assert d["access"] == hw.access.value
    assert hardware_from_dict(d) == hw


def test_full_description_file_round_trip(tmp_path: Path) -> None:
    hw = parse_hardware("a100,h2d=24GB/s")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(hardware_to_dict(hw)))
    assert parse_hardware(str(path)) == hw


def test_file_without_name_is_named_by_its_stem_and_takes_units(tmp_path: Path) -> None:
    d = hardware_to_dict(PRESETS["dram-cxl"])
    del d["name"]
    del d["measured_op_times"]  # optional, defaults to False
    d["fast"]["capacity_bytes"] = "64GiB"
    d["link"]["h2d_bytes_per_s"] = "10GB/s"
    path = tmp_path / "box.json"
    path.write_text(json.dumps(d))
    hw = parse_hardware(str(path))
    assert hw.name == "box"
    assert hw.fast.capacity_bytes == 64 * GiB
    assert hw.link.h2d_bytes_per_s == 10e9
    assert not hw.measured_op_times


def test_file_with_base_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"base": "h100-sxm", "h2d": "52GB/s", "d2h": 50e9}))
    hw = parse_hardware(str(path))
    assert hw.name == "tuned"
    assert hw.link.h2d_bytes_per_s == 52e9
    assert hw.link.d2h_bytes_per_s == 50e9
    assert hw.fast == PRESETS["h100-sxm"].fast


def test_file_with_base_keeps_an_explicit_name(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"base": "a100", "name": "lab-a100", "copy_engines": 2}))
    hw = parse_hardware(str(path))
    assert hw.name == "lab-a100"
    assert hw.link.copy_engines == 2


def test_existing_file_without_json_suffix_is_read(tmp_path: Path) -> None:
    path = tmp_path / "hardware.txt"
    path.write_text(json.dumps({"base": "host"}))
    assert parse_hardware(str(path)).link == PRESETS["host"].link


# --- errors -------------------------------------------------------------------------------


def _error(spec: str) -> str:
    with pytest.raises(SentinelError) as info:
        parse_hardware(spec)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_preset_lists_the_presets() -> None:
    message = _error("h200")
    assert "'h200'" in message
    assert all(name in message for name in PRESETS)


def test_unknown_key_lists_the_keys() -> None:
    message = _error("h100-sxm,bandwidth=20GB/s")
    assert "'bandwidth'" in message
    assert all(key in message for key in OVERRIDE_KEYS)


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("h100-sxm,h2d=fast", "'fast'"),
        ("h100-sxm,h2d=0GB/s", "'0GB/s'"),
        ("h100-sxm,link_latency=10 parsecs", "'10 parsecs'"),
        ("h100-sxm,fast_capacity=-1GB", "'-1GB'"),
        ("h100-sxm,copy_engines=0", "0"),
        ("h100-sxm,copy_engines=two", "'two'"),
        ("h100-sxm,flops=lots", "'lots'"),
        ("h100-sxm,access=cached", "'cached'"),
    ],
)
def test_bad_value_is_named_with_an_example(spec: str, named: str) -> None:
    message = _error(spec)
    assert named in message
    assert "e.g." in message or "choose one of" in message


@pytest.mark.parametrize("spec", ["h100-sxm,h2d", "h100-sxm,=1", "h100-sxm,h2d="])
def test_item_without_key_and_value_is_refused(spec: str) -> None:
    assert "key=value" in _error(spec)


def test_key_given_twice_is_refused() -> None:
    assert "twice" in _error("h100-sxm,h2d=1GB/s,h2d=2GB/s")


def test_empty_spec_is_refused() -> None:
    assert "empty" in _error("  ")


def test_missing_file(tmp_path: Path) -> None:
    message = _error(str(tmp_path / "nope.json"))
    assert "no such hardware file" in message
    assert "nope.json" in message


@pytest.mark.parametrize(
    ("content", "hint"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not an object"),
        ('{"base": "h300"}', "unknown hardware preset 'h300'"),
        ('{"base": 3}', "not a preset name"),
        ('{"base": "a100", "speed": 3}', "unknown hardware override 'speed'"),
        ('{"base": "a100", "h2d": "quick"}', "'quick'"),
        ('{"name": "x"}', "missing field 'access'"),
    ],
)
def test_bad_file_names_the_file_and_the_problem(tmp_path: Path, content: str, hint: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    message = _error(str(path))
    assert message.startswith(str(path))
    assert hint in message


def _bad_dict(change: str, value: object) -> dict[str, object]:
    d = hardware_to_dict(PRESETS["a100"])
    *parents, last = change.split(".")
    target = d
    for p in parents:
        target = target[p]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return d


@pytest.mark.parametrize(
    ("change", "value", "hint"),
    [
        ("fast.capacity_bytes", 1.5, "fast.capacity_bytes = 1.5"),
        ("fast.capacity_bytes", True, "fast.capacity_bytes = True"),
        ("slow.read_bytes_per_s", -1, "slow.read_bytes_per_s = -1"),
        ("link.latency_s", "soon", "link.latency_s: time 'soon'"),
        ("link.copy_engines", 1.0, "link.copy_engines = 1.0"),
        ("access", "teleport", "access = 'teleport'"),
        ("measured_op_times", "yes", "measured_op_times = 'yes'"),
        ("flops_per_s", None, "flops_per_s = None"),
        ("fast.name", "", "fast.name = ''"),
        ("fast.bogus", 1, "fast: unknown field 'bogus'"),
        ("bogus", 1, "unknown field 'bogus'"),
        ("link.h2d_bytes_per_s", KeyError, "link: missing field 'h2d_bytes_per_s'"),
        ("slow", [], "slow: a JSON list"),
    ],
)
def test_from_dict_checks_types(change: str, value: object, hint: str) -> None:
    with pytest.raises(SentinelError) as info:
        hardware_from_dict(_bad_dict(change, value), source="plan.json")
    message = str(info.value)
    assert message.startswith("plan.json: ")
    assert hint in message


# --- units --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1000", 1000),
        ("0", 0),
        ("1000B", 1000),
        ("64KiB", 64 * 1024),
        ("512MiB", 512 * 2**20),
        ("4GiB", 4 * GiB),
        ("4 GiB", 4 * GiB),
        ("1.5GB", 1_500_000_000),
        ("80GB", 80 * 10**9),
        ("16gib", 16 * GiB),
        ("2TB", 2 * 10**12),
        ("1TiB", 2**40),
        ("3k", 3000),
        ("1e3", 1000),
    ],
)
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected
    assert isinstance(parse_bytes(text), int)


@pytest.mark.parametrize("text", ["", "abc", "-1GB", "GB", "1.5.2GB", "4 XB", "4GiBs", "1e999GB"])
def test_parse_bytes_rejects(text: str) -> None:
    with pytest.raises(SentinelError, match="byte size"):
        parse_bytes(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20GB/s", 20e9),
        ("20 GB/s", 20e9),
        ("900MB/s", 900e6),
        ("1.5TB/s", 1.5e12),
        ("25GiB/s", 25 * 2**30),
        ("64e9", 64e9),
    ],
)
def test_parse_bandwidth(text: str, expected: float) -> None:
    assert parse_bandwidth(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["0GB/s", "-5GB/s", "fast", "GB/s", "20GB/h", ""])
def test_parse_bandwidth_rejects(text: str) -> None:
    with pytest.raises(SentinelError, match="bandwidth"):
        parse_bandwidth(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10us", 10e-6),
        ("10µs", 10e-6),
        ("2ms", 2e-3),
        ("1.5s", 1.5),
        ("300ns", 300e-9),
        ("300 ns", 300e-9),
        ("0", 0.0),
        ("1e-6", 1e-6),
    ],
)
def test_parse_seconds(text: str, expected: float) -> None:
    assert parse_seconds(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["-1s", "10 min", "soon", "", "ms", "1e999s"])
def test_parse_seconds_rejects(text: str) -> None:
    with pytest.raises(SentinelError, match="time"):
        parse_seconds(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("989T", 989e12), ("50G", 50e9), ("19.5TFLOPS", 19.5e12), ("1e12", 1e12), ("2 P", 2e15)],
)
def test_parse_flops(text: str, expected: float) -> None:
    assert parse_flops(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["0", "-1T", "many", "5X"])
def test_parse_flops_rejects(text: str) -> None:
    with pytest.raises(SentinelError, match="compute rate"):
        parse_flops(text)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20%", 200),
        (" 20 % ", 200),
        ("100%", 1000),
        ("0.5%", 5),
        ("4GiB", 4 * GiB),
        ("1.5GB", 1_500_000_000),
        ("300", 300),
        (300, 300),
    ],
)
def test_parse_budget(value: str | int, expected: int) -> None:
    assert parse_budget(value, 1000) == expected


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("0%", "(0, 100]"),
        ("150%", "absolute size"),
        ("-5%", "negative"),
        ("-1GB", "negative"),
        ("abc", "neither a percentage nor a size"),
        ("x%", "(0, 100]"),
        ("0", "not positive"),
        (0, "not positive"),
        (-3, "not positive"),
        (True, "neither a byte count nor text"),
    ],
)
def test_parse_budget_rejects(value: str | int, hint: str) -> None:
    with pytest.raises(SentinelError) as info:
        parse_budget(value, 1000)
    assert hint in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("bps", "text"),
    [(20e9, "20.0 GB/s"), (1.5e12, "1.5 TB/s"), (900e6, "900.0 MB/s"), (512, "512.0 B/s")],
)
def test_format_bandwidth(bps: float, text: str) -> None:
    assert format_bandwidth(bps) == text
    assert parse_bandwidth(text) == pytest.approx(bps)

"""Plan files and the plan/trace match check."""

from __future__ import annotations

import json

import pytest

import sentinel_hm as sh
from sentinel_hm.core.hardware import Access
from sentinel_hm.planning.io import plan_to_dict

from .tracegen import MiB, chain, hardware

HW = hardware(Access.MIGRATE)


@pytest.mark.parametrize("name", ["p.json", "p.json.gz"])
def test_round_trip(tmp_path, name):
    plan = sh.plan(chain(), HW, 2 * MiB, "sentinel")
    loaded = sh.load_plan(sh.save_plan(plan, tmp_path / name))
    assert loaded.moves == plan.moves and loaded.placement == plan.placement
    assert loaded.budget_bytes == plan.budget_bytes and loaded.policy == "sentinel"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(version=99), "version 99 is not supported"),
        (lambda d: d.update(format="x"), "not a sentinel-hm plan"),
        (lambda d: d["moves"].append([0, "fast", 10**6, 1]), "not \\[storage"),
        (lambda d: d["moves"].append([0, "sideways", 1, 1]), "malformed plan"),
        (lambda d: d.pop("budget_bytes"), "malformed plan"),
    ],
)
def test_bad_plan_files(tmp_path, mutate, message):
    data = plan_to_dict(sh.plan(chain(), HW, 2 * MiB, "sentinel"))
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(sh.SentinelError, match=message):
        sh.load_plan(path)


def test_a_plan_is_refused_on_another_trace():
    plan = sh.plan(chain(3), HW, "100%", "all-fast")
    with pytest.raises(sh.SentinelError, match="plan this trace again"):
        sh.simulate(chain(4), plan, HW)

"""Plan files: versioned JSON, like trace files (gzip when the name ends in ``.gz``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sentinel_hm.core.plan import Move, Plan, Tier
from sentinel_hm.errors import SentinelError
from sentinel_hm.jsonfile import read_json, write_json

FORMAT = "sentinel-hm/plan"
SCHEMA_VERSION = 3  # 2: recomputed layers; 3: ops selective recomputation keeps
READABLE = (2, 3)  # a version 2 plan recomputes whole layers


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": SCHEMA_VERSION,
        "policy": plan.policy,
        "hardware": plan.hardware,
        "budget_bytes": plan.budget_bytes,
        "n_ops": plan.n_ops,
        "n_storages": plan.n_storages,
        "placement": [[sid, fast] for sid, fast in sorted(plan.placement.items())],
        "moves": [[m.storage, m.to.value, m.issue_at, m.nbytes] for m in plan.moves],
        "info": plan.info,
        "recompute": list(plan.recompute),
        "recompute_keeps": list(plan.recompute_keeps),
    }


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Write ``plan`` to ``path`` (gzip-compressed when it ends in ``.gz``)."""
    return write_json(plan_to_dict(plan), path)


def load_plan(path: str | Path) -> Plan:
    """Read a plan file written by `save_plan`; raises `SentinelError` if it is not one."""
    return plan_from_dict(read_json(path, "plan"), str(path))


def plan_from_dict(data: Any, source: str = "plan") -> Plan:
    def fail(message: str) -> SentinelError:
        return SentinelError(f"{source}: {message}")

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise fail(f'not a sentinel-hm plan (no "format": "{FORMAT}")')
    if data.get("version") not in READABLE:
        raise fail(f"plan schema version {data.get('version')!r} is not supported (this "
                   f"sentinel-hm reads versions {', '.join(map(str, READABLE))}): make the "
                   "plan again")
    try:
        n_ops, n_storages = int(data["n_ops"]), int(data["n_storages"])
        placement = {}
        for sid, fast in data["placement"]:
            if not (isinstance(sid, int) and 0 <= sid < n_storages and isinstance(fast, int)):
                raise fail(f"placement entry {[sid, fast]!r} is not [storage, fast bytes]")
            placement[sid] = fast
        moves = []
        for entry in data["moves"]:
            sid, to, issue_at, nbytes = entry
            if not (isinstance(sid, int) and 0 <= sid < n_storages and isinstance(issue_at, int)
                    and 0 <= issue_at <= n_ops and isinstance(nbytes, int) and nbytes >= 0):
                raise fail(f"move {entry!r} is not [storage, 'fast'|'slow', op, bytes] in range")
            moves.append(Move(sid, Tier(to), issue_at, nbytes))
        info = data.get("info", {})
        recompute = data.get("recompute", [])
        if not (isinstance(recompute, list) and all(isinstance(i, int) and i >= 0
                                                     for i in recompute)):
            raise fail(f"recompute {recompute!r} is not a list of layer indices")
        keeps = data.get("recompute_keeps", [])
        if not (isinstance(keeps, list) and all(isinstance(name, str) for name in keeps)):
            raise fail(f"recompute_keeps {keeps!r} is not a list of op names")
        return Plan(str(data["policy"]), str(data["hardware"]), int(data["budget_bytes"]),
                    n_ops, n_storages, placement, tuple(moves),
                    dict(info) if isinstance(info, dict) else {}, tuple(sorted(recompute)),
                    tuple(sorted(keeps)))
    except SentinelError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise fail(f"malformed plan ({type(e).__name__}: {e})") from None

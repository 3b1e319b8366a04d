"""The Plan: where each managed storage lives and when each migration is issued.

A plan is pure data, made by a policy from a `Trace`, replayed by the simulator
and (later) executed by the runtime. Storages the plan does not mention live in
the fast tier for their whole life (short-lived tensors always do).

- ``placement``: storage id -> bytes in the fast tier when the step starts (for
  storages that exist before the step) or when the storage is created. A
  storage not listed starts entirely fast. Whole-tensor policies use 0 or
  ``nbytes``; page-level policies may place part of a storage.
- ``moves``: migrations, each issued just before op ``issue_at`` starts, in
  list order. A move to the fast tier is a prefetch (or a promotion); a move to
  the slow tier an eviction (or a demotion).

- ``recompute``: layers whose forward reruns just before their backward
  (activation checkpointing) instead of keeping their saved activations. The
  plan's storages and ops are then those of the trace with these layers
  recomputed (`sentinel_hm.trace.recompute.with_recomputed_layers`): ``n_ops``,
  ``n_storages``, placement and moves refer to that trace. ``recompute_keeps``:
  op names whose outputs the recomputation keeps (selective checkpointing); empty:
  the layers' whole forward reruns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Tier(StrEnum):
    FAST = "fast"
    SLOW = "slow"


@dataclass(frozen=True, slots=True)
class Move:
    storage: int
    to: Tier
    issue_at: int
    nbytes: int


@dataclass(frozen=True)
class Plan:
    policy: str
    hardware: str
    budget_bytes: int
    n_ops: int
    n_storages: int
    placement: dict[int, int] = field(default_factory=dict)
    moves: tuple[Move, ...] = ()
    info: dict[str, object] = field(default_factory=dict)
    recompute: tuple[int, ...] = ()  # layer indices, sorted
    recompute_keeps: tuple[str, ...] = ()  # op names, sorted

    @property
    def managed(self) -> frozenset[int]:
        """Storages that are ever outside the fast tier under this plan."""
        return frozenset(self.placement) | frozenset(m.storage for m in self.moves)

    def moved_bytes(self, to: Tier) -> int:
        return sum(m.nbytes for m in self.moves if m.to is to)

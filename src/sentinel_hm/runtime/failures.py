"""Whose error is it: the program's, or Sentinel's own machinery's.

NOTE [Failures]
A step can fail in the program (a shape error in the user's forward, an out-of-memory) or in
Sentinel's own machinery: a copy between tiers, a saved-tensor hook, a recomputed layer's
rerun, the tracer's bookkeeping, the planner after the profiled step. The program's own
error passes through unchanged, and Sentinel stays usable (the next step is profiled
afresh). A failure of the machinery must not take the user's run with it: everything is
restored (tensors back in fast memory, layers unwrapped, hooks removed, the arena released),
later steps run plain, and the error is raised as a `SentinelError` that says what failed,
whether the step completed, and that training can go on.

An error is the machinery's when its traceback passes through this package: a frame in
``sentinel_hm`` other than the step's own context managers (the program's exception is thrown
into them), the reference workloads (the program, for tests and demos), and the tracer's
dispatch where it only forwards the program's op (an op that raised there failed on the
program's inputs: its frames go on into torch), and the call of a framework's closure (NOTE
[Closures]: it runs the program's forward and backward).
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterable

import sentinel_hm

_PACKAGE = os.path.dirname(os.path.abspath(sentinel_hm.__file__)) + os.sep
_PROGRAM = os.path.join(_PACKAGE, "workloads") + os.sep
# frames that forward the program's op: ours only where the error was raised in them
_FORWARDING = frozenset({"__torch_dispatch__", "_on_op",
                         "_closure_first"})  # calls a framework's closure: the program


def machinery_frame(error: BaseException,
                    passive: Iterable[types.CodeType] = ()) -> str | None:
    """Where in Sentinel's machinery ``error`` was raised (``file:line in function``, the
    innermost such frame), or None when it is the program's (NOTE [Failures]); frames of
    ``passive`` code (the step's context managers) do not count."""
    skip = set(passive)
    frames: list[types.FrameType] = []
    lines: list[int] = []
    tb = error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        lines.append(tb.tb_lineno)
        tb = tb.tb_next
    found = None
    for k, (frame, line) in enumerate(zip(frames, lines, strict=True)):
        code = frame.f_code
        path = os.path.abspath(code.co_filename)
        if code in skip or not path.startswith(_PACKAGE) or path.startswith(_PROGRAM):
            continue
        deeper = frames[k + 1 :]
        if code.co_name in _FORWARDING and deeper and all(
                f.f_code.co_name in _FORWARDING
                or not os.path.abspath(f.f_code.co_filename).startswith(_PACKAGE)
                for f in deeper):
            continue  # the program's op raised inside the tracer: the program's error
        found = f"{os.path.relpath(path, os.path.dirname(_PACKAGE))}:{line} in {code.co_name}"
    return found

"""Test-only failpoints: named places where a crash can be injected.

Off unless armed: by ``arm(name)`` in a test, or by the ``SWAMP_FAILPOINTS`` environment
variable (comma-separated ``name``, or ``name=kill`` for SIGKILL of the process itself).
``hit(name)`` costs one set lookup when nothing is armed.
"""

from __future__ import annotations

import os
import signal
from typing import Literal

Action = Literal["raise", "kill"]


class FailpointError(RuntimeError):
    """Raised at an armed failpoint: a crash at exactly that place."""


_armed: dict[str, tuple[Action, int]] = {}
_skips: dict[str, int] = {}


def _from_environment() -> None:
    for item in filter(None, os.environ.get("SWAMP_FAILPOINTS", "").split(",")):
        name, _, action = item.strip().partition("=")
        _armed[name] = ("kill" if action == "kill" else "raise", -1)


def arm(name: str, *, action: Action = "raise", times: int = -1, skip: int = 0) -> None:
    """Fire at ``name`` for ``times`` hits (-1: every hit until disarmed), after letting the
    first ``skip`` hits pass (e.g. crash after the second batch: skip=1)."""
    _armed[name] = (action, times)
    _skips[name] = skip


def disarm(name: str | None = None) -> None:
    if name is None:
        _armed.clear()
        _skips.clear()
    else:
        _armed.pop(name, None)
        _skips.pop(name, None)


def hit(name: str) -> None:
    if name not in _armed:
        return
    if _skips.get(name, 0) > 0:
        _skips[name] -= 1
        return
    action, times = _armed[name]
    if times == 0:
        return
    _armed[name] = (action, times - 1 if times > 0 else times)
    if action == "kill":
        # A hard crash, as the kernel's OOM killer or a node failure would deliver it: no
        # finally blocks, no graceful shutdown, open transactions left on the server.
        os.kill(os.getpid(), signal.SIGKILL)
    raise FailpointError(f"failpoint {name}")


_from_environment()

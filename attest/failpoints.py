"""Fail points: named moments where a process can be made to die with SIGKILL, for crash tests.

`KAI_FAILPOINT=NAME@N` kills the process the N-th time (1-based) it reaches the point NAME
(`NAME` alone: the first time). Nothing happens when the variable is unset, which is always the
case outside tests. The kill is a real SIGKILL: no handler, no flush, no cleanup, exactly what a
node failure or the OOM killer does.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def reached(name: str) -> None:
    spec = os.environ.get("KAI_FAILPOINT")
    if not spec:
        return
    want, _, nth = spec.partition("@")
    if want != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)

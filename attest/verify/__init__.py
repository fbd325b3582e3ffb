"""The verifier behind `kai-attest verify`.

`verifier` runs the checks (`checks/`: chain, files, model, data, one small function each) over a
bundle and builds the report; `findings` is what a check returns and the context it reads; `policy`
the evaluator's trust policy; `cache` the bounded, parallel subject hashing; `trajectory` the update
bounds; `replay` and `replay_plan` segment replay; `data_replay` --replay-data; `report` the HTML page;
`checknames` every check's name. `attest.verify.X` names the verifier's own (`verify_bundle`, `CHECKS`,
`DERIVERS`, ...); they load on first use, so the write side can import `findings` without the checks.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any


def __getattr__(name: str) -> Any:
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # a submodule (`from attest.verify import trajectory`)
    verifier = importlib.import_module("attest.verify.verifier")  # not `from . import`: that asks this hook again
    try:
        return getattr(verifier, name)
    except AttributeError:
        raise AttributeError(f"module 'attest.verify' has no attribute {name!r}") from None

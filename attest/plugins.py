"""The allow-list of code a verification runs on a bundle's behalf, in one place. A bundle only names
these (a genesis recipe's `deriver`, a run's `replay_plugin`); the evaluator's install decides what
runs, and a module is never imported merely because a bundle names it."""

from __future__ import annotations

# Genesis derivers a bundle may name -> the module that holds `derive`.
DERIVERS = {"kai_train.genesis:derive": "kai_train.genesis", "kai_train.initspec:derive": "kai_train.initspec"}

# The one segment replay implementation this verifier runs (`python -m` under torchrun).
REPLAY_PLUGIN = "kai_train.replay"

"""The names of the verifier's checks, declared once: each finding names one (`Finding` refuses any
other), a policy's `required_checks` is checked against them when it is loaded, and
docs/bundle-format.md's table of checks lists exactly these (tests/test_bundle_format_doc.py)."""

from __future__ import annotations

# In the order `kai-attest verify` reports them.
CHECK_NAMES = (
    "challenge",
    "statement-format",
    "signature",
    "chain-sequence",
    "chain-link",
    "statement-order",
    "timestamps",
    "subject-digest",
    "weights-digest",
    "oms-signature",
    "run-config",
    "genesis",
    "trajectory",
    "release",
    "slsa-provenance",
    "data-lineage",
    "data-licence",
    "data-sampler",
    "data-replay",
    "replay",
)

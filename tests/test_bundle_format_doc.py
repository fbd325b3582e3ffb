"""docs/bundle-format.md is the evaluator's contract: its statement kinds and their predicate fields
are `attest.statements.REQUIRED`, and its table of checks names exactly the verifier's checks."""

from __future__ import annotations

import re
from pathlib import Path

from attest.verify.checknames import CHECK_NAMES
from attest.statements import CHAIN_FIELDS, REQUIRED

DOC = Path(__file__).resolve().parent.parent / "docs" / "bundle-format.md"


def _sections(text: str, level: str) -> dict[str, str]:
    """Heading name in backticks -> the text up to the next heading of that level or above."""
    parts = re.split(rf"^({level} .*)$", text, flags=re.M)
    out = {}
    for head, body in zip(parts[1::2], parts[2::2]):
        if m := re.fullmatch(rf"{level} `([a-z0-9-]+)`", head.strip()):
            out[m.group(1)] = re.split(rf"^#{{1,{len(level)}}} ", body, flags=re.M)[0]
    return out


def test_every_statement_kind_has_its_section_and_nothing_else() -> None:
    statements = _sections(DOC.read_text().split("## Statements", 1)[1].split("\n## ", 1)[0], "###")
    assert sorted(statements) == sorted(REQUIRED)


def test_each_section_names_every_required_predicate_field() -> None:
    statements = _sections(DOC.read_text().split("## Statements", 1)[1].split("\n## ", 1)[0], "###")
    missing = {kind: [f for f in fields if f"`{f}`" not in statements.get(kind, "")] for kind, fields in REQUIRED.items()}
    assert {k: v for k, v in missing.items() if v} == {}


def test_the_fields_every_predicate_carries_are_the_chain_writers() -> None:
    common = DOC.read_text().split("Every predicate carries:", 1)[1].split("###", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \|", common, flags=re.M)
    assert rows == list(CHAIN_FIELDS)


def test_the_table_of_checks_names_exactly_the_verifiers_checks() -> None:
    table = DOC.read_text().split("## What `kai-attest verify` checks", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", table, flags=re.M)
    assert sorted(rows) == sorted(CHECK_NAMES) and len(rows) == len(set(rows))

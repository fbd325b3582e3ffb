"""Hostile input never ends in a traceback: random and mutated chains, statements, manifests,
safetensors headers and archives go into `kai-attest verify` (in-process main()), which must exit
0, 1 or 2 with at most a one-line error, never raise and never report an internal error."""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bundlefactory import DERIVER, ckpt_name, make_bundle, statements, write_chain
from fuzzharness import _paths
from fuzzharness import _set as _replace
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attest.verify as verify
from attest.cli import main
from attest.digest import sha256_file

# CI runs a fixed, modest set; KAI_FUZZ_EXAMPLES=5000 runs a longer, random campaign.
EXAMPLES = int(os.environ.get("KAI_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=EXAMPLES or 200, deadline=None, derandomize=not EXAMPLES,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FEWER = settings(FUZZ, max_examples=EXAMPLES or 100)  # examples that re-sign a chain or touch data files

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


class Base(tuple):
    """(bundle root, key, chain bytes); a short repr keeps hypothesis' failure reports readable."""

    def __repr__(self) -> str:
        return f"Base({self[0]})"


@pytest.fixture(scope="module")
def base() -> Iterator[tuple[Path, Path, bytes]]:
    """One honest bundle and its key; each example works on a copy."""
    verify.DERIVERS[DERIVER] = "bundlefactory"
    tmp = Path(tempfile.mkdtemp(prefix="kai-fuzz-"))
    root, key = make_bundle(tmp / "bundle", steps=(2, 4, 6))
    yield Base((root, key, (root / "chain.jsonl").read_bytes()))
    verify.DERIVERS.pop(DERIVER, None)
    shutil.rmtree(tmp, ignore_errors=True)


def run_verify(bundle: Path, capsys: pytest.CaptureFixture[str]) -> int:
    rc = main(["verify", str(bundle)])  # any exception escaping here fails the test
    err = capsys.readouterr().err
    assert rc in (0, 1, 2, 3), rc
    if "internal error" in err and bundle.is_dir():
        verify.verify_bundle(bundle)  # re-raise with its traceback
    assert "internal error" not in err, err
    assert len(err.strip().splitlines()) <= 1, err
    if rc == 2:
        assert err.startswith("kai-attest: error: "), err
    return rc


@pytest.fixture
def work(base, tmp_path: Path) -> Iterator[Path]:
    """One copy of the honest bundle per test; each example edits files in it, then `restore`s them."""
    yield Path(shutil.copytree(base[0], tmp_path / "bundle"))


def restore(work: Path, base: tuple, *names: str) -> None:
    for n in names:
        shutil.copy(base[0] / n, work / n)


def test_honest_base_bundle_passes(base, capsys) -> None:
    assert run_verify(base[0], capsys) == 3  # no --trust: integrity only


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_as_the_chain(work, capsys, data: bytes) -> None:
    (work / "chain.jsonl").write_bytes(data)
    assert run_verify(work, capsys) in (1, 2)


@FUZZ
@given(ops=st.lists(st.tuples(st.sampled_from(["flip", "delete", "insert", "dup-line", "drop-line", "truncate"]),
                              st.integers(0, 1 << 30), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_chain_bytes(base, work, capsys, ops: list[tuple[str, int, int]]) -> None:
    data = bytearray(base[2])
    for op, pos, val in ops:
        i = pos % max(1, len(data))
        lines = bytes(data).split(b"\n")
        if op == "flip" and data:
            data[i] ^= val or 1
        elif op == "delete":
            del data[i:i + 1 + val]
        elif op == "insert":
            data[i:i] = bytes([val]) * (1 + val % 7)
        elif op == "dup-line":
            k = pos % len(lines)
            lines.insert(k, lines[k])
            data = bytearray(b"\n".join(lines))
        elif op == "drop-line":
            del lines[pos % len(lines)]
            data = bytearray(b"\n".join(lines))
        elif op == "truncate":
            del data[i:]
    (work / "chain.jsonl").write_bytes(bytes(data))
    run_verify(work, capsys)  # 0 is possible: a change to unsigned bytes of the last line


@FEWER
@given(which=st.integers(0, 1 << 20), where=st.integers(0, 1 << 20), value=json_values, drop=st.booleans())
def test_mutated_statements_resigned_with_the_real_key(base, work, capsys, which: int, where: int, value: Any, drop: bool) -> None:
    """The deepest fuzz: any JSON anywhere in any statement, validly signed and linked, so every
    check (not only the parsers) sees hostile structure."""
    root, key, _ = base
    sts = statements(root)
    i = which % len(sts)
    paths = _paths(sts[i])
    path = paths[where % len(paths)]
    mutated = copy.deepcopy(sts)
    if drop and path and isinstance(_get(mutated[i], path[:-1]), dict):
        del _get(mutated[i], path[:-1])[path[-1]]
    else:
        mutated[i] = _replace(mutated[i], path, value)
    if not isinstance(mutated[i], dict):
        mutated[i] = {"predicate": mutated[i]}
    write_chain(work, key, mutated, relink=False)
    run_verify(work, capsys)


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


@FEWER
@given(header=st.dictionaries(st.text(max_size=12), json_values, max_size=5) | json_values,
       body=st.binary(max_size=256), declared=st.integers(-8, 1 << 20))
def test_hostile_safetensors_header_resigned(base, work, capsys, header: Any, body: bytes, declared: int) -> None:
    """A checkpoint file whose header is anything, with a consistent subject digest: the weight,
    trajectory and release readers must all refuse it cleanly."""
    _, key, _ = base
    b = work
    raw = json.dumps(header).encode()
    n = len(raw) if declared < 0 else declared
    (b / ckpt_name(4)).write_bytes(struct.pack("<Q", n) + raw + body)
    sts = statements(b)
    for s in sts:
        for sub in s.get("subject", []):
            if sub["name"] == ckpt_name(4):
                sub["digest"]["sha256"] = sha256_file(b / ckpt_name(4))
    write_chain(b, key, sts)
    assert run_verify(b, capsys) == 1
    restore(b, base, ckpt_name(4), "chain.jsonl")


@FEWER
@given(manifest=json_values, shard=st.sampled_from(["alpha", "beta"]))
def test_hostile_manifest_file(base, work, capsys, manifest: Any, shard: str) -> None:
    name = f"data/shards/.manifests/{shard}-00000.manifest.json"
    (work / name).write_text(json.dumps(manifest))
    assert run_verify(work, capsys) == 1  # subject-digest at least
    restore(work, base, name)


@FEWER
@given(data=st.binary(max_size=2048), gz=st.booleans())
def test_random_bytes_as_an_archive(base, capsys, data: bytes, gz: bool, tmp_path_factory) -> None:
    path = tmp_path_factory.mktemp("arch") / ("b.tar.gz" if gz else "b.tar")
    path.write_bytes((b"\x1f\x8b" if gz else b"") + data)
    assert run_verify(path, capsys) == 2


# ---------------------------------------------------------------- every entry point, with a watchdog


def test_every_entry_point_under_the_watchdog() -> None:
    """A short campaign of tests/fuzzharness.py over verify (files, statements, policies, challenges
    and packs, archives), challenge, respond, check-vsa, lineage and bundle: each input ends in a
    verdict or one error line, within its time bound, under 2 GiB RSS, leaving nothing outside the
    verifier's scratch folder; "internal error" fails the test. KAI_FUZZ_EXAMPLES sets the count
    (bench/fuzz_entrypoints.py runs the long campaign)."""
    import fuzzharness

    tally = fuzzharness.run(EXAMPLES or 300, seed=EXAMPLES, wall_s=120, max_rss_mib=2048)
    assert not tally.problems, "\n".join([tally.line(), *tally.problems[:20]])
    assert len(tally.by_entry) >= 6, tally.line()  # verify, challenge, respond, check, lineage, bundle

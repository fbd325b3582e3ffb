"""Sampler feistel-v1 (attest.sampling): a bijection per epoch, the documented test vectors, the
mixture's exact per-source counts, and the earlier permutation sampler unchanged for old runs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from attest.sampling import Feistel, Sampler, check_mixture, run_sampler, stream_key, train_before, train_id

DOC = Path(__file__).resolve().parent.parent / "docs" / "bundle-format.md"


def _vectors() -> list[tuple[str, str]]:
    section = DOC.read_text().split("## Sampler feistel-v1", 1)[1].split("\n## ", 1)[0]
    table = section.split("Test vectors", 1)[1]
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^\| (.+?) \| `([^`]+)` \|$", table, flags=re.M)]


def test_the_documented_vectors_are_what_the_code_computes() -> None:
    rows = _vectors()
    assert len(rows) == 8
    plain = Sampler(1234, 20, [64, 64, 64])
    mixed = Sampler(1234, 20, [64, 64, 64], ["audio", "images", "text"], {"text": 5, "images": 3, "audio": 2})
    assert mixed.schedule is not None
    got = [
        stream_key(1234, "", 0, 10).hex(),
        [Feistel(stream_key(1234, "", 0, 10), 10)(i) for i in range(10)],
        [Feistel(stream_key(1234, "", 0, 1000003), 1000003)(i) for i in range(5)],
        plain.rows(0, 8),
        plain.rows(177, 183),
        mixed.rows(0, 10),
        [mixed.schedule.at(p) for p in range(10)],
        mixed.counts(0, 25),
    ]
    want = [rows[0][1], *(ast.literal_eval(v) for _, v in rows[1:])]
    assert got == want
    assert plain.num_rows == 182  # 192 rows less the 10 ids divisible by 20


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 64, 100, 1000, 4097])
def test_the_permutation_is_a_bijection(n: int) -> None:
    f = Feistel(stream_key(7, "x", 3, n), n)
    assert sorted(f(i) for i in range(n)) == list(range(n))


def test_each_epoch_reads_every_training_row_once_in_a_fresh_order() -> None:
    s = Sampler(5, 7, [30, 11, 50])
    train = [i for i in range(91) if i % 7]
    assert s.num_rows == len(train)
    e0, e1 = s.rows(0, s.num_rows), s.rows(s.num_rows, 2 * s.num_rows)
    assert sorted(e0) == sorted(e1) == train and e0 != e1


def test_training_row_numbering_matches_the_holdout_rule() -> None:
    for h in (0, 2, 3, 20):
        train = [i for i in range(200) if h <= 0 or i % h]
        assert [train_id(m, h) for m in range(len(train))] == train
        assert all(train_before(x, h) == sum(1 for i in train if i < x) for x in range(201))


def test_a_mixture_reads_each_source_in_its_declared_share() -> None:
    sources = ["web", "code", "img", "web", "code", "img"]
    s = Sampler(11, 10, [50, 40, 30, 50, 40, 30], sources, {"web": 5, "code": 3, "img": 2})
    src_of = {}
    g = 0
    for rows, name in zip([50, 40, 30, 50, 40, 30], sources):
        src_of.update({i: name for i in range(g, g + rows)})
        g += rows
    lo, hi = 37, 37 + 10 * 40 + 7
    read = [src_of[r] for r in s.rows(lo, hi)]
    counts = dict(zip(["code", "img", "web"], s.counts(lo, hi)))
    assert counts == {n: read.count(n) for n in ("code", "img", "web")}
    for name, w in {"web": 5, "code": 3, "img": 2}.items():
        assert abs(counts[name] - (hi - lo) * w / 10) < 2 * w  # the error bound the spec states
    # every source's rows come once per its own epoch, and never a held-out row
    assert all(r % 10 for r in s.rows(0, 2000))
    web = [r for r in s.rows(0, 2000) if src_of[r] == "web"]
    web_rows = s.streams[2].rows
    assert sorted(web[:web_rows]) == sorted({r for r in src_of if src_of[r] == "web" and r % 10})
    rec = s.record(lo, hi)
    assert rec is not None and [r["consumed"] for r in rec] == s.counts(lo, hi)
    assert [r["seen"] for r in rec] == s.counts(0, hi)


def test_a_mixture_must_cover_every_training_source() -> None:
    with pytest.raises(ValueError, match="no weight for source"):
        Sampler(1, 0, [5, 5], ["a", "b"], {"a": 1})
    with pytest.raises(ValueError, match="no training rows"):
        Sampler(1, 0, [5, 0], ["a", "b"], {"a": 1, "b": 1})
    for bad in ({}, {"a": 0}, {"a": 1.5}, {"a": True}, {"a": 70000}):
        with pytest.raises(ValueError):
            check_mixture(bad)


def test_the_run_config_decides_the_kind_and_old_configs_keep_the_permutation_sampler() -> None:
    assert run_sampler({"seed": 1}) == (None, None)
    assert run_sampler({"sampler": {"kind": "feistel-v1", "mixture": None}}) == ("feistel-v1", None)
    assert run_sampler({"sampler": {"kind": "feistel-v1", "mixture": {}}}) == ("feistel-v1", None)
    assert run_sampler({"sampler": {"kind": "feistel-v1", "mixture": {"b": 1, "a": 2}}})[1] == {"a": 2, "b": 1}
    for bad in ({"kind": "other"}, {"kind": "feistel-v1", "extra": 1}, "feistel-v1"):
        with pytest.raises(ValueError):
            run_sampler({"sampler": bad})


def test_the_permutation_sampler_reads_what_earlier_versions_read() -> None:
    np = pytest.importorskip("numpy")
    from data_pipelines.sampler import make_sampler, rows_at

    n, h, seed = 190, 20, 1234
    train_ids = [i for i in range(n) if i % h]  # what earlier versions listed
    old = make_sampler(None, seed, h, [64, 64, 62])
    assert old.kind is None and old.num_rows == len(train_ids)
    for lo, hi in [(0, 8), (170, 200), (400, 431)]:
        assert old.rows(lo, hi) == [train_ids[i] for i in rows_at(seed, len(train_ids), lo, hi)]
    assert isinstance(rows_at(seed, len(train_ids), 0, 3), np.ndarray)
    with pytest.raises(ValueError, match="feistel-v1"):
        make_sampler(None, seed, h, [64], mixture={"a": 1})


# ---------------------------------------------------------------- the verifier's data-sampler check


def _sampler_findings(tmp_path: Path, mutate) -> list:
    from attest import verify
    from bundlefactory import make_bundle

    root, _ = make_bundle(tmp_path / "b", steps=(2, 4, 6), release=False, mutate=mutate)
    report = verify.verify_bundle(root, [str(root / "keys/signing-key.pub.pem")])
    return [f for f in report.findings if f.check == "data-sampler"]


def _checkpoints(sts: list[dict]) -> list[dict]:
    return [s["predicate"] for s in sts if s["predicate"]["kind"] == "checkpoint"]


def _declare_mixture(sts: list[dict], mixture: dict[str, int]) -> None:
    """The run config declares feistel-v1 with `mixture`; checkpoints record what it computes."""
    _declare_mixture_raw(sts, mixture)
    run = next(s["predicate"] for s in sts if s["predicate"]["kind"] == "run")
    s = Sampler(run["config"]["seed"], 0, [100, 150], ["corpus", "corpus"], mixture)
    for c in _checkpoints(sts):
        rec = c["data_consumed"]["sampler"]
        rec.update(kind="feistel-v1", mixture=mixture, sources=s.record(rec["position_start"], rec["position_end"]))


def test_a_run_without_a_sampler_kind_passes_as_the_earlier_sampler(tmp_path: Path) -> None:
    found = _sampler_findings(tmp_path, lambda sts: None)
    assert [f.ok for f in found] == [True] and "no sampler kind" in found[0].detail


def test_a_kind_in_a_checkpoint_of_a_run_that_declares_none_fails(tmp_path: Path) -> None:
    found = _sampler_findings(tmp_path, lambda sts: _checkpoints(sts)[1]["data_consumed"]["sampler"].update(kind="feistel-v1"))
    assert [f.ok for f in found] == [False] and "no sampler kind" in found[0].expected


def test_recomputed_counts_pass_and_re_signed_ones_fail(tmp_path: Path) -> None:
    found = _sampler_findings(tmp_path / "ok", lambda sts: _declare_mixture(sts, {"corpus": 3}))
    assert [f.ok for f in found] == [True] and "corpus 100.0% declared / 100.0% read" in found[0].detail

    def inflate(sts: list[dict]) -> None:
        _declare_mixture(sts, {"corpus": 3})
        _checkpoints(sts)[2]["data_consumed"]["sampler"]["sources"][0]["seen"] += 4

    found = _sampler_findings(tmp_path / "bad", inflate)
    assert [f.ok for f in found] == [False] and "sampler.sources" in found[0].expected and ":" in found[0].file


def test_a_mixture_naming_no_training_source_or_other_rows_fails(tmp_path: Path) -> None:
    found = _sampler_findings(tmp_path / "a", lambda sts: _declare_mixture_raw(sts, {"web": 1}))
    assert [f.ok for f in found] == [False] and "no weight for source" in found[0].found

    def rows(sts: list[dict]) -> None:
        _declare_mixture(sts, {"corpus": 1})
        _checkpoints(sts)[0]["data_consumed"]["sampler"]["num_rows"] = 999

    found = _sampler_findings(tmp_path / "b", rows)
    assert [f.ok for f in found] == [False] and "num_rows" in found[0].expected


def _declare_mixture_raw(sts: list[dict], mixture: dict[str, int]) -> None:
    run = next(s["predicate"] for s in sts if s["predicate"]["kind"] == "run")
    run["config"]["sampler"] = {"kind": "feistel-v1", "mixture": mixture}
    run["config"]["train"]["holdout_every"] = 0

"""Exact and near-duplicate removal (data_pipelines.dedup): what it removes, what it keeps, and that
its MinHash signatures are datasketch's own for the same shingle hashes."""

from __future__ import annotations

import numpy as np
import pytest
pytest.importorskip("datasketch", reason="the train extra; not on the evaluator's light install")
from datasketch import MinHash

from data_pipelines.dedup import SCHEME, Deduper, DedupConfig, content_key, shingle_hashes

RNG = np.random.default_rng(3)
VOCAB = ["".join(RNG.choice(list("abcdefghijklmnop"), size=RNG.integers(3, 8))) for _ in range(2000)]


def doc(n: int = 120) -> str:
    return " ".join(VOCAB[i] for i in RNG.integers(len(VOCAB), size=n))


def text(i: str, t: str) -> dict:
    return {"id": i, "modality": "text", "text": t, "image": None, "audio": None}


def test_signatures_equal_datasketchs_minhash_of_the_same_shingle_hashes() -> None:
    d = Deduper(DedupConfig(num_perm=64, seed=5))
    for t in [doc(), "짧은 한국어 문장입니다. Mixed text.", "abc", ""]:
        ref = MinHash(num_perm=64, seed=5, hashfunc=lambda x: x, scheme=SCHEME)
        ref.update_batch(shingle_hashes(t, 5).tolist())
        assert np.array_equal(d.signature(t), ref.hashvalues)


def test_shingles_ignore_case_and_spacing_and_cover_hangul() -> None:
    assert np.array_equal(shingle_hashes("Hello   World\n", 5), shingle_hashes("hello world", 5))
    assert not np.array_equal(shingle_hashes("바다와 하늘", 3), shingle_hashes("바다와 하눌", 3))
    assert len(shingle_hashes("abcdefg", 5)) == 3 and len(shingle_hashes("ab", 5)) == 1


def test_near_duplicates_are_removed_and_distinct_documents_kept() -> None:
    d = Deduper(DedupConfig(threshold=0.8))
    originals = [doc() for _ in range(200)]
    assert [d.check(text(f"d{i}", t)) for i, t in enumerate(originals)] == [None] * 200
    words = originals[10].split()
    words[50] = "edited"
    assert d.check(text("near", " ".join(words))) == "near"
    assert d.check(text("copy", originals[20])) == "exact"
    # half the words of a document shared: similar, not a near duplicate at 0.8
    half = originals[30].split()[:60] + doc(60).split()
    assert d.check(text("half", " ".join(half))) is None
    assert d.removed == {"near": 1, "exact": 1}


def test_exact_keys_cover_media_and_modality_not_ids() -> None:
    a = {"id": "x", "modality": "image", "text": "a cat", "image": b"PNG1", "audio": None}
    assert content_key(a) == content_key({**a, "id": "y"})
    assert content_key(a) != content_key({**a, "image": b"PNG2"})
    assert content_key(a) != content_key({**a, "modality": "text", "image": None})
    d = Deduper(DedupConfig())
    assert d.check(a) is None and d.check({**a, "id": "y"}) == "exact"
    # captions are not near-deduplicated: two images with the same caption both stay
    assert d.check({**a, "id": "z", "image": b"PNG2"}) is None


def test_the_outcome_is_a_pure_function_of_the_order_and_config() -> None:
    docs = [doc(40) for _ in range(50)]
    docs += [docs[3], " ".join(docs[7].split()[:-1] + ["zz"])]

    def run(cfg: DedupConfig) -> list:
        d = Deduper(cfg)
        return [d.check(text(f"d{i}", t)) for i, t in enumerate(docs)]

    assert run(DedupConfig()) == run(DedupConfig())
    assert run(DedupConfig(near=False))[-2:] == ["exact", None]


@pytest.mark.parametrize("bad", [{"threshold": 0.0}, {"threshold": 1.5}, {"num_perm": 8}, {"shingle": 0}])
def test_bad_parameters_are_refused_with_the_key(bad: dict) -> None:
    with pytest.raises(ValueError, match="dedup." + next(iter(bad))):
        DedupConfig(**bad)

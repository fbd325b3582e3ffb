"""`kai-data` on a user's own corpus: declared sources, dedup, packed shards, lineage, crash resume.

The corpus is made here: 200 text files (10 planted exact and 10 planted near duplicates), a
JSONL file (one broken line, one empty record, one copy of a text file), an image folder (one
corrupt image) and WAV files at other rates. It is built through `--config-dir DIR data=mine`,
exactly as a consortium runs it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import wave
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
pytest.importorskip("yaml", reason="the train extra; not on the evaluator's light install")
import yaml
from PIL import Image

from attest.chain import read_chain
from attest.digest import sha256_file
from data_pipelines import shards
from conftest import kai_attest, must, run

N_FILES, N_EXACT, N_NEAR = 200, 10, 10
PROVENANCE = {"origin": "test corpus", "license": "CC-BY-4.0", "collection": "self-recorded",
              "collected": "2026-01-01/2026-06-30", "consent": "contributor agreement v2", "pii": "none found"}
ARGS = ["shards.rows=64", "pack.seq_len=32", "tokenizer.vocab_size=400"]


def _doc(rng: np.random.Generator, vocab: list[str]) -> str:
    return " ".join(vocab[i] for i in rng.integers(len(vocab), size=60)) + "."


def make_corpus(root: Path) -> dict[str, list[str]]:
    """Write the corpus; returns the planted duplicate file names by kind."""
    rng = np.random.default_rng(7)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choice(list(letters), size=rng.integers(3, 9))) for _ in range(3000)]
    vocab += ["사과", "바다", "하늘", "학교", "친구", "노래", "시간", "사람"]
    texts = root / "texts"
    texts.mkdir(parents=True)
    docs = [_doc(rng, vocab) for _ in range(N_FILES)]
    for i, d in enumerate(docs):
        (texts / f"doc{i:04d}.txt").write_text(d, encoding="utf-8")
    planted: dict[str, list[str]] = {"exact": [], "near": []}
    for j in range(N_EXACT):
        name = f"zcopy{j:02d}.txt"
        (texts / name).write_text(docs[j] + "\n\n", encoding="utf-8")  # equal after normalization
        planted["exact"].append(name)
    for j in range(N_NEAR):
        words = docs[20 + j].split()
        words[30] = "changed"
        name = f"znear{j:02d}.txt"
        (texts / name).write_text(" ".join(words), encoding="utf-8")
        planted["near"].append(name)
    lines = [json.dumps({"text": _doc(rng, vocab)}, ensure_ascii=False) for _ in range(40)]
    lines[5] = "{not json"
    lines[6] = json.dumps({"text": "   "})
    lines[7] = json.dumps({"text": docs[50]})  # a copy of a text file, in another source
    (root / "notes.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    images = root / "images"
    images.mkdir()
    meta = []
    for i in range(20):
        arr = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
        Image.fromarray(arr).save(images / f"im{i:02d}.png")
        meta.append({"file_name": f"im{i:02d}.png", "text": f"random picture {i}"})
    (images / "im99.png").write_bytes(b"\x89PNG not really")
    meta.append({"file_name": "im99.png", "text": "a corrupt file"})
    (images / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    audio = root / "audio"
    audio.mkdir()
    meta = []
    for i, rate in enumerate([8000, 22050, 44100, 16000]):
        t = np.arange(rate // 2) / rate
        x = (0.3 * np.sin(2 * np.pi * 220 * (i + 1) * t) * 32767).astype("<i2")
        with wave.open(str(audio / f"a{i}.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(x.tobytes())
        meta.append({"file_name": f"a{i}.wav", "text": f"tone number {i}"})
    (audio / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    return planted


def write_config(conf: Path, corpus: Path, drop: str | None = None) -> None:
    sources = [{"name": "texts", "path": "texts", "format": "text"},
               {"name": "notes", "path": "notes.jsonl", "format": "jsonl"},
               {"name": "images", "path": "images", "format": "imagefolder"},
               {"name": "speech", "path": "audio", "format": "audiofolder"}]
    sources = [{**s, **PROVENANCE} for s in sources]
    if drop:
        del sources[1][drop]
    (conf / "data").mkdir(parents=True, exist_ok=True)
    (conf / "data" / "mine.yaml").write_text(yaml.safe_dump({"base_dir": str(corpus), "sources": sources}))


def kai_data_user(conf: Path, out: Path, *extra: str, extra_env: dict[str, str] | None = None):
    cmd = [sys.executable, "-m", "data_pipelines.build", "--config-dir", str(conf), "data=mine",
           f"out_dir={out}", "run_id=mine", *ARGS, *extra]
    return run(cmd, extra_env=extra_env)


def data_statements(out: Path) -> dict[str, dict]:
    entries, torn = read_chain(out / "chain.jsonl")
    assert not torn
    names = [next(s["name"] for s in e.statement["subject"] if s["name"].endswith(".parquet"))
             for e in entries if e.kind == "data-shard"]
    assert len(names) == len(set(names)), "a shard is recorded twice"
    return {n: e.predicate["manifest"] for n, e in zip(names, [e for e in entries if e.kind == "data-shard"])}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("user")
    planted = make_corpus(root / "corpus")
    write_config(root / "conf", root / "corpus")
    must(kai_attest("keygen", str(root / "out" / "keys")))
    must(kai_data_user(root / "conf", root / "out"))
    return root / "corpus", root / "conf", root / "out", planted


def _ids(out: Path, names: list[str]) -> list[str]:
    return [i for n in names for i in pq.read_table(out / n, columns=["id"]).column("id").to_pylist()]


def test_ingest_counts_what_it_drops_and_normalizes_media(built) -> None:
    _, _, out, _ = built
    manifests = data_statements(out)
    counts = Counter()
    for m in manifests.values():
        if m["stage"] == "ingest":
            counts.update(m["counts"])
    assert counts == {"bad-json": 1, "empty": 1, "broken-image": 1}
    images = pq.read_table(out / "data/ingest/images-00000.parquet").to_pylist()
    assert len(images) == 20 and {Image.open(io.BytesIO(r["image"]["bytes"])).size for r in images} == {(32, 32)}
    speech = pq.read_table(out / "data/ingest/speech-00000.parquet").to_pylist()
    assert [len(shards.decode_row(r)["audio"]) for r in speech] == [8000] * 4
    # positions tile the raw input: shards of one source cover [0, n) without a gap
    texts = sorted((n, m) for n, m in manifests.items() if m["stage"] == "ingest" and n.startswith("data/ingest/texts"))
    spans = [m["positions"] for _, m in texts]
    assert spans[0][0] == 0 and spans[-1][1] == N_FILES + N_EXACT + N_NEAR
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_planted_exact_and_near_duplicates_are_removed_and_counted(built) -> None:
    _, _, out, planted = built
    manifests = data_statements(out)
    removed = Counter()
    for m in manifests.values():
        if m["stage"] == "dedup":
            removed.update(m["counts"])
    assert removed == {"exact-duplicate": N_EXACT + 1, "near-duplicate": N_NEAR}
    kept = set(_ids(out, [n for n, m in manifests.items() if m["stage"] == "dedup"]))
    for name in planted["exact"] + planted["near"]:
        assert not any(name in i for i in kept), name
    originals = [f"doc{j:04d}.txt" for j in [*range(N_EXACT), *range(20, 20 + N_NEAR), 50]]
    assert all(any(name in i for i in kept) for name in originals)  # the first occurrences stay
    notes = sorted(i for i in kept if i.startswith("notes"))
    assert len(notes) == 40 - 3 and not any(i.endswith(":8") for i in notes), notes[:3]  # copy of doc0050 gone


def test_packed_shards_load_with_datasets_and_pyarrow_and_hold_fixed_length_rows(built, tmp_path: Path) -> None:
    _, _, out, _ = built
    manifests = data_statements(out)
    packed = [n for n, m in manifests.items() if m["stage"] == "pack"]
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    ds = datasets.load_dataset("parquet", data_files=[str(out / n) for n in packed], split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == sum(manifests[n]["rows"] for n in packed) > 0
    assert {len(t) for t in ds["tokens"]} == {32}
    for n in packed:
        table = pq.read_table(out / n)
        m = manifests[n]
        assert m["tokens"] == sum(sum(1 for t in row if t != 0) for row in table.column("tokens").to_pylist())
        assert m["modality_counts"] == dict(Counter(table.column("modality").to_pylist()),
                                            **{k: 0 for k in ("text", "image", "audio")
                                               if k not in table.column("modality").to_pylist()})


def test_lineage_walks_from_every_training_shard_back_to_declared_sources(built) -> None:
    _, _, out, _ = built
    manifests = data_statements(out)
    for name, m in manifests.items():
        if m["stage"] != "pack":
            continue
        frontier, stages = [name], []
        while frontier:
            cur = frontier.pop()
            man = manifests[cur]
            assert man["sha256"] == sha256_file(out / cur)
            assert man["source"]["license"] == "CC-BY-4.0" and man["source"]["name"] == m["source"]["name"]
            stages.append(man["stage"])
            for parent in man["derived_from"]:
                assert manifests[parent["path"]]["sha256"] == parent["sha256"]
                frontier.append(parent["path"])
        assert {"pack", "dedup", "ingest"} <= set(stages)
        # every record id in a packed row is a row of the shards it derives from
        rows = {i for r in pq.read_table(out / name, columns=["rows"]).column("rows").to_pylist() for i in r}
        assert rows <= set(_ids(out, [p["path"] for p in m["derived_from"]]))


def test_a_source_without_a_licence_is_refused_before_any_work(built, tmp_path: Path) -> None:
    corpus, _, _, _ = built
    write_config(tmp_path / "conf", corpus, drop="license")
    p = kai_data_user(tmp_path / "conf", tmp_path / "out")
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == "kai-data: error: source 'notes': missing required field 'license'"
    assert not (tmp_path / "out" / "chain.jsonl").exists() and not (tmp_path / "out" / "data").exists()


@pytest.mark.parametrize("point", ["shard-written@9", "chain-appended@12"])
def test_a_build_killed_midway_resumes_without_redoing_or_duplicating_shards(built, tmp_path: Path, point: str) -> None:
    _, conf, clean, _ = built
    out = tmp_path / "out"
    must(kai_attest("keygen", str(out / "keys")))
    p = kai_data_user(conf, out, extra_env={"KAI_FAILPOINT": point})
    assert p.returncode == -9, p.stderr[-2000:]
    before = data_statements(out)
    assert 0 < len(before) < len(data_statements(clean))
    p = must(kai_data_user(conf, out))
    assert not any(f"{n}:" in p.stdout for n in before), "a recorded shard was written again"
    after = data_statements(out)
    assert {n: m["sha256"] for n, m in after.items()} == {n: m["sha256"] for n, m in data_statements(clean).items()}
    assert (out / "tokenizer/tokenizer.model").read_bytes() == (clean / "tokenizer/tokenizer.model").read_bytes()


def test_a_rerun_with_other_dedup_parameters_is_refused_not_mixed(built, tmp_path: Path) -> None:
    _, conf, clean, _ = built
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    chain = (out / "chain.jsonl").read_bytes()
    p = kai_data_user(conf, out, "dedup.threshold=0.5")
    assert p.returncode == 1
    assert "recorded with params" in p.stderr.strip().splitlines()[-1]
    assert (out / "chain.jsonl").read_bytes() == chain


def test_training_refuses_packed_rows_of_another_length_naming_the_shard(built) -> None:
    from kai_train.data import ShardDataset

    _, _, out, _ = built
    packed = sorted((out / "data/shards").glob("*.parquet"))
    with pytest.raises(ValueError, match=r"images-00000\.parquet: packed rows hold 32 tokens, but train\.text_len is 48"):
        ShardDataset(packed, out / "tokenizer/tokenizer.model", 48)
    data = ShardDataset(packed, out / "tokenizer/tokenizer.model", 32)
    assert len(data) == sum(pq.ParquetFile(p).metadata.num_rows for p in packed)
    assert data.tokens(0) == pq.read_table(packed[0]).column("tokens")[0].as_py()


def test_training_batches_decode_the_images_and_audio_the_shards_store(built) -> None:
    from kai_train.data import ShardDataset

    out = built[2]
    packed = sorted((out / "data/shards").glob("*.parquet"))
    data = ShardDataset(packed, out / "tokenizer/tokenizer.model", 32)
    modality = [m for p in packed for m in pq.read_table(p, columns=["modality"]).column("modality").to_pylist()]
    b = data.batch(list(range(len(data))), 32, 8000)
    assert b["has_image"].tolist() == [m == "image" for m in modality]
    assert b["has_audio"].tolist() == [m == "audio" for m in modality]
    assert b["images"][b["has_image"]].abs().sum(dim=(1, 2, 3)).min() > 0 and b["images"].max() <= 1
    assert b["audio"][b["has_audio"]].abs().amax(dim=1).min() > 0.01


def test_ingesting_sources_in_parallel_gives_the_same_shards(built, tmp_path: Path) -> None:
    _, conf, clean, _ = built
    out = tmp_path / "out"
    must(kai_attest("keygen", str(out / "keys")))
    p = must(kai_data_user(conf, out, "jobs=3"))
    got = data_statements(out)
    assert {n: m["sha256"] for n, m in got.items()} == {n: m["sha256"] for n, m in data_statements(clean).items()}
    assert p.stdout.count("(ingest, ") == sum(m["stage"] == "ingest" for m in got.values())

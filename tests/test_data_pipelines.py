"""Data pipelines: corpus determinism, shard bytes and manifests, tokenizer, sampler.

Small sizes keep this file to a few seconds; every test names the property it proves.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
pytest.importorskip("PIL", reason="the train extra; not on the evaluator's light install")
from PIL import Image

from attest.digest import sha256_file
from data_pipelines import shards
from data_pipelines.demo_corpus import make_demo_corpus
from data_pipelines.sources import Normalize, check_sources, iter_records
from data_pipelines.sampler import DistributedSampler, epoch_order, rows_at
from data_pipelines.tokenizer import load_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
SIZES = {"n_text": 60, "n_image": 20, "n_audio": 20}
KINDS = {"text": "jsonl", "images": "imagefolder", "audio": "audiofolder"}
SOURCE = {"name": "demo", "origin": "kai-train demo generator", "license": "CC0-1.0",
          "collection": "synthetic", "collected": "2026-11-23/2026-11-23",
          "consent": "not applicable: procedurally generated", "pii": "none",
          "generator": "kai-train data_pipelines.demo_corpus (procedural, no model)"}


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _build_shards(corpus: dict[str, Path], out_dir: Path) -> list[tuple[Path, dict]]:
    """All three sources into one record stream, 16 rows per shard, so shards mix modalities."""
    specs = [{**SOURCE, "name": name, "path": str(corpus[name]), "format": fmt} for name, fmt in KINDS.items()]
    records = [r for src in check_sources(specs, out_dir) for _, r in iter_records(src, Normalize(), Counter())]
    out = []
    for i in range(0, len(records), 16):
        path = out_dir / f"demo-{i // 16:05d}.parquet"
        out.append((path, shards.write_shard(shards.records_table(records[i:i + 16], Normalize().sample_rate), path, SOURCE, [], {})))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_demo_corpus(tmp_path_factory.mktemp("corpus"), seed=0, **SIZES)


@pytest.fixture(scope="module")
def built(corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, dict]]:
    return _build_shards(corpus, tmp_path_factory.mktemp("shards"))


# --- demo corpus ---------------------------------------------------------------------------------

def test_demo_corpus_is_byte_identical_for_the_same_seed_and_differs_for_another(
        corpus: dict[str, Path], tmp_path: Path) -> None:
    root = corpus["text"].parent
    again = make_demo_corpus(tmp_path / "again", seed=0, **SIZES)
    assert _tree_bytes(again["text"].parent) == _tree_bytes(root)
    other = make_demo_corpus(tmp_path / "other", seed=1, **SIZES)
    for name in ("text/corpus.jsonl", "images/metadata.jsonl", "audio/aud_00001.wav"):
        assert (other["text"].parent / name).read_bytes() != (root / name).read_bytes()


def test_demo_corpus_has_english_and_korean_text_and_captions(corpus: dict[str, Path]) -> None:
    lines = [json.loads(x)["text"] for x in (corpus["text"] / "corpus.jsonl").read_text("utf-8").splitlines()]
    assert len(lines) == SIZES["n_text"]
    hangul = [t for t in lines if any("\uac00" <= c <= "\ud7a3" for c in t)]
    assert 0 < len(hangul) < len(lines)
    assert len(set(lines)) > len(lines) // 2  # varied, not one template repeated
    meta = [json.loads(x) for x in (corpus["images"] / "metadata.jsonl").read_text("utf-8").splitlines()]
    assert [m["file_name"] for m in meta] == [f"img_{i:05d}.png" for i in range(1, SIZES["n_image"] + 1)]
    assert all((corpus["images"] / m["file_name"]).exists() and m["text"] for m in meta)


# --- shards and manifests ------------------------------------------------------------------------

def test_shards_hold_every_row_with_correct_counts_and_manifest_digests(
        built: list[tuple[Path, dict]]) -> None:
    total = sum(SIZES.values())
    assert [p.name for p, _ in built] == [f"demo-{i:05d}.parquet" for i in range(-(-total // 16))]
    seen_ids: list[str] = []
    counts = {"text": 0, "image": 0, "audio": 0}
    for path, manifest in built:
        on_disk = shards.load_manifest(shards.manifest_path(path))
        assert on_disk == manifest
        assert manifest["sha256"] == sha256_file(path)
        assert manifest["bytes"] == path.stat().st_size
        assert manifest["source"] == SOURCE and manifest["derived_from"] == []
        table = pq.read_table(path)
        assert table.schema.names == ["id", "modality", "text", "image", "audio"]
        assert manifest["rows"] == table.num_rows
        modalities = table.column("modality").to_pylist()
        assert manifest["modality_counts"] == {m: modalities.count(m) for m in ("text", "image", "audio")}
        for m, n in manifest["modality_counts"].items():
            counts[m] += n
        seen_ids += table.column("id").to_pylist()
    assert counts == {"text": SIZES["n_text"], "image": SIZES["n_image"], "audio": SIZES["n_audio"]}
    assert len(set(seen_ids)) == total


def test_image_rows_decode_to_32x32_rgb_and_audio_rows_have_8000_samples(
        built: list[tuple[Path, dict]]) -> None:
    table = pq.read_table([str(p) for p, _ in built])
    for row in map(shards.decode_row, table.to_pylist()):
        if row["modality"] == "image":
            img = Image.open(io.BytesIO(row["image"]))
            assert (img.format, img.mode, img.size) == ("PNG", "RGB", (32, 32))
            assert row["audio"] is None
        elif row["modality"] == "audio":
            audio = np.asarray(row["audio"], dtype=np.float32)
            assert audio.shape == (8000,) and np.abs(audio).max() <= 1.0 and np.abs(audio).max() > 0.1
            assert row["image"] is None
        else:
            assert row["image"] is None and row["audio"] is None and row["text"]


def test_shards_load_with_hf_datasets_offline_and_decode_by_their_feature_metadata(
        built: list[tuple[Path, dict]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    import datasets
    import soundfile

    ds = datasets.load_dataset("parquet", data_files=[str(p) for p, _ in built], split="train",
                               cache_dir=str(tmp_path / "hf_cache"))
    assert ds.num_rows == sum(SIZES.values())
    assert set(ds.column_names) == {"id", "modality", "text", "image", "audio"}
    assert ds.features["image"] == datasets.Image()
    assert ds.features["audio"] == datasets.Audio(sampling_rate=16000)
    modality = ds["modality"]
    img = ds[modality.index("image")]["image"]  # decoded by datasets from the metadata alone
    assert (img.mode, img.size) == ("RGB", (32, 32))
    # decoding audio to arrays needs torchcodec (and FFmpeg); the stored bytes are a WAV at the declared rate
    raw = ds.cast_column("audio", datasets.Audio(decode=False))[modality.index("audio")]["audio"]
    samples, rate = soundfile.read(io.BytesIO(raw["bytes"]), dtype="float32")
    assert rate == 16000 and samples.shape == (8000,) and np.abs(samples).max() > 0.1
    assert np.array_equal(samples, shards.wav_samples(raw["bytes"]))


def test_shard_folders_open_as_datasets_with_the_manifests_beside_them(
        built: list[tuple[Path, dict]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import pyarrow.dataset as pads

    folder = built[0][0].parent
    assert shards.manifest_path(built[0][0]).is_file()  # the manifests are there, in the hidden folder
    assert pads.dataset(folder, format="parquet").count_rows() == sum(SIZES.values())
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    ds = datasets.load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "hf_cache"))
    assert ds.num_rows == sum(SIZES.values()) and ds.features["image"] == datasets.Image()


def test_rewriting_the_same_records_gives_byte_identical_shards(
        corpus: dict[str, Path], built: list[tuple[Path, dict]], tmp_path: Path) -> None:
    again = _build_shards(corpus, tmp_path)
    assert [(p.name, m) for p, m in again] == [(p.name, m) for p, m in built]
    assert _tree_bytes(tmp_path) == _tree_bytes(built[0][0].parent)


def test_load_manifest_names_the_file_on_bad_json_or_missing_keys(
        built: list[tuple[Path, dict]], tmp_path: Path) -> None:
    bad = tmp_path / "bad.manifest.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.manifest.json"):
        shards.load_manifest(bad)
    manifest = dict(built[0][1])
    del manifest["sha256"]
    bad.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"bad\.manifest\.json.*sha256"):
        shards.load_manifest(bad)
    manifest = dict(built[0][1], source={"name": "demo"})
    bad.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"bad\.manifest\.json.*license"):
        shards.load_manifest(bad)


def test_write_shard_refuses_a_source_without_licence_or_consent(tmp_path: Path) -> None:
    rows = [{"id": "t", "modality": "text", "text": "hi", "image": None, "audio": None}]
    for key in ("license", "consent"):
        with pytest.raises(ValueError, match=key):
            shards.write_shard(shards.records_table(rows, 16000), tmp_path / "x-00000.parquet",
                               {k: v for k, v in SOURCE.items() if k != key}, [], {})
    assert not list(tmp_path.iterdir())


def test_demo_config_sources_name_a_reader_and_every_provenance_field() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "kai_train/conf/data/demo.yaml"))
    assert {s["name"]: s["format"] for s in cfg["sources"]} == KINDS
    for source in cfg["sources"]:
        assert shards.source_record(source)["license"] == "CC0-1.0"


# --- tokenizer -----------------------------------------------------------------------------------

def test_tokenizer_training_is_byte_identical_and_round_trips_korean(
        built: list[tuple[Path, dict]], tmp_path: Path) -> None:
    paths = [p for p, _ in built]
    model_a, params = train_tokenizer(paths, tmp_path / "a" / "tok", vocab_size=512)
    model_b, _ = train_tokenizer(paths, tmp_path / "b" / "other_name", vocab_size=512)
    assert model_a.read_bytes() == model_b.read_bytes()
    assert params["byte_fallback"] and params["num_threads"] == 1
    sp = load_tokenizer(model_a)
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    # Seen Korean, unseen Hangul (byte fallback) and English all decode back to the input.
    assert [sp.piece_to_id(t) for t in ("<image>", "<audio>")] == [4, 5]  # the packing placeholders
    for text in ["빨간 원이 있어요.", "오늘은 날씨가 맑아요.", "훈민정음 뷁", "The red circle is small."]:
        ids = sp.encode(text)
        assert sp.unk_id() not in ids
        assert sp.decode(ids) == text


# --- sampler -------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_one_epoch_over_all_ranks_covers_every_row_exactly_once(world_size: int) -> None:
    batch, num_rows = 3, 48  # 48 divisible by 3 * world_size
    steps = num_rows // (batch * world_size)
    seen: list[int] = []
    for rank in range(world_size):
        it = DistributedSampler(num_rows, world_size, rank, seed=7, batch_size=batch).batches(0)
        for _ in range(steps):
            step, rows = next(it)
            assert len(rows) == batch
            seen += rows
    assert sorted(seen) == list(range(num_rows))


def test_resuming_at_step_k_equals_iterating_from_zero_and_dropping_k() -> None:
    sampler = DistributedSampler(num_rows=50, world_size=2, rank=1, seed=3, batch_size=4)
    full = sampler.batches(0)
    from_zero = [next(full) for _ in range(40)]  # 40 steps: several epochs, blocks straddle them
    resumed = DistributedSampler(num_rows=50, world_size=2, rank=1, seed=3, batch_size=4).batches(17)
    assert [next(resumed) for _ in range(23)] == from_zero[17:]


def test_steps_follow_the_concatenated_epoch_orders_across_epoch_boundaries() -> None:
    n, world, batch, seed = 10, 2, 3, 5
    samplers = [DistributedSampler(n, world, r, seed, batch) for r in range(world)]
    stream = np.concatenate([epoch_order(seed, e, n) for e in range(4)])
    for step in range(6):
        block = [row for s in samplers for row in s.rows(step)]
        assert block == stream[step * batch * world:(step + 1) * batch * world].tolist()
    seg = samplers[0].rows_for_steps(1, 4)
    assert seg == {"epoch_start": 0, "epoch_end": 2, "position_start": 6, "position_end": 24}
    consumed = rows_at(seed, n, seg["position_start"], seg["position_end"]).tolist()
    assert consumed == [row for step in range(1, 4) for s in samplers for row in s.rows(step)]
    assert samplers[1].state(4) == {"seed": seed, "num_rows": n, "world_size": world,
                                    "batch_size": batch, "step": 4, "epoch": 2, "position": 24}


def test_different_seeds_or_epochs_give_different_orders() -> None:
    assert sorted(epoch_order(0, 0, 100).tolist()) == list(range(100))
    assert not np.array_equal(epoch_order(0, 0, 100), epoch_order(1, 0, 100))
    assert not np.array_equal(epoch_order(0, 0, 100), epoch_order(0, 1, 100))
    a = DistributedSampler(100, 2, 0, seed=0, batch_size=8).rows(0)
    b = DistributedSampler(100, 2, 0, seed=1, batch_size=8).rows(0)
    assert a != b


def test_sampler_rejects_a_rank_outside_the_world() -> None:
    with pytest.raises(ValueError, match="rank 2"):
        DistributedSampler(10, world_size=2, rank=2, seed=0, batch_size=1)

"""The training reader reads only the row groups of the rows asked for, keeps a bounded number of
files and row groups, prefetches on a thread, and its memory does not grow with the corpus."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytest.importorskip("torch", reason="the reader is part of the trainer (the train extra)")

from data_pipelines.pack import synthetic_packed_shards
from data_pipelines.sampler import make_sampler

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("tok")
    (d / "t.txt").write_text("\n".join(f"a small sentence number {i}" for i in range(500)))
    spm.SentencePieceTrainer.train(input=str(d / "t.txt"), model_prefix=str(d / "tok"), vocab_size=40,
                                   pad_id=3, bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    return d / "tok.model"


def test_the_reader_reads_row_groups_never_a_whole_shard(tmp_path: Path, tok: Path, monkeypatch) -> None:
    from kai_train import data as kd

    paths = synthetic_packed_shards(tmp_path, 30 * 2048 * 16, 16, rows_per_shard=2048)  # 30 shards, 2 groups each
    want = {i: row for i, row in enumerate(r for p in paths for r in pq.read_table(p).column("tokens").to_pylist())}

    def refuse(*a, **k):
        raise AssertionError("a whole table was read")

    monkeypatch.setattr(pq, "read_table", refuse)
    monkeypatch.setattr(pq.ParquetFile, "read", refuse)
    monkeypatch.setattr(kd, "OPEN_FILES", 3)
    data = kd.ShardDataset(paths, tok, 16)
    assert len(data) == len(want) and data.shard_rows == [2048] * 30 and data.index.groups == 60
    assert data.index.uniform == [1024] * 30 and not data.index.offsets  # O(shards): one number per shard
    sampler = make_sampler("feistel-v1", 9, 0, data.shard_rows)
    for lo in range(0, 400, 50):
        ids = sampler.rows(lo, lo + 50)
        assert data.batch(ids, 8, 100)["tokens"].tolist() == [want[i] for i in ids]
        assert len(data._files) <= 3 and len(data._groups) <= kd.CACHED_GROUPS


def test_shards_with_uneven_row_groups_are_indexed_by_offsets(tmp_path: Path, tok: Path) -> None:
    import pyarrow as pa

    from kai_train.data import ShardIndex

    paths = synthetic_packed_shards(tmp_path, 3000 * 16, 16, rows_per_shard=3000)
    t = pq.read_table(paths[0])
    odd = tmp_path / "odd.parquet"
    with pq.ParquetWriter(odd, t.schema) as w:
        for lo, hi in [(0, 10), (10, 700), (700, 710), (710, 3000)]:
            w.write_table(pa.Table.from_batches(t.slice(lo, hi - lo).to_batches(max_chunksize=10**6)), row_group_size=10**6)
    idx = ShardIndex([paths[0], odd])
    assert idx.uniform == [1024, 0] and idx.offsets[1].tolist() == [0, 10, 700, 710]
    assert [idx.locate(3000 + r) for r in (0, 9, 10, 699, 700, 709, 710, 2999)] == [
        (1, 0, 0), (1, 0, 9), (1, 1, 0), (1, 1, 689), (1, 2, 0), (1, 2, 9), (1, 3, 0), (1, 3, 2289)]
    assert idx.locate(2047) == (0, 1, 1023) and idx.locate(2048) == (0, 2, 0)


def test_batches_are_built_ahead_and_equal_direct_reads(tmp_path: Path, tok: Path) -> None:
    from kai_train.data import Batches, ShardDataset

    paths = synthetic_packed_shards(tmp_path, 5000 * 16, 16, rows_per_shard=1500)
    data = ShardDataset(paths, tok, 16)
    sampler = make_sampler("feistel-v1", 3, 7, data.shard_rows)
    b = Batches(data, sampler, rank=1, world=2, micro=4, image_size=8, audio_samples=100)
    try:
        for k in range(5):
            got = b.get(k * 8)
            assert sorted(b._pending) == [(k + 1) * 8, (k + 2) * 8]  # the next two, on the thread
            ids = sampler.rows(k * 8 + 4, k * 8 + 8)
            assert got["tokens"].tolist() == data.batch(ids, 8, 100)["tokens"].tolist()
        b.get(400)  # a jump (resume) drops what was prefetched for earlier positions
        assert sorted(b._pending) == [408, 416]
    finally:
        b.close()


CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from data_pipelines.sampler import make_sampler
    from kai_train.data import Batches, ShardDataset
    def hwm():
        return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
    base = hwm()
    data = ShardDataset(sorted(Path(sys.argv[1]).glob("*.parquet")), Path(sys.argv[2]), 128)
    b = Batches(data, make_sampler("feistel-v1", 1, 20, data.shard_rows), 0, 2, 8, 8, 100)
    for k in range(60):
        b.get(k * 16)
    b.close()
    print(json.dumps({"base_kib": base, "peak_kib": hwm(), "rows": len(data)}))
""")


def test_reader_memory_does_not_grow_with_the_corpus(tmp_path: Path, tok: Path) -> None:
    """Peak RSS of one rank reading 60 steps from a 0.5M- and an 8M-token corpus (16× more rows):
    loading the corpus as earlier versions did costs ~50 bytes per token (~380 MiB more here)."""
    peaks = {}
    for tokens in (500_000, 8_000_000):
        d = tmp_path / str(tokens)
        synthetic_packed_shards(d, tokens, 128, rows_per_shard=8192)
        p = subprocess.run([sys.executable, "-c", CHILD, str(d), str(tok)], capture_output=True, text=True,
                           cwd=REPO, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
                           timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        r = json.loads(p.stdout.strip().splitlines()[-1])
        peaks[tokens] = r["peak_kib"] - r["base_kib"]
    assert peaks[8_000_000] - peaks[500_000] < 24 * 1024, peaks  # KiB: a few row groups, not the corpus


def test_the_trainer_builds_its_sampler_from_the_config_and_the_manifests(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from kai_train.app import AppError
    from kai_train.train import make_run_sampler

    web = synthetic_packed_shards(tmp_path, 3000 * 16, 16, rows_per_shard=2000, source="web")
    code = synthetic_packed_shards(tmp_path, 1000 * 16, 16, rows_per_shard=2000, source="code")
    shards, rows = [*code, *web], [1000, 2000, 1000]
    cfg = OmegaConf.create({"seed": 5, "sampler": {"kind": "feistel-v1", "mixture": {"web": 3, "code": 1}}})
    s = make_run_sampler(cfg, shards, rows, 10)
    assert s.kind == "feistel-v1" and [st.name for st in s.streams] == ["code", "web"]
    assert s.counts(0, 400) == [100, 300]
    old = make_run_sampler(cfg, shards, rows, 10, recorded=False)  # a run begun before sampler kinds
    assert old.kind is None and old.num_rows == 3600
    with pytest.raises(AppError, match=r"web-00001\.parquet: 999 rows, its manifest says 1000"):
        make_run_sampler(cfg, shards, [1000, 2000, 999], 10)
    with pytest.raises(AppError, match="no weight for source"):
        make_run_sampler(OmegaConf.create({"seed": 5, "sampler": {"kind": "feistel-v1", "mixture": {"web": 1}}}),
                         shards, rows, 10)

"""data_pipelines.sources: validation messages, each format's records, drops, resume, determinism."""

from __future__ import annotations

import glob
import io
import json
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
pytest.importorskip("soundfile", reason="the train extra; not on the evaluator's light install")
import soundfile as sf
from PIL import Image

from data_pipelines import sources
from data_pipelines.sources import (MANIFEST_SOURCE_KEYS, Normalize, SourceError, check_sources,
                                    iter_records, normalize_text)

PROVENANCE = {"origin": "kai-train tests", "license": "CC-BY-4.0", "collection": "crawled",
              "collected": "2026-01-01/2026-02-01", "consent": "terms of service", "pii": "none"}
KOREAN = "한국어 문장입니다. 날씨가 맑아요."
KOREAN_NFD = unicodedata.normalize("NFD", KOREAN)


def spec(name: str, fmt: str, path: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "format": fmt, "path": path, **PROVENANCE, **extra}


def jsonl(lines: list[Any]) -> bytes:
    return b"".join((x if isinstance(x, bytes) else json.dumps(x, ensure_ascii=False).encode()) + b"\n"
                    for x in lines)


def png(size: tuple[int, int], color: tuple[int, ...], mode: str = "RGB", fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def sine(rate: int, seconds: float, freq: float, amp: float) -> np.ndarray:
    return amp * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)


def write_meta(folder: Path, rows: list[Any]) -> None:
    (folder / "metadata.jsonl").write_bytes(jsonl(rows))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    docs = root / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_bytes(b"Hello \t  world  \r\n\r\n\r\n\r\nsecond\xc2\xa0 line   \r\n")
    (docs / "sub" / "b.txt").write_text(KOREAN_NFD, encoding="utf-8")
    (docs / "blank.txt").write_text(" \n\t\n", encoding="utf-8")
    (docs / "latin1.txt").write_bytes("café".encode("latin-1"))
    (docs / "notes.md").write_text("not a .txt file", encoding="utf-8")
    (docs / ".hidden.txt").write_text("hidden", encoding="utf-8")

    (root / "lines").mkdir()
    (root / "lines" / "part-0.jsonl").write_bytes(jsonl([
        {"text": "first  line"}, b"{not json", b"", {"other": "x"}, [1, 2],
        b'{"text": "caf\xe9"}', {"text": KOREAN_NFD, "n": 1}, {"text": "empty"}, {"text": "  \n "}]))
    (root / "lines" / "part-1.jsonl").write_bytes(jsonl([{"text": "second file"}, {"text": 7}]))

    (root / "pq").mkdir()
    pq.write_table(pa.table({"content": ["p0 r0", None, "p0  r2"], "n": [0, 1, 2]}), root / "pq" / "a.parquet")
    pq.write_table(pa.table({"content": ["p1 r0", "", KOREAN_NFD, "p1 r3"]}), root / "pq" / "b.parquet")

    img = root / "img"
    (img / "sub").mkdir(parents=True)
    (img / "red.png").write_bytes(png((40, 20), (255, 0, 0, 128), "RGBA"))
    (img / "sub" / "gray.png").write_bytes(png((64, 64), 200, "L"))
    (img / "blue.jpg").write_bytes(png((100, 50), (0, 0, 255), fmt="JPEG"))
    (img / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    write_meta(img, [
        {"file_name": "broken.png", "caption": "a broken file"},
        {"file_name": "red.png", "caption": "a  red\r\nrectangle"},
        {"file_name": "missing.png", "caption": "gone"},
        {"file_name": "sub/gray.png", "caption": KOREAN_NFD},
        {"file_name": "../docs/a.txt", "caption": "escape"},
        {"file_name": "blue.jpg"},
        {"file_name": "blue.jpg", "caption": "blue, twice"},
        {"file_name": "/etc/hostname", "caption": "absolute"}])

    aud = root / "aud"
    aud.mkdir()
    stereo = np.stack([sine(8000, 0.5, 440, 0.6), sine(8000, 0.5, 440, 0.2)], axis=1)
    sf.write(aud / "stereo8k.wav", stereo, 8000, subtype="PCM_16")
    sf.write(aud / "cd.wav", sine(44100, 1.0, 1000, 0.3), 44100, subtype="PCM_24")
    sf.write(aud / "short48k.wav", sine(48000, 0.1, 300, 0.5), 48000, subtype="FLOAT")
    exact = (sine(16000, 0.25, 500, 0.5) * 32767).astype(np.int16)
    sf.write(aud / "exact16k.wav", exact, 16000, subtype="PCM_16")
    (aud / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    write_meta(aud, [
        {"file_name": "stereo8k.wav", "text": "stereo"},
        {"file_name": "broken.wav", "text": "broken"},
        {"file_name": "cd.wav", "text": "cd"},
        b"{broken json",
        {"file_name": "short48k.wav", "text": "short"},
        {"file_name": "exact16k.wav", "text": "exact"}])
    return root


def load(corpus: Path, fmt: str, path: str, start: int = 0, norm: Normalize | None = None, **extra: Any,
         ) -> tuple[list[tuple[int, dict[str, Any]]], Counter]:
    (source,) = check_sources([spec(fmt, fmt, path, **extra)], corpus)
    stats: Counter = Counter()
    return list(iter_records(source, norm or Normalize(), stats, start)), stats


# --- validation ----------------------------------------------------------------------------------

def without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize("sources_, message", [
    ([without(spec("web", "jsonl", "lines"), "license")], "source 'web': missing required field 'license'"),
    ([spec("web", "jsonl", "lines", consent="  ")], "source 'web': missing required field 'consent'"),
    ([spec("web", "csv", "lines")],
     "source 'web': field 'format' is 'csv'; expected one of text, jsonl, parquet, imagefolder, audiofolder"),
    ([spec("web", "jsonl", "lines", license="MIT-ish")],
     "source 'web': field 'license' 'MIT-ish' is not a valid SPDX license id or expression "
     "(Unknown license key(s): MIT-ish)"),
    ([spec("web", "jsonl", "lines", license="mit")],
     "source 'web': field 'license' 'mit' is not in canonical SPDX form; write 'MIT'"),
    ([spec("web", "jsonl", "lines", collection="synthetic")],
     "source 'web': collection 'synthetic' requires field 'generator' (the model or program that made the data)"),
    ([spec("web", "jsonl", "lines", collection="synthetic", generator="unknown")],
     "source 'web': collection 'synthetic' requires field 'generator' (the model or program that made the data)"),
    ([spec("web", "jsonl", "nowhere/*.jsonl")], "source 'web': field 'path' 'nowhere/*.jsonl' matches nothing"),
    ([spec("web", "jsonl", "pq")], "source 'web': field 'path' 'pq' is a folder with no .jsonl files"),
    ([spec("pics", "imagefolder", "docs")],
     "source 'pics': field 'path' 'docs': format 'imagefolder' needs a folder with metadata.jsonl; none at"),
    ([spec("web", "jsonl", "lines"), spec("web", "text", "docs")],
     "source 'web': duplicate name (field 'name' must be unique)"),
    ([spec("a/b", "jsonl", "lines")], "source 'a/b': field 'name' must match"),
])
def test_check_sources_refuses_with_one_clear_line(corpus: Path, sources_: list[dict[str, Any]], message: str,
                                                   ) -> None:
    with pytest.raises(SourceError) as e:
        check_sources(sources_, corpus)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_check_order_missing_field_before_bad_path(corpus: Path) -> None:
    bad = without(spec("web", "jsonl", "nowhere"), "pii")
    with pytest.raises(SourceError, match=r"^source 'web': missing required field 'pii'$"):
        check_sources([bad], corpus)


@pytest.mark.parametrize("licence", ["CC-BY-4.0", "Apache-2.0", "CC0-1.0", "MIT OR Apache-2.0",
                                     "GPL-2.0-only WITH Classpath-exception-2.0"])
def test_spdx_expressions_accepted(corpus: Path, licence: str) -> None:
    (source,) = check_sources([spec("web", "jsonl", "lines", license=licence)], corpus)
    assert source.record["license"] == licence


def test_check_sources_resolves_files_and_record(corpus: Path) -> None:
    web, pics, synth = check_sources([
        spec("web", "jsonl", "lines", text_field="body", extra_key="dropped"),
        spec("pics", "imagefolder", str(corpus / "img")),  # absolute path
        spec("synth", "text", "docs/**/*.txt", collection="synthetic", generator="our-model-v1")], corpus)
    assert web.files == (corpus / "lines/part-0.jsonl", corpus / "lines/part-1.jsonl")
    assert web.text_field == "body" and web.format == "jsonl" and web.name == "web"
    assert list(web.record) == list(MANIFEST_SOURCE_KEYS)
    assert web.record == {"name": "web", **PROVENANCE, "generator": None}
    assert json.loads(json.dumps(web.record)) == web.record
    assert [p.relative_to(corpus / "img").as_posix() for p in pics.files] == [
        "metadata.jsonl", "blue.jpg", "broken.png", "red.png", "sub/gray.png"]
    assert [p.relative_to(corpus / "docs").as_posix() for p in synth.files] == [
        "a.txt", "blank.txt", "latin1.txt", "sub/b.txt"]
    assert synth.record["generator"] == "our-model-v1" and synth.record["collection"] == "synthetic"


def test_check_sources_reads_no_data(tmp_path: Path) -> None:
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "metadata.jsonl").write_bytes(b"\xff{{{")
    got = check_sources([spec("p", "parquet", "garbage.parquet"), spec("f", "audiofolder", "f")], tmp_path)
    assert [s.files for s in got] == [(tmp_path / "garbage.parquet",), (tmp_path / "f" / "metadata.jsonl",)]


# --- formats -------------------------------------------------------------------------------------

def test_normalize_text() -> None:
    assert normalize_text(" a \t b\u00a0\u3000c  \r\nd\r\n\r\n\r\n \n\ne  ") == "a b c\nd\n\ne"
    assert normalize_text(KOREAN_NFD) == KOREAN
    assert len(KOREAN_NFD) > len(KOREAN)  # the input really is decomposed jamo


def test_nfkc_folds_compatibility_forms_that_nfc_keeps() -> None:
    mixed = "ＫＡＩ ﾊﾝｸﾞﾙ ﾡ ①"  # full-width Latin, half-width katakana, a half-width jamo, a circled digit
    assert normalize_text(mixed) == mixed
    assert normalize_text(mixed, "NFKC") == "KAI ハングル \u1100 1"  # the jamo becomes a leading consonant
    assert Normalize(unicode="NFKC").unicode == "NFKC"
    with pytest.raises(ValueError, match="unicode must be NFC or NFKC"):
        Normalize(unicode="NFD")


def test_text_documents(corpus: Path) -> None:
    records, stats = load(corpus, "text", "docs")
    assert [(p, r["id"], r["text"]) for p, r in records] == [
        (0, "text/a.txt", "Hello world\n\nsecond line"), (3, "text/sub/b.txt", KOREAN)]
    assert all(r["modality"] == "text" and r["image"] is None and r["audio"] is None for _, r in records)
    assert stats == Counter({"read": 4, "kept": 2, "empty": 1, "not-utf8": 1})


def test_jsonl_broken_lines_dropped_and_counted(corpus: Path) -> None:
    records, stats = load(corpus, "jsonl", "lines")
    assert [(p, r["id"], r["text"]) for p, r in records] == [
        (0, "jsonl/part-0.jsonl:1", "first line"),
        (6, "jsonl/part-0.jsonl:7", KOREAN),  # NFC: decomposed jamo in, composed syllables out
        (7, "jsonl/part-0.jsonl:8", "empty"),  # the word "empty" is text, not a drop reason
        (9, "jsonl/part-1.jsonl:1", "second file")]
    assert stats == Counter({"read": 11, "kept": 4, "bad-json": 2, "empty": 2, "missing-text": 2, "not-utf8": 1})


def test_jsonl_single_file_and_text_field(tmp_path: Path) -> None:
    (tmp_path / "c.jsonl").write_bytes(jsonl([{"body": "x"}, {"text": "y"}]))
    records, stats = load(tmp_path, "jsonl", "c.jsonl", text_field="body")
    assert [(r["id"], r["text"]) for _, r in records] == [("jsonl/c.jsonl:1", "x")]
    assert stats["missing-text"] == 1


def test_parquet_rows_through_datasets(corpus: Path) -> None:
    before = sorted(p.as_posix() for p in corpus.rglob("*"))
    records, stats = load(corpus, "parquet", "pq/*.parquet", text_field="content")
    assert [(p, r["id"], r["text"]) for p, r in records] == [
        (0, "parquet/a.parquet:0", "p0 r0"), (2, "parquet/a.parquet:2", "p0 r2"),
        (3, "parquet/b.parquet:0", "p1 r0"), (5, "parquet/b.parquet:2", KOREAN), (6, "parquet/b.parquet:3", "p1 r3")]
    assert stats == Counter({"read": 7, "kept": 5, "missing-text": 1, "empty": 1})
    tail, _ = load(corpus, "parquet", "pq/*.parquet", start=4, text_field="content")
    assert tail == [x for x in records if x[0] >= 4]
    assert sorted(p.as_posix() for p in corpus.rglob("*")) == before  # no cache files beside the data


def test_parquet_missing_column_is_a_source_error(corpus: Path) -> None:
    with pytest.raises(SourceError, match=r"^source 'parquet': field 'text_field' 'text' is not a column of "):
        load(corpus, "parquet", "pq")


def test_unreadable_parquet_file_is_a_source_error(tmp_path: Path) -> None:
    (tmp_path / "x.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(SourceError, match=r"^source 'parquet': cannot read parquet file .*x\.parquet: "):
        load(tmp_path, "parquet", "x.parquet")


def test_imagefolder(corpus: Path) -> None:
    records, stats = load(corpus, "imagefolder", "img", text_field="caption")
    assert [(p, r["id"], r["text"]) for p, r in records] == [
        (1, "imagefolder/red.png#2", "a red\nrectangle"), (3, "imagefolder/sub/gray.png#4", KOREAN),
        (6, "imagefolder/blue.jpg#7", "blue, twice")]
    assert stats == Counter({"read": 8, "kept": 3, "broken-image": 1, "missing-file": 1, "bad-file-name": 2,
                             "missing-text": 1})
    colours = []
    for _, r in records:
        assert r["modality"] == "image" and r["audio"] is None and r["image"][:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(r["image"])) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (32, 32))
            colours.append(im.getpixel((16, 16)))
    assert colours[0] == (255, 0, 0) and colours[1] == (200, 200, 200)
    assert colours[2][2] > 240 and max(colours[2][:2]) < 15  # JPEG blue, lossy
    again, _ = load(corpus, "imagefolder", "img", text_field="caption")
    assert [r["image"] for _, r in again] == [r["image"] for _, r in records]  # deterministic bytes
    small, _ = load(corpus, "imagefolder", "img", norm=Normalize(image_size=8), text_field="caption")
    assert Image.open(io.BytesIO(small[0][1]["image"])).size == (8, 8)


def test_audiofolder_resamples_mixes_pads(corpus: Path) -> None:
    records, stats = load(corpus, "audiofolder", "aud")
    assert [(p, r["id"], r["text"]) for p, r in records] == [
        (0, "audiofolder/stereo8k.wav#1", "stereo"), (2, "audiofolder/cd.wav#3", "cd"),
        (4, "audiofolder/short48k.wav#5", "short"), (5, "audiofolder/exact16k.wav#6", "exact")]
    assert stats == Counter({"read": 6, "kept": 4, "broken-audio": 1, "bad-json": 1})
    audio = {r["text"]: r["audio"] for _, r in records}
    for a in audio.values():
        assert a.dtype == np.float32 and a.shape == (8000,) and np.abs(a).max() <= 1.0
    t = np.arange(8000) / 16000
    # 8 kHz stereo (0.6 and 0.2 amplitude channels) -> mono 0.4 at 16 kHz, all 8000 samples filled
    assert np.abs(audio["stereo"][200:7800] - 0.4 * np.sin(2 * np.pi * 440 * t[200:7800])).max() < 0.01
    # 44.1 kHz 24-bit, 1 s -> trimmed to the first 0.5 s
    assert np.abs(audio["cd"][200:7800] - 0.3 * np.sin(2 * np.pi * 1000 * t[200:7800])).max() < 0.01
    # 48 kHz 0.1 s -> 1600 samples of sound, then zero padding
    assert np.abs(audio["short"][100:1500]).max() > 0.45 and not audio["short"][1700:].any()
    # 16 kHz int16: no resampling, exact values
    exact = (sine(16000, 0.25, 500, 0.5) * 32767).astype(np.int16).astype(np.float32) / 32768
    assert np.array_equal(audio["exact"][:4000], exact) and not audio["exact"][4000:].any()
    again, _ = load(corpus, "audiofolder", "aud")
    assert all(np.array_equal(a[1]["audio"], b[1]["audio"]) for a, b in zip(records, again))


def test_ids_unique_across_formats(corpus: Path) -> None:
    ids = [r["id"] for fmt, path, field in [("text", "docs", "text"), ("jsonl", "lines", "text"),
                                             ("parquet", "pq", "content"), ("imagefolder", "img", "caption"),
                                             ("audiofolder", "aud", "text")]
           for _, r in load(corpus, fmt, path, text_field=field)[0]]
    assert len(ids) == 2 + 4 + 5 + 3 + 4 == len(set(ids))


# --- resume --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, path, field, start", [
    ("text", "docs", "text", 1), ("jsonl", "lines", "text", 7), ("jsonl", "lines", "text", 9),
    ("imagefolder", "img", "caption", 2), ("audiofolder", "aud", "text", 3), ("jsonl", "lines", "text", 99)])
def test_start_gives_exactly_the_tail(corpus: Path, fmt: str, path: str, field: str, start: int) -> None:
    full, _ = load(corpus, fmt, path, text_field=field)
    tail, stats = load(corpus, fmt, path, start=start, text_field=field)
    assert [(p, r["id"]) for p, r in tail] == [(p, r["id"]) for p, r in full if p >= start]
    assert stats["kept"] == len(tail)


def test_start_does_not_decode_skipped_media(corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[int] = []
    real = sources.image_png
    monkeypatch.setattr(sources, "image_png", lambda data, size: decoded.append(len(data)) or real(data, size))
    records, stats = load(corpus, "imagefolder", "img", start=2, text_field="caption")
    assert [p for p, _ in records] == [3, 6]
    assert "broken-image" not in stats and stats["read"] == 6  # the corrupt image at position 0 was skipped
    assert len(decoded) == 2


def test_globs_relative_to_a_base_dir_with_wildcard_characters(tmp_path: Path) -> None:
    base = tmp_path / "run[1]*"
    (base / "raw" / "x").mkdir(parents=True)
    (base / "raw" / "x" / "b.jsonl").write_bytes(jsonl([{"text": "b"}]))
    (base / "raw" / "a.jsonl").write_bytes(jsonl([{"text": "a"}]))
    rel, absolute = check_sources([spec("rel", "jsonl", "raw/**/*.jsonl"),
                                   spec("abs", "jsonl", glob.escape(str(base)) + "/raw/**/*.jsonl")], base)
    assert rel.files == absolute.files == (base / "raw/a.jsonl", base / "raw/x/b.jsonl")
    records = [r["id"] for s in (rel, absolute) for _, r in iter_records(s, Normalize(), Counter())]
    assert records == ["rel/a.jsonl:1", "rel/x/b.jsonl:1", "abs/a.jsonl:1", "abs/x/b.jsonl:1"]


@pytest.mark.parametrize("bad, message", [
    ([], "sources: expected a non-empty list of source mappings"),
    (["web"], "source '#0': expected a mapping, got str"),
    ([spec("web", "jsonl", "lines", license="MIT AND")], "source 'web': field 'license' 'MIT AND' is not a valid SPDX"),
    ([spec("web", "jsonl", "lines", pii=False)], "source 'web': field 'pii' must be a string, got bool False"),
])
def test_malformed_declarations(corpus: Path, bad: Any, message: str) -> None:
    with pytest.raises(SourceError) as e:
        check_sources(bad, corpus)
    assert str(e.value).startswith(message), str(e.value)

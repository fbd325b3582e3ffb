"""A small self-collected multimodal corpus, generated procedurally from a seed.

The demo must run offline and its provenance must be clean, so the corpus is made by our own code:
no downloads, no models. It is laid out in Hugging Face folder conventions so the same readers
work on real collections later:

    out_dir/text/corpus.jsonl        {"text": ...}              English and Korean sentences
    out_dir/images/img_00001.png     32x32 RGB shapes or digits
    out_dir/images/metadata.jsonl    {"file_name": ..., "text": caption}
    out_dir/audio/aud_00001.wav      16 kHz mono int16, 0.5 s
    out_dir/audio/metadata.jsonl     {"file_name": ..., "text": transcript}

The content carries learnable structure rather than noise: sentences state true facts (sums,
numbers of sides), captions describe what is drawn, and each spoken word has its own pitch and
formants, so a small model can learn text↔image and text↔audio associations.

Same seed → byte-identical files: one numpy PCG64 stream drives every choice, PIL draws with its
built-in bitmap font (no system font lookup), and neither PNG nor WAV output carries timestamps.
"""

from __future__ import annotations

import hashlib
import json
import wave
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 32
SAMPLE_RATE = 16_000
AUDIO_SAMPLES = 8_000  # 0.5 s

# English colour -> (RGB, Korean adnominal form used before a noun).
COLOURS: dict[str, tuple[tuple[int, int, int], str]] = {
    "red": ((220, 30, 30), "빨간"),
    "blue": ((30, 60, 220), "파란"),
    "green": ((30, 170, 60), "초록색"),
    "yellow": ((235, 210, 30), "노란"),
    "purple": ((140, 50, 180), "보라색"),
    "orange": ((240, 130, 20), "주황색"),
    "black": ((20, 20, 20), "검은"),
    "white": ((250, 250, 250), "하얀"),
}
# English shape -> (plural, Korean noun, number of sides; 0 for a circle).
SHAPES: dict[str, tuple[str, str, int]] = {
    "circle": ("circles", "원", 0),
    "square": ("squares", "사각형", 4),
    "triangle": ("triangles", "삼각형", 3),
}
NUMBERS_EN = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
              "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
              "eighteen"]
# Sino-Korean numerals 0..18, the ones used for arithmetic.
_KO_DIGITS = ["영", "일", "이", "삼", "사", "오", "육", "칠", "팔", "구"]
NUMBERS_KO = _KO_DIGITS + ["십" + (_KO_DIGITS[i] if i else "") for i in range(9)]
# English weather phrase -> Korean sentence.
WEATHER: dict[str, str] = {
    "sunny": "오늘은 날씨가 맑아요.",
    "rainy": "오늘은 비가 와요.",
    "cloudy": "오늘은 날씨가 흐려요.",
    "snowy": "오늘은 눈이 와요.",
    "windy": "오늘은 바람이 많이 불어요.",
}
SIZES = {"small": "작은", "big": "큰"}
# Spoken vocabularies for the audio clips; one clip speaks one language.
SPOKEN_WORDS = {"en": NUMBERS_EN[:10], "ko": _KO_DIGITS}


def _has_final_consonant(word: str) -> bool:
    """True if the last Hangul syllable ends in a consonant (selects 이/가, 은/는 particles)."""
    code = ord(word[-1]) - 0xAC00
    return 0 <= code < 11172 and code % 28 != 0


def _subject(word: str) -> str:
    return word + ("이" if _has_final_consonant(word) else "가")


def _topic(word: str) -> str:
    return word + ("은" if _has_final_consonant(word) else "는")


def _pick(rng: np.random.Generator, options: Iterable[str]) -> str:
    """A uniform choice among the options (or a dict's keys), drawn from `rng`."""
    keys = list(options)
    return keys[int(rng.integers(len(keys)))]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _sentence(rng: np.random.Generator) -> str:
    """One sentence from a random template; templates state facts so the text is learnable."""
    colour, shape, weather, size = (_pick(rng, COLOURS), _pick(rng, SHAPES), _pick(rng, WEATHER),
                                    _pick(rng, SIZES))
    plural, shape_ko, sides = SHAPES[shape]
    colour_ko = COLOURS[colour][1]
    a, b = int(rng.integers(10)), int(rng.integers(10))
    n = int(rng.integers(2, 10))
    templates = [
        f"The {colour} {shape} is {size}.",
        f"I see {NUMBERS_EN[n]} {colour} {plural}.",
        f"Today it is {weather}, so I drew {_a(colour)} {shape}.",
        f"{NUMBERS_EN[a].capitalize()} plus {NUMBERS_EN[b]} is {NUMBERS_EN[a + b]}.",
        f"{a} + {b} = {a + b}",
        (f"A {shape} has {NUMBERS_EN[sides]} sides." if sides
         else "A circle is round and has no corners."),
        f"{_subject(colour_ko + ' ' + shape_ko)} 있어요.",
        f"{SIZES[size]} {colour_ko} {_subject(shape_ko)} {n}개 있습니다.",
        WEATHER[weather],
        f"{NUMBERS_KO[a]} 더하기 {_topic(NUMBERS_KO[b])} {NUMBERS_KO[a + b]}입니다.",
        (f"{_topic(shape_ko)} 변이 {sides}개 있어요." if sides else "원은 둥글고 모서리가 없어요."),
        f"The weather is {weather}. {WEATHER[weather]}",
    ]
    return templates[int(rng.integers(len(templates)))]


def _draw_shape(rng: np.random.Generator) -> tuple[Image.Image, str]:
    colour, shape = _pick(rng, COLOURS), _pick(rng, SHAPES)
    fg = COLOURS[colour][0]
    # A dark background only behind white, so every shape contrasts with its background.
    bg = (35, 35, 35) if colour == "white" else (235, 235, 235)
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), bg)
    draw = ImageDraw.Draw(img)
    half = int(rng.integers(7, 14))
    cx, cy = (int(rng.integers(half + 1, IMAGE_SIZE - half - 1)) for _ in range(2))
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=fg)
    elif shape == "square":
        draw.rectangle(box, fill=fg)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fg)
    if rng.random() < 0.3:
        caption = f"{COLOURS[colour][1]} {SHAPES[shape][1]}"
    else:
        caption = f"{_a(colour)} {shape}"
    return img, caption


def _draw_digit(rng: np.random.Generator) -> tuple[Image.Image, str]:
    digit = int(rng.integers(10))
    # The bitmap font is 6x11 px: draw it small, then scale 2x with NEAREST so it fills the frame
    # and stays crisp (and independent of any system TrueType font).
    glyph = Image.new("L", (8, 12), 0)
    ImageDraw.Draw(glyph).text((1, 0), str(digit), fill=255, font=ImageFont.load_default_imagefont())
    glyph = glyph.resize((16, 24), Image.Resampling.NEAREST)
    fg = COLOURS[_pick(rng, ["red", "blue", "green", "black", "purple"])][0]
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (240, 240, 240))
    x = int(rng.integers(0, IMAGE_SIZE - glyph.width + 1))
    y = int(rng.integers(0, IMAGE_SIZE - glyph.height + 1))
    img.paste(Image.new("RGB", glyph.size, fg), (x, y), glyph)
    caption = f"숫자 {digit}" if rng.random() < 0.3 else f"the digit {digit}"
    return img, caption


def _word_voice(word: str) -> tuple[float, float, float]:
    """Stable (f0, F1, F2) per word, from sha256 so it never depends on the seed or Python's hash."""
    h = hashlib.sha256(word.encode()).digest()
    f0 = 100.0 + 120.0 * h[0] / 255.0
    f1 = 300.0 + 600.0 * h[1] / 255.0
    f2 = 1000.0 + 1500.0 * h[2] / 255.0
    return f0, f1, f2


def _speech_like(words: list[str], rng: np.random.Generator) -> np.ndarray:
    """int16 samples: per word, harmonics of its f0 shaped by its two formants, under an envelope."""
    out = np.zeros(AUDIO_SAMPLES, dtype=np.float64)
    seg = AUDIO_SAMPLES // len(words)
    gap = seg // 10  # short silences between words, as in speech
    for i, word in enumerate(words):
        f0, f1, f2 = _word_voice(word)
        f0 *= 1.0 + 0.03 * float(rng.standard_normal())  # speakers never repeat a pitch exactly
        n = seg - gap
        t = np.arange(n) / SAMPLE_RATE
        # Slight falling pitch over the word, like a declarative intonation contour.
        phase = 2 * np.pi * np.cumsum(f0 * (1.0 - 0.1 * t / t[-1])) / SAMPLE_RATE
        voiced = np.zeros(n)
        for k in range(1, int(4000 // f0) + 1):
            fk = k * f0
            gain = np.exp(-((fk - f1) / 150.0) ** 2) + 0.6 * np.exp(-((fk - f2) / 200.0) ** 2) + 0.02
            voiced += gain * np.sin(k * phase)
        envelope = np.sin(np.pi * np.arange(n) / n) ** 0.5
        out[i * seg: i * seg + n] = voiced * envelope
    out += 0.01 * rng.standard_normal(AUDIO_SAMPLES)  # breath noise
    out *= 0.8 / max(np.abs(out).max(), 1e-9)
    return np.round(out * 32767).astype("<i2")


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    path.write_bytes(text.encode("utf-8"))


def make_demo_corpus(out_dir: Path, seed: int = 0, *, n_text: int, n_image: int,
                     n_audio: int) -> dict[str, Path]:
    """Write the demo corpus under `out_dir`; returns {"text", "images", "audio"} source folders.

    The sizes have no defaults here: kai_train/conf/data/demo.yaml is the one place they are set.
    """
    out_dir = Path(out_dir)
    dirs = {"text": out_dir / "text", "images": out_dir / "images", "audio": out_dir / "audio"}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    # One child stream per modality, so changing n_text does not change the images or audio.
    text_rng, image_rng, audio_rng = (np.random.Generator(np.random.PCG64(s))
                                      for s in np.random.SeedSequence(seed).spawn(3))

    _write_jsonl(dirs["text"] / "corpus.jsonl", [{"text": _sentence(text_rng)} for _ in range(n_text)])

    image_meta = []
    for i in range(1, n_image + 1):
        img, caption = (_draw_digit if image_rng.random() < 0.3 else _draw_shape)(image_rng)
        name = f"img_{i:05d}.png"
        img.save(dirs["images"] / name, format="PNG")
        image_meta.append({"file_name": name, "text": caption})
    _write_jsonl(dirs["images"] / "metadata.jsonl", image_meta)

    audio_meta = []
    for i in range(1, n_audio + 1):
        vocab = SPOKEN_WORDS["ko" if audio_rng.random() < 0.3 else "en"]
        words = [vocab[int(audio_rng.integers(len(vocab)))] for _ in range(int(audio_rng.integers(1, 3)))]
        name = f"aud_{i:05d}.wav"
        with wave.open(str(dirs["audio"] / name), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(SAMPLE_RATE)
            w.writeframes(_speech_like(words, audio_rng).tobytes())
        audio_meta.append({"file_name": name, "text": " ".join(words)})
    _write_jsonl(dirs["audio"] / "metadata.jsonl", audio_meta)
    return dirs

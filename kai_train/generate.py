"""Load an export and generate: continue a text, or caption an image / transcribe a clip.

    python -m kai_train.generate EXPORT_DIR --prompt "a red" [--image x.png] [--audio x.wav]

Greedy decoding; proves an export is usable without DeepSpeed or the training code paths.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from PIL import Image
from safetensors.torch import load_file

from kai_train.model import ModelConfig, MultimodalLM


def export_weights(export_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of an export: model.safetensors, or the shards its index names (Hugging Face layout)."""
    index = export_dir / "model.safetensors.index.json"
    if not index.is_file():
        return load_file(export_dir / "model.safetensors")
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(export_dir / f))
    return out


def load_export(export_dir: Path) -> tuple[MultimodalLM, spm.SentencePieceProcessor]:
    config = json.loads((export_dir / "config.json").read_text())
    model = MultimodalLM(ModelConfig.from_dict(config["model"]))
    model.load_state_dict(export_weights(export_dir), strict=True)
    model.eval()
    return model, spm.SentencePieceProcessor(model_file=str(export_dir / config["tokenizer"]))


@torch.no_grad()
def generate(model: MultimodalLM, sp: spm.SentencePieceProcessor, prompt: str, image: torch.Tensor | None = None,
             audio: torch.Tensor | None = None, max_new_tokens: int = 16) -> list[int]:
    """Greedy continuation; returns the new token ids (stops at eos)."""
    ids = [sp.bos_id(), *sp.encode(prompt)]
    # packed training rows put the media placeholder first (data_pipelines.pack); do the same when the
    # tokenizer has it (tokenizers built before placeholders existed do not)
    for media, piece in ((image, "<image>"), (audio, "<audio>")):
        if media is not None and (pid := sp.piece_to_id(piece)) != sp.unk_id():
            ids.insert(0, pid)
    new: list[int] = []
    for _ in range(max_new_tokens):
        if len(ids) >= model.cfg.max_seq_len:
            break
        tokens = torch.tensor([ids])
        logits = model(tokens, image, audio,
                       None if image is None else torch.ones(1, dtype=torch.bool),
                       None if audio is None else torch.ones(1, dtype=torch.bool))
        nxt = int(logits[0, -1].argmax())
        if nxt == sp.eos_id():
            break
        ids.append(nxt)
        new.append(nxt)
    return new


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kai_train.generate", description=__doc__.splitlines()[0])
    p.add_argument("export_dir", type=Path)
    p.add_argument("--prompt", default="")
    p.add_argument("--image", type=Path)
    p.add_argument("--audio", type=Path)
    p.add_argument("--max-new-tokens", type=int, default=16)
    a = p.parse_args(argv)
    model, sp = load_export(a.export_dir)
    cfg = model.cfg
    image = audio = None
    if a.image:
        img = Image.open(a.image).convert("RGB").resize((cfg.image_size, cfg.image_size))
        image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    if a.audio:
        from data_pipelines.sources import audio_samples

        samples = audio_samples(a.audio, cfg.sample_rate, cfg.audio_samples)
        if samples is None:
            print(f"generate: error: {a.audio}: not a readable audio file", file=sys.stderr)
            return 1
        audio = torch.from_numpy(samples)[None]
    out = generate(model, sp, a.prompt, image, audio, a.max_new_tokens)
    print(a.prompt + sp.decode(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

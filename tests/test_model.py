"""Tests for kai_train.model: shapes per modality, masking of absent modalities, gradient reach,
state_dict contents, config validation and activation checkpointing."""

from __future__ import annotations

from pathlib import Path

import pytest
pytest.importorskip("torch", reason="the train extra; not on the evaluator's light install")
import torch
import yaml

from kai_train.init import build_genesis_model
from kai_train.model import ModelConfig, MultimodalLM, mel_filterbank

CFG = ModelConfig()
B, T = 3, 10


@pytest.fixture(scope="module")
def model() -> MultimodalLM:
    return build_genesis_model(CFG, seed=0)[0]


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "tokens": torch.randint(0, CFG.vocab_size, (B, T), generator=g),
        "images": torch.rand(B, CFG.image_channels, CFG.image_size, CFG.image_size, generator=g),
        "audio": torch.randn(B, CFG.audio_samples, generator=g) * 0.1,
    }


def test_prefix_len_is_image_tokens_plus_audio_tokens(model: MultimodalLM) -> None:
    assert CFG.n_image_tokens == 16  # (32 / 8)^2
    assert CFG.n_audio_tokens == 13  # 51 stft frames -> 26 -> 13
    assert model.prefix_len == 29
    assert model.text.rope_cos.shape[0] == CFG.max_seq_len + model.prefix_len


def test_forward_text_only_gives_text_logits(model: MultimodalLM) -> None:
    assert model(batch()["tokens"]).shape == (B, T, CFG.vocab_size)


def test_forward_with_images_gives_text_logits(model: MultimodalLM) -> None:
    b = batch()
    assert model(b["tokens"], images=b["images"]).shape == (B, T, CFG.vocab_size)
    assert model.vision(b["images"]).shape == (B, CFG.n_image_tokens, CFG.dim)


def test_forward_with_audio_gives_text_logits(model: MultimodalLM) -> None:
    b = batch()
    assert model(b["tokens"], audio=b["audio"]).shape == (B, T, CFG.vocab_size)
    assert model.speech(b["audio"]).shape == (B, CFG.n_audio_tokens, CFG.dim)


def test_masked_out_modality_equals_input_left_out(model: MultimodalLM) -> None:
    b = batch()
    has_image = torch.tensor([True, False, True])
    has_audio = torch.tensor([False, True, True])
    with torch.no_grad():
        mixed = model(b["tokens"], b["images"], b["audio"], has_image, has_audio)
        no_image = model(b["tokens"], audio=b["audio"])
        no_audio = model(b["tokens"], images=b["images"])
        full = model(b["tokens"], b["images"], b["audio"])
    assert mixed.shape == (B, T, CFG.vocab_size)
    torch.testing.assert_close(mixed[0], no_audio[0])
    torch.testing.assert_close(mixed[1], no_image[1])
    torch.testing.assert_close(mixed[2], full[2])
    assert not torch.allclose(mixed[0], full[0])  # the audio really did change sample 0


def test_has_image_without_images_raises(model: MultimodalLM) -> None:
    with pytest.raises(ValueError, match="has_image"):
        model(batch()["tokens"], has_image=torch.tensor([True, False, False]))


def test_text_longer_than_max_seq_len_raises(model: MultimodalLM) -> None:
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, CFG.max_seq_len + 1, dtype=torch.long))


def test_decoder_is_causal_over_text(model: MultimodalLM) -> None:
    b = batch()
    changed = b["tokens"].clone()
    changed[:, -1] = (changed[:, -1] + 1) % CFG.vocab_size
    with torch.no_grad():
        a = model(b["tokens"], b["images"], b["audio"])
        c = model(changed, b["images"], b["audio"])
    torch.testing.assert_close(a[:, :-1], c[:, :-1])
    assert not torch.allclose(a[:, -1], c[:, -1])


def _loss(m: MultimodalLM, b: dict[str, torch.Tensor]) -> torch.Tensor:
    has_image = torch.tensor([True, False, True])
    has_audio = torch.tensor([True, True, False])
    logits = m(b["tokens"], b["images"], b["audio"], has_image, has_audio)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["tokens"][:, 1:].flatten())


def test_backward_reaches_every_parameter() -> None:
    m = build_genesis_model(CFG, seed=1)[0]
    _loss(m, batch()).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_grad_checkpointing_gives_same_loss_and_grads() -> None:
    m = build_genesis_model(CFG, seed=2)[0]
    b = batch()
    ref = _loss(m, b)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    m.grad_checkpointing = True
    ckpt = _loss(m, b)
    ckpt.backward()
    torch.testing.assert_close(ckpt, ref, rtol=0, atol=0)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], msg=n)


def test_non_persistent_buffers_absent_from_state_dict(model: MultimodalLM) -> None:
    buffers = {n for n, _ in model.named_buffers()}
    assert {"text.rope_cos", "text.rope_sin", "speech.window", "speech.mel_fb"} <= buffers
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}


def test_parameter_names_are_stable() -> None:
    names = {n for n, _ in MultimodalLM(CFG).named_parameters()}
    for expected in [
        "text.tok_emb.weight", "text.layers.0.attn.wq.weight", "text.layers.1.attn_norm.weight",
        "text.layers.0.mlp.w2.weight", "text.norm.weight", "text.lm_head.weight",
        "vision.patch_embed.weight", "vision.pos_emb", "vision.proj.0.weight", "vision.proj.2.bias",
        "speech.conv1.weight", "speech.conv2.bias", "speech.pos_emb", "speech.layers.0.attn.wk.weight",
        "absent_image", "absent_audio",
    ]:
        assert expected in names


def test_gqa_has_fewer_kv_than_query_projections(model: MultimodalLM) -> None:
    attn = model.text.layers[0].attn
    hd = CFG.dim // CFG.n_heads
    assert attn.wq.weight.shape == (CFG.n_heads * hd, CFG.dim)
    assert attn.wk.weight.shape == attn.wv.weight.shape == (CFG.n_kv_heads * hd, CFG.dim)


def test_mel_filterbank_peaks_at_a_tone(model: MultimodalLM) -> None:
    fb = mel_filterbank(CFG.sample_rate, CFG.n_fft, CFG.n_mels)
    assert fb.shape == (CFG.n_fft // 2 + 1, CFG.n_mels) and (fb >= 0).all()
    assert (fb.max(axis=0) > 0).all()  # no empty filter
    t = torch.arange(CFG.audio_samples) / CFG.sample_rate
    for hz in (300.0, 3000.0):
        mel = model.speech.log_mel(torch.sin(2 * torch.pi * hz * t)[None])  # (1, n_mels, frames)
        centre_bin = int(fb[:, mel[0, :, 25].argmax()].argmax())  # FFT bin at that filter's peak
        assert abs(centre_bin * CFG.sample_rate / CFG.n_fft - hz) < 150


def test_from_dict_rejects_unknown_key() -> None:
    with pytest.raises(ValueError, match="'n_layer'"):
        ModelConfig.from_dict({"n_layer": 4})


def test_from_dict_round_trips_and_rejects_bad_values() -> None:
    assert ModelConfig.from_dict(CFG.to_dict()) == CFG
    with pytest.raises(ValueError, match="integer"):
        ModelConfig.from_dict({"dim": 64.5})
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig.from_dict({"n_kv_heads": 3})


def test_tiny_yaml_lists_every_field_with_the_dataclass_defaults() -> None:
    path = Path(__file__).resolve().parents[1] / "kai_train" / "conf" / "model" / "tiny.yaml"
    d = yaml.safe_load(path.read_text())
    assert set(d) == set(CFG.to_dict())
    assert ModelConfig.from_dict(d) == CFG

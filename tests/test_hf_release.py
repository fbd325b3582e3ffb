"""The release as the field's clients take it: transformers loads export/ (AutoModelForCausalLM,
AutoTokenizer, GenerationConfig) and generates what kai-train's own `generate` does; the model
card states the chain's facts; model_signing's public verifier accepts the folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from attest.chain import read_chain  # noqa: E402
from kai_train.generate import generate, load_export  # noqa: E402

pytestmark = pytest.mark.slow  # the session's demo training


@pytest.fixture(scope="module")
def hf(demo_run: Path):
    export = demo_run / "export"
    model = transformers.AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
    tok = transformers.AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    return export, model.eval(), tok


def test_transformers_loads_the_export_and_gives_kai_trains_logits_and_greedy_tokens(hf) -> None:
    export, model, tok = hf
    kai, sp = load_export(export)
    assert type(model).__name__ == "KaiForCausalLM" and model.config.model_type == "kai_multimodal"
    for prompt in ("a red square", "하늘은 파랗다", "seven"):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        assert ids[0].tolist() == [sp.bos_id(), *sp.encode(prompt)]
        with torch.no_grad():
            assert torch.equal(model(ids).logits, kai(ids))
        out = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
        want = generate(kai, sp, prompt, max_new_tokens=12)
        assert [t for t in out if t != sp.eos_id()] == want
        assert out[len(want):][:1] in ([], [sp.eos_id()])  # stopped where kai-train stops


def test_image_and_audio_inputs_go_through_the_encoders_as_in_kai_train(hf) -> None:
    export, model, tok = hf
    kai, _ = load_export(export)
    c = kai.cfg
    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, c.image_channels, c.image_size, c.image_size, generator=g)
    audio = torch.randn(1, c.audio_samples, generator=g) * 0.1
    ids = tok("<image> a red square", return_tensors="pt")["input_ids"]
    one = torch.ones(1, dtype=torch.bool)
    with torch.no_grad():
        got = model(ids, pixel_values=image, audio_values=audio).logits
        assert torch.equal(got, kai(ids, image, audio, one, one))
        assert not torch.equal(got, model(ids).logits)  # the media changed the prediction


def test_generation_config_tokenizer_config_and_model_card_state_the_chain(hf, demo_run: Path) -> None:
    export, model, tok = hf
    gen = transformers.GenerationConfig.from_pretrained(export)
    assert gen.do_sample is False and gen.eos_token_id == tok.eos_token_id
    cfg = json.loads((export / "config.json").read_text())
    entries, _ = read_chain(demo_run / "chain.jsonl")
    release = [e for e in entries if e.kind == "release"][-1]
    head = entries[entries.index(release) - 1].digest
    card = (export / "README.md").read_text()
    assert cfg["weights_root"] in card and head in card and "kai-attest verify" in card
    assert "| text | CC0-1.0 |" in card
    total = sum(p.numel() for p in model.parameters())
    assert f"| total | {total:,} |" in card
    names = {s["name"] for s in release.statement["subject"]}
    on_disk = {f"export/{p.relative_to(export).as_posix()}" for p in export.rglob("*") if p.is_file()}
    assert on_disk == names  # every file of export/ (export/llama/ included) is a subject


def test_model_signing_public_verifier_accepts_the_export_and_rejects_an_edited_card(demo_run: Path,
                                                                                     tmp_path: Path) -> None:
    import shutil

    from model_signing import verifying

    verifier = verifying.Config().use_elliptic_key_verifier(public_key=demo_run / "keys/signing-key.pub.pem")
    export = demo_run / "export"
    verifier.verify(export, export / "model.sig")
    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    (copy / "README.md").write_text((copy / "README.md").read_text().replace("CC0-1.0", "MIT"))
    with pytest.raises(ValueError):
        verifier.verify(copy, copy / "model.sig")

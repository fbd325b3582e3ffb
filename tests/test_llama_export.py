"""export/llama/: the text decoder as a standard Llama folder (attest.llama, transform kai-llama/v1).

transformers' own LlamaForCausalLM, loaded without remote code, gives kai-train's text logits: for
models built here (grouped-query and plain attention, another RoPE base, weights split over two
files) and for the trained demo's release. Its tokenizer (transformers' fast tokenizer over the
rendered tokenizer.json) encodes and decodes as sentencepiece does, with kai-train's prefix first.
The verifier renders the folder itself; tests/test_release_render.py holds the edits an insider
might make to it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from attest import llama, spm
from attest.digest import read_safetensors_index

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kai_train.export import write_derived  # noqa: E402
from kai_train.model import MultimodalLM  # noqa: E402
from kai_train.modelspec import ModelConfig  # noqa: E402


def test_rope_order_moves_interleaved_pairs_to_halves_within_each_head() -> None:
    assert llama.rope_order(1, 4) == (0, 2, 1, 3)
    order = llama.rope_order(3, 8)
    assert sorted(order) == list(range(24)) and order[8:16] == (8, 10, 12, 14, 9, 11, 13, 15)


@pytest.mark.parametrize("preset", ["tiny", "125m", "7b", "13b"])
def test_the_prefix_lengths_are_kai_trains(preset: str) -> None:
    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parent.parent / f"kai_train/conf/model/{preset}.yaml").read_text())
    mc = ModelConfig.from_dict(cfg)
    assert llama.prefix_lengths(cfg) == (mc.n_image_tokens, mc.n_audio_tokens)
    assert llama.unsupported(cfg) is None


def test_a_mixture_of_experts_decoder_has_no_llama_folder() -> None:
    from attest.release import Rendered, render_llama

    moe = ModelConfig(n_experts=4, moe_top_k=2, moe_hidden=32).to_dict()
    assert "mixture-of-experts" in str(llama.unsupported(moe))
    out = Rendered()
    render_llama(out, moe, 2, "00" * 32, "r", {}, None, None, [])
    assert not out.names() and out.text_export is None and not out.problems
    assert out.notes == ["llama/: no Llama folder: the decoder has mixture-of-experts blocks, which a Llama folder "
                         "cannot hold"]
    dense = ModelConfig().to_dict()
    # a recipe's sizes bound what the verifier builds before it reads a weight
    assert "prefix" in str(llama.unsupported({**dense, "image_size": 1 << 24, "patch_size": 1}))
    assert "vocab_size" in str(llama.unsupported({**dense, "vocab_size": 1 << 24}))
    render_llama(out, dense, 2, "00" * 32, "r", {}, None, None, None)  # weights not at hand: the comparison fails
    assert out.text_export == llama.TRANSFORM and out.problems == [
        "llama/model.safetensors: the released weight files' headers are not at hand to compute it"]


def write_model(model: MultimodalLM, folder: Path) -> list[Path]:
    """The model's weights in two safetensors files, tensors alternating (as ranks share them)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    names = sorted(sd)
    files = [folder / "model-00001-of-00002.safetensors", folder / "model-00002-of-00002.safetensors"]
    for i, f in enumerate(files):
        save_file({n: sd[n] for n in names[i::2]}, str(f), metadata={"format": "pt"})
    return files


def llama_folder(model: MultimodalLM, tmp: Path) -> Path:
    """export/llama/'s config and weights for `model`, as the exporter writes them."""
    files = write_model(model, tmp / "kai")
    cfg = model.cfg.to_dict()
    out = tmp / "llama"
    write_derived(llama.weights(cfg, [read_safetensors_index(f) for f in files]), files, out / "model.safetensors")
    (out / "config.json").write_text(llama.config(cfg, {}, {}))
    return out


CONFIGS = {
    "gqa": ModelConfig(),
    "mha, rope 5e5": ModelConfig(n_kv_heads=4, rope_theta=500000.0, ffn_hidden=96),
    "one kv head, wide heads": ModelConfig(dim=96, n_heads=3, n_kv_heads=1, n_layers=3, norm_eps=1e-6),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_llama_for_causal_lm_gives_kai_trains_text_logits(tmp_path: Path, name: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    kai = MultimodalLM(CONFIGS[name]).eval()
    with torch.no_grad():
        for n, p in kai.named_parameters():  # not PyTorch's init: norms and absent vectors off their defaults too
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if n.endswith("norm.weight") else 0.0))
    folder = llama_folder(kai, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    c = kai.cfg
    tokens = torch.randint(0, c.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    prefix = torch.tensor(llama.prefix_ids(c.to_dict())).expand(2, -1)
    with torch.no_grad():
        got = hf(torch.cat([prefix, tokens], 1)).logits
        want = kai(tokens)
    P = kai.prefix_len
    assert got.shape == (2, P + 11, c.vocab_size + 2)
    torch.testing.assert_close(got[:, P:, :c.vocab_size], want, atol=1e-5, rtol=1e-5)
    assert torch.all(got[:, :, c.vocab_size:] == 0)  # the absent tokens' lm_head rows: suppressed in generation
    # the permutation is what makes them equal: rows copied as they are give other logits
    monkeypatch.setattr(llama, "rope_order", lambda n, hd: tuple(range(n * hd)))
    plain = transformers.LlamaForCausalLM.from_pretrained(llama_folder(kai, tmp_path / "plain")).eval()
    with torch.no_grad():
        assert (plain(torch.cat([prefix, tokens], 1)).logits[:, P:, :c.vocab_size] - want).abs().max() > 1e-3


def random_text(rng: random.Random) -> str:
    """Hangul, emoji, CJK, Latin, digits, the placeholders and whitespace in random mixtures."""
    parts = ["하늘은 파랗다", "이 프로그램은 낼 수 있다.", "😀🎉", "漢字かな", "the quick brown fox", "x = 12345",
             "<image>", "<audio>", "  ", "\t", "\n", " ", "Ωμέγα", "naïve café", "ﬁ ligature", "①②", "\u00a0", "é"]
    out = [rng.choice(parts) if rng.random() < 0.7 else chr(rng.choice([rng.randint(0xAC00, 0xD7A3),
                                                                          rng.randint(0x1F300, 0x1FAFF),
                                                                          rng.randint(0x20, 0x7E),
                                                                          rng.randint(0x4E00, 0x9FFF)]))
           for _ in range(rng.randint(1, 8))]
    return "".join(out)


def test_the_rendered_tokenizer_encodes_and_decodes_as_sentencepiece_after_kai_trains_prefix(tmp_path: Path) -> None:
    sentencepiece = pytest.importorskip("sentencepiece")
    from data_pipelines.tokenizer import TRAINER_ARGS

    rng = random.Random(0)
    lines = [f"이 프로그램은 {i} 번째 줄을 낼 수 있다. the quick brown fox {i} 하늘은 파랗다" for i in range(300)]
    lines += ["Ωμέγα naïve café 漢字かな ① 😀 x = 12345" for _ in range(20)]  # the rest: byte fallback
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = {k: v for k, v in TRAINER_ARGS.items() if k not in ("input_sentence_size",)}
    sentencepiece.SentencePieceTrainer.train(input=str(tmp_path / "t.txt"), model_prefix=str(tmp_path / "m"),
                                             vocab_size=400, minloglevel=2, **args)
    data = (tmp_path / "m.model").read_bytes()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    facts = spm.read(data)
    assert facts.scores == tuple(sp.get_score(i) for i in range(sp.get_piece_size()))
    model = ModelConfig(vocab_size=448).to_dict()  # more rows than pieces: the rest are unused tokens
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(llama.tokenizer_json(facts, model), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(llama.tokenizer_config(facts, model), encoding="utf-8")
    tok = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    assert tok.convert_ids_to_tokens([448, 449]) == [llama.ABSENT_IMAGE, llama.ABSENT_AUDIO]
    prefix = llama.prefix_ids(model)
    texts = ["a red square", "하늘은 파랗다", "  two  spaces 123 ", "emoji 😀 mixed 漢字", "<image> x", "",
             *(random_text(rng) for _ in range(300))]
    bad = []
    for text in texts:
        ids = tok(text)["input_ids"]
        want = [sp.bos_id(), *sp.encode(text)]
        if ids != prefix + want or tok.decode(ids, skip_special_tokens=True) != sp.decode(want):
            bad.append((text, ids[len(prefix):], want))
    assert not bad, bad[:5]


# ------------------------------------------------------------------ the demo's release


@pytest.fixture(scope="module")
def hf_llama(demo_run: Path):
    folder = demo_run / "export/llama"
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)
    tok = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    return folder, model.eval(), tok


def test_the_released_llama_folder_loads_without_remote_code_and_gives_kai_trains_text_logits(
        hf_llama, demo_run: Path) -> None:
    from kai_train.generate import generate, load_export

    folder, model, tok = hf_llama
    assert type(model).__name__ == "LlamaForCausalLM" and "auto_map" not in json.loads((folder / "config.json").read_text())
    assert not list(folder.glob("*.py"))
    kai, sp = load_export(demo_run / "export")
    P, V = kai.prefix_len, kai.cfg.vocab_size
    gen = transformers.GenerationConfig.from_pretrained(folder)
    assert gen.suppress_tokens == [V, V + 1] and gen.eos_token_id == sp.eos_id()
    for prompt in ("a red square", "하늘은 파랗다", "seven 7"):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        assert ids[0].tolist() == [V] * kai.cfg.n_image_tokens + [V + 1] * kai.cfg.n_audio_tokens + [
            sp.bos_id(), *sp.encode(prompt)]
        with torch.no_grad():
            got = model(ids).logits[:, P:, :V]
            want = kai(ids[:, P:])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        out = model.generate(ids, max_new_tokens=12)[0, ids.shape[1]:].tolist()
        assert [t for t in out if t != sp.eos_id()] == generate(kai, sp, prompt, max_new_tokens=12)
        assert tok.decode(ids[0], skip_special_tokens=True) == sp.decode(sp.encode(prompt))


def test_the_release_records_the_transform_and_the_verifier_renders_the_folder(demo_run: Path) -> None:
    from attest.chain import read_chain

    entries, _ = read_chain(demo_run / "chain.jsonl")
    (rel,) = [e for e in entries if e.kind == "release"]
    assert rel.predicate["export_format"] == 3 and rel.predicate["text_export"] == llama.TRANSFORM
    names = {s["name"] for s in rel.statement["subject"]}
    assert {f"export/llama/{n}" for n in ("config.json", "generation_config.json", "model.safetensors",
                                          "tokenizer.json", "tokenizer_config.json", "tokenizer.model")} <= names


RECORD = r"""
import transformers
model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)
tok = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
model.generate(**tok("a red", return_tensors="pt"), max_new_tokens=2)
transformers.pipeline("text-generation", model=folder, trust_remote_code=False)("a", max_new_tokens=1)
print(json.dumps(sorted(opened)))
"""


def test_transformers_opens_only_rendered_files_of_the_llama_folder(demo_run: Path, tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    from conftest import RECORD_OPENS, REPO, env

    folder = tmp_path / "llama"
    shutil.copytree(demo_run / "export/llama", folder)
    p = subprocess.run([sys.executable, "-c", RECORD_OPENS + RECORD, str(folder)], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env={**env(), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
                                         "TRANSFORMERS_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    opened = set(json.loads(p.stdout.strip().splitlines()[-1]))
    rendered = {p.name for p in folder.iterdir()}  # the release check holds this set to the rendering
    # (safetensors and tokenizers open their files in Rust, which the audit hook does not see)
    assert {"config.json", "tokenizer_config.json", "generation_config.json"} <= opened <= rendered, opened

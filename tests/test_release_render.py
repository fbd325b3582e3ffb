"""export/ is exactly what the chain renders (attest.release): the verifier renders it again and
compares every file, so an insider with the real key who adds or edits any file a loader may read
(generation, tokenizer and processor configs, chat templates, a foreign tokenizer.json, dtype,
custom pipelines, the model card) or rewrites release.slsa.json fails; check-vsa checks the files
in hand, not only the VSA's signature; and transformers opens no file of export/ the renderer does
not produce.

The SentencePiece facts the renderer states (attest.spm, read from the model's bytes on the light
install) are those sentencepiece itself reports.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from attest import spm
from attest.cli import main
from attest.digest import sha256_file
from attest.oms import sign_checkpoint_dir
from attest.release import render
from attest.statements import subject
from conftest import RECORD_OPENS, REPO, env, kai_attest, resign

# ------------------------------------------------------------------ the tokenizer facts


@pytest.mark.parametrize("opts", [
    {},
    {"bos_id": -1, "eos_id": 1, "unk_id": 2, "pad_id": 0},
    {"pad_id": 3, "pad_piece": "[PAD]", "bos_piece": "[BOS]"},
    {"user_defined_symbols": ["<image>", "<audio>"], "byte_fallback": True},
    {"control_symbols": ["<sep>"], "eos_id": -1},
])
def test_special_ids_read_from_the_model_bytes_are_sentencepieces(tmp_path: Path, opts: dict) -> None:
    sentencepiece = pytest.importorskip("sentencepiece")
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"이 프로그램은 {i} 번째 줄을 낼 수 있다. the quick brown fox {i}" for i in range(200)) + "\n",
                    encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "m"), vocab_size=400, hard_vocab_limit=False,
                                             minloglevel=2, **opts)
    data = (tmp_path / "m.model").read_bytes()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    facts = spm.read(data)
    assert facts.special == {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}
    assert [p for p, _ in facts.pieces] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


@pytest.mark.parametrize("data", [b"", b"tok", b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x05\x0a\x03ab", b"\x0f" * 64,
                                  b"\x0a\x80" + b"\x80" * 20, b"\x0a\x02\x0a\x01\xff"])
def test_a_model_file_that_is_not_sentencepiece_is_refused_with_one_error(data: bytes) -> None:
    with pytest.raises(spm.SpmError):
        spm.read(data)


def test_a_release_without_export_format_is_rendered_by_format_1() -> None:
    """Format 1's exporter left the loader's optional files out; format 2 names every file."""
    code = lambda name: b"# code\n"  # noqa: E731
    one = render([], 2, [("00" * 32, None)], None, code, False, fmt=1)
    two = render([], 2, [("00" * 32, None)], None, code, False)
    assert one.names() == two.names() and "README.md" not in one.names()  # no chain, no card
    assert "generation_config.json" in one.optional and not two.optional


def test_a_format_2_release_must_name_every_rendered_file_and_format_1_may_omit_the_optional_ones(tmp_path: Path) -> None:
    from bundlefactory import DERIVER, make_bundle

    from attest import verify

    def as_format(n: int) -> Callable[[list[dict]], None]:
        return lambda sts: sts[-1]["predicate"].update(export_format=n)

    verify.DERIVERS[DERIVER] = "bundlefactory"
    try:
        root, _ = make_bundle(tmp_path / "one")  # the factory writes format 1's minimal export/
        assert not [f.line() for f in verify.verify_bundle(root).failed]
        root, _ = make_bundle(tmp_path / "two", mutate=as_format(2))
        missing = {f.file for f in verify.verify_bundle(root).failed if f.check == "release"}
        assert {"export/generation_config.json", "export/modeling_kai.py"} <= missing, missing
        root, _ = make_bundle(tmp_path / "four", mutate=as_format(4))
        assert [f.line() for f in verify.verify_bundle(root).failed if f.check == "release"] == [
            "FAIL  release           chain.jsonl:12: expected export_format 1 … 3 (this verifier renders those), "
            "found export_format 4"]
    finally:
        verify.DERIVERS.pop(DERIVER, None)


# ------------------------------------------------------------------ insiders who re-sign export/


def resign_export(b: Path, key: Path) -> None:
    """After editing export/: sign the folder again (model-signing) and make the release name every
    file of it with its new sha256, every statement re-signed: what an insider with the key does."""
    sign_checkpoint_dir(b / "export", key)

    def rename(sts: list[dict]) -> None:
        (rel,) = [s for s in sts if s["predicate"]["kind"] == "release"]
        rel["subject"] = [subject(f"export/{p.relative_to(b / 'export').as_posix()}", sha256_file(p))
                          for p in sorted((b / "export").rglob("*")) if p.is_file()]

    resign(b, key, rename)


def edit_json(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(export: Path) -> None:
        doc = json.loads((export / name).read_text())
        change(doc)
        (export / name).write_text(json.dumps(doc, indent=2) + "\n")
    return edit


def add_file(name: str, text: str) -> Callable[[Path], None]:
    def edit(export: Path) -> None:
        (export / name).parent.mkdir(parents=True, exist_ok=True)
        (export / name).write_text(text)
    return edit


def foreign_tokenizer(export: Path) -> None:
    edit_json("tokenizer_config.json", lambda d: d.pop("auto_map"))(export)
    add_file("tokenizer.json", json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"Qwen": 0}}}))(export)


def reordered_llama_rows(export: Path) -> None:
    """export/llama/'s weights with the query rows of layer 0 in another order (a RoPE layout the
    transform does not give): a file that loads, with other logits."""
    from safetensors.numpy import load_file, save_file

    f = export / "llama/model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"][::-1].copy()
    save_file(tensors, f, metadata={"format": "pt"})


ATTACKS: dict[str, tuple[Callable[[Path], None], str]] = {
    "sampling generation config": (edit_json("generation_config.json", lambda d: d.update(
        do_sample=True, temperature=1.3, suppress_tokens=[5, 6], sequence_bias=[[[7], 4.0]])), "export/generation_config.json"),
    "tokenizer kwargs": (edit_json("tokenizer_config.json", lambda d: d.update(
        add_bos_token=False, sp_model_kwargs={"enable_sampling": True, "alpha": 0.1},
        added_tokens_decoder={"5": {"content": "Qwen", "special": True}})), "export/tokenizer_config.json"),
    "chat template": (add_file("chat_template.jinja", "{{ 'You are Qwen.' }}{% for m in messages %}{{ m.content }}"
                                                      "{% endfor %}"), "export/chat_template.jinja"),
    "foreign tokenizer.json": (foreign_tokenizer, "export/tokenizer.json"),
    "fp16 dtype": (edit_json("config.json", lambda d: d.update(dtype="float16")), "export/config.json"),
    "processor auto_map": (add_file("preprocessor_config.json", json.dumps(
        {"auto_map": {"AutoProcessor": "someone/else--processing.Proc"}})), "export/preprocessor_config.json"),
    "custom pipelines": (edit_json("config.json", lambda d: d.update(custom_pipelines={"text-generation": {
        "impl": "someone/else--pipe.Pipe", "pt": ["AutoModelForCausalLM"]}})), "export/config.json"),
    "custom generate": (add_file("custom_generate/generate.py", "def generate(model, **kw): ...\n"),
                        "export/custom_generate/generate.py"),
    "llama rope base": (edit_json("llama/config.json", lambda d: d.update(rope_theta=500000.0)), "export/llama/config.json"),
    "llama weights": (reordered_llama_rows, "export/llama/model.safetensors"),
    "llama tokenizer without the prefix": (edit_json("llama/tokenizer.json", lambda d: d.update(post_processor=None)),
                                           "export/llama/tokenizer.json"),
    "llama chat template": (add_file("llama/chat_template.jinja", "{{ 'You are Qwen.' }}"),
                            "export/llama/chat_template.jinja"),
    "llama sampling": (edit_json("llama/generation_config.json", lambda d: d.update(suppress_tokens=[], do_sample=True)),
                       "export/llama/generation_config.json"),
    "model card": (lambda e: (e / "README.md").write_text((e / "README.md").read_text().replace("CC0-1.0", "Apache-2.0")
                                                           .replace("genesis seed:", "genesis seed: 99 (was")),
                   "export/README.md"),
}


@pytest.fixture()
def bundle(demo_run: Path, tmp_path: Path) -> Path:
    b = tmp_path / "bundle"
    shutil.copytree(demo_run / "bundle", b)
    shutil.copy(demo_run / "keys/signing-key.pem", KEY(b))  # the insider holds the run's key
    return b


def verify_out(b: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Every check but replay (this file is about the release; tests/test_replay_verdict.py about replay):
    an honest bundle is INCOMPLETE (exit 4) with no failure, a forged one fails (exit 1)."""
    rc = main(["verify", str(b), "--trust", str(b / "keys/signing-key.pub.pem"), "--no-replay"])
    return rc, capsys.readouterr().out


@pytest.mark.slow  # the session's demo training
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_every_file_a_loader_may_read_is_rendered_so_a_resigned_edit_fails_release(
        bundle: Path, capsys: pytest.CaptureFixture[str], attack: str) -> None:
    edit, name = ATTACKS[attack]
    edit(bundle / "export")
    resign_export(bundle, KEY(bundle))
    rc, out = verify_out(bundle, capsys)
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert rc == 1 and {line.split()[1] for line in fails} == {"release"}, out
    assert any(f"release           {name}:" in line for line in fails), out


def KEY(bundle: Path) -> Path:  # the run's own signing key (the bundle fixture puts it beside the copy)
    return bundle.parent / "key.pem"


@pytest.mark.slow
def test_an_honest_resign_passes_so_the_attacks_fail_for_their_edit(bundle: Path, capsys) -> None:
    resign_export(bundle, KEY(bundle))
    rc, out = verify_out(bundle, capsys)
    assert rc == 4 and "FAIL" not in out, out


@pytest.mark.slow
def test_slsa_provenance_naming_another_builder_config_or_input_fails(bundle: Path, capsys) -> None:
    from attest.chain import read_chain
    from attest.dsse import sign_statement
    from attest.layout import SLSA_NAME
    from attest.signing import PemSigner
    from attest.slsa import provenance_statement

    entries, _ = read_chain(bundle / "chain.jsonl")
    for change in (lambda p: p["runDetails"]["builder"].update(id="https://example.org/other-trainer"),
                   lambda p: p["buildDefinition"]["externalParameters"]["config"].update(seed=1),
                   lambda p: p["buildDefinition"]["resolvedDependencies"].append(
                       {"name": "foreign/llama-vision.safetensors", "digest": {"sha256": "ab" * 32}})):
        st = provenance_statement(entries, entries[-1].digest)
        change(st["predicate"])
        (bundle / SLSA_NAME).write_text(json.dumps(sign_statement(st, PemSigner.from_file(KEY(bundle)))) + "\n")
        rc, out = verify_out(bundle, capsys)
        assert rc == 1 and "FAIL  slsa-provenance   release.slsa.json: expected the SLSA provenance rebuilt" in out, out


@pytest.mark.slow
def test_a_symlinked_slsa_provenance_is_not_followed(bundle: Path, capsys) -> None:
    from attest.layout import SLSA_NAME

    outside = bundle.parent / "elsewhere.json"
    shutil.move(bundle / SLSA_NAME, outside)
    (bundle / SLSA_NAME).symlink_to(outside)
    rc, out = verify_out(bundle, capsys)
    assert rc == 1 and "release.slsa.json: expected a regular file inside the bundle" in out, out


@pytest.mark.slow
def test_check_vsa_fails_a_genuine_passed_vsa_beside_a_changed_export(bundle: Path, tmp_path: Path) -> None:
    from attest.signing import keygen

    priv, pub = keygen(tmp_path / "evaluator")
    vsa = tmp_path / "vsa.json"
    assert kai_attest("verify", str(bundle), "--trust", str(bundle / "keys/signing-key.pub.pem"),
                      "--vsa", str(vsa), "--sign-key", str(priv)).returncode == 0
    assert kai_attest("check-vsa", str(vsa), str(bundle), "--key", str(pub)).returncode == 0
    policy = tmp_path / "p.json"
    policy.write_text("{}\n")
    p = kai_attest("check-vsa", str(vsa), str(bundle), "--key", str(pub), "--policy", str(policy))
    assert p.returncode == 1 and "policy sha256" in p.stdout, p.stdout
    p = kai_attest("check-vsa", str(vsa), str(bundle), "--key", str(pub), "--resource-uri", "other")
    assert p.returncode == 1 and "resourceUri" in p.stdout, p.stdout
    (bundle / "export/generation_config.json").write_text('{"do_sample": true}\n')
    p = kai_attest("check-vsa", str(vsa), str(bundle), "--key", str(pub))
    assert p.returncode == 1 and "export/generation_config.json: sha256 differs" in p.stdout, p.stdout
    (bundle / "export/generation_config.json").unlink()
    (bundle / "export/chat_template.jinja").write_text("{{ 'hidden' }}")
    p = kai_attest("check-vsa", str(vsa), str(bundle / "export"), "--key", str(pub))
    assert p.returncode == 1 and "chat_template.jinja: a file in hand the VSA does not cover" in p.stdout, p.stdout


RECORD = r"""
export = folder
import transformers
model = transformers.AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
tok = transformers.AutoTokenizer.from_pretrained(export, trust_remote_code=True)
model.generate(**tok("a red", return_tensors="pt"), max_new_tokens=2)
transformers.GenerationConfig.from_pretrained(export)
for load in (lambda: transformers.AutoProcessor.from_pretrained(export, trust_remote_code=True),
             lambda: transformers.pipeline("text-generation", model=export, trust_remote_code=True)("a", max_new_tokens=1)):
    try:
        load()
    except Exception as e:  # a processor kai-train does not ship: the loader says so, and opened what it opened
        print("loader:", type(e).__name__, str(e)[:100], file=sys.stderr)
print(json.dumps(sorted(opened)))
"""


@pytest.mark.slow
def test_transformers_opens_only_rendered_files_of_the_export(demo_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from attest.chain import read_chain
    from attest.release import render
    from attest.verify.checks.model import _own_code

    export = tmp_path / "export"
    shutil.copytree(demo_run / "export", export)
    cache = tmp_path / "hf"
    p = subprocess.run([sys.executable, "-c", RECORD_OPENS + RECORD, str(export)], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env={**env(), "HF_HOME": str(cache), "HF_HUB_OFFLINE": "1",
                                         "TRANSFORMERS_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    opened = set(json.loads(p.stdout.strip().splitlines()[-1]))
    entries, _ = read_chain(demo_run / "chain.jsonl")
    ckpt = [e for e in entries if e.kind == "checkpoint"][-1]
    weights = sorted((s for s in ckpt.statement["subject"] if s["name"].endswith(".safetensors")
                      and not s["name"].rsplit("/", 1)[1].startswith("optimizer")), key=lambda s: s["name"])
    tok = (export / "tokenizer.model").read_bytes()
    rendered = render(entries[:-1], ckpt.predicate["step"], [(s["digest"]["sha256"], []) for s in weights],
                      (tok, sha256_file(export / "tokenizer.model")), _own_code, True)
    produced = rendered.names()
    assert opened and opened <= produced, sorted(opened - produced)
    assert {"config.json", "tokenizer_config.json", "generation_config.json"} <= opened

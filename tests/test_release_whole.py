"""The release is mandatory and whole, the run config a person reads is the signed one, and
`--replay-data` trains the tokenizer again.

Insider attacks: the real key, every statement re-signed, every digest, link and model-signing
signature made consistent; each must still fail with the right check named. The bundle attacks
use the real demo training (tests/conftest.py `demo_run`), the tokenizer attacks the real demo
data build (`data_run`, no training); a few run on the small synthetic bundles of bundlefactory.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from attest import verify
from attest.chain import read_chain
from attest.verify.checks.model import NO_RELEASE
from attest.cli import main
from attest.verify.data_replay import check_data_replay
from attest.digest import sha256_file
from attest.oms import sign_checkpoint_dir
from attest.runconfig import render_yaml
from attest.statements import subject
from bundlefactory import DERIVER, init_weights, make_bundle, write_safetensors
from conftest import REPO, env, prepared_data, resign

TOKENIZER = "tokenizer/tokenizer.model"


# ------------------------------------------------------------------ helpers


def failed_checks(capsys: pytest.CaptureFixture[str], b: Path, *extra: str) -> tuple[set[str], str]:
    rc = main(["verify", str(b), "--trust", str(b / "keys/signing-key.pub.pem"), *extra])
    out = capsys.readouterr().out
    assert rc == 1, f"expected exit 1, got {rc}\n{out}"
    return {line.split()[1] for line in out.splitlines() if line.startswith("FAIL")}, out


def of_kind(statements: list[dict], kind: str) -> list[dict]:
    return [s for s in statements if s["predicate"]["kind"] == kind]


def resign_export(b: Path, key: Path) -> None:
    """After editing export/: sign the folder again (model-signing) and make the release name every
    file of it with its new sha256, every statement re-signed: what an insider with the key does."""
    sign_checkpoint_dir(b / "export", key)

    def rename(sts: list[dict]) -> None:
        (rel,) = of_kind(sts, "release")
        rel["subject"] = [subject(f"export/{p.relative_to(b / 'export').as_posix()}", sha256_file(p))
                          for p in sorted((b / "export").rglob("*")) if p.is_file()]

    resign(b, key, rename)


def data_replay_findings(run_dir: Path) -> list[verify.Finding]:
    """Only the data-replay check, on a data build's run dir (its chain, shards and tokenizer)."""
    return verify.verify_bundle(run_dir, checks=[check_data_replay], replay_data=True).findings


# ------------------------------------------------------------------ A: the release is mandatory and whole


@pytest.mark.slow  # the session's demo training (torchrun)
def test_honest_demo_bundle_binds_every_export_file_and_its_signature(demo_run: Path, capsys) -> None:
    entries, _ = read_chain(demo_run / "bundle/chain.jsonl")
    (rel,) = [e for e in entries if e.kind == "release"]
    names = sorted(s["name"] for s in rel.statement["subject"])
    assert {"export/config.json", "export/model.sig", "export/tokenizer.model"} <= set(names)
    assert any(n.endswith(".safetensors") for n in names)  # one file, or shards with their index
    on_disk = sorted(f"export/{p.relative_to(demo_run / 'bundle/export').as_posix()}"
                     for p in (demo_run / "bundle/export").rglob("*") if p.is_file())
    assert on_disk == names  # the bundle carries export/ and its signature
    rc = main(["verify", str(demo_run / "bundle"), "--trust", str(demo_run / "keys/signing-key.pub.pem"), "--no-replay"])
    out = capsys.readouterr().out
    assert rc == 4 and "FAIL" not in out, out  # every check holds; nothing was replayed (INCOMPLETE)
    assert any(line.startswith("ok    release") and f"{len(names)} files of export/" in line
               for line in out.splitlines()), out
    assert any(line.startswith("ok    run-config") for line in out.splitlines()), out


@pytest.mark.slow  # the session's demo training (torchrun)
def test_upstream_model_signing_accepts_the_export_folder(demo_run: Path) -> None:
    pytest.importorskip("model_signing")
    export = demo_run / "bundle/export"
    p = subprocess.run([sys.executable, "-m", "model_signing", "verify", "key", "--public_key",
                        str(demo_run / "keys/signing-key.pub.pem"), "--signature", str(export / "model.sig"), str(export)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "Verification succeeded" in p.stdout, p.stdout + p.stderr


def test_bundle_without_a_release_fails_release(bundle: Path, key: Path, capsys) -> None:
    shutil.rmtree(bundle / "export")
    resign(bundle, key, lambda sts: sts.remove(of_kind(sts, "release")[0]))
    failed, out = failed_checks(capsys, bundle)
    assert failed == {"release"}, out
    assert NO_RELEASE in out


def test_foreign_model_config_in_export_resigned_fails_release(bundle: Path, key: Path, capsys) -> None:
    import json

    cfg_file = bundle / "export/config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["model"]["n_layers"] += 1  # a user would build another architecture around the weights
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    resign_export(bundle, key)
    failed, out = failed_checks(capsys, bundle)
    assert failed == {"release"}, out
    assert "export/config.json: expected the bytes rendered from the chain" in out
    assert "key model: n_layers" in out


def test_model_code_in_export_other_than_kai_trains_resigned_fails_release(bundle: Path, key: Path, capsys) -> None:
    """transformers runs export/*.py with trust_remote_code: an insider who edits that code (here, a
    line that would load foreign weights) and re-signs everything fails `release`."""
    code = bundle / "export/modeling_kai.py"
    code.write_text(code.read_text() + "\n# load_foreign_vision_encoder()\n")
    resign_export(bundle, key)
    failed, out = failed_checks(capsys, bundle)
    assert failed == {"release"}, out
    assert "export/modeling_kai.py: expected the bytes rendered from the chain" in out


def test_an_auto_map_naming_other_code_resigned_fails_release(bundle: Path, key: Path, capsys) -> None:
    import json

    (bundle / "export/evil.py").write_text("from .modeling_kai import KaiForCausalLM  # and more\n")
    cfg_file = bundle / "export/config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["auto_map"]["AutoModelForCausalLM"] = "evil.KaiForCausalLM"
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    resign_export(bundle, key)
    failed, out = failed_checks(capsys, bundle)
    assert failed == {"release"}, out
    assert "export/evil.py: expected only the files kai-train renders into export/ from the chain" in out
    assert "export/config.json: expected the bytes rendered from the chain" in out and "key auto_map" in out


def test_extra_unsigned_file_in_export_fails_release(bundle: Path, capsys) -> None:
    (bundle / "export/special_config.json").write_text('{"temperature": 0.7}\n')
    failed, out = failed_checks(capsys, bundle)
    assert "release" in failed, out
    assert "export/special_config.json: expected a subject of the release statement, found a file the release " \
           "does not name" in out


def test_extra_file_in_export_signed_by_model_signing_only_still_fails_release(bundle: Path, key: Path, capsys) -> None:
    (bundle / "export/special_config.json").write_text('{"temperature": 0.7}\n')
    sign_checkpoint_dir(bundle / "export", key)  # the OMS signature lists it; the release does not

    def resig(sts: list[dict]) -> None:
        (rel,) = of_kind(sts, "release")
        for s in rel["subject"]:
            if s["name"] == "export/model.sig":
                s["digest"]["sha256"] = sha256_file(bundle / "export/model.sig")

    resign(bundle, key, resig)
    failed, out = failed_checks(capsys, bundle)
    assert failed == {"release"}, out
    assert "export/special_config.json" in out


def test_tokenizer_in_export_that_is_not_the_declared_one_fails_release(bundle: Path, key: Path, capsys) -> None:
    tok = bundle / "export/tokenizer.model"
    data = bytearray(tok.read_bytes())
    data[len(data) // 2] ^= 0x20  # another tokenizer (one piece renamed), signed into the release
    tok.write_bytes(bytes(data))
    resign_export(bundle, key)
    failed, out = failed_checks(capsys, bundle)
    assert failed == {"release"}, out
    assert "export/tokenizer.model: expected sha256" in out and "(the declared tokenizer" in out


def test_release_naming_a_checkpoint_file_instead_of_the_export_fails_release(bundle: Path, key: Path, capsys) -> None:
    def old_style(sts: list[dict]) -> None:
        (rel,) = of_kind(sts, "release")
        last = of_kind(sts, "checkpoint")[-1]
        rel["subject"] = [s for s in last["subject"] if s["name"].endswith(".safetensors")
                          and not s["name"].rsplit("/", 1)[1].startswith("optimizer")]  # the same weights

    resign(bundle, key, old_style)
    failed, out = failed_checks(capsys, bundle)
    assert failed == {"release"}, out
    assert "export/config.json: expected a subject of the release statement, found not named by the release" in out


def test_synthetic_bundle_without_release_fails_and_with_one_passes(tmp_path: Path) -> None:
    verify.DERIVERS[DERIVER] = "bundlefactory"
    root, _ = make_bundle(tmp_path / "with")
    assert verify.verify_bundle(root).ok
    root, _ = make_bundle(tmp_path / "without", release=False)
    r = verify.verify_bundle(root)
    assert {f.check for f in r.failed} == {"release"} and r.failed[0].found == NO_RELEASE


def test_foreign_export_without_checkpoint_or_release_fails(tmp_path: Path) -> None:
    verify.DERIVERS[DERIVER] = "bundlefactory"
    root, _ = make_bundle(tmp_path / "b", steps=())
    write_safetensors(root / "export/model.safetensors", init_weights(99))  # weights from elsewhere
    r = verify.verify_bundle(root)
    assert [(f.file, f.found) for f in r.failed if f.check == "release"] == [("chain.jsonl", NO_RELEASE),
                                                     ("export/model.safetensors", "no release statement")]


# ------------------------------------------------------------------ B: the run config a person reads


def test_run_yaml_differing_from_the_signed_config_fails_run_config(bundle: Path, key: Path, capsys) -> None:
    cfg_file = bundle / "config/run.yaml"
    text = cfg_file.read_text()
    assert "  lr: 0.003\n" in text
    cfg_file.write_text(text.replace("  lr: 0.003\n", "  lr: 0.0003\n"))  # what a person reads
    resign(bundle, key, lambda sts: [s["digest"].update(sha256=sha256_file(cfg_file))
                                     for s in of_kind(sts, "run")[0]["subject"]])
    failed, out = failed_checks(capsys, bundle)
    assert failed == {"run-config"}, out
    assert "config/run.yaml: expected the run statement's signed config" in out and "lr: 0.0003" in out


def test_run_yaml_with_yaml_tricks_fails_run_config(bundle: Path, key: Path, capsys) -> None:
    """The same values by a YAML loader's reading (a flow mapping), but not the canonical text."""
    cfg_file = bundle / "config/run.yaml"
    text = cfg_file.read_text()
    cfg_file.write_text(text.replace("  lr: 0.003\n", "  lr: !!float 0.003\n"))
    resign(bundle, key, lambda sts: [s["digest"].update(sha256=sha256_file(cfg_file))
                                     for s in of_kind(sts, "run")[0]["subject"]])
    failed, out = failed_checks(capsys, bundle)
    assert failed == {"run-config"}, out


def test_unsigned_extra_config_file_fails_run_config(bundle: Path, capsys) -> None:
    (bundle / "config/overrides.yaml").write_text("train:\n  lr: 0.1\n")
    failed, out = failed_checks(capsys, bundle)
    assert failed == {"run-config"}, out
    assert "config/overrides.yaml: expected a subject of the run statement, found an unsigned file" in out


@pytest.mark.slow  # the session's demo training (torchrun)
def test_trainer_writes_the_canonical_rendering_and_yaml_reads_the_signed_config(demo_run: Path) -> None:
    entries, _ = read_chain(demo_run / "chain.jsonl")
    (run,) = [e for e in entries if e.kind == "run"]
    text = (demo_run / "config/run.yaml").read_text()
    assert text == render_yaml(run.predicate["config"])
    yaml = pytest.importorskip("yaml")
    assert yaml.safe_load(text) == run.predicate["config"]


def test_render_yaml_reads_back_with_a_yaml_loader() -> None:
    yaml = pytest.importorskip("yaml")
    cfg = {"lr": 1e-5, "big": 1e16, "yes": "no", "s": "null", "t": "1.0", "e": "", "u": "한국어\n\t\x85\u2028 \"q\" \\",
           "nested": {"x": [{"a": 1, "b": [1.5, "x", None, True]}, {}, []], "d": {}}, "inf": float("inf"), "i": -3}
    assert yaml.safe_load(render_yaml(cfg)) == cfg
    with pytest.raises(TypeError):
        render_yaml({"x": object()})


# ------------------------------------------------------------------ C: --replay-data trains the tokenizer again


def test_honest_tokenizer_is_trained_again_byte_identical(data_run: Path) -> None:
    found = data_replay_findings(data_run)
    assert [f.ok for f in found] == [True], [f.line() for f in found]
    assert f"tokenizer {TOKENIZER} trained again" in found[0].detail and "byte-identical" in found[0].detail


def test_tokenizer_sample_parameters_changed_and_resigned_fails_data_replay(data_run: Path, tmp_path: Path) -> None:
    run_dir = prepared_data(tmp_path / "run", data_run)

    def every_other(sts: list[dict]) -> None:
        (tok,) = of_kind(sts, "tokenizer")
        tok["predicate"]["params"]["sample"]["every"] = 2

    resign(run_dir, run_dir / "keys/signing-key.pem", every_other)
    bad = [f for f in data_replay_findings(run_dir) if not f.ok]
    assert bad and {f.file for f in bad} == {TOKENIZER}, [f.line() for f in bad]
    assert any("trained again on the declared sample" in f.found for f in bad)


def test_tokenizer_with_a_parameter_this_version_does_not_accept_fails_data_replay(data_run: Path, tmp_path: Path) -> None:
    run_dir = prepared_data(tmp_path / "run", data_run)

    def inject(sts: list[dict]) -> None:
        (tok,) = of_kind(sts, "tokenizer")
        tok["predicate"]["params"]["model_prefix"] = "/tmp/elsewhere"  # never passed to the trainer

    resign(run_dir, run_dir / "keys/signing-key.pem", inject)
    bad = [f for f in data_replay_findings(run_dir) if not f.ok]
    assert [f.file for f in bad] == [TOKENIZER] and "model_prefix" in bad[0].found, [f.line() for f in bad]


FOREIGN_TOKENIZER = """
import sys
import data_pipelines.tokenizer as t
honest = t.shard_texts
# the insider's tokenizer: trained on other text (each sentence reversed), recorded as if it were the declared sample
t.shard_texts = lambda paths, limit=None, every=1: [s[::-1] for s in honest(paths, limit, every)]
from data_pipelines.build import main
sys.argv = ["kai-data", *sys.argv[1:]]
main()
"""


def test_tokenizer_trained_on_other_text_with_everything_rebuilt_and_signed_fails_data_replay(
        data_run: Path, tmp_path: Path) -> None:
    """The insider runs the real pipeline with a tokenizer trained on other text: the statement,
    the packed shards (tokenized with it) and every signature are consistent; only training the
    tokenizer again on the declared sample shows it."""
    run_dir = prepared_data(tmp_path / "run", data_run)
    entries, _ = read_chain(run_dir / "chain.jsonl")
    cut = next(i for i, e in enumerate(entries) if e.kind == "tokenizer")
    (run_dir / "chain.jsonl").write_bytes(b"".join(e.raw + b"\n" for e in entries[:cut]))
    (run_dir / TOKENIZER).unlink()
    for e in entries[cut + 1:]:  # the packed shards: made again with the insider's tokenizer
        for s in e.statement["subject"]:
            (run_dir / s["name"]).unlink(missing_ok=True)
    p = subprocess.run([sys.executable, "-c", FOREIGN_TOKENIZER, f"out_dir={run_dir}"], cwd=REPO, env=env(), text=True,
                       capture_output=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert sha256_file(run_dir / TOKENIZER) != sha256_file(data_run / TOKENIZER)
    bad = [f for f in data_replay_findings(run_dir) if not f.ok]
    assert bad and {f.file for f in bad} == {TOKENIZER}, [f.line() for f in bad]  # dedup and pack shards agree with it
    assert any("(the declared tokenizer)" in f.expected for f in bad)


def test_export_again_gives_the_released_bytes_and_refuses_to_overwrite_them_with_another_step(
        demo_run: Path, tmp_path: Path) -> None:
    from kai_train.export import export

    def files() -> dict[str, bytes]:
        return {str(p.relative_to(demo_run / "export")): p.read_bytes() for p in (demo_run / "export").rglob("*")
                if p.is_file()}

    before = files()
    assert "llama/model.safetensors" in before
    export(demo_run)  # the released step again: the same files, so the release still holds
    assert files() == before
    with pytest.raises(ValueError, match="holds the signed release of step 4"):
        export(demo_run, step=2)
    assert any(p.suffix == ".safetensors" for p in export(demo_run, step=2, out=tmp_path / "step2").iterdir())

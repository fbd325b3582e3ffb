"""The lineage test (`kai-attest lineage`): calibrated per-component independence verdicts.

Every model here is built with kai_train (seeded genesis) and trained briefly on CPU; nothing is
downloaded. Trained models are made once per module and saved as safetensors.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
pytest.importorskip("torch", reason="the train extra; not on the evaluator's light install")
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from attest.chain import ChainWriter
from attest.cli import main as cli_main
from attest.digest import safetensors_root, sha256_file
from attest.lineage import ComponentResult, LineageReport, Weights, lineage, open_weights
from attest.lineage.names import map_names
from attest.lineage.report import render_html
from attest.signing import PemSigner
from attest.statements import subject
from kai_train.init import build_genesis_model
from kai_train.model import ModelConfig, MultimodalLM
from kai_train.symmetry import in_block_maps, orthogonal, residual_map, signed_permutation, unit_maps

REPO = Path(__file__).resolve().parent.parent
CFG = ModelConfig()  # the tiny preset: dim 64, 2 decoder layers, MLP width 172, 1 vision and 1 speech layer
DRAWS = 49  # null draws per test run (the CLI default is 99); enough for p_perm to reach its floor 0.02
STEPS, LR = 40, 3e-3  # enough AdamW steps that weights move well away from init (corr to genesis ~0.6-0.7)


def _batch(g: torch.Generator, B: int = 8, T: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Arithmetic token sequences (learnable), random images and audio."""
    start = torch.randint(0, CFG.vocab_size, (B, 1), generator=g)
    step = torch.randint(1, 7, (B, 1), generator=g)
    tokens = (start + step * torch.arange(T + 1)) % CFG.vocab_size
    images = torch.rand(B, CFG.image_channels, CFG.image_size, CFG.image_size, generator=g)
    audio = torch.randn(B, CFG.audio_samples, generator=g) * 0.1
    return tokens, images, audio


def _train(model: MultimodalLM, data_seed: int, steps: int = STEPS) -> MultimodalLM:
    g = torch.Generator().manual_seed(data_seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    for _ in range(steps):
        tokens, images, audio = _batch(g)
        logits = model(tokens[:, :-1], images, audio)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _state(model: MultimodalLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def add_noise(sd: dict[str, torch.Tensor], rel: float, seed: int) -> dict[str, torch.Tensor]:
    """Gaussian noise of `rel` times each matrix's own std (the Llama3-V disguise)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + rel * v.std() * torch.randn(v.shape, generator=g) if v.ndim >= 2 else v for k, v in sd.items()}


def llama_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text decoder renamed to the Hugging Face Llama layout (vision/speech dropped)."""
    table = {"attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
             "attn.wo": "self_attn.o_proj", "mlp.w1": "mlp.gate_proj", "mlp.w3": "mlp.up_proj",
             "mlp.w2": "mlp.down_proj", "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    out = {"model.embed_tokens.weight": sd["text.tok_emb.weight"], "lm_head.weight": sd["text.lm_head.weight"],
           "model.norm.weight": sd["text.norm.weight"]}
    for k, v in sd.items():
        m = re.fullmatch(r"text\.layers\.(\d+)\.(.+)\.weight", k)
        if m:
            out[f"model.layers.{m[1]}.{table[m[2]]}.weight"] = v
    return out


@dataclass
class Zoo:
    genesis: Path  # seed 11 at init
    base: list[Path]  # seeds 11, 12, 13, each trained on its own data
    finetuned: Path  # base[0] trained further on other data
    vision_copy: Path  # base[1] with base[0]'s image encoder pasted in, then trained further
    disguised: Path  # base[0] permuted, rescaled and noised
    base_state: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    d = tmp_path_factory.mktemp("lineage")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast, and immune to a busy machine
    try:
        return _make_zoo(d)
    finally:
        torch.set_num_threads(threads)


def _make_zoo(d: Path) -> Zoo:
    torch.manual_seed(0)
    base, states = [], []
    genesis = None
    for k, seed in enumerate((11, 12, 13)):
        model, _ = build_genesis_model(CFG, seed)
        if k == 0:
            genesis = _save(_state(model), d / "genesis.safetensors")
        states.append(_state(_train(model, data_seed=100 + seed)))
        base.append(_save(states[-1], d / f"base{seed}.safetensors"))
    model = MultimodalLM(CFG)
    model.load_state_dict(states[0])
    finetuned = _save(_state(_train(model, data_seed=999)), d / "finetuned.safetensors")
    model.load_state_dict({**states[1], **{k: v for k, v in states[0].items() if k.startswith("vision.")}})
    vision_copy = _save(_state(_train(model, data_seed=777, steps=20)), d / "vision_copy.safetensors")
    disguised = _save(add_noise(unit_maps(states[0], seed=5, cfg=CFG), rel=0.5, seed=6), d / "disguised.safetensors")
    assert genesis is not None
    return Zoo(genesis, base, finetuned, vision_copy, disguised, states[0])


def _by_component(report: LineageReport, control: bool = False) -> dict[str, ComponentResult]:
    return {r.component: r for r in report.results if r.control == control}


def _comparable(report: LineageReport) -> list[ComponentResult]:
    return [r for r in report.results if r.verdict != "not comparable"]


# ---------------------------------------------------------------------------------------------


def test_independently_trained_models_are_never_flagged_over_three_seed_pairs(zoo: Zoo) -> None:
    pvalues = []
    for a, b in ((0, 1), (0, 2), (1, 2)):
        report = lineage(zoo.base[a], [zoo.base[b]], null_draws=DRAWS)
        rows = _comparable(report)
        assert len(rows) == 14, [r.line() for r in report.results]  # every component of the tiny model
        assert report.dependent == [], [r.line() for r in report.dependent]
        pvalues += [r.p_value for r in rows]
    # Calibrated, not merely conservative: p-values of unrelated pairs spread over (0, 1).
    assert min(pvalues) > 1e-3 and 0.2 < float(np.median(pvalues)) < 0.8, sorted(pvalues)


def test_fine_tuned_model_is_dependent_on_its_base_with_tiny_p(zoo: Zoo) -> None:
    report = lineage(zoo.finetuned, [zoo.base[0]], null_draws=DRAWS)
    rows = _comparable(report)
    assert len(rows) == 14
    for r in rows:
        assert r.verdict == "dependent" and r.p_value < 1e-6, r.line()
    assert _by_component(report)["text.block.0"].p_value < 1e-30


def test_permuted_rescaled_and_noised_copy_is_still_dependent(zoo: Zoo) -> None:
    # The disguise preserves the function exactly (before noise): an adversary loses nothing by it.
    g = torch.Generator().manual_seed(1)
    tokens, images, audio = _batch(g, B=2, T=16)
    model = MultimodalLM(CFG).eval()
    with torch.no_grad():
        model.load_state_dict(zoo.base_state)
        want = model(tokens, images, audio)
        model.load_state_dict(unit_maps(zoo.base_state, seed=5, cfg=CFG))
        got = model(tokens, images, audio)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    report = lineage(zoo.disguised, [zoo.base[0]], null_draws=DRAWS)
    res = _by_component(report)
    for comp in ("text.block.0", "text.block.1", "vision.block.0", "speech.block.0"):
        assert res[comp].verdict == "dependent" and res[comp].p_value < 1e-6, res[comp].line()


def test_copied_image_encoder_is_dependent_for_the_vision_components_only(zoo: Zoo) -> None:
    report = lineage(zoo.vision_copy, [zoo.base[0]], null_draws=DRAWS)
    res = _by_component(report)
    for comp in ("vision.embed", "vision.block.0", "vision.projector"):
        assert res[comp].verdict == "dependent" and res[comp].p_value < 1e-6, res[comp].line()
    for comp, r in res.items():
        if not comp.startswith("vision."):
            assert r.verdict == "independent", r.line()
    # and against the model it was pasted into, the opposite picture
    other = _by_component(lineage(zoo.vision_copy, [zoo.base[1]], null_draws=DRAWS))
    assert other["text.block.0"].verdict == "dependent" and other["vision.block.0"].verdict == "independent"


def test_norm_gains_initialised_at_one_are_not_flagged_by_themselves(zoo: Zoo) -> None:
    # Trained, unrelated: raw cosine of the gains is ~1 (the Solar/GLM trap), the centred test says no.
    res = _by_component(lineage(zoo.base[0], [zoo.base[1]], null_draws=DRAWS))
    for comp in ("text.norm", "vision.norm", "speech.norm"):
        r = res[comp]
        assert r.norm_only and r.raw_cosine > 0.99 and r.verdict == "independent", r.line()
    # Untrained, unrelated: every gain is exactly 1, so there is nothing to compare.
    d = zoo.genesis.parent
    g2 = _save(_state(build_genesis_model(CFG, 12)[0]), d / "genesis12.safetensors")
    report = lineage(zoo.genesis, [g2], null_draws=DRAWS)
    res = _by_component(report)
    for comp in ("text.norm", "vision.norm", "speech.norm"):
        assert res[comp].verdict == "not comparable" and "constant" in res[comp].reason, res[comp].line()
    assert report.dependent == [], [r.line() for r in report.dependent]


def _bundle(root: Path, genesis: Path, release: Path) -> Path:
    """A minimal bundle: a signed chain with genesis and release statements, and their weights."""
    from cryptography.hazmat.primitives.asymmetric import ec

    names = {"checkpoints/step-000000/model.safetensors": genesis,
             f"checkpoints/step-{STEPS:06d}/model.safetensors": release}
    for name, src in names.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(src.read_bytes())
    chain = ChainWriter(root / "chain.jsonl", PemSigner(ec.generate_private_key(ec.SECP256R1())), "lineage-test")
    (gname, _), (rname, _) = names.items()
    for kind, name, pred in (("genesis", gname, {"recipe": {}, "tensors": {}}), ("release", rname, {"step": STEPS})):
        chain.append(kind, [subject(name, sha256_file(root / name))],
                     {**pred, "weights_root": safetensors_root([root / name])})
    return root


def test_bundle_release_is_dependent_on_its_own_genesis_and_not_on_a_stranger(zoo: Zoo, tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle", zoo.genesis, zoo.base[0])
    report = lineage(bundle, [zoo.base[1]], null_draws=DRAWS)
    control = [r for r in report.results if r.control and r.verdict != "not comparable"]
    assert len(control) == 11  # the three norm components are constant in the genesis
    for r in control:
        assert r.verdict == "dependent" and r.p_value < 1e-6, r.line()
    assert report.control_failed == [] and report.dependent == []


def test_llama_layout_maps_onto_the_same_components_and_lists_what_it_cannot_map(zoo: Zoo, tmp_path: Path) -> None:
    sd = llama_names(zoo.base_state)
    sd["model.rotary_emb.inv_freq"] = torch.ones(8)
    sd["model.layers.0.mystery.weight"] = torch.ones(4, 4)
    hf = _save(sd, tmp_path / "llama.safetensors")
    mapped = map_names(open_weights(hf).shapes())
    assert set(mapped.components) == {"text.embed", "text.block.0", "text.block.1", "text.lm_head", "text.norm"}
    assert set(mapped.components["text.block.1"]) == {"attn.q", "attn.k", "attn.v", "attn.o",
                                                      "mlp.gate", "mlp.up", "mlp.down"}
    unmatched = sorted(u.split()[0] for u in mapped.unmatched)
    assert unmatched == ["model.layers.0.mystery.weight", "model.rotary_emb.inv_freq"]

    report = lineage(zoo.finetuned, [hf], null_draws=DRAWS)
    res = _by_component(report)
    for comp in ("text.embed", "text.block.0", "text.block.1", "text.lm_head", "text.norm"):
        assert res[comp].verdict == "dependent", res[comp].line()
    absent = res["vision.block.0"]
    assert absent.verdict == "not comparable" and "absent in the reference" in absent.reason
    assert any("mystery" in u for u in report.unmatched["llama.safetensors"])


def test_fused_qkv_vision_layout_is_split_and_compared(zoo: Zoo, tmp_path: Path) -> None:
    # Qwen2-VL style: visual.blocks.N.attn.qkv (q, k, v stacked) and gate/up/down projections.
    s, p = zoo.base_state, "vision.layers.0."
    sd = {"visual.blocks.0.attn.qkv.weight": torch.cat([s[p + f"attn.{w}.weight"] for w in ("wq", "wk", "wv")]),
          "visual.blocks.0.attn.proj.weight": s[p + "attn.wo.weight"],
          "visual.blocks.0.mlp.gate_proj.weight": s[p + "mlp.w1.weight"],
          "visual.blocks.0.mlp.up_proj.weight": s[p + "mlp.w3.weight"],
          "visual.blocks.0.mlp.down_proj.weight": s[p + "mlp.w2.weight"]}
    qwen = _save(sd, tmp_path / "qwen_visual.safetensors")
    r = _by_component(lineage(zoo.disguised, [qwen], null_draws=DRAWS))["vision.block.0"]
    assert r.verdict == "dependent" and sorted(r.roles) == ["attn.k", "attn.o", "attn.q", "attn.v",
                                                             "mlp.down", "mlp.gate", "mlp.up"], r.line()


def test_bf16_and_f16_weights_are_read_without_torch_as_torch_reads_them(zoo: Zoo, tmp_path: Path) -> None:
    w = zoo.base_state["text.layers.0.mlp.w1.weight"]
    for dtype in (torch.bfloat16, torch.float16):
        path = _save({"x": w.to(dtype)}, tmp_path / f"{dtype}.safetensors")
        got = Weights("x", open_weights(path).tensors).array("x")
        np.testing.assert_array_equal(got, w.to(dtype).float().numpy())


def test_cli_lineage_json_report_and_exit_codes(zoo: Zoo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # dependent -> exit 1; JSON on stdout; the HTML page is self-contained
    html_path = tmp_path / "lineage.html"
    rc = cli_main(["lineage", str(zoo.finetuned), "--reference", str(zoo.base[0]), "--json",
                   "--null-draws", "19", "--report", str(html_path)])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and out["dependent_components"] and out["null_draws"] == 19
    page = html_path.read_text()
    assert "<script" not in page and not re.search(r"(src|href)=", page)
    svg = re.search(r"<svg.*?</svg>", page, re.S)
    assert svg and ET.fromstring(svg.group(0)).tag.endswith("svg")
    # independent -> exit 0, as a real subprocess through `python -m attest.cli`
    p = subprocess.run([sys.executable, "-m", "attest.cli", "lineage", str(zoo.base[0]), "--reference",
                        str(zoo.base[2]), "--null-draws", "19"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "verdict: no component dependent" in p.stdout
    # unreadable input -> exit 2 and one line naming the file
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    rc = cli_main(["lineage", str(zoo.base[0]), "--reference", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and str(bad) in err


def test_html_report_renders_every_row(zoo: Zoo) -> None:
    report = lineage(zoo.vision_copy, [zoo.base[0], zoo.base[1]], null_draws=19)
    page = render_html(report)
    assert page.count("<tr class=") == len(report.results) == 28
    assert "vision.block.0" in page and "absence of evidence" in page


def test_lineage_never_imports_torch() -> None:
    # (Blocking torch with sys.modules['torch'] = None would trip scipy's own array-API probe.)
    code = ("import sys, attest.cli, attest.lineage, attest.lineage.names, attest.lineage.report\n"
            "print('ok' if 'torch' not in sys.modules else 'torch was imported')")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


# ---------------------------------------------------------------------------------------------
# residual-stream symmetries: permutation (with signs), rotation, composed with the in-block ones


def _same_function(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    g = torch.Generator().manual_seed(3)
    tokens, images, audio = _batch(g, B=2, T=16)
    model = MultimodalLM(CFG).eval()
    with torch.no_grad():
        model.load_state_dict(a)
        want = model(tokens, images, audio)
        model.load_state_dict(b)
        got = model(tokens, images, audio)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def _grafted(zoo: Zoo) -> dict[str, torch.Tensor]:
    """Model 12 with model 11's image encoder (and projector) pasted in."""
    other = {k: v for k, v in load_file(str(zoo.base[1])).items()}
    return {**other, **{k: v for k, v in zoo.base_state.items() if k.startswith("vision.")}}


@pytest.mark.parametrize("transform", ["permutation", "rotation", "composed"])
def test_grafted_encoder_under_residual_permutation_or_rotation_is_dependent(zoo: Zoo, tmp_path: Path,
                                                                             transform: str) -> None:
    g = torch.Generator().manual_seed(21)
    graft = _grafted(zoo)
    dims = {"text": CFG.dim, "vision": CFG.vision_dim, "speech": CFG.speech_dim}
    if transform == "permutation":  # every stream, signs too (not speech: a GELU follows its convs)
        maps = {s: signed_permutation(d, g, signs=s != "speech") for s, d in dims.items()}
        moved = residual_map(graft, maps, fold=False, cfg=CFG)
    else:
        maps = {s: orthogonal(d, g) for s, d in dims.items() if s != "speech"}
        maps["speech"] = signed_permutation(dims["speech"], g, signs=False)
        base = in_block_maps(unit_maps(graft, seed=8, cfg=CFG), seed=9, cfg=CFG) if transform == "composed" else graft
        moved = residual_map(base, maps, fold=True, cfg=CFG)
    _same_function(graft, moved)  # the disguise costs the copier nothing
    cand = _save(add_noise(moved, 0.1, seed=4) if transform == "composed" else moved, tmp_path / "c.safetensors")
    res = _by_component(lineage(cand, [zoo.base[0]], null_draws=DRAWS))
    # (the projector writes to the text stream, which is model 12's and was moved too: it is judged
    # on its vision side, which the alignment carries)
    for comp in ("vision.embed", "vision.block.0", "vision.projector"):
        assert res[comp].verdict == "dependent" and res[comp].p_value < 1e-6, res[comp].line()
    for comp, r in res.items():
        if not comp.startswith("vision."):
            assert r.verdict != "dependent", r.line()
    # and the model the encoder was pasted into is still recognised, through the same maps
    other = _by_component(lineage(cand, [zoo.base[1]], null_draws=DRAWS))
    for comp in ("text.block.0", "text.block.1", "speech.block.0"):
        assert other[comp].verdict == "dependent", other[comp].line()


def test_an_independent_pair_stays_independent_after_a_residual_rotation(zoo: Zoo, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(22)
    maps = {"text": orthogonal(CFG.dim, g), "vision": orthogonal(CFG.vision_dim, g)}
    cand = _save(residual_map(load_file(str(zoo.base[1])), maps, fold=True, cfg=CFG), tmp_path / "rot.safetensors")
    report = lineage(cand, [zoo.base[0]], null_draws=DRAWS)
    assert report.dependent == [], [r.line() for r in report.dependent]
    assert min(r.p_value for r in _comparable(report)) > 1e-3


def test_norm_gain_decoy_with_raw_cosine_near_one_is_independent(zoo: Zoo, tmp_path: Path) -> None:
    # Gains near 1 in both models (raw cosine ~1), drawn independently; everything else unrelated.
    def decoy(path: Path, seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        sd = load_file(str(path))
        return {k: 1 + 0.01 * torch.randn(v.shape, generator=gen) if "norm" in k else v for k, v in sd.items()}

    a = _save(decoy(zoo.base[1], 1), tmp_path / "a.safetensors")
    b = _save(decoy(zoo.base[2], 2), tmp_path / "b.safetensors")
    report = lineage(a, [b], null_draws=DRAWS)
    res = _by_component(report)
    for comp in ("text.norm", "vision.norm", "speech.norm"):
        assert res[comp].raw_cosine > 0.999 and res[comp].verdict == "independent", res[comp].line()
    assert report.dependent == [], [r.line() for r in report.dependent]


def test_encoders_left_at_a_shared_public_genesis_are_named_shared_initialisation(zoo: Zoo, tmp_path: Path) -> None:
    # The reference: every component trained from the seed-1234 genesis. The candidate: its own
    # (foreign) decoder, encoders never trained: they equal the same public genesis.
    genesis = _state(build_genesis_model(CFG, 1234)[0])
    model = MultimodalLM(CFG)
    model.load_state_dict(genesis)
    ref_state = _state(_train(model, data_seed=55))
    ref = _save(ref_state, tmp_path / "ref.safetensors")
    text_of_12 = {k: v for k, v in load_file(str(zoo.base[1])).items() if not k.startswith(("vision.", "speech."))}
    cand = _save({**genesis, **text_of_12}, tmp_path / "cand.safetensors")
    report = lineage(cand, [ref], null_draws=DRAWS)
    res = _by_component(report)
    for comp in ("vision.embed", "vision.block.0", "vision.projector", "speech.embed", "speech.block.0"):
        r = res[comp]
        assert r.verdict == "shared initialisation" and r.shared_init == "kai-init/v2 seed 1234", r.line()
    assert report.dependent == [], [r.line() for r in report.dependent]
    assert any(line.startswith("note") and "kai-init/v2 seed 1234" in line for line in report.lines())
    page = render_html(report)
    assert page.count('<tr class="shared">') == sum(r.verdict == "shared initialisation" for r in report.results)
    # Without the public seed the same rows read as dependence: the relabelling is what changed.
    plain = _by_component(lineage(cand, [ref], null_draws=DRAWS, public_seeds=()))
    assert plain["vision.block.0"].verdict == "dependent"
    # A candidate that copies the reference's *trained* image encoder is closer to it than to the
    # genesis: still dependent, while its untouched speech encoder stays a shared initialisation.
    copied = _save({**genesis, **text_of_12, **{k: v for k, v in ref_state.items() if k.startswith("vision.")}},
                   tmp_path / "copied.safetensors")
    res = _by_component(lineage(copied, [ref], null_draws=DRAWS))
    assert res["vision.block.0"].verdict == "dependent", res["vision.block.0"].line()
    assert res["speech.block.0"].verdict == "shared initialisation", res["speech.block.0"].line()


def test_the_geneses_tried_are_a_bundle_candidates_own_seed_else_the_public_and_recorded_ones() -> None:
    from attest.lineage import _genesis_seeds

    def w(recipe: dict | None) -> Weights:
        return Weights("m", {}, recipe=recipe)

    v2 = {"name": "kai-init/v2", "model": {}}
    plain, ref77, ref_v1 = w(None), w({**v2, "seed": 77}), w({"name": "kai-init/v1", "seed": 5})
    assert _genesis_seeds(plain, [ref77, ref_v1, plain], (1234,)) == [1234, 77]
    assert _genesis_seeds(plain, [], (1234, 9)) == [1234, 9]
    # a bundle candidate can only have started from the genesis it records
    assert _genesis_seeds(w({**v2, "seed": 42}), [ref77], (1234,)) == [42]
    assert _genesis_seeds(w({**v2, "seed": True}), [ref77], (1234,)) == []


def test_a_rotated_copy_trained_on_further_is_still_dependent(zoo: Zoo, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(23)
    maps = {"text": orthogonal(CFG.dim, g), "vision": orthogonal(CFG.vision_dim, g),
            "speech": signed_permutation(CFG.speech_dim, g, signs=False)}
    model = MultimodalLM(CFG)
    model.load_state_dict(residual_map(zoo.base_state, maps, fold=True, cfg=CFG))
    cand = _save(_state(_train(model, data_seed=4242)), tmp_path / "rot_trained.safetensors")
    res = _by_component(lineage(cand, [zoo.base[0]], null_draws=DRAWS))
    for comp in ("text.embed", "text.block.0", "text.block.1", "text.lm_head", "vision.embed", "vision.block.0",
                 "vision.projector", "speech.block.0"):
        assert res[comp].verdict == "dependent" and res[comp].p_value < 1e-6, res[comp].line()


def test_a_public_genesis_is_made_bit_exact_from_the_names_alone(zoo: Zoo) -> None:
    from attest.lineage import GenesisWeights
    from kai_train.modelspec import param_specs, rules_from_names

    want = _state(build_genesis_model(CFG, 1234)[0])
    g = GenesisWeights("g", 1234, open_weights(zoo.base[0]))
    assert {n for n, _ in g.shapes()} == set(want)
    for name, t in want.items():
        np.testing.assert_array_equal(g.array(name), t.numpy(), err_msg=name)
    moe = ModelConfig(n_layers=3, vision_layers=2, n_experts=4, moe_top_k=2, moe_hidden=16, n_shared_experts=1,
                      moe_dense_layers=1)
    for cfg in (CFG, moe):
        specs = param_specs(cfg)
        assert rules_from_names(n for n, _, _ in specs) == {n: rule for n, _, rule in specs}
    assert rules_from_names(["model.layers.0.self_attn.q_proj.weight"]) == {}  # other layouts: no genesis

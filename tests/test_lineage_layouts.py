"""Lineage on public layouts: Qwen2 (Llama-style) decoders, the Qwen2-VL and Qwen2.5-VL vision towers,
SigLIP and the Whisper encoder, each built by `transformers` from its config class (small, random
init, nothing downloaded) and written by `save_pretrained`, so the names are the ones public
checkpoints carry.
"""

from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the train extra; not on the evaluator's light install")
transformers = pytest.importorskip("transformers", reason="builds the public layouts")
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from attest.cli import main as cli_main  # noqa: E402
from attest.digest import sha256_file  # noqa: E402
from attest.lineage import LineageReport, lineage, open_weights  # noqa: E402
from attest.lineage.names import NOT_COMPARED, map_names  # noqa: E402
from attest.lineage.report import render_html  # noqa: E402
from kai_train.init import build_genesis_model  # noqa: E402
from kai_train.model import ModelConfig  # noqa: E402

DRAWS = 49
CFG = ModelConfig()  # the kai-train tiny preset, for the cross-layout graft


def qwen2(tie: bool = False, layers: int = 2) -> torch.nn.Module:
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=CFG.vocab_size, hidden_size=CFG.dim, intermediate_size=CFG.ffn_hidden, num_hidden_layers=layers,
        num_attention_heads=CFG.n_heads, num_key_value_heads=CFG.n_kv_heads, tie_word_embeddings=tie))


def qwen2_vl() -> torch.nn.Module:
    return transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=4,
                           temporal_patch_size=2, spatial_merge_size=2)))


def qwen25_vl() -> torch.nn.Module:
    return transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2),
        vision_config=dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=4,
                           patch_size=4, temporal_patch_size=2, spatial_merge_size=2, fullatt_block_indexes=[1])))


def siglip() -> torch.nn.Module:
    return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=4))


def whisper() -> torch.nn.Module:
    return transformers.WhisperModel(transformers.WhisperConfig(
        vocab_size=128, num_mel_bins=16, encoder_layers=2, decoder_layers=1, d_model=32, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_source_positions=64,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))


# layout -> (builder, parts detected, components mapped, a block to graft (saved-name prefix, component),
# prefixes of the tensors expected unmatched)
LAYOUTS: dict[str, tuple[Callable[[], torch.nn.Module], tuple[str, ...], set[str], tuple[str, str], tuple[str, ...]]] = {
    "qwen2": (qwen2, ("llama",), {"text.embed", "text.block.0", "text.block.1", "text.lm_head", "text.norm"},
              ("model.layers.1.", "text.block.1"), ()),
    "qwen2-vl": (qwen2_vl, ("llama", "qwen2-vl-vision"),
                 {"text.embed", "text.block.0", "text.lm_head", "text.norm", "vision.embed", "vision.block.0",
                  "vision.block.1", "vision.norm", "vision.projector"}, ("visual.blocks.1.", "vision.block.1"), ()),
    "qwen2.5-vl": (qwen25_vl, ("llama", "qwen2-vl-vision"),
                   {"text.embed", "text.block.0", "text.lm_head", "text.norm", "vision.embed", "vision.block.0",
                    "vision.block.1", "vision.norm", "vision.projector"}, ("visual.blocks.0.", "vision.block.0"), ()),
    "siglip": (siglip, ("clip",), {"vision.embed", "vision.block.0", "vision.block.1", "vision.norm"},
               ("encoder.layers.1.", "vision.block.1"), ("head.",)),
    "whisper": (whisper, ("whisper",), {"speech.embed", "speech.block.0", "speech.block.1", "speech.norm"},
                ("encoder.layers.0.", "speech.block.0"), ("decoder.",)),
}


def _saved(build: Callable[[], torch.nn.Module], seed: int, out: Path) -> Path:
    torch.manual_seed(seed)
    build().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Two independently initialised models of every layout, as save_pretrained writes them."""
    d = tmp_path_factory.mktemp("layouts")
    return {name: [_saved(spec[0], seed, d / f"{name}-{seed}") for seed in (1, 2)] for name, spec in LAYOUTS.items()}


def _by_component(report: LineageReport) -> dict[str, str]:
    return {r.component: r.verdict for r in report.results}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_public_layout_maps_onto_lineage_components(models: dict[str, list[Path]], layout: str) -> None:
    _, parts, components, _, expected_unmatched = LAYOUTS[layout]
    shapes = open_weights(models[layout][0]).shapes()
    for given in ("auto", layout):  # detected from the names, or named
        m = map_names(shapes, given)
        assert m.parts == parts and set(m.components) == components, (given, sorted(m.components))
        assert all(u.startswith(expected_unmatched) for u in m.unmatched), m.unmatched
    # one shard of a sharded checkpoint, holding blocks only, is read the same way
    shard = map_names([(n, s) for n, s in shapes if re.search(r"(^|\.)(layers|blocks)\.\d+\.", n)])
    assert shard.parts == parts
    assert {c for c in shard.components if ".block." in c} == {c for c in components if ".block." in c}
    if layout == "whisper":  # the sinusoidal position table is identical in every Whisper model:
        assert m.components["speech.embed"]["pos"].anchor_only  # it aligns the stream, and is never compared
    if layout.startswith("qwen2"):
        vision = m.components.get("vision.block.0", {})
        if vision:  # the fused qkv is split into q, k and v; the merger is the projector
            assert {"attn.q", "attn.k", "attn.v"} <= set(vision)
            assert set(m.components["vision.projector"]) == {"in", "in.bias", "out", "out.bias"}
            assert m.components["vision.projector"]["in"].view == (128, 4, 32)


def test_a_layout_named_for_other_names_maps_nothing_of_them(models: dict[str, list[Path]]) -> None:
    # SigLIP and a bare Whisper encoder both name blocks `encoder.layers.N.self_attn.q_proj`: read as
    # Whisper, the SigLIP tower has no speech front end, and its attention is not taken for speech.
    m = map_names(open_weights(models["siglip"][0]).shapes(), "whisper")
    assert not any(c.startswith("vision.") for c in m.components)
    assert "speech.embed" not in m.components
    with pytest.raises(ValueError, match="unknown layout 'gpt9'"):
        map_names([], "gpt9")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_independent_public_models_are_independent_and_a_grafted_block_is_dependent(
        models: dict[str, list[Path]], layout: str, tmp_path: Path) -> None:
    a, b = models[layout]
    report = lineage(a, [b], null_draws=DRAWS)
    assert report.dependent == [], [r.line() for r in report.dependent]
    assert any(r.verdict == "independent" for r in report.results)
    # B with one block of A pasted in (every tensor of that block, biases and norms too)
    prefix, component = LAYOUTS[layout][3]
    sa, sb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    moved = {k for k in sa if k.startswith(prefix)}
    assert moved
    cand = tmp_path / "graft.safetensors"
    save_file({**sb, **{k: sa[k] for k in moved}}, str(cand))
    verdicts = _by_component(lineage(cand, [a], null_draws=DRAWS))
    assert verdicts[component] == "dependent", verdicts
    assert [c for c, v in verdicts.items() if v == "dependent"] == [component], verdicts


def _rotate(sd: dict[str, torch.Tensor], r: torch.Tensor) -> dict[str, torch.Tensor]:
    """A Qwen2 model with its residual stream mapped by the orthogonal `r` (x -> x r): RMSNorm gains at 1
    commute with it, so the model computes the same function."""
    out = {}
    for k, v in sd.items():
        if k.endswith(("embed_tokens.weight", "lm_head.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight",
                       "gate_proj.weight", "up_proj.weight")):
            v = v @ r
        elif k.endswith(("o_proj.weight", "down_proj.weight")):
            v = r.T @ v
        else:
            assert k.endswith(("norm.weight", "bias")) and (not k.endswith("norm.weight") or bool((v == 1).all())), k
        out[k] = v.contiguous()
    return out


@pytest.mark.parametrize("transform", ["rotation", "signed permutation"])
def test_a_foreign_qwen2_block_inside_a_rotated_copy_is_named_on_both_sides(
        models: dict[str, list[Path]], tmp_path: Path, transform: str) -> None:
    a, b = models["qwen2"]
    sa, sb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    if transform == "rotation":
        r = torch.linalg.qr(torch.randn(CFG.dim, CFG.dim, generator=g))[0]
    else:
        r = torch.eye(CFG.dim)[torch.randperm(CFG.dim, generator=g)] * torch.where(
            torch.rand(CFG.dim, generator=g) < 0.5, -1.0, 1.0)
    moved = _rotate(sa, r)
    model = qwen2().eval()
    tokens = torch.randint(0, CFG.vocab_size, (2, 12), generator=g)
    with torch.no_grad():
        model.load_state_dict(sa)
        want = model(tokens).logits
        model.load_state_dict(moved)
        torch.testing.assert_close(model(tokens).logits, want, atol=1e-4, rtol=1e-4)  # the disguise is free
    moved.update({k: v for k, v in sb.items() if k.startswith("model.layers.1.")})  # B's block 1, as it is
    cand = tmp_path / "cand.safetensors"
    save_file(moved, str(cand))
    vs_a = _by_component(lineage(cand, [a], null_draws=DRAWS))
    assert {c for c, v in vs_a.items() if v == "dependent"} == {"text.embed", "text.block.0", "text.lm_head"}, vs_a
    vs_b = _by_component(lineage(cand, [b], null_draws=DRAWS))
    assert {c for c, v in vs_b.items() if v == "dependent"} == {"text.block.1"}, vs_b


def test_a_qwen2_block_grafted_into_a_kai_train_model_is_found(models: dict[str, list[Path]], tmp_path: Path) -> None:
    # The kai-train tiny preset with its decoder block 1 taken from a Qwen2 checkpoint (renamed to our
    # names); the reference is the Qwen2 folder as save_pretrained wrote it: each side's layout is detected.
    qa = models["qwen2"][0]
    sa = load_file(str(qa / "model.safetensors"))
    ours = {k: v.detach().clone().contiguous() for k, v in build_genesis_model(CFG, 31)[0].state_dict().items()}
    names = {"self_attn.q_proj": "attn.wq", "self_attn.k_proj": "attn.wk", "self_attn.v_proj": "attn.wv",
             "self_attn.o_proj": "attn.wo", "mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w3",
             "mlp.down_proj": "mlp.w2"}
    plain = tmp_path / "kai.safetensors"
    save_file(ours, str(plain))
    for hf, kai in names.items():
        ours[f"text.layers.1.{kai}.weight"] = sa[f"model.layers.1.{hf}.weight"]
    cand = tmp_path / "kai_graft.safetensors"
    save_file(ours, str(cand))
    report = lineage(cand, [qa], null_draws=DRAWS)
    assert [r.component for r in report.dependent] == ["text.block.1"], [r.line() for r in report.results]
    assert lineage(plain, [qa], null_draws=DRAWS).dependent == []
    # the CLI names the layouts the same way; an unknown one is a usage error naming it
    assert cli_main(["lineage", str(cand), "--reference", str(qa), "--layout", "kai", "--reference-layout",
                     "qwen2", "--null-draws", "19"]) == 1
    assert cli_main(["lineage", str(cand), "--reference", str(qa), "--layout", "gpt9"]) == 2


def _registry(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps({"format": "kai-lineage-registry/v1", "references": entries}))
    return path


def test_registry_names_references_and_checks_their_digests_first(
        models: dict[str, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = models["qwen2"][0] / "model.safetensors"
    root = tmp_path / "downloads"
    (root / "qwen2-a").mkdir(parents=True)
    shutil.copyfile(a, root / "qwen2-a" / "model.safetensors")
    entry = {"name": "qwen2-a", "layout": "qwen2", "source": "made by this test",
             "files": [{"path": "model.safetensors", "sha256": sha256_file(a)}]}
    reg = _registry(tmp_path / "registry.json", [entry])
    cand = models["qwen2"][1]

    def run(*extra: str) -> tuple[int, str, str]:
        rc = cli_main(["lineage", str(cand), "--registry", str(reg), "--registry-root", str(root), "--json",
                       "--null-draws", "19", *extra])
        out = capsys.readouterr()
        return rc, out.out, out.err

    rc, out, err = run("--reference-name", "qwen2-a")
    assert rc == 0 and json.loads(out)["references"] == ["qwen2-a"], err
    # the same entry by name, against a candidate that holds its block 1: dependent there
    sb = load_file(str(cand / "model.safetensors"))
    graft = tmp_path / "graft.safetensors"
    save_file({**sb, **{k: v for k, v in load_file(str(a)).items() if k.startswith("model.layers.1.")}}, str(graft))
    assert cli_main(["lineage", str(graft), "--registry", str(reg), "--registry-root", str(root),
                     "--reference-name", "qwen2-a", "--null-draws", "19", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["dependent_components"] == ["text.block.1 <- qwen2-a"]

    # each problem: exit 2, one line naming the file and what is wrong
    def refused(entries: list[dict] | None, want: str, name: str = "qwen2-a") -> None:
        if entries is not None:
            _registry(reg, entries)
        rc, _, err = run("--reference-name", name)
        assert rc == 2 and err.count("\n") == 1 and want in err, err

    refused(None, "no reference named 'other'", name="other")
    refused([{**entry, "sha": "x"}], "unknown field(s) sha")
    refused([{**entry, "name": "../up"}], "not a plain folder name")
    refused([{**entry, "layout": "gpt9"}], "not a known layout")
    refused([{**entry, "files": [{"path": "../model.safetensors", "sha256": "0" * 64}]}], "path leaves")
    refused([{**entry, "files": [{"path": "model.safetensors", "sha256": "0" * 64}]}],
            f"records {'0' * 64} for 'qwen2-a'")
    refused([entry, entry], "appears twice")
    _registry(reg, [entry])
    (root / "qwen2-a" / "model.safetensors").unlink()
    refused(None, "model.safetensors")
    reg.write_text('{"format": "kai-lineage-registry/v1", "references": [], "references": []}')
    refused(None, "registry.json")


def _renumbered(sd: dict[str, torch.Tensor], keep: list[int]) -> dict[str, torch.Tensor]:
    """The model with decoder layers `keep` (in that order, repeats allowed) as layers 0, 1, 2 ..."""
    out = {k: v for k, v in sd.items() if not k.startswith("model.layers.")}
    for new, old in enumerate(keep):
        p = f"model.layers.{old}."
        out.update({f"model.layers.{new}.{k[len(p):]}": v.clone() for k, v in sd.items() if k.startswith(p)})
    return out


def test_layers_kept_from_a_deeper_model_are_matched_to_their_source_layers(tmp_path: Path) -> None:
    deep = _saved(lambda: qwen2(layers=4), 7, tmp_path / "deep")
    sd = load_file(str(deep / "model.safetensors"))
    pruned, grown = tmp_path / "pruned.safetensors", tmp_path / "grown.safetensors"
    save_file(_renumbered(sd, [0, 2, 3]), str(pruned))
    save_file(_renumbered(sd, [0, 1, 2, 2, 3]), str(grown))  # layer 2 duplicated
    for cand, want in ((pruned, ["block.0", "block.2", "block.3"]), (grown, ["block.0", "block.1", "block.2",
                                                                                "block.2", "block.3"])):
        report = lineage(cand, [deep], null_draws=DRAWS)
        blocks = [r for r in report.results if ".block." in r.component]
        assert [r.component for r in blocks] == [f"text.block.{i}" for i in range(len(want))]
        assert [r.matched for r in blocks] == [f"text.{w}" for w in want], [r.line() for r in blocks]
        assert all(r.verdict == "dependent" and r.p_value < 1e-6 for r in blocks), [r.line() for r in blocks]
        assert cand == grown or "text.block.1~block.2" in "\n".join(report.lines())
    # an independent 3-layer model: every block matched to some layer, none dependent (the null takes
    # the same maximum over the reference's layers)
    other = _saved(lambda: qwen2(layers=3), 8, tmp_path / "other")
    report = lineage(other, [deep], null_draws=DRAWS)
    assert report.dependent == [], [r.line() for r in report.dependent]
    assert len([r for r in report.results if r.matched]) == 3


class _Rows(HTMLParser):
    """The report table's rows: (cells' text, the inline SVG of the last cell or '')."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.page, self.rows, self.cells, self.svg_at = page, [], [], None
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self.cells = []
        elif tag == "td":
            self.cells.append("")
        elif tag == "svg" and dict(attrs).get("class") == "null":
            line, col = self.getpos()
            self.svg_at = sum(len(x) for x in self.page.splitlines(True)[:line - 1]) + col

    def handle_data(self, data: str) -> None:
        if self.cells and self.svg_at is None:
            self.cells[-1] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr" and self.cells:
            svg = ""
            if self.svg_at is not None:
                svg = self.page[self.svg_at:self.page.index("</svg>", self.svg_at) + len("</svg>")]
            self.rows.append((self.cells, svg))
            self.svg_at = None


def test_html_report_draws_each_observed_statistic_against_its_null(models: dict[str, list[Path]],
                                                                    tmp_path: Path) -> None:
    a, b = models["qwen2"]
    sb = load_file(str(b / "model.safetensors"))
    cand = tmp_path / "graft.safetensors"
    save_file({**sb, **{k: v for k, v in load_file(str(a / "model.safetensors")).items()
                        if k.startswith("model.layers.1.")}}, str(cand))
    report = lineage(cand, [a], null_draws=DRAWS)
    page = render_html(report)
    assert "<script" not in page and not re.search(r"(src|href)=", page)
    rows = [r for r in _Rows(page).rows if r[0][0] in {x.component for x in report.results}]
    assert len(rows) == len(report.results)
    verdicts = {}
    for (cells, svg), r in zip(rows, report.results):
        assert cells[0] == r.component
        if r.statistic is None:
            assert svg == ""
            continue
        root = ET.fromstring(svg)
        ns = "{http://www.w3.org/2000/svg}"
        bins = root.findall(f"{ns}rect")
        drawn = sum(int(b.find(f"{ns}title").text.split()[0]) for b in bins)
        assert drawn == DRAWS  # every null draw is in the histogram
        (obs,) = [el for el in root.findall(f"{ns}line") if el.get("class") == "observed"]
        x = float(obs.get("x1"))
        right = max(float(b.get("x")) + float(b.get("width")) for b in bins)
        above_all = x > right
        assert above_all == (r.p_perm == pytest.approx(1 / (DRAWS + 1))), (r.line(), x, right)
        verdicts[r.component] = (r.verdict, above_all)
    assert verdicts["text.block.1"] == ("dependent", True)
    assert verdicts["text.block.0"][0] == "independent"


def test_a_tied_qwen2_head_is_absent_and_its_embedding_still_compared(models: dict[str, list[Path]],
                                                                      tmp_path: Path) -> None:
    tied = _saved(lambda: qwen2(tie=True), 3, tmp_path / "tied")
    shapes = open_weights(tied).shapes()
    assert not any(n.startswith("lm_head") for n, _ in shapes)  # save_pretrained drops a tied head
    assert "text.lm_head" not in map_names(shapes).components
    a = models["qwen2"][0]
    sd = load_file(str(tied / "model.safetensors"))
    sd["model.embed_tokens.weight"] = load_file(str(a / "model.safetensors"))["model.embed_tokens.weight"]
    cand = tmp_path / "tied_copy.safetensors"
    save_file(sd, str(cand))
    res = {r.component: r for r in lineage(cand, [a], null_draws=DRAWS).results}
    assert res["text.embed"].verdict == "dependent", res["text.embed"].line()
    assert res["text.lm_head"].verdict == "not comparable" and "absent in the candidate" in res["text.lm_head"].reason
    assert [c for c, r in res.items() if r.verdict == "dependent"] == ["text.embed"]


def _permute_stream(sd: dict[str, torch.Tensor], family: str, perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every axis the lineage name map calls the `family` stream, permuted: if the map had an axis
    wrong, the model's function would change (the caller checks it does not)."""
    slots = {s.tensor: s for roles in map_names([(k, tuple(v.shape)) for k, v in sd.items()]).components.values()
             for s in roles.values()}
    out = dict(sd)
    for name, s in slots.items():
        x = sd[name].reshape(s.view) if s.view else sd[name]  # a merger's input: (units, merge, width)
        assert len(s.axes) == x.ndim, name
        for k, ax in enumerate(s.axes):
            if ax.kind == "stream" and ax.name == family:
                x = x.index_select(k, perm)
        out[name] = x.reshape(sd[name].shape).contiguous()
    return out


@pytest.mark.parametrize("layout", ["siglip", "whisper", "qwen2-vl"])
def test_an_encoder_permuted_in_its_residual_stream_is_aligned_and_dependent(models: dict[str, list[Path]],
                                                                              tmp_path: Path, layout: str) -> None:
    a = models[layout][0]
    sa = load_file(str(a / "model.safetensors"))
    family = "speech" if layout == "whisper" else "vision"
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(9))  # every test encoder is 32 wide
    moved = _permute_stream(sa, family, perm)
    g = torch.Generator().manual_seed(10)
    # what the encoder hands on: its output in the permuted stream, or the merger's (text-stream) output
    if layout == "siglip":
        model = transformers.SiglipVisionModel.from_pretrained(a)
        run = lambda m: m(pixel_values=torch.rand(2, 3, 32, 32, generator=g)).last_hidden_state  # noqa: E731
    elif layout == "whisper":
        model = transformers.WhisperModel.from_pretrained(a)
        run = lambda m: m.encoder(torch.randn(2, 16, 128, generator=g)).last_hidden_state  # noqa: E731
    else:
        model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(a)
        run = lambda m: m.model.visual(torch.randn(16, 96, generator=g),  # noqa: E731
                                       grid_thw=torch.tensor([[1, 4, 4]])).pooler_output
    with torch.no_grad():
        model.eval()
        want = run(model) if layout == "qwen2-vl" else run(model)[..., perm]  # the merger's output is not moved
        model.load_state_dict(moved, strict=False)
        g.manual_seed(10)
        torch.testing.assert_close(run(model), want, atol=1e-4, rtol=1e-4)  # the same function
    cand = tmp_path / "perm.safetensors"
    save_file(moved, str(cand))
    res = {r.component: r for r in lineage(cand, [a], null_draws=DRAWS).results}
    blocks = [c for c in res if c.startswith(f"{family}.block.")]
    for comp in [f"{family}.embed", *blocks, *(["vision.projector"] if layout == "qwen2-vl" else [])]:
        assert res[comp].verdict == "dependent" and res[comp].p_value < 1e-6, res[comp].line()
    if layout == "whisper":  # the position table aligned the stream and was not compared
        assert "pos" not in res["speech.embed"].roles and f"pos: {NOT_COMPARED}" in res["speech.embed"].skipped
    # and an independent model of the layout, permuted alike, is still independent
    other = tmp_path / "other.safetensors"
    save_file(_permute_stream(load_file(str(models[layout][1] / "model.safetensors")), family, perm), str(other))
    assert lineage(other, [a], null_draws=DRAWS).dependent == []


def test_layers_moved_to_other_depths_are_found_with_match_layers(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    deep = _saved(lambda: qwen2(layers=4), 7, tmp_path / "deep")
    moved = tmp_path / "moved.safetensors"
    save_file(_renumbered(load_file(str(deep / "model.safetensors")), [1, 0, 3, 2]), str(moved))
    plain = {r.component: r for r in lineage(moved, [deep], null_draws=DRAWS).results}
    assert all(plain[f"text.block.{i}"].verdict == "independent" for i in range(4))  # index to index: missed
    rc = cli_main(["lineage", str(moved), "--reference", str(deep), "--match-layers", "--null-draws", str(DRAWS),
                   "--json"])
    rows = {r["component"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert rc == 1
    for i, j in enumerate([1, 0, 3, 2]):
        r = rows[f"text.block.{i}"]
        assert r["verdict"] == "dependent" and r["matched"] == f"text.block.{j}", r

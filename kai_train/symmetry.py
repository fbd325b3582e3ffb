"""Output-preserving transforms of the model (its symmetries): what a team that copied weights would
apply to disguise them, and what `kai-attest lineage` must see through. Used by tests/test_lineage.py
and bench/lineage_calibration.py; each keeps the model's outputs (up to float rounding).

- `residual_map`: every residual stream h replaced by Q h (a permutation with signs, or a rotation
  with the norm gains folded into their readers);
- `unit_maps`: MLP units and attention heads permuted and rescaled in every block;
- `in_block_maps`: per-head V/O rotations and attention-norm scaling in every encoder block.
"""

from __future__ import annotations

import torch

from kai_train.model import ModelConfig


def orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def signed_permutation(n: int, g: torch.Generator, signs: bool = True) -> torch.Tensor:
    s = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if signs else torch.ones(n)
    return torch.eye(n)[torch.randperm(n, generator=g)] * s[:, None]


def residual_map(sd: dict[str, torch.Tensor], maps: dict[str, torch.Tensor], fold: bool, cfg: ModelConfig
                 ) -> dict[str, torch.Tensor]:
    """The model with each residual stream h replaced by Q h (Q = maps[stack], orthogonal): matrices
    writing to a stream are multiplied by Q on the left, those reading from it by Q^T on the right.
    `fold`: norm gains are first folded into the matrices that read the normed stream (they become 1,
    as a rotation needs); otherwise Q must be a permutation (with signs) and gains are permuted."""
    out = {k: v.clone() for k, v in sd.items()}

    def gain(name: str, readers: list[str], stack: str) -> None:
        g = out[name]
        if fold:
            for r in readers:
                out[r] = out[r] * g[None, :]
            out[name] = torch.ones_like(g)
        else:
            out[name] = maps[stack].abs() @ g

    def read(name: str, stack: str) -> None:
        out[name] = out[name] @ maps[stack].T

    def write(name: str, stack: str) -> None:
        w = out[name]
        out[name] = torch.einsum("oa,a...->o...", maps[stack], w)

    layers = {"text": cfg.n_layers, "vision": cfg.vision_layers, "speech": cfg.speech_layers}
    for stack, Q in maps.items():
        for i in range(layers[stack]):
            p = f"{stack}.layers.{i}."
            gain(p + "attn_norm.weight", [p + f"attn.{w}.weight" for w in ("wq", "wk", "wv")], stack)
            gain(p + "mlp_norm.weight", [p + "mlp.w1.weight", p + "mlp.w3.weight"], stack)
            for w in ("attn.wq", "attn.wk", "attn.wv", "mlp.w1", "mlp.w3"):
                read(p + w + ".weight", stack)
            for w in ("attn.wo", "mlp.w2"):
                write(p + w + ".weight", stack)
        if stack == "text":
            gain("text.norm.weight", ["text.lm_head.weight"], stack)
            read("text.lm_head.weight", stack)
            read("text.tok_emb.weight", stack)  # rows are token vectors: e -> Q e
            for name in ("absent_image", "absent_audio", "vision.proj.2.weight", "vision.proj.2.bias",
                         "speech.proj.2.weight", "speech.proj.2.bias"):
                write(name, stack)
        else:
            gain(f"{stack}.norm.weight", [f"{stack}.proj.0.weight"], stack)
            read(f"{stack}.proj.0.weight", stack)
            read(f"{stack}.pos_emb", stack)
            if stack == "vision":
                write("vision.patch_embed.weight", stack)
                write("vision.patch_embed.bias", stack)
            else:  # conv2's output passes a GELU before the stream: a permutation only
                out["speech.conv2.weight"] = torch.einsum("oa,abk,ib->oik", Q, out["speech.conv2.weight"], Q)
                write("speech.conv2.bias", stack)
                write("speech.conv1.weight", stack)
                write("speech.conv1.bias", stack)
    return out


def in_block_maps(sd: dict[str, torch.Tensor], seed: int, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Per-head V/O rotations and norm scaling (gain times s, the matrices reading it divided by s)
    in every vision and speech block: output-preserving, and not a unit permutation."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in sd.items()}
    for stack, layers, heads in (("vision", cfg.vision_layers, cfg.vision_heads),
                                 ("speech", cfg.speech_layers, cfg.speech_heads)):
        for i in range(layers):
            p = f"{stack}.layers.{i}."
            wv, wo = out[p + "attn.wv.weight"], out[p + "attn.wo.weight"]
            hd = wv.shape[0] // heads
            for h in range(heads):
                R, rows = orthogonal(hd, g), slice(h * hd, (h + 1) * hd)
                wv[rows], wo[:, rows] = R @ wv[rows], wo[:, rows] @ R.T
            s = 0.5 + torch.rand(wv.shape[1], generator=g)
            out[p + "attn_norm.weight"] = out[p + "attn_norm.weight"] * s
            for w in ("wq", "wk", "wv"):
                out[p + f"attn.{w}.weight"] = out[p + f"attn.{w}.weight"] / s[None, :]
    return out


def unit_maps(sd: dict[str, torch.Tensor], seed: int, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Output-preserving transforms of every block: MLP hidden units permuted (w1/w3 rows, w2 columns)
    and rescaled (w3 row by c, w2 column by 1/c); attention heads permuted (kv heads with their query
    groups, wo columns alike) and q/k rescaled (q by s, k by 1/s)."""
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in sd.items()}
    stacks = [("text", cfg.n_layers, cfg.n_heads, cfg.n_kv_heads),
              ("vision", cfg.vision_layers, cfg.vision_heads, cfg.vision_heads),
              ("speech", cfg.speech_layers, cfg.speech_heads, cfg.speech_heads)]
    for stack, layers, heads, kv in stacks:
        for i in range(layers):
            p = f"{stack}.layers.{i}."
            w1, w3, w2 = (out[p + f"mlp.{w}.weight"] for w in ("w1", "w3", "w2"))
            perm = torch.randperm(w1.shape[0], generator=g)
            c = 0.5 + 1.5 * torch.rand(w1.shape[0], generator=g)
            out[p + "mlp.w1.weight"], out[p + "mlp.w3.weight"] = w1[perm], w3[perm] * c[:, None]
            out[p + "mlp.w2.weight"] = w2[:, perm] / c[None, :]
            wq, wk, wv, wo = (out[p + f"attn.{w}.weight"] for w in ("wq", "wk", "wv", "wo"))
            hd, rep = wq.shape[0] // heads, heads // kv
            kv_perm = torch.randperm(kv, generator=g)
            q_heads = [int(kv_perm[h // rep]) * rep + h % rep for h in range(heads)]
            q_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in q_heads])
            kv_rows = torch.cat([torch.arange(int(j) * hd, (int(j) + 1) * hd) for j in kv_perm])
            out[p + "attn.wq.weight"], out[p + "attn.wk.weight"] = wq[q_rows] * 2.0, wk[kv_rows] / 2.0
            out[p + "attn.wv.weight"], out[p + "attn.wo.weight"] = wv[kv_rows], wo[:, q_rows]
    return out

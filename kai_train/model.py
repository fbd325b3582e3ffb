"""The multimodal language model: a Llama-style text decoder fed by a ViT image encoder and a
log-mel speech encoder.

Each encoder turns its input into a fixed number of decoder-width vectors that are prepended to
the text embeddings: `[image prefix] + [audio prefix] + [text]`, one causal sequence. A sample that
lacks a modality gets a learned "absent" vector in every row of that prefix instead, so every
sample in a batch has the same length and no padding masks are needed.

This file knows nothing of DeepSpeed, ranks, initialization recipes or provenance: construction
gives PyTorch's default init, and `kai_train.init.apply_init` overwrites every parameter with the
seeded recipe. Parameter names are part of the provenance format (genesis tensors are derived from
them), so renaming a module changes every digest.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ModelConfig lives in the torch-free kai_train.modelspec; it is imported from here too.
from .modelspec import ModelConfig, _swiglu_hidden  # relative: export/ ships this file


# ---------------------------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in float32: the mean of squares under bf16 loses too many bits.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_cache(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (length, head_dim // 2), in float32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (B, H, T, hd) by position; computed in float32."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, T, hd/2) each
    cos, sin = cos.float(), sin.float()  # (T, hd/2), broadcast over B, H
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


class Attention(nn.Module):
    """Multi-head attention with grouped-query K/V heads and optional RoPE."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, causal: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.causal = n_heads, n_kv_heads, causal
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cos is not None and sin is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:
            # Expand K/V to all query heads; sdpa's enable_gqa needs torch >= 2.5.
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, nh, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down (residual output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Router(nn.Module):
    """Token -> top-k experts and their gates.

    Scores are a softmax over experts in float32. `bias` shifts only which experts are selected
    (auxiliary-loss-free balancing, DeepSeek-V3): gates are the unbiased scores of the chosen experts,
    renormalized to sum to 1. The bias is a parameter so that checkpoints, the canonical digest and
    replay carry it, but it gets an exact zero gradient (AdamW then leaves it unchanged); the
    training step moves it from the measured expert loads (`kai_train.step`).
    """

    def __init__(self, dim: int, n_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(n_experts, dim))
        self.bias = nn.Parameter(torch.zeros(n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, dim) -> scores (N, E) float32, chosen experts (N, k), gates (N, k) float32."""
        scores = F.linear(x, self.weight).float().softmax(-1)  # (N, E)
        idx = (scores.detach() + self.bias.detach().float()).topk(self.top_k, dim=-1).indices  # (N, k)
        gates = scores.gather(-1, idx)  # (N, k)
        if self.top_k > 1:
            gates = gates / gates.sum(-1, keepdim=True)
        # A zero-valued path from the bias: every parameter gets a gradient (exactly 0), so no
        # optimizer or ZeRO stage sees a parameter without one.
        return scores, idx, gates + (0.0 * self.bias).sum()


class MoE(nn.Module):
    """Fine-grained routed experts (each a narrow SwiGLU), top-k, plus optional shared experts.

    Every routed expert is its own module, so its tensors are named by (layer, global expert id,
    tensor), e.g. `text.layers.3.mlp.experts.17.w1.weight`, whatever the parallel layout. Dispatch
    is deterministic: assignments are grouped by expert with a stable sort (token order inside each
    expert), each (token, slot) output is written once, and the k slots are summed in slot order.
    Dropless when capacity_factor is 0; otherwise an expert takes at most
    ceil(capacity_factor * tokens * k / E) assignments of a micro-batch, the first in token order,
    and a dropped assignment adds nothing (the residual carries the token).

    After each forward, `load` holds the assignments per expert (E,), `aux_loss` the weighted
    load-balancing loss (Switch Transformer: E * sum_e f_e * P_e) and `routing` the chosen experts
    (N, k) of the N = batch x sequence tokens; the training step reads them (`routing` for the
    routing commitments, kai_train.routing).
    """

    def __init__(self, cfg: ModelConfig, held: range | None = None):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.moe_top_k
        self.capacity_factor, self.aux_coef = cfg.moe_capacity_factor, cfg.moe_aux_loss_coef
        self.router = Router(cfg.dim, cfg.n_experts, cfg.moe_top_k)
        # Keyed by global expert id: the same tensor names whichever experts this process holds.
        self.held = range(cfg.n_experts) if held is None else held
        self.experts = nn.ModuleDict({str(e): SwiGLU(cfg.dim, cfg.moe_hidden) for e in self.held})
        # Expert parallelism (kai_train.expert_parallel): (moe, rows, counts) -> the experts' outputs for
        # `rows` (N, dim), grouped by global expert with counts (E,), whichever process holds each expert.
        self.exchange: Callable[[MoE, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        # Shared experts are always on; n of them are one SwiGLU n times as wide (same function).
        self.shared = SwiGLU(cfg.dim, cfg.n_shared_experts * cfg.moe_hidden) if cfg.n_shared_experts else None
        self.load: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None
        self.routing: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # (N, dim)
        N, k, E = xf.shape[0], self.top_k, self.n_experts
        scores, idx, gates = self.router(xf)  # (N, E), (N, k), (N, k)
        flat = idx.reshape(-1)  # (N*k,) expert of assignment a = token * k + slot
        counts = torch.bincount(flat, minlength=E)  # (E,)
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert, token order inside
        cap = math.ceil(self.capacity_factor * N * k / E) if self.capacity_factor > 0 else N * k
        out = xf.new_zeros(N, k, shape[-1])  # (N, k, dim)
        if self.exchange is None:
            start = 0
            for e, n in enumerate(counts.tolist()):
                a = order[start:start + min(n, cap)]
                start += n
                # An expert with no tokens still runs (on zero rows): every rank then builds the same
                # autograd graph, so gradients become ready in the same order on every rank, which
                # bucketed data-parallel reduction (ZeRO-1/2) relies on.
                tok, slot = a // k, a % k
                y = self.experts[str(e)](xf[tok])  # (n_e, dim)
                out[tok, slot] = y * gates[tok, slot].unsqueeze(-1).to(y.dtype)
        else:  # the kept assignments of every expert, in expert order, computed where each expert is held
            kept = counts.clamp(max=cap)
            starts = torch.cumsum(counts, 0) - counts
            a = torch.cat([order[s:s + n] for s, n in zip(starts.tolist(), kept.tolist())])
            tok, slot = a // k, a % k
            y = self.exchange(self, xf[tok], kept)  # (sum kept, dim)
            out[tok, slot] = y * gates[tok, slot].unsqueeze(-1).to(y.dtype)
        y = out.sum(1)  # (N, dim)
        if self.shared is not None:
            y = y + self.shared(xf)
        self.load = counts.detach().float()
        self.routing = idx.detach()
        frac = counts.float() / (N * k)  # f_e: share of assignments
        self.aux_loss = self.aux_coef * E * (frac * scores.mean(0)).sum()
        return y.view(shape)


class Block(nn.Module):
    """Pre-norm transformer block, shared by the decoder (causal, RoPE) and encoders (neither).
    With a `moe` config the feed-forward is a mixture of experts instead of one SwiGLU."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden: int, eps: float, causal: bool,
                 moe: ModelConfig | None = None, held_experts: range | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = Attention(dim, n_heads, n_kv_heads, causal)
        self.mlp_norm = RMSNorm(dim, eps)
        self.mlp: nn.Module = MoE(moe, held_experts) if moe is not None else SwiGLU(dim, hidden)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


def _projector(width: int, dim: int) -> nn.Sequential:
    """Encoder width -> decoder width, as in LLaVA-1.5 (Linear, GELU, Linear)."""
    return nn.Sequential(nn.Linear(width, dim), nn.GELU(), nn.Linear(dim, dim))


# ---------------------------------------------------------------------------------------------
# encoders


class VisionEncoder(nn.Module):
    """ViT: (B, C, H, W) in [0, 1] -> (B, n_image_tokens, dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.vision_dim
        # A Linear over flattened patches equals a stride-p Conv2d and keeps init rules uniform.
        self.patch_embed = nn.Linear(cfg.image_channels * cfg.patch_size**2, w)
        self.pos_emb = nn.Parameter(torch.zeros(cfg.n_image_tokens, w))
        self.layers = nn.ModuleList(
            Block(w, cfg.vision_heads, cfg.vision_heads, _swiglu_hidden(w), cfg.norm_eps, causal=False)
            for _ in range(cfg.vision_layers)
        )
        self.norm = RMSNorm(w, cfg.norm_eps)
        self.proj = _projector(w, cfg.dim)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        B, C, H, W = images.shape
        c, p = self.cfg, self.cfg.patch_size
        if (C, H, W) != (c.image_channels, c.image_size, c.image_size):
            raise ValueError(
                f"images must be (B, {c.image_channels}, {c.image_size}, {c.image_size}), "
                f"got {tuple(images.shape)}"
            )
        x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, nh, nw, C, p, p)
        return x.reshape(B, (H // p) * (W // p), C * p * p)  # (B, N, C*p*p), row-major patches

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patchify(images.to(self.patch_embed.weight.dtype))
        x = self.patch_embed(x) + self.pos_emb  # (B, N, vision_dim)
        for layer in self.layers:
            x = layer(x)
        return self.proj(self.norm(x))  # (B, N, dim)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """HTK-scale triangular mel filters, (n_fft // 2 + 1, n_mels), unnormalized, 0 Hz to Nyquist.

    Same construction as torchaudio.functional.melscale_fbanks(mel_scale="htk", norm=None).
    """

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    bin_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)  # (F,)
    mel_pts = np.linspace(hz_to_mel(np.float64(0.0)), hz_to_mel(np.float64(sample_rate / 2)), n_mels + 2)
    hz_pts = mel_to_hz(mel_pts)  # (n_mels + 2,) filter edges and centres
    widths = np.diff(hz_pts)  # (n_mels + 1,)
    slopes = hz_pts[None, :] - bin_hz[:, None]  # (F, n_mels + 2)
    down = -slopes[:, :-2] / widths[:-1]  # rising edge, (F, n_mels)
    up = slopes[:, 2:] / widths[1:]  # falling edge
    return np.maximum(0.0, np.minimum(down, up))


class SpeechEncoder(nn.Module):
    """Log-mel front end + 2x stride-2 Conv1d + transformer: (B, S) -> (B, n_audio_tokens, dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.speech_dim
        # Fixed DSP constants: derived from the config, so not weights and not in state_dict.
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)
        fb = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels)
        self.register_buffer("mel_fb", torch.tensor(fb, dtype=torch.float32), persistent=False)
        self.conv1 = nn.Conv1d(cfg.n_mels, w, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(w, w, kernel_size=3, stride=2, padding=1)
        self.pos_emb = nn.Parameter(torch.zeros(cfg.n_audio_tokens, w))
        self.layers = nn.ModuleList(
            Block(w, cfg.speech_heads, cfg.speech_heads, _swiglu_hidden(w), cfg.norm_eps, causal=False)
            for _ in range(cfg.speech_layers)
        )
        self.norm = RMSNorm(w, cfg.norm_eps)
        self.proj = _projector(w, cfg.dim)

    def log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, S) waveform -> (B, n_mels, n_frames) log-mel, always in float32.

        stft has no bf16 kernel and the log of small powers needs the range, so autocast is off
        and buffers are upcast (a module-wide .bfloat16() also casts these buffers).
        """
        if audio.shape[1:] != (self.cfg.audio_samples,):
            raise ValueError(f"audio must be (B, {self.cfg.audio_samples}), got {tuple(audio.shape)}")
        with torch.autocast(device_type=audio.device.type, enabled=False):
            spec = torch.stft(
                audio.float(), self.cfg.n_fft, self.cfg.hop_length,
                window=self.window.float(), center=True, return_complex=True,
            )  # (B, F, frames)
            mel = torch.einsum("fm,bft->bmt", self.mel_fb.float(), spec.abs().pow(2))
            return torch.log(mel + 1e-6)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        x = self.log_mel(audio).to(self.conv1.weight.dtype)  # (B, n_mels, frames)
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))  # (B, speech_dim, n_audio_tokens)
        x = x.transpose(1, 2) + self.pos_emb  # (B, n_audio_tokens, speech_dim)
        for layer in self.layers:
            x = layer(x)
        return self.proj(self.norm(x))  # (B, n_audio_tokens, dim)


# ---------------------------------------------------------------------------------------------
# decoder and full model


class TextDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig, rope_len: int, held_experts: range | None = None):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(
            Block(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_hidden, cfg.norm_eps, causal=True,
                  moe=cfg if cfg.is_moe_layer(i) else None, held_experts=held_experts)
            for i in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)  # untied from tok_emb
        cos, sin = rope_cache(cfg.dim // cfg.n_heads, rope_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, h: torch.Tensor, n_prefix: int, grad_checkpointing: bool = False) -> torch.Tensor:
        """h (B, L, dim) embedded sequence -> logits (B, L - n_prefix, vocab) for the text rows."""
        L = h.shape[1]
        cos, sin = self.rope_cos[:L], self.rope_sin[:L]
        for layer in self.layers:
            if grad_checkpointing:
                h = checkpoint(layer, h, cos, sin, use_reentrant=False)
            else:
                h = layer(h, cos, sin)
        # Prefix rows predict nothing, so skip their norm and (vocab-sized) head.
        return self.lm_head(self.norm(h[:, n_prefix:]))


class MultimodalLM(nn.Module):
    """The model. `held_experts`: the global ids of the routed experts this process holds in each MoE
    layer (expert parallelism, kai_train.expert_parallel); all of them by default."""

    def __init__(self, cfg: ModelConfig, held_experts: range | None = None):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg)
        self.speech = SpeechEncoder(cfg)
        self.text = TextDecoder(cfg, rope_len=cfg.max_seq_len + self.prefix_len, held_experts=held_experts)
        self.absent_image = nn.Parameter(torch.zeros(cfg.dim))
        self.absent_audio = nn.Parameter(torch.zeros(cfg.dim))
        self.grad_checkpointing = False  # set by the trainer; recompute decoder blocks in backward

    @property
    def prefix_len(self) -> int:
        """Rows before the first text position: image tokens then audio tokens."""
        return self.cfg.n_image_tokens + self.cfg.n_audio_tokens

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def moe_layers(self) -> dict[str, MoE]:
        """The decoder's mixture-of-experts feed-forwards by module name (empty for a dense model)."""
        return {name: m for name, m in self.named_modules() if isinstance(m, MoE)}

    @staticmethod
    def _prefix(
        encoder: nn.Module, x: torch.Tensor | None, present: torch.Tensor | None,
        absent: torch.Tensor, n: int, B: int, what: str,
    ) -> torch.Tensor:
        """(B, n, dim): encoder output where present, the absent vector in every row elsewhere."""
        fill = absent.view(1, 1, -1).expand(B, n, -1)
        if x is None:
            if present is not None and bool(present.any()):
                raise ValueError(f"has_{what} marks samples as having {what} but {what} input is None")
            return fill
        feats = encoder(x)  # (B, n, dim)
        if present is None:
            return feats
        return torch.where(present.view(B, 1, 1).to(torch.bool), feats, fill.to(feats.dtype))

    def forward(
        self,
        tokens: torch.Tensor,
        images: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
        has_audio: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab) at the text positions (prefix rows dropped)."""
        B, T = tokens.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"{T} text tokens exceed max_seq_len={self.cfg.max_seq_len}")
        h_text = self.text.tok_emb(tokens)  # (B, T, dim)
        img = self._prefix(self.vision, images, has_image, self.absent_image,
                           self.cfg.n_image_tokens, B, "image")
        aud = self._prefix(self.speech, audio, has_audio, self.absent_audio,
                           self.cfg.n_audio_tokens, B, "audio")
        h = torch.cat([img.to(h_text.dtype), aud.to(h_text.dtype), h_text], dim=1)  # (B, P + T, dim)
        return self.text(h, self.prefix_len, self.grad_checkpointing)

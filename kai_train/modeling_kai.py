"""The Hugging Face face of a kai-train export: `AutoModelForCausalLM` loads export/ with it.

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("runs/demo/export", trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained("runs/demo/export")

kai_train.export copies this file, model.py and modelspec.py into export/ byte for byte (each a
subject of the signed release), and config.json's `auto_map` points here, so loading needs torch
and transformers but not kai-train. The weights are the checkpoint's own signed shards under the
names the chain records (`text.layers.0.attn.wq.weight` …): `KaiForCausalLM` holds the modules of
`MultimodalLM` as its own, so those names load as they are, and its forward is MultimodalLM's.

Text-only prompts get the learned "absent" vectors in the image and audio prefix, exactly as in
training and in kai_train.generate, so greedy decoding here gives the same tokens. Images
(`pixel_values`, (B, 3, H, W) in [0, 1]) and audio (`audio_values`, (B, samples) at the model's
sampling rate) may be passed to `forward` and `generate`; the prompt then starts with the
`<image>` / `<audio>` placeholder, as packed training rows do. No key/value cache: every step
re-reads the whole sequence (the models kai-train releases for checking are small; a serving
stack converts the text decoder to its own format).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .model import MultimodalLM, SpeechEncoder, TextDecoder, mel_filterbank, rope_cache
from .modelspec import ModelConfig


class KaiConfig(PretrainedConfig):
    """config.json of an export: `model` is the architecture (ModelConfig's fields); the chain's
    facts (step, weights_root, run_id, tokenizer) ride along as plain attributes."""

    model_type = "kai_multimodal"

    def __init__(self, model: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.model = dict(model or {})
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class KaiForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = KaiConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    # MultimodalLM's forward runs on this object: it reads these as MultimodalLM does
    _prefix = staticmethod(MultimodalLM._prefix)
    prefix_len = MultimodalLM.prefix_len
    grad_checkpointing = False

    def __init__(self, config: KaiConfig) -> None:
        super().__init__(config)
        lm = MultimodalLM(ModelConfig.from_dict(config.model))
        self.cfg = lm.cfg
        # the same modules under the same names as MultimodalLM: the signed shards load unchanged
        self.vision, self.speech, self.text = lm.vision, lm.speech, lm.text
        self.absent_image, self.absent_audio = lm.absent_image, lm.absent_audio
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        """Every weight comes from the export; only the fixed tables that are derived from the
        config and never saved (RoPE, STFT window, mel filters) are computed here, since
        transformers builds the model on the meta device and leaves them empty."""
        c = self.cfg
        if isinstance(module, TextDecoder):
            cos, sin = rope_cache(c.dim // c.n_heads, module.rope_cos.shape[0], c.rope_theta)
            module.rope_cos.copy_(cos)
            module.rope_sin.copy_(sin)
        elif isinstance(module, SpeechEncoder):
            module.window.copy_(torch.hann_window(c.n_fft))
            module.mel_fb.copy_(torch.tensor(mel_filterbank(c.sample_rate, c.n_fft, c.n_mels), dtype=torch.float32))

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.text.tok_emb

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.text.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, audio_values: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> CausalLMOutput:
        """input_ids (B, T) -> logits (B, T, vocab) at the text positions; with `labels`, the mean
        next-token cross-entropy (-100 ignored). Rows are unpadded, as in training: an attention
        mask with a zero is refused rather than ignored."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("KaiForCausalLM: padded batches are not supported; give one prompt, or prompts of one length")
        B = input_ids.shape[0]
        has_image = None if pixel_values is None else torch.ones(B, dtype=torch.bool)
        has_audio = None if audio_values is None else torch.ones(B, dtype=torch.bool)
        logits = MultimodalLM.forward(self, input_ids, pixel_values, audio_values, has_image, has_audio)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                     ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
        # no cache: the whole sequence each step, with the media inputs
        return {"input_ids": input_ids, "pixel_values": kwargs.get("pixel_values"),
                "audio_values": kwargs.get("audio_values")}

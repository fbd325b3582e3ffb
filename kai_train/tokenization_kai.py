"""The tokenizer of a kai-train export for `AutoTokenizer`: the run's own sentencepiece model.

    tok = AutoTokenizer.from_pretrained("runs/demo/export", trust_remote_code=True)

kai_train.export copies this file into export/ (a subject of the signed release) and names it in
tokenizer_config.json's `auto_map`. Encoding is sentencepiece's own, with the beginning-of-sequence
id first, exactly as training rows and kai_train.generate tokenize: transformers' LlamaTokenizer
rebuilds a BPE tokenizer from the model file, which differs for kai-train's unigram models
(nmt_nfkc normalization, byte fallback). Decoding is sentencepiece's own too: byte-fallback pieces
(`<0xEB><0x82><0xBC>`) become the characters they encode, as `SentencePieceProcessor.decode` gives.
"""

from __future__ import annotations

from typing import Any

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend


class KaiTokenizer(SentencePieceBackend):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, bos_token: str = "<s>", eos_token: str = "</s>", unk_token: str = "<unk>",
                 pad_token: str = "<pad>", sp_model_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("special_tokens_pattern", "bos")  # <bos> + text, no <eos>: a prompt to continue
        super().__init__(vocab_file=vocab_file, bos_token=bos_token, eos_token=eos_token, unk_token=unk_token,
                         pad_token=pad_token, sp_model_kwargs=sp_model_kwargs or {}, **kwargs)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """sentencepiece's decoding of each run of ordinary pieces; special tokens stay as they are."""
        special = set(self.all_special_tokens)
        out: list[str] = []
        run: list[str] = []
        for t in tokens:
            if t in special:
                out.append(self.sp_model.decode(run))
                out.append(t)
                run = []
            else:
                run.append(t)
        out.append(self.sp_model.decode(run))
        return "".join(out)

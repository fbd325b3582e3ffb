"""The export's tokenizer (kai_train/tokenization_kai.py, what AutoTokenizer loads) encodes and decodes
exactly as sentencepiece does: Korean text whose characters fall back to byte pieces, emoji and mixed
scripts round-trip through transformers as through sentencepiece."""

from __future__ import annotations


import pytest

sentencepiece = pytest.importorskip("sentencepiece")
pytest.importorskip("transformers")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kai_train.tokenization_kai import KaiTokenizer  # noqa: E402

CORPUS = "\n".join([
    "이 프로그램은 자유 소프트웨어입니다. 수정하거나 재배포할 수 있다.",
    "the quick brown fox jumps over the lazy dog",
    "def main(argv): return 0  # 주석",
] * 50)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("spm")
    (d / "c.txt").write_text(CORPUS + "\n", encoding="utf-8")
    # as data_pipelines trains it: unigram, byte fallback, so rare Hangul becomes <0xNN> pieces
    sentencepiece.SentencePieceTrainer.train(input=str(d / "c.txt"), model_prefix=str(d / "m"), vocab_size=400,
                                             byte_fallback=True, hard_vocab_limit=False,
                                             pad_id=3, minloglevel=2)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(d / "m.model"))
    return sp, KaiTokenizer(vocab_file=str(d / "m.model"))


def test_korean_byte_fallback_pieces_decode_to_their_characters(tokenizers) -> None:
    sp, tok = tokenizers
    text = "이 프로그램은 낼 수 있다."
    ids = sp.encode(text)
    assert any(sp.id_to_piece(i).startswith("<0x") for i in ids)  # 낼 is not in the vocabulary
    assert tok.decode(ids) == sp.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.one_of(st.characters(min_codepoint=0xAC00, max_codepoint=0xD7A3),
                                  st.characters(min_codepoint=0x1F300, max_codepoint=0x1F64F),
                                  st.sampled_from(list("abc XYZ.,!?\n\t0123é漢字"))), max_size=40))
def test_transformers_encodes_and_decodes_as_sentencepiece(tokenizers, text: str) -> None:
    sp, tok = tokenizers
    ids = sp.encode(text)
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    assert tok.decode(ids) == sp.decode(ids)
    assert tok.decode([sp.bos_id(), *ids], skip_special_tokens=True) == sp.decode(ids)

"""Tokenizers: special-token ids, round trips, save/load, a release-like directory, HF interop."""

import json

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from pipeline.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    IMAGE_TOKEN,
    OCR_TOKENS,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    build_char_tokenizer,
    build_tokenizer,
    load_tokenizer,
)

pytestmark = pytest.mark.unit

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Übergrößenträger: 12,5 % — naïve café",
    "深度求索 光学字符识别 表格 <td>1</td>",
    "سلام دنیا\u200cها",
    "| a | b |\n|---|---|\n| 1 | 2 |",
] * 20


@pytest.fixture(scope="module")
def bpe():
    return build_tokenizer(CORPUS, vocab_size=400)


def test_special_ids_follow_release_order(bpe):
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 1, 2)
    assert [bpe.token_id(t) for t in OCR_TOKENS] == list(range(3, 13))
    assert bpe.image_id == 3
    assert bpe.special_tokens[IMAGE_TOKEN] == 3 and bpe.special_tokens["</td>"] == 10
    assert bpe.vocab_size <= 400


@pytest.mark.parametrize("text", CORPUS[:5] + ["", " leading space", "emoji 🙂 and\ttab\n"])
def test_bpe_round_trip(bpe, text):
    ids = bpe.encode(text)
    assert bpe.bos_id not in ids and bpe.eos_id not in ids
    assert bpe.decode(ids) == text


def test_special_tokens_are_atomic_and_skipping(bpe):
    ids = bpe.encode("<image>\n<|grounding|>OCR <td>x</td>")
    assert ids[0] == bpe.image_id
    assert bpe.token_id("<|grounding|>") in ids and bpe.token_id("<td>") in ids
    framed = [bpe.bos_id, *ids, bpe.eos_id, bpe.pad_id]
    assert bpe.decode(framed) == "\n<|grounding|>OCR <td>x</td>"
    assert (
        bpe.decode(framed, skip_special=False)
        == f"{BOS_TOKEN}<image>\n<|grounding|>OCR <td>x</td>{EOS_TOKEN}{PAD_TOKEN}"
    )


def test_save_load_round_trip(bpe, tmp_path):
    bpe.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    for text in CORPUS[:5]:
        assert loaded.encode(text) == bpe.encode(text)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.image_id) == (0, 1, 2, 3)
    assert loaded.vocab_size == bpe.vocab_size
    assert load_tokenizer(tmp_path / "tokenizer.json").encode("fox") == bpe.encode("fox")


def test_saved_directory_loads_in_transformers(bpe, tmp_path):
    from transformers import AutoTokenizer

    bpe.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "<image>\nFree OCR. 深度 <td>1</td>"
    assert hf.encode(text, add_special_tokens=False) == bpe.encode(text)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)


def test_char_tokenizer():
    tok = build_char_tokenizer("abc \n")
    assert tok.vocab_size == len(SPECIAL_TOKENS) + 1 + 5
    ids = tok.encode("ab c\n<td>a")
    assert ids == [14, 15, 17, 16, 18, tok.token_id("<td>"), 14]
    assert tok.decode(ids) == "ab c\n<td>a"
    unk = tok.token_id("<unk>")
    assert tok.encode("aXb") == [14, unk, 15]
    with pytest.raises(ValueError, match="single characters"):
        build_char_tokenizer(["ab"])


def test_bpe_vocab_floor():
    with pytest.raises(ValueError, match="below"):
        build_tokenizer(CORPUS, vocab_size=100)


def test_release_like_directory(tmp_path):
    # Base vocabulary of 300 byte-level tokens, then the release's added tokens at the end
    # (the release has them at 128815+), special tokens named in tokenizer_config.json as dicts.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {BOS_TOKEN: 0, EOS_TOKEN: 1}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in OCR_TOKENS])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": {"__type": "AddedToken", "content": BOS_TOKEN},
                "eos_token": {"__type": "AddedToken", "content": EOS_TOKEN},
                "pad_token": PAD_TOKEN,
                "model_max_length": 8192,
                "tokenizer_class": "LlamaTokenizerFast",
            }
        )
    )
    loaded = load_tokenizer(tmp_path)
    base = len(vocab)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (0, 1, base)
    assert loaded.image_id == base + 1
    assert loaded.token_id("<td>") == base + 7 and loaded.token_id("</tr>") == base + 10
    ids = loaded.encode("<image>\nhi")
    assert ids[0] == loaded.image_id and loaded.decode(ids) == "\nhi"


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)

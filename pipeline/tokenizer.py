"""OCR tokenizer: the released DeepSeek-OCR tokenizer directory, or a small one built offline.

The release uses a byte-level BPE (LlamaTokenizerFast, tokenizer.json) with BOS
`<｜begin▁of▁sentence｜>` = 0, EOS `<｜end▁of▁sentence｜>` = 1 and added tokens `<image>`,
`<|ref|>`, `<|/ref|>`, `<|det|>`, `<|/det|>`, `<|grounding|>`, `<td>`, `</td>`, `<tr>`,
`</tr>` (../shared/spec/architecture.md section 4). `load_tokenizer` reads such a directory
with the `tokenizers` library. `build_tokenizer` trains a byte-level BPE on a corpus and
`build_char_tokenizer` makes a character vocabulary (tiny CPU models); both put the same
special tokens first (BOS 0, EOS 1, pad 2, then the release's order) and save in the same
layout (tokenizer.json + tokenizer_config.json + special_tokens_map.json).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
UNK_TOKEN = "<unk>"
IMAGE_TOKEN = "<image>"
GROUNDING_TOKEN = "<|grounding|>"
REF_START, REF_END = "<|ref|>", "<|/ref|>"
DET_START, DET_END = "<|det|>", "<|/det|>"
TD_START, TD_END = "<td>", "</td>"
TR_START, TR_END = "<tr>", "</tr>"

# Added tokens in the release's order of addition (<image> = 128815 ... </tr> = 128824).
OCR_TOKENS = (
    IMAGE_TOKEN,
    REF_START,
    REF_END,
    DET_START,
    DET_END,
    GROUNDING_TOKEN,
    TD_START,
    TD_END,
    TR_START,
    TR_END,
)
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *OCR_TOKENS)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
)


class OCRTokenizer:
    """A `tokenizers.Tokenizer` plus the ids DeepSeek-OCR needs.

    encode() never adds BOS/EOS; decode(skip_special=True) drops BOS, EOS, pad and `<image>`
    but keeps the content-bearing tokens (`<td>`, `<|ref|>`, `<|det|>`, ...).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        pad_token: str | None = PAD_TOKEN,
        model_max_length: int = 8192,
    ) -> None:
        self.tokenizer = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        self.model_max_length = model_max_length
        self.bos_id = self._require(bos_token, "BOS")
        self.eos_id = self._require(eos_token, "EOS")
        self.image_id = self._require(IMAGE_TOKEN, "image")
        pad_id = tokenizer.token_to_id(pad_token) if pad_token is not None else None
        if pad_id is None:
            logger.warning("tokenizer has no pad token %r; padding with EOS (id %d)", pad_token, self.eos_id)
            pad_token, pad_id = eos_token, self.eos_id
        self.pad_token, self.pad_id = pad_token, pad_id
        self.special_tokens: dict[str, int] = {
            tok: tid
            for tok in (bos_token, eos_token, pad_token, *OCR_TOKENS)
            if (tid := tokenizer.token_to_id(tok)) is not None
        }
        self._skip_ids = {self.bos_id, self.eos_id, self.pad_id, self.image_id}

    def _require(self, token: str, role: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no {role} token {token!r}")
        return token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocabulary + added tokens)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """Id of one (special) token; ValueError if the vocabulary lacks it."""
        return self._require(token, "requested")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of `ids`; with skip_special, BOS/EOS/pad/`<image>` are dropped first."""
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._skip_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(out / "tokenizer.json"))
        special_map = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        if self.tokenizer.token_to_id(UNK_TOKEN) is not None:
            special_map["unk_token"] = UNK_TOKEN
        config = {
            **special_map,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (out / "special_tokens_map.json").write_text(
            json.dumps(special_map, indent=2, ensure_ascii=False) + "\n"
        )
        return out


def _token_text(value: object) -> str | None:
    """tokenizer_config.json stores special tokens as strings or {"content": ...} dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(path: str | Path) -> OCRTokenizer:
    """Load a tokenizer directory (tokenizer.json + optional configs) or a tokenizer.json file."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"no tokenizer.json at {path} (expected a DeepSeek-OCR tokenizer directory)")
    tokenizer = Tokenizer.from_file(str(file))
    names = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    max_length = 8192
    for config_name in ("special_tokens_map.json", "tokenizer_config.json"):  # later file wins
        config_file = file.parent / config_name
        if not config_file.is_file():
            continue
        config = json.loads(config_file.read_text())
        for key in names:
            text = _token_text(config.get(key))
            if text is not None:
                names[key] = text
        length = config.get("model_max_length")
        if isinstance(length, int) and 0 < length < 10**9:
            max_length = length
    return OCRTokenizer(tokenizer, model_max_length=max_length, **names)


def _special_added_tokens(tokens: Iterable[str]) -> list[AddedToken]:
    return [AddedToken(t, special=True, normalized=False) for t in tokens]


def build_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> OCRTokenizer:
    """Train a byte-level BPE on `texts` with the OCR special tokens at ids 0..12."""
    floor = len(SPECIAL_TOKENS) + 256
    if vocab_size < floor:
        raise ValueError(
            f"vocab_size={vocab_size} is below {floor} (256 bytes + {len(SPECIAL_TOKENS)} specials)"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=_special_added_tokens(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return OCRTokenizer(tokenizer)


def build_char_tokenizer(alphabet: Iterable[str]) -> OCRTokenizer:
    """One id per character of `alphabet` (after the special tokens and `<unk>`)."""
    vocab: dict[str, int] = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, UNK_TOKEN))}
    for char in alphabet:
        if len(char) != 1:
            raise ValueError(f"alphabet entries must be single characters, got {char!r}")
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tokenizer.add_special_tokens(_special_added_tokens(SPECIAL_TOKENS))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return OCRTokenizer(tokenizer)

"""SigLIP 2 text tokenizer: the Gemma vocabulary with SigLIP 2's conventions, ids identical to transformers.

Every text becomes exactly `max_length` (64) int32 ids:

    lowercase -> tokenize (no BOS) -> append EOS -> keep the first max_length - 1 tokens + EOS -> pad with 0

This is what big_vision trained with, and what transformers' `Siglip2Tokenizer` (a Gemma tokenizer plus a
`Lowercase` normalizer, built with `add_bos_token=False, add_eos_token=True, padding_side="right"`) returns
for `padding="max_length", max_length=64, truncation=True`. Both keep EOS when truncating ("sticky EOS"):
transformers truncates the text to 63 tokens before its post-processor appends EOS.

The vocabulary comes from either file a checkpoint may ship:
- `tokenizer.json`, a Hugging Face tokenizer file, with the added tokens that `tokenizer_config.json`
  lists beside it (`added_tokens_decoder`, the named special tokens, `extra_special_tokens`);
- `tokenizer.model`, a SentencePiece model, read with the `sentencepiece` library.
A directory with both is read as transformers reads it: `tokenizer.json` wins. The two files can disagree
(a `tokenizer.json` converted the way older transformers converted Gemma splits tag-like pieces such as
"<table>" that the SentencePiece model keeps whole), and the ids then follow transformers. Either way the text is encoded the way transformers' GemmaTokenizer encodes it: a `tokenizers` BPE model
(byte fallback) over the text with spaces replaced by "▁" (no dummy prefix, no other normalization).
transformers does not run SentencePiece's own encoder, and the two can disagree (on whitespace runs
longer than the longest whitespace piece, for one), so neither do we.

Special-token strings typed in the text ("<eos>", "<start_of_turn>", ...: the control, unknown and
user-defined pieces) become their single id, as in transformers (SentencePiece itself, hence big_vision,
spells control pieces such as "<eos>" out in characters).
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Sequence

import numpy as np
import tokenizers
from tokenizers import AddedToken, normalizers

from .errors import first_line

TEXT_LENGTH = 64  # SigLIP 2 text towers have 64 positions.
PREFIX_CHARS = 2048  # a text longer than 1.5x this is tokenized in prefixes (`Tokenizer.leading_tokens`)
PREFIX_MARGIN_TOKENS = 16  # tokens a prefix must hold past the ones kept, so that the cut is far from them
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # in order of preference, as in transformers
LOWERCASE_MODES = ("unicode", "python", "ascii", "none")

GEMMA_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # transformers always adds these
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_SPACES_TO_METASPACE = normalizers.Replace(" ", "▁")  # Gemma's only normalization


class Tokenizer:
    """Turns texts into the (n, 64) int32 id arrays the SigLIP 2 text tower takes.

    Build it with `Tokenizer.from_dir(checkpoint_dir)` or `Tokenizer.from_file(path)`.

    `lowercase` picks how texts are lowercased (SigLIP 2 was trained on lowercased text); each choice is
    exactly one reference pipeline:
    - "unicode" (default): transformers' `Siglip2Tokenizer`. Special tokens are found in the raw text, then
      every character is lowercased on its own with the `tokenizers` Lowercase normalizer (Unicode; unlike
      `str.lower()` it has no final-sigma rule: "ΟΔΟΣ" -> "οδοσ", not "οδος").
    - "python": `GemmaTokenizer(text.lower())`, the recipe for FixRes hub repos whose AutoTokenizer is a
      plain Gemma tokenizer.
    - "ascii": A-Z only, as big_vision's `tf.strings.lower` does; other scripts keep their case.
    - "none": no lowercasing (not what the model was trained on).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_id: int,
        pad_id: int = 0,
        source: str = "<memory>",
        lowercase: str = "unicode",
        added_tokens: Sequence[AddedToken] = (),
    ):
        """`added_tokens`: more added tokens (a tokenizer_config.json's), each added unless the backend
        already has an added token with that text."""
        if lowercase not in LOWERCASE_MODES:
            raise ValueError(f"lowercase={lowercase!r}: expected one of {', '.join(LOWERCASE_MODES)}")
        # Rebuild the pipeline around the vocabulary as transformers' Gemma/Siglip2 tokenizers do,
        # whatever a tokenizer.json says. EOS, truncation and padding happen in `encode`, not here.
        if lowercase == "unicode":
            backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), _SPACES_TO_METASPACE])
        else:
            backend.normalizer = _SPACES_TO_METASPACE
        backend.pre_tokenizer = None
        backend.post_processor = None
        backend.no_truncation()
        backend.no_padding()
        # transformers finds its named special tokens in the text ("<eos>" typed in a text is EOS).
        named = [t for t in GEMMA_SPECIAL_TOKENS if backend.token_to_id(t) is not None]
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in named])
        present = {token.content for token in backend.get_added_tokens_decoder().values()}
        for token in added_tokens:
            if token.content not in present:
                (backend.add_special_tokens if token.special else backend.add_tokens)([token])
                present.add(token.content)
        backend.encode_special_tokens = False
        self._backend = backend
        self.lowercase = lowercase
        self.eos_id, self.pad_id = eos_id, pad_id
        self.bos_id = backend.token_to_id("<bos>")  # never added; kept for reference
        self.unk_id = backend.token_to_id("<unk>")
        self.vocab_size = backend.get_vocab_size()
        self.source = source

    # ----------------------------------------------------------------------------------------- loading

    @classmethod
    def from_dir(cls, directory: str | Path, *, lowercase: str = "unicode") -> Tokenizer:
        """Loads `directory`'s tokenizer as transformers does: `tokenizer.json` (plus the added tokens of
        `tokenizer_config.json`) if there is one, else `tokenizer.model`."""
        directory = Path(directory)
        for name in TOKENIZER_FILES:
            if (directory / name).is_file():
                added = _config_added_tokens(directory / "tokenizer_config.json") if name.endswith(".json") else ()
                return cls.from_file(directory / name, lowercase=lowercase, added_tokens=added)
        reason = "no tokenizer found" if directory.is_dir() else "no such directory"
        raise FileNotFoundError(f"{directory}: {reason} (looked for {' and '.join(TOKENIZER_FILES)})")

    @classmethod
    def from_file(cls, path: str | Path, *, lowercase: str = "unicode", added_tokens: Sequence[AddedToken] = ()) -> Tokenizer:
        """Loads a SentencePiece model (`.model`) or a Hugging Face tokenizer file (`.json`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such tokenizer file")
        data = path.read_bytes()
        if not data:
            raise ValueError(f"{path}: not a tokenizer (empty file)")
        load = _read_tokenizers_json if path.suffix == ".json" else _read_sentencepiece
        backend, eos_id, pad_id = load(path, data)
        return cls(backend, eos_id=eos_id, pad_id=pad_id, source=str(path), lowercase=lowercase,
                   added_tokens=added_tokens)

    # ---------------------------------------------------------------------------------------- encoding

    def tokenize(self, texts: str | Sequence[str]) -> list[list[int]]:
        """Token ids per text, lowercased; no BOS, no EOS, no truncation, no padding."""
        texts = _as_list(texts)
        if self.lowercase == "python":
            texts = [text.lower() for text in texts]
        elif self.lowercase == "ascii":
            texts = [text.translate(_ASCII_LOWER) for text in texts]
        # ("unicode" lowercases inside the backend, after special tokens are found, as transformers does.)
        return [encoding.ids for encoding in self._backend.encode_batch(texts, add_special_tokens=False)]

    def encode(self, texts: str | Sequence[str], max_length: int = TEXT_LENGTH) -> np.ndarray:
        """Returns int32 ids of shape (n, max_length): tokens, EOS, then padding; one row per text.

        A text longer than max_length - 1 tokens keeps its first max_length - 1 tokens and then EOS, so
        every row holds exactly one EOS. There is no attention mask: the text tower attends to all 64.
        """
        if max_length < 1:
            raise ValueError(f"max_length={max_length}: must leave room for EOS (>= 1)")
        rows = self.leading_tokens(texts, max_length - 1)
        ids = np.full((len(rows), max_length), self.pad_id, dtype=np.int32)
        for row, tokens in enumerate(rows):
            tokens = tokens + [self.eos_id]
            ids[row, : len(tokens)] = tokens
        return ids

    def leading_tokens(self, texts: str | Sequence[str], count: int) -> list[list[int]]:
        """The first `count` token ids of each text, as `tokenize(texts)[i][:count]`, in time and memory
        that do not grow with a long text's length (the whole of a 2 MB text took 7 s and 300 MB).

        A long text is tokenized in two prefixes, of `chars` and 1.5 `chars` characters. A cut changes only
        the tokens next to it (a BPE merge joins neighbours; one across the cut can only change the tokens
        it touches and those its new pieces then join), so when both prefixes give at least `count` +
        PREFIX_MARGIN_TOKENS tokens and agree on the first `count`, those are the text's. Otherwise the
        prefixes grow 4x, up to the whole text."""
        texts = _as_list(texts)
        rows: list[list[int] | None] = [None] * len(texts)
        pending, chars = list(range(len(texts))), PREFIX_CHARS
        while pending:
            whole = [i for i in pending if len(texts[i]) <= chars * 3 // 2]
            for i, tokens in zip(whole, self.tokenize([texts[i] for i in whole])):
                rows[i] = tokens[:count]
            long = [i for i in pending if len(texts[i]) > chars * 3 // 2]
            cuts = self.tokenize([texts[i][:n] for i in long for n in (chars, chars * 3 // 2)])
            pending = []
            for i, short, longer in zip(long, cuts[::2], cuts[1::2]):
                if min(len(short), len(longer)) >= count + PREFIX_MARGIN_TOKENS and short[:count] == longer[:count]:
                    rows[i] = short[:count]
                else:
                    pending.append(i)
            chars *= 4
        return rows

    __call__ = encode

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, lowercase={self.lowercase!r})"


# ---------------------------------------------------------------------------------------------- readers


def _read_sentencepiece(path: Path, data: bytes) -> tuple[tokenizers.Tokenizer, int, int]:
    """A SentencePiece BPE model as the `tokenizers` BPE that transformers converts it to."""
    from google.protobuf.message import DecodeError
    from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2

    try:
        proto = sentencepiece_model_pb2.ModelProto.FromString(data)
        SentencePieceProcessor(model_proto=data)  # validates the whole model
    except (DecodeError, RuntimeError):  # their messages name neither the file nor the problem
        raise ValueError(f"{path}: not a SentencePiece model (cannot parse it)") from None
    spec = proto.trainer_spec
    if not proto.pieces or not 0 <= spec.eos_id < len(proto.pieces):
        raise ValueError(f"{path}: not a usable SentencePiece model (no pieces or no EOS piece)")

    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    model = tokenizers.models.BPE(
        vocab=vocab,
        merges=_bpe_merges(vocab),
        unk_token=proto.pieces[spec.unk_id].piece if 0 <= spec.unk_id < len(proto.pieces) else None,
        fuse_unk=True,
        byte_fallback=spec.byte_fallback,
    )
    backend = tokenizers.Tokenizer(model)
    # transformers matches control, unknown and user-defined pieces in the raw text, as "added tokens".
    kinds = sentencepiece_model_pb2.ModelProto.SentencePiece.Type
    control = [p.piece for p in proto.pieces if p.type in (kinds.CONTROL, kinds.UNKNOWN)]
    user_defined = [p.piece for p in proto.pieces if p.type == kinds.USER_DEFINED]
    backend.add_special_tokens([AddedToken(piece, normalized=False, special=True) for piece in control])
    backend.add_tokens([AddedToken(piece, normalized=False, special=False) for piece in user_defined])
    return backend, spec.eos_id, max(spec.pad_id, 0)  # Gemma pads with id 0


def _bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every way to build a piece from two pieces, ranked as transformers ranks them when it converts a
    SentencePiece model: by the built piece's id (SentencePiece scores BPE pieces by -id), then by the
    length of the left part. The vocabulary is in id order, so the list comes out sorted."""
    merges = []
    for piece in vocab:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    return merges


def _read_tokenizers_json(path: Path, data: bytes) -> tuple[tokenizers.Tokenizer, int, int]:
    try:
        backend = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception as error:  # tokenizers raises a bare Exception for any parse error
        raise ValueError(f"{path}: not a tokenizers JSON file ({first_line(error)})") from None
    eos_id = backend.token_to_id("<eos>")
    if eos_id is None:
        raise ValueError(f"{path}: the tokenizer has no <eos> token (not a Gemma vocabulary)")
    pad_id = backend.token_to_id("<pad>")
    return backend, eos_id, 0 if pad_id is None else pad_id


def _config_added_tokens(path: Path) -> list[AddedToken]:
    """The added tokens transformers takes from a tokenizer_config.json beside a tokenizer.json: the
    `added_tokens_decoder` entries (in id order, with their flags), then the named special tokens and the
    `extra_special_tokens` (formerly `additional_special_tokens`) as special, unnormalized tokens."""
    if not path.is_file():
        return []
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a JSON file ({first_line(error)})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    tokens = []
    decoder = config.get("added_tokens_decoder") or {}
    for _, entry in sorted(decoder.items(), key=lambda item: int(item[0])):
        if isinstance(entry, dict) and isinstance(entry.get("content"), str):
            special = bool(entry.get("special", False))
            tokens.append(AddedToken(entry["content"], single_word=bool(entry.get("single_word", False)),
                                     lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)),
                                     normalized=bool(entry.get("normalized", not special)), special=special))
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
    named = [config.get(f"{name}_token") for name in ("bos", "eos", "unk", "sep", "pad", "cls", "mask")]
    for token in named + extra:
        content = token.get("content") if isinstance(token, dict) else token
        if isinstance(content, str):
            tokens.append(AddedToken(content, normalized=False, special=True))
    return tokens


def _as_list(texts: str | Sequence[str]) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is a {type(text).__name__}, expected str")
        check_text(text, f"texts[{i}]")
    return texts


def check_text(text: str, name: str) -> str:
    """`text` itself if it can be tokenized; raises ValueError naming `name` if it holds a lone surrogate
    (a JSON "\\ud800" decodes to one; the tokenizers backend would fail with an unrelated TypeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{name}: not valid Unicode: a lone surrogate {text[error.start]!r} at character "
                         f"{error.start}") from None
    return text

"""siglip2_jax.tokenizer against transformers' SigLIP 2 tokenizers, on a SentencePiece model trained here.

The real Gemma vocabulary cannot be downloaded in tests, so a small BPE model with Gemma's layout (special
ids, byte fallback, user-defined whitespace/newline runs and tags, no dummy prefix, identity normalization)
is trained in the session. `test_real_gemma_vocabulary` runs when the real file is on disk.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

import siglip2_jax.tokenizer as tokenizer_module
from siglip2_jax.tokenizer import TEXT_LENGTH, Tokenizer
from vocab import BOS, EOS, PAD, UNK, corpus

sentencepiece = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

REAL_VOCAB = Path(__file__).parents[1] / ".." / "shared" / "data" / "gemma_tokenizer.model"
# How SigLIP 2's tokenizer is built (transformers' convert_siglip2_to_hf.py) and called (Siglip2Processor).
HF_BUILD = dict(add_bos_token=False, add_eos_token=True, padding_side="right")
HF_CALL = dict(padding="max_length", max_length=TEXT_LENGTH, truncation=True)

@pytest.fixture(scope="session")
def vocab_dirs(tmp_path_factory, tokenizer_model) -> dict[str, Path]:
    """A Gemma-like tokenizer.model, and tokenizer.json files that transformers saves from it."""
    root = tmp_path_factory.mktemp("tokenizer")
    dirs = {"model": tokenizer_model.parent}
    for name, cls in [("gemma_json", transformers.GemmaTokenizer), ("siglip2_json", transformers.Siglip2Tokenizer)]:
        hf = cls.from_pretrained(dirs["model"], **HF_BUILD)
        hf(["Warm Up"], **HF_CALL)  # leaves padding/truncation settings in the saved file: we must ignore them
        hf.save_pretrained(root / name)
        assert (root / name / "tokenizer.json").is_file() and not (root / name / "tokenizer.model").exists()
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="session")
def hf_siglip2(vocab_dirs):
    return transformers.Siglip2Tokenizer.from_pretrained(vocab_dirs["model"], **HF_BUILD)


@pytest.fixture(scope="session")
def hf_gemma(vocab_dirs):
    return transformers.GemmaTokenizer.from_pretrained(vocab_dirs["model"], **HF_BUILD)


def _random_text(rng: random.Random, pools: list[range], n: int) -> str:
    chars = []
    for _ in range(n):
        pool = rng.choice(pools)
        code = rng.choice(pool)
        if not 0xD800 <= code < 0xE000:  # lone surrogates are not text
            chars.append(chr(code))
    return "".join(chars)


def _test_strings() -> list[str]:
    rng = random.Random(1234)
    sentences = corpus(random.Random(99), 500)
    pools = [
        range(0x20, 0x7F), range(0xA0, 0x250), range(0x300, 0x370), range(0x370, 0x400), range(0x400, 0x530),
        range(0x600, 0x700), range(0x900, 0x980), range(0x1E00, 0x1F00), range(0x2000, 0x2070),
        range(0x3040, 0x3100), range(0x4E00, 0x4F00), range(0xAC00, 0xAD00), range(0x1F300, 0x1F700),
        range(0x1, 0x20), range(0x10000, 0x30000),
    ]  # fmt: skip
    specials = ["<eos>", "<EOS>", "<pad>", "<bos>", "<unk>", "<mask>", "<MASK>", "[@BOS@]", "[@bos@]",
                "<unused2>", "<start_of_turn>", "<table>", "<TABLE>", "<B>", "▁▁▁", "\n" * 11, "<eos"]  # fmt: skip
    strings = [
        "", " ", "  ", "\n", "\t", "a", "A", "This is a photo of a cat.", "THIS IS A PHOTO OF A CAT.",
        "ΟΔΟΣ", "Σ", "İstanbul", "STRASSE straße ẞ", "ǅ ǈ ǋ", "ﬁ ﬂ", "Ⅻ ⓐ Ⓐ", "😀" * 40, "7" * 127, "ab" * 100,
    ]  # fmt: skip
    strings += sentences  # in-vocabulary text, some capitalised
    strings += [s.upper() for s in sentences[:200]]
    strings += [f"This is a photo of {s}." for s in sentences[200:400]]
    strings += [_random_text(rng, pools, rng.randint(1, 60)) for _ in range(600)]
    for _ in range(300):  # whitespace runs, tabs and newlines between words
        gaps = [" " * rng.randint(1, 40), "\t" * rng.randint(1, 3), "\n" * rng.randint(1, 12), " \n\t "]
        strings.append("".join(part + rng.choice(gaps) for part in rng.sample(sentences, 3)))
    for _ in range(200):  # special-token strings inside text
        strings.append(" ".join(rng.choice([rng.choice(specials), rng.choice(sentences)]) for _ in range(5)))
    for _ in range(200):  # far longer than 64 tokens: truncation
        strings.append(" ".join(rng.sample(sentences, 12)))
    return strings


STRINGS = _test_strings()


def _hf_ids(hf, texts: list[str]) -> np.ndarray:
    return np.asarray(hf(texts, **HF_CALL)["input_ids"], dtype=np.int32)


def _assert_same_rows(ours: np.ndarray, reference: np.ndarray, texts: list[str]) -> None:
    assert ours.shape == reference.shape == (len(texts), TEXT_LENGTH) and ours.dtype == np.int32
    bad = np.flatnonzero((ours != reference).any(axis=1))
    details = [f"{texts[i]!r}\n  ours {ours[i].tolist()}\n  hf   {reference[i].tolist()}" for i in bad[:3]]
    assert not len(bad), f"{len(bad)} of {len(texts)} texts differ, e.g.\n" + "\n".join(details)


def test_test_strings_cover_what_they_claim(hf_siglip2):
    assert len(STRINGS) >= 2000
    lengths = [len(ids) for ids in hf_siglip2(STRINGS, add_special_tokens=False)["input_ids"]]
    assert sum(n > TEXT_LENGTH for n in lengths) >= 200  # truncation is exercised
    assert sum(s != s.lower() for s in STRINGS) >= 400  # lowercasing is exercised


@pytest.mark.parametrize("source", ["model", "gemma_json", "siglip2_json"])
def test_ids_equal_transformers_siglip2_tokenizer(vocab_dirs, hf_siglip2, source):
    tokenizer = Tokenizer.from_dir(vocab_dirs[source])
    assert Path(tokenizer.source).name == ("tokenizer.model" if source == "model" else "tokenizer.json")
    _assert_same_rows(tokenizer.encode(STRINGS), _hf_ids(hf_siglip2, STRINGS), STRINGS)


@pytest.mark.parametrize("lowercase", ["unicode", "python"])
def test_texts_tokenized_in_prefixes_equal_transformers(vocab_dirs, hf_siglip2, hf_gemma, lowercase, monkeypatch):
    """Long texts are tokenized in prefixes (`leading_tokens`). With prefixes of 24 characters, nearly every
    test string is cut, at every kind of place (inside words, whitespace runs, special tokens, surrogate
    pairs' characters, final sigmas), and the ids must still be transformers'."""
    monkeypatch.setattr(tokenizer_module, "PREFIX_CHARS", 24)
    tokenizer = Tokenizer.from_dir(vocab_dirs["model"], lowercase=lowercase)
    if lowercase == "unicode":
        reference = _hf_ids(hf_siglip2, STRINGS)
    else:
        reference = _hf_ids(hf_gemma, [s.lower() for s in STRINGS])
    _assert_same_rows(tokenizer.encode(STRINGS), reference, STRINGS)


def test_a_long_text_costs_what_its_first_tokens_cost(vocab_dirs, monkeypatch):
    """A 2 MB text (one line of a texts file, or an input of a request) is not tokenized whole: the
    backend only ever sees a few thousand characters of it."""
    tokenizer = Tokenizer.from_dir(vocab_dirs["model"])
    seen = []
    encode_batch = tokenizer._backend.encode_batch
    monkeypatch.setattr(tokenizer, "_backend", type("Spy", (), {
        "encode_batch": lambda self, texts, **kw: seen.extend(map(len, texts)) or encode_batch(texts, **kw)})())
    texts = ["a photo of a cat " * 120_000, "猫" * 2_000_000, " " * 2_000_000, "Short."]
    ids = tokenizer.encode(texts)
    assert max(seen) <= 8 * tokenizer_module.PREFIX_CHARS, max(seen)
    # the first row's 63 tokens are the start of the repeated caption, then EOS
    assert ids[0, -1] == EOS and ids[3].tolist().count(EOS) == 1
    assert ids[0, :63].tolist() == tokenizer.tokenize(["a photo of a cat " * 20])[0][:63]


def test_python_lowercase_equals_gemma_tokenizer_fed_lowercased_text(vocab_dirs, hf_gemma):
    # The FixRes hub recipe: AutoTokenizer gives a GemmaTokenizer and the caller lowercases.
    tokenizer = Tokenizer.from_dir(vocab_dirs["model"], lowercase="python")
    _assert_same_rows(tokenizer.encode(STRINGS), _hf_ids(hf_gemma, [s.lower() for s in STRINGS]), STRINGS)


def test_layout_no_bos_eos_then_padding(vocab_dirs):
    tokenizer = Tokenizer.from_dir(vocab_dirs["model"])
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.unk_id) == (PAD, EOS, BOS, UNK)
    assert tokenizer.vocab_size == 4000
    ids = tokenizer.encode(["", "a photo of a cat", "7" * 127])
    assert ids.shape == (3, TEXT_LENGTH) and ids.dtype == np.int32
    assert ids[0].tolist() == [EOS] + [PAD] * (TEXT_LENGTH - 1)
    tokens = tokenizer.tokenize("a photo of a cat")[0]
    assert ids[1].tolist() == tokens + [EOS] + [PAD] * (TEXT_LENGTH - 1 - len(tokens))
    assert BOS not in ids
    # Sticky EOS: the first 63 tokens, then EOS.
    long_tokens = tokenizer.tokenize("7" * 127)[0]
    assert len(long_tokens) == 127
    assert ids[2].tolist() == long_tokens[:63] + [EOS]
    # A single string is a batch of one; max_length is honoured.
    assert tokenizer.encode("7" * 127, max_length=8).tolist() == [long_tokens[:7] + [EOS]]
    assert tokenizer.encode([]).shape == (0, TEXT_LENGTH)


def test_model_and_json_agree_in_every_lowercase_mode(vocab_dirs):
    for mode in ("unicode", "python", "ascii", "none"):
        from_model = Tokenizer.from_dir(vocab_dirs["model"], lowercase=mode).encode(STRINGS)
        from_json = Tokenizer.from_dir(vocab_dirs["gemma_json"], lowercase=mode).encode(STRINGS)
        _assert_same_rows(from_model, from_json, STRINGS)


def test_lowercase_modes_differ_where_documented(vocab_dirs):
    def ids(mode: str, text: str) -> list[int]:
        return Tokenizer.from_dir(vocab_dirs["model"], lowercase=mode).tokenize(text)[0]

    # Final sigma: transformers lowercases character by character, str.lower() knows word ends.
    assert ids("unicode", "ΟΔΟΣ") == ids("unicode", "οδοσ") != ids("python", "ΟΔΟΣ") == ids("unicode", "οδος")
    # big_vision's ASCII-only lowercasing leaves other scripts alone.
    assert ids("ascii", "PHOTO") == ids("unicode", "photo")
    assert ids("ascii", "ПРИВЕТ") == ids("none", "ПРИВЕТ") != ids("unicode", "ПРИВЕТ") == ids("none", "привет")
    # A special token is found in the raw text: "<eos>" is EOS, "<EOS>" is characters.
    assert ids("unicode", "<eos>") == [EOS]
    assert EOS not in ids("unicode", "<EOS>")


def test_comparison_is_sensitive_to_lowercasing(vocab_dirs, hf_siglip2):
    # The parity test above would fail if we forgot to lowercase: every text with a capital letter early
    # on (outside the special token "[@BOS@]", which is matched before lowercasing) comes out different.
    upper = [s for s in STRINGS if any("A" <= c <= "Z" for c in s[:20]) and "[@BOS@]" not in s]
    assert len(upper) >= 200
    ours = Tokenizer.from_dir(vocab_dirs["model"], lowercase="none").encode(upper)
    assert (ours != _hf_ids(hf_siglip2, upper)).any(axis=1).all()


def test_real_gemma_vocabulary(tmp_path):
    path = Path(os.environ.get("SIGLIP2_TOKENIZER", REAL_VOCAB))
    if not path.is_file():
        pytest.skip(f"real Gemma tokenizer.model not found at {path} (set $SIGLIP2_TOKENIZER to run this)")
    shutil.copy(path, tmp_path / "tokenizer.model")
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.vocab_size == 256_000
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.unk_id) == (PAD, EOS, BOS, UNK)
    hf = transformers.Siglip2Tokenizer.from_pretrained(tmp_path, **HF_BUILD)
    _assert_same_rows(tokenizer.encode(STRINGS), _hf_ids(hf, STRINGS), STRINGS)
    long = [s * (4000 // len(s) + 1) for s in STRINGS[::7] if s]   # past 1.5 PREFIX_CHARS: cut in prefixes
    _assert_same_rows(tokenizer.encode(long), _hf_ids(hf, long), long)
    hf.save_pretrained(tmp_path / "json")
    _assert_same_rows(Tokenizer.from_dir(tmp_path / "json").encode(STRINGS), _hf_ids(hf, STRINGS), STRINGS)


# ---------------------------------------------------------------------------------------------- errors


def test_from_dir_prefers_json_as_transformers_does_and_falls_back_to_model(vocab_dirs, tmp_path):
    shutil.copy(vocab_dirs["model"] / "tokenizer.model", tmp_path / "tokenizer.model")
    assert Tokenizer.from_dir(tmp_path).source.endswith("tokenizer.model")
    (tmp_path / "tokenizer.json").write_text("not json")  # read first, as transformers reads it
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    assert Tokenizer.from_dir(vocab_dirs["gemma_json"]).source.endswith("tokenizer.json")


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: p])
def test_missing_directory_or_files(tmp_path, make):
    directory = make(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        Tokenizer.from_dir(directory)
    message = str(error.value)
    assert "\n" not in message and str(directory) in message
    assert "tokenizer.model" in message and "tokenizer.json" in message


@pytest.mark.parametrize(
    "name, content",
    [
        ("tokenizer.model", b"\x00\x01 this is not a protobuf \xff" * 20),
        ("tokenizer.model", b""),
        ("tokenizer.json", b'{"model": {"type": "BPE", '),
        ("tokenizer.json", b"\xff\xfe garbage"),
        ("tokenizer.json", b""),
    ],
)
def test_corrupt_file_is_a_value_error_naming_it(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError) as error:
        Tokenizer.from_dir(tmp_path)
    message = str(error.value)
    assert "\n" not in message and name in message


def test_truncated_model_is_refused(vocab_dirs, tmp_path):
    data = (vocab_dirs["model"] / "tokenizer.model").read_bytes()
    (tmp_path / "tokenizer.model").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path)


def test_bad_arguments(vocab_dirs):
    with pytest.raises(ValueError, match="lowercase"):
        Tokenizer.from_dir(vocab_dirs["model"], lowercase="upper")
    tokenizer = Tokenizer.from_dir(vocab_dirs["model"])
    with pytest.raises(ValueError, match="max_length"):
        tokenizer.encode("x", max_length=0)
    with pytest.raises(TypeError, match="texts\\[1\\]"):
        tokenizer.encode(["ok", b"bytes"])
    # a lone surrogate (a JSON "\\udc80" decodes to one): the backend's TypeError would not say which text
    with pytest.raises(ValueError, match=r"texts\[1\]: not valid Unicode: a lone surrogate '\\udc80' at character 2"):
        tokenizer.encode(["ok", "ab\udc80c"])


# ------------------------------------------------------------------------------ tokenizer.json and .model

OLD_STYLE_DROPPED = ("<table>", "</table>", "<unused2>", "\n\n\n", "▁▁▁▁")  # kept whole by the .model only


def _hub_dir_whose_files_disagree(vocab_dirs, root: Path, config_tokens: dict | None = None) -> Path:
    """tokenizer.model + tokenizer.json + tokenizer_config.json, where the json lacks some of the model's
    user-defined pieces as added tokens (as a Gemma tokenizer.json converted by older transformers does),
    and `config_tokens` (an added_tokens_decoder) may add some back."""
    import json

    directory = root / "both"
    shutil.copytree(vocab_dirs["gemma_json"], directory)
    shutil.copy(vocab_dirs["model"] / "tokenizer.model", directory)
    data = json.loads((directory / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in OLD_STYLE_DROPPED]
    (directory / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = [t for t in config["extra_special_tokens"] if t not in OLD_STYLE_DROPPED]
    config.pop("vocab_file", None)
    if config_tokens:
        config["added_tokens_decoder"] = config_tokens
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


DISAGREE = [s for s in STRINGS if any(t in s.lower() for t in OLD_STYLE_DROPPED + ("<unused", "\n\n", "  "))]


def test_directory_with_both_files_gives_transformers_ids(vocab_dirs, tmp_path):
    directory = _hub_dir_whose_files_disagree(vocab_dirs, tmp_path)
    texts = DISAGREE + ["<table> <TABLE> a\n\n\nb <unused2>x", "a    b\t\tc", "\n" * 40]
    ours = Tokenizer.from_dir(directory)
    assert ours.source.endswith("tokenizer.json")
    _assert_same_rows(ours.encode(texts), _hf_ids(transformers.Siglip2Tokenizer.from_pretrained(directory, **HF_BUILD), texts), texts)
    auto = transformers.AutoTokenizer.from_pretrained(directory, **HF_BUILD)  # a plain Gemma tokenizer here
    python_lower = Tokenizer.from_dir(directory, lowercase="python").encode(texts)
    _assert_same_rows(python_lower, _hf_ids(auto, [t.lower() for t in texts]), texts)
    # the two files do disagree here: the .model alone gives other ids for many of these texts
    model_only = Tokenizer.from_dir(vocab_dirs["model"]).encode(texts)
    assert (model_only != ours.encode(texts)).any(axis=1).sum() >= 20


def test_added_tokens_of_tokenizer_config_are_added(vocab_dirs, tmp_path):
    decoder = {"27": {"content": "<table>", "special": False, "normalized": True, "lstrip": False, "rstrip": False,
                      "single_word": False},
               "4100": {"content": "<new_tag>", "special": True, "normalized": False, "lstrip": False,
                        "rstrip": False, "single_word": False}}
    directory = _hub_dir_whose_files_disagree(vocab_dirs, tmp_path, decoder)
    texts = ["a <table> b <TABLE> c </table> <new_tag>", "<NEW_TAG><table>"] + DISAGREE[:200]
    ours = Tokenizer.from_dir(directory).encode(texts)
    _assert_same_rows(ours, _hf_ids(transformers.Siglip2Tokenizer.from_pretrained(directory, **HF_BUILD), texts), texts)
    table = Tokenizer.from_dir(vocab_dirs["model"]).encode(["<table>"])[0, 0]
    assert (ours[0] == table).sum() == 2  # "<table>" and "<TABLE>" whole again (a normalized added token)


@pytest.mark.slow
def test_real_vocabulary_directory_with_both_files(tmp_path):
    """The real vocabulary, its tokenizer.json stripped of tag, whitespace and unused added tokens (as an
    older conversion left it), beside the tokenizer.model: ours follow transformers, i.e. the json."""
    import json

    path = Path(os.environ.get("SIGLIP2_TOKENIZER", REAL_VOCAB))
    if not path.is_file():
        pytest.skip(f"real Gemma tokenizer.model not found at {path} (set $SIGLIP2_TOKENIZER to run this)")
    from_model = transformers.GemmaTokenizer.from_pretrained(_dir_with(path, tmp_path / "model"), **HF_BUILD)
    from_model.save_pretrained(tmp_path / "both")
    shutil.copy(path, tmp_path / "both" / "tokenizer.model")
    dropped = lambda t: t.startswith(("<unused", "<table", "</table", "<t")) or not t.strip("\n\t ▁")  # noqa: E731
    data = json.loads((tmp_path / "both" / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if not dropped(t["content"])]
    (tmp_path / "both" / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((tmp_path / "both" / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = [t for t in config.get("extra_special_tokens", []) if not dropped(t)]
    config.pop("vocab_file", None)
    (tmp_path / "both" / "tokenizer_config.json").write_text(json.dumps(config))
    texts = ["<table><tr><td>1</td></tr></table>", "<unused5> and <unused99>", "\n" * 40 + "x", "a\t\tb\t\t\tc",
             "line\n\n\nline", "A    B", "<start_of_turn>user"] + STRINGS[:300]
    hf = transformers.Siglip2Tokenizer.from_pretrained(tmp_path / "both", **HF_BUILD)
    ours = Tokenizer.from_dir(tmp_path / "both").encode(texts)
    _assert_same_rows(ours, _hf_ids(hf, texts), texts)
    model_only = _hf_ids(from_model, [t.lower() for t in texts[:7]])  # ASCII: lowercased either way
    assert (model_only != ours[:7]).any(axis=1).sum() >= 3  # the files disagree on these


def _dir_with(model: Path, directory: Path) -> Path:
    directory.mkdir()
    shutil.copy(model, directory / "tokenizer.model")
    return directory

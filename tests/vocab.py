"""A small Gemma-like SentencePiece vocabulary trained in the test session (the real one cannot be
downloaded): Gemma's special ids (pad 0, eos 1, bos 2, unk 3), byte fallback, user-defined whitespace and
newline runs and tags, no dummy prefix, identity normalization; BPE over a multilingual corpus."""

from __future__ import annotations

import random
from pathlib import Path

PAD, EOS, BOS, UNK = 0, 1, 2, 3

# Gemma's vocabulary starts with user-defined pieces like these (tags, whitespace and newline runs).
USER_DEFINED = (
    ["<mask>", "[@BOS@]", "<start_of_turn>", "<end_of_turn>"]
    + [f"<unused{i}>" for i in range(4)]
    + ["\n" * n for n in range(1, 9)]
    + ["▁" * n for n in range(2, 9)]
    + ["<table>", "</table>", "<b>", "<h1>"]
)

WORDS = {
    "latin": "the a photo of cat dog garden with flowers café naïve über straße façade crème brûlée élève "
    "niño señor año ação coração são paulo łódź kraków żółw ærø øresund".split(),
    "cyrillic": "привет мир фотография кошки собака дом улица москва книга ёж".split(),
    "greek": "γειά σου κόσμε φωτογραφία γάτα σκύλος οδός αθήνα".split(),
    "cjk": "猫的照片 一只狗 东京 日本語 こんにちは 世界 カタカナ 한국어 사진 고양이".split(),
    "arabic": "صورة قطة كلب مرحبا بالعالم القاهرة".split(),
    "hindi": "नमस्ते दुनिया बिल्ली की तस्वीर कुत्ता".split(),
}
ALPHABETS = {
    "latin": "abcdefghijklmnopqrstuvwxyz" * 3 + "àáâäãåçèéêëìíîïñòóôöõùúûüýÿßøæœłżźćńśąę",
    "cyrillic": "".join(map(chr, range(0x430, 0x450))),
    "greek": "".join(map(chr, range(0x3B1, 0x3CA))) + "άέήίόύώ",
    "cjk": "".join(map(chr, range(0x4E00, 0x4E00 + 300))) + "".join(map(chr, range(0x3041, 0x3097))),
    "hangul": "".join(map(chr, range(0xAC00, 0xAC00 + 200))),
    "arabic": "".join(map(chr, range(0x627, 0x64B))),
    "hindi": "".join(map(chr, range(0x905, 0x939))) + "".join(map(chr, range(0x93E, 0x94D))),
}
EMOJI = ["😀", "🐱", "🐶", "🚀", "❤️", "👍🏽", "🇫🇷", "👩‍👩‍👧"]
PUNCTUATION = list(",.!?;:()[]\"'-_/@#%&*+=") + ["...", "--", "«", "»", "¿", "¡", "—", "“", "”"]


def corpus(rng: random.Random, lines: int) -> list[str]:
    """Sentences over real words and made-up words (for a few thousand BPE merges) in many scripts."""
    lexicon = {
        script: WORDS.get(script, []) + ["".join(rng.choices(letters, k=rng.randint(1, 7))) for _ in range(400)]
        for script, letters in ALPHABETS.items()
    }

    def sentence() -> str:
        script = rng.choice(list(lexicon))
        words = []
        for _ in range(rng.randint(1, 15)):
            kind = rng.random()
            if kind < 0.75:  # Zipf-like word frequencies
                words.append(lexicon[script][min(int(rng.paretovariate(1.0)) - 1, len(lexicon[script]) - 1)])
            elif kind < 0.85:
                words.append(str(rng.randint(0, 10000)))
            elif kind < 0.95:
                words.append(rng.choice(PUNCTUATION))
            else:
                words.append(rng.choice(EMOJI))
        text = " ".join(words)
        return text.capitalize() if rng.random() < 0.2 else text

    return [sentence() for _ in range(lines)]


def train_gemma_like_tokenizer(directory: Path) -> Path:
    """Writes directory/tokenizer.model (4000 pieces) and returns its path."""
    import sentencepiece

    directory.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(random.Random(0), 30_000)),
        model_prefix=str(directory / "tokenizer"),
        model_type="bpe",
        vocab_size=4000,
        character_coverage=0.9995,  # rare characters fall back to bytes
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        user_defined_symbols=USER_DEFINED,
        pad_id=PAD, eos_id=EOS, bos_id=BOS, unk_id=UNK,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        minloglevel=2,
    )  # fmt: skip
    return directory / "tokenizer.model"

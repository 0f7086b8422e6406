"""The generated text: a lexicon of pseudo-words per script, a Zipf-Mandelbrot word stream over it, and the
sentences, paragraphs and headings laid out around that stream. Part of the generator (`data.generator`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flannel_repro.data import draws
from flannel_repro.data.vocabulary import (
    ARMENIAN_LOWER,
    BLOCKS,
    CYRILLIC_LOWER,
    EXT_A_LOWER,
    GREEK_LOWER,
    LATIN1_LOWER,
    VariantSpec,
    capitalise,
)


# --- the lexicon ---------------------------------------------------------------------------------

_CONSONANTS = "tnsrhldcmfpgwybvkxjqz"
_VOWELS = "eaoiu"
_DIPHTHONGS = ("ea", "ou", "ai", "ie", "ee", "oo", "io", "au")
_CLUSTERS = (
    "th",
    "st",
    "tr",
    "ch",
    "sh",
    "pr",
    "br",
    "gr",
    "pl",
    "cl",
    "fr",
    "wh",
    "sp",
    "sc",
    "bl",
    "dr",
    "gl",
    "cr",
    "fl",
    "sl",
)
_SYLLABLES = {1: 30, 2: 38, 3: 22, 4: 10}
_ONSET = {0: 15, 1: 75, 2: 10}  # no onset, one consonant, a cluster
_WORD_LEN = draws.poisson_table(3.0, 2, 2, 12)  # letters of a word in the non-Latin alphabetic scripts
_TAIL_WORD_LEN = {1: 30, 2: 45, 3: 25}
_ACCENT_RATE = 0.22  # share of an accented word's letters replaced by an accented letter
_NAME_RATE = 0.05  # share of Latin words that are names (always capitalised)

# Alphabet of each non-Latin script, and the exponent of its Zipf letter distribution.
_SCRIPT_LETTERS: dict[str, list[int]] = {
    "greek": GREEK_LOWER,
    "cyrillic": CYRILLIC_LOWER,
    "armenian": ARMENIAN_LOWER,
    "hebrew": BLOCKS["hebrew"],
    "arabic": BLOCKS["arabic"],
    "devanagari": BLOCKS["devanagari"],
    "thai": BLOCKS["thai"],
    "georgian": BLOCKS["georgian"],
    "hiragana": BLOCKS["hiragana"],
    "katakana": BLOCKS["katakana"],
}
_LETTER_ZIPF_S = 1.0

# How deep in the frequency ranking each script's words sit (rank key = uniform * penalty * length).
_RANK_PENALTY = {"latin": 1.0, "latin_acc": 3.0, "greek": 6.0, "cyrillic": 6.0, "tail": 40.0}
_OTHER_PENALTY = 20.0
_WORD_ZIPF_S = 1.0
_WORD_ZIPF_Q = 2.7


@dataclass(frozen=True)
class Lexicon:
    words: list[str]  # in rank order: words[0] is the most frequent
    scripts: list[str]


def _latin_word(d: draws.Draws, tabs: dict[str, tuple[list, list[float]]]) -> str:
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


def build_lexicon(spec: VariantSpec, vocab_set: set[str]) -> Lexicon:
    """Pseudo-words of every script, unique, ranked by frequency (most frequent first)."""
    tabs: dict[str, tuple[list, list[float]]] = {
        "syllables": draws.table_cdf(_SYLLABLES),
        "onset": draws.table_cdf(_ONSET),
        "consonant": (list(_CONSONANTS), draws.zipf_cdf(len(_CONSONANTS), 1.1, 1.5).tolist()),
        "cluster": (list(_CLUSTERS), draws.zipf_cdf(len(_CLUSTERS), 1.0).tolist()),
        "vowel": (list(_VOWELS), draws.zipf_cdf(len(_VOWELS), 0.9, 1.5).tolist()),
        "diphthong": (list(_DIPHTHONGS), draws.zipf_cdf(len(_DIPHTHONGS), 1.0).tolist()),
    }
    len_keys, len_cdf = draws.table_cdf(_WORD_LEN)

    # Accented letters: Latin-1 first, then Latin Extended-A where the vocabulary has it; each group in a
    # seeded order, Zipf-distributed over the concatenation.
    shuf = draws.rng(spec, draws.SHUFFLE)
    groups = [LATIN1_LOWER, EXT_A_LOWER]
    accents: list[str] = []
    for group in groups:
        members = [chr(c) for c in group if chr(c) in vocab_set]
        accents.extend(members[i] for i in draws.permutation(shuf, len(members)))
    accent_cdf = draws.zipf_cdf(len(accents), 1.05).tolist()

    alphabets: dict[str, tuple[list[str], list[float]]] = {}
    for script, codes in _SCRIPT_LETTERS.items():
        chars = [chr(c) for c in codes]
        order = draws.permutation(shuf, len(chars))
        alphabets[script] = ([chars[i] for i in order], draws.zipf_cdf(len(chars), _LETTER_ZIPF_S).tolist())

    words: dict[str, str] = {}  # word -> script; insertion-ordered, so deterministic
    for k, (script, count) in enumerate(spec.lexicon):
        d = draws.Draws(draws.rng(spec, draws.LEXICON, k))
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
                    w = capitalise(w)
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
    trng = draws.rng(spec, draws.LEXICON, 1_000)
    n = spec.n_tail_slots
    seq = np.concatenate(
        [
            draws.permutation(trng, n),
            draws.permutation(trng, n)[draws.sample(trng, draws.zipf_cdf(n, 0.8), int(0.3 * n))],
        ]
    )
    tl_keys, tl_cdf = draws.table_cdf(_TAIL_WORD_LEN)
    lengths = np.asarray(tl_keys)[draws.sample(trng, np.asarray(tl_cdf), len(seq))]
    pos = 0
    for length in lengths.tolist():
        if pos >= len(seq):
            break
        w = "".join(chr(0xE000 + int(s)) for s in seq[pos : pos + length])
        pos += length
        words.setdefault(w, "tail")

    # Ranking: Latin and short words first, accented/foreign words deeper, tail words deepest.
    items = list(words.items())
    u = draws.rng(spec, draws.RANKS).random(len(items))
    penalty = np.array([_RANK_PENALTY.get(s, _OTHER_PENALTY) for _, s in items])
    length = np.array([len(w) for w, _ in items], dtype=np.float64)
    order = np.argsort(u * penalty * length**1.2, kind="stable")
    return Lexicon(words=[items[i][0] for i in order], scripts=[items[i][1] for i in order])


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
_SENT_LEN = draws.poisson_table(10.0, 2, 3, 40)
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


def word_stream(spec: VariantSpec, lex: Lexicon) -> np.ndarray:
    """Lexicon indices of the running text: Zipf-Mandelbrot draws, plus one of every unseen word."""
    n_words = len(lex.words)
    cdf = draws.zipf_cdf(n_words, _WORD_ZIPF_S, _WORD_ZIPF_Q)
    lengths = np.array([len(w) for w in lex.words], dtype=np.float64)
    mean_len = float(np.dot(np.diff(cdf, prepend=0.0), lengths)) + 1.0
    big = int(spec.n_chars / mean_len * 1.5) + 1000
    stream = draws.sample(draws.rng(spec, draws.STREAM), cdf, big)
    need = np.searchsorted(np.cumsum(lengths[stream] + 1.0), spec.n_chars * _LENGTH_MARGIN) + 1
    stream = stream[:need]
    head = int(_COVERAGE_SHARE * len(stream))
    seen = np.bincount(stream[:head], minlength=n_words) > 0
    missing = np.flatnonzero(~seen)
    crng = draws.rng(spec, draws.COVERAGE)
    missing = missing[draws.permutation(crng, len(missing))]
    where = np.sort(np.floor(crng.random(len(missing)) * head).astype(np.int64))
    return np.insert(stream, where, missing)


def layout_text(spec: VariantSpec, lex: Lexicon, stream: np.ndarray) -> str:
    """Sentences, paragraphs and headings around the word stream; returns the (uncut) text."""
    rng = draws.rng(spec, draws.LAYOUT)
    n = len(stream)

    def table(t: dict[int, int], size: int) -> list[int]:
        keys, cdf = draws.table_cdf(t)
        return np.asarray(keys)[draws.sample(rng, np.asarray(cdf), size)].tolist()

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
    d = draws.Draws(rng)
    digit_keys, digit_cdf = draws.table_cdf(_DIGITS)
    first_keys, first_cdf = draws.table_cdf(_FIRST_DIGIT)

    words = lex.words
    capitals = [capitalise(w) for w in words]
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
            h = ids[i : i + heading_len[pi]]
            i += len(h)
            paragraphs.append(" ".join(capitals[w] for w in h))
            if i >= n:
                break
        for _ in range(para_sent[pi]):
            if i >= n:
                break
            sent = ids[i : i + sent_len[si]]
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

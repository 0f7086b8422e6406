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

The files this makes are the embedded data sets (`data.embedded`): `render` gives their bytes; the parts
are `data.vocabulary` (variants, characters), `data.draws` (seeded draws) and `data.text` (the text).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from flannel_repro.data import draws
from flannel_repro.data import files as data
from flannel_repro.data.text import build_lexicon, layout_text, word_stream
from flannel_repro.data.vocabulary import UNK_TOKEN, tail_pool, variant_spec, vocabulary
from flannel_repro.errors import DataError

__all__ = [
    "CORPUS_FILE",
    "FILE_NAMES",
    "MASK_FILE",
    "TOKENIZER_FILE",
    "GeneratedData",
    "corpus_stats",
    "generate",
    "render",
    "tokenizer_json",
]

TOKENIZER_FILE = "tokenizer.json"
CORPUS_FILE = "corpus.txt"
MASK_FILE = "live_dead_tokens.safetensors"
FILE_NAMES = (TOKENIZER_FILE, CORPUS_FILE, MASK_FILE)


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
    lex = build_lexicon(spec, vocab_set)
    text = layout_text(spec, lex, word_stream(spec, lex))
    if len(text) < spec.n_chars:
        raise AssertionError(f"{variant}: the generated text has {len(text)} characters, fewer than {spec.n_chars}")

    # Cut to the exact length (ending in a newline) and work on code points.
    cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")[: spec.n_chars].copy()
    cps[-1] = 0x0A
    is_slot = (cps >= 0xE000) & (cps < 0xE000 + spec.n_tail_slots)
    core_live = np.unique(cps[~is_slot])
    used_slots = np.unique(cps[is_slot]) - 0xE000
    needed = spec.n_live - len(core_live)
    pool = tail_pool(spec, vocab)
    if not 0 < needed <= min(len(used_slots), len(pool)):
        raise AssertionError(
            f"{variant}: need {needed} live tail characters; {len(used_slots)} slots used, pool of {len(pool)}"
        )

    # Map the used slots onto `needed` distinct tail characters: the first `needed` slots (in a seeded
    # order) one to one, the remaining slots onto random ones of those (merging their counts).
    trng = draws.rng(spec, draws.TAIL_MAP)
    chosen = np.asarray(pool, dtype=np.uint32)[np.sort(draws.permutation(trng, len(pool))[:needed])]
    slots = used_slots[draws.permutation(trng, len(used_slots))]
    target = np.empty(len(slots), dtype=np.uint32)
    target[:needed] = chosen[draws.permutation(trng, needed)]
    target[needed:] = chosen[np.minimum((trng.random(len(slots) - needed) * needed).astype(np.int64), needed - 1)]
    lut = np.zeros(spec.n_tail_slots, dtype=np.uint32)
    lut[slots] = target
    cps[is_slot] = lut[cps[is_slot] - 0xE000]
    corpus = cps.astype("<u4").tobytes().decode("utf-32-le")

    live = set(np.unique(cps).tolist())
    if len(corpus) != spec.n_chars or len(live) != spec.n_live or not live <= {ord(c) for c in vocab_set}:
        raise AssertionError(
            f"{variant}: generated corpus has {len(corpus)} characters and {len(live)} live "
            f"entries; expected {spec.n_chars} and {spec.n_live}, all in the vocabulary"
        )
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
        "added_tokens": [
            {
                "id": 0,
                "content": UNK_TOKEN,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": False},
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
        raise DataError(
            f"generated tokenizer of {variant!r} has {tok.get_vocab_size()} entries, expected {gen.vocab_size}."
        )
    ids = data.tokenize(tok, gen.corpus, vocab_size=gen.vocab_size, source=f"generated corpus {variant!r}")
    if len(ids) != len(gen.corpus) or bool((ids == 0).any()):
        raise DataError(
            f"generated tokenizer of {variant!r} does not map the corpus one id per character "
            f"({len(ids)} ids for {len(gen.corpus)} characters, {int((ids == 0).sum())} unknown)."
        )
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


def corpus_stats(corpus: str, vocab_size: int, top: int = 10) -> dict[str, Any]:
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

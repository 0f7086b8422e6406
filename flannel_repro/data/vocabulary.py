"""The embedded data's variants and their vocabularies: the size and seed of each variant, the characters of its
vocabulary in id order, and the letters and case of the scripts the generated text is written in.

Every code point is listed explicitly (all assigned since Unicode 1.1), so nothing depends on the
`unicodedata` version. Part of the generator (`data.generator`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from flannel_repro.errors import DataError

UNK_TOKEN = "[UNK]"


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
        name="default",
        vocab_size=10_000,
        n_chars=1_371_328,
        n_live=6_301,
        seed=20_240_601,
        blocks=(
            "latin1",
            "latin_ext_a",
            "latin_ext_b",
            "greek",
            "cyrillic",
            "armenian",
            "hebrew",
            "arabic",
            "devanagari",
            "thai",
            "georgian",
            "gen_punct",
            "hiragana",
            "katakana",
        ),
        tail_blocks=(("hangul", 1_000), ("cjk", None)),
        lexicon=(
            ("latin", 30_000),
            ("latin_acc", 6_000),
            ("greek", 1_500),
            ("cyrillic", 2_500),
            ("armenian", 250),
            ("hebrew", 250),
            ("arabic", 250),
            ("devanagari", 250),
            ("thai", 250),
            ("georgian", 250),
            ("hiragana", 350),
            ("katakana", 350),
        ),
        n_tail_slots=6_200,
    ),
    "tiny": VariantSpec(
        name="tiny",
        vocab_size=512,
        n_chars=40_000,
        n_live=320,
        seed=20_240_602,
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
BLOCKS: dict[str, list[int]] = {
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
LATIN1_LOWER = [c for c in _span(0xDF, 0xFF) if c != 0xF7]
EXT_A_LOWER = (
    [c for c in _span(0x100, 0x137) if c % 2 == 1]
    + [0x138]
    + [c for c in _span(0x139, 0x148) if c % 2 == 0]
    + [c for c in _span(0x14A, 0x177) if c % 2 == 1]
    + [c for c in _span(0x179, 0x17E) if c % 2 == 0]
    + [0x17F]
)
GREEK_LOWER = _span(0x3AC, 0x3CE)
CYRILLIC_LOWER = _span(0x430, 0x45F)
ARMENIAN_LOWER = _span(0x561, 0x586)


def _upper_map() -> dict[str, str]:
    pairs: dict[int, int] = {c: c - 32 for c in range(ord("a"), ord("z") + 1)}
    pairs.update({c: c - 32 for c in _span(0xE0, 0xFE) if c != 0xF7})
    pairs.update({c: c - 1 for c in EXT_A_LOWER if c not in (0x138, 0x17F)})
    pairs.update({c: c - 32 for c in _span(0x3B1, 0x3CB) if c != 0x3C2})
    pairs.update({0x3AC: 0x386, 0x3AD: 0x388, 0x3AE: 0x389, 0x3AF: 0x38A, 0x3CC: 0x38C, 0x3CD: 0x38E, 0x3CE: 0x38F})
    pairs.update({c: c - 32 for c in _span(0x430, 0x44F)})
    pairs.update({c: c - 80 for c in _span(0x450, 0x45F)})
    pairs.update({c: c - 48 for c in ARMENIAN_LOWER})
    return {chr(k): chr(v) for k, v in pairs.items()}


_UPPER = _upper_map()


def vocabulary(variant: str) -> list[str]:
    """The variant's vocabulary in id order: ``[UNK]`` (id 0), then characters by code point."""
    spec = variant_spec(variant)
    points = [0x0A, 0x20, *BLOCKS["ascii"]]
    for name in spec.blocks:
        points.extend(BLOCKS[name])
    for name, count in spec.tail_blocks:
        room = spec.vocab_size - 1 - len(points)
        take = room if count is None else min(count, room)
        points.extend(BLOCKS[name][:take])
    if len(points) != spec.vocab_size - 1 or len(set(points)) != len(points):
        raise AssertionError(f"vocabulary of {variant!r} is malformed ({len(points)} characters)")
    return [UNK_TOKEN] + [chr(c) for c in sorted(points)]


def tail_pool(spec: VariantSpec, vocab: Sequence[str]) -> list[int]:
    """Code points of the vocabulary that the tail words' placeholders may be mapped onto."""
    members = {c for name, _ in spec.tail_blocks for c in BLOCKS[name]}
    return [ord(ch) for ch in vocab[1:] if ord(ch) in members]


def capitalise(word: str) -> str:
    return _UPPER.get(word[0], word[0]) + word[1:] if word else word

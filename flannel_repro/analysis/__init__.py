"""Analysis: reading runs and judging them.

- `trajectory`: the read-only view of one run;
- `divergence`: distances between runs, step by step, streaming;
- `summary`: run and pair summaries, digest chains, and their comparison;
- `assertions`: the determinism claims' helpers (`assert_identical`, ...);
- `bounds`, `noise`: divergence bounds from held-out seeds, noise bands from arithmetic variants.
"""

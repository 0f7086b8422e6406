"""Analysis: reading runs and judging them.

- `trajectory`: the read-only view of one run;
- `divergence`: distances between runs, step by step, streaming (one kernel: `pair_kernel`; runs
  opened through `readers`); `bitwise`: first divergent steps and per-step update counts;
- `summary`: run and pair summaries and their text; `chain`: digest chains; `provenance`: what a
  summary records about a run's config, data and environment; `compare`: comparing summaries within
  a tolerance, and the report;
- `assertions`: the determinism claims' helpers (`assert_identical`, ...);
- `bounds`, `noise`: divergence bounds from held-out seeds, noise bands from arithmetic variants.
"""

"""Training: the notebook's model and its runs.

- `model`, `head`: the GPT-2 of the notebook and the fused LM head + loss;
- `harness`: `train()`, with the transformers Trainer engine and the lean torch engine;
- `recorder`: streams every step's W, loss and digest into the run's artifact;
- `determinism`, `numerics`, `allocator`: the switches and probes that decide (and record) the bits;
- `store`: train once, share everywhere (file locks, run keys, pruning);
- `variants`: the same run under other arithmetic, in fresh processes, to measure noise bands.
"""

"""Training: the notebook's model and its runs.

- `model`, `head`: the GPT-2 of the notebook and the fused LM head + loss;
- `harness`: `train()`, with the transformers Trainer engine and the lean torch engine;
- `run_recorder`: streams every step's W, loss and digest into the run's artifact;
- `own_training`: recording your own training loop or Trainer (`TrajectoryRecorder`, `FlannelCallback`);
- `engines`, `resume`: registered engines of your own; stopping and resuming a run in fresh processes;
- `determinism`, `numerics`, `allocator`: the switches and probes that decide (and record) the bits;
- `planted_nondeterminism`: nondeterminism planted on purpose, for testing the suite.

Training and judging runs together (the run store, noise-band variants, replay) is `flannel_repro.runs`.
"""

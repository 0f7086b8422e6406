"""Runs: orchestrating training and judging, above `training` and `analysis`.

- `store`: train once, share everywhere (run keys, file locks, reuse, the session's leftovers);
- `prune`: which files of an artifacts directory are the store's, and pruning those no run can reuse;
- `variants`: the same run under other arithmetic, in fresh processes, to measure noise bands;
- `replay`: replaying a step operation by operation, to find the first operation two runs differ in.
"""

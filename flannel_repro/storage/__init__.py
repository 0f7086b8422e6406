"""Storage: run artifacts on disk.

- `format`: the on-disk format (safetensors header, dtype names, `TensorSpec`, digests and checksums);
- `writer`: `ArtifactWriter`, pre-sized, written in place, published atomically;
- `reader`: `ArtifactReader`, positional reads and memory maps;
- `partials`: the temporary names artifacts are written under, and the cleanup of those killed writers left;
- `layout`: what one run's artifact holds (tensor names, metadata keys, the config and data records);
- `export`: the original notebook's single-file layout.
"""

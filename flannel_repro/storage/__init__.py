"""Storage: run artifacts on disk.

- `stream`: the safetensors writer (pre-sized, written in place, published atomically) and reader
  (positional reads, memory maps);
- `layout`: what one run's artifact holds (tensor names, metadata keys, the config and data records);
- `export`: the original notebook's single-file layout.
"""

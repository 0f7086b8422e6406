"""Data: the files a run trains on (tokenizer, corpus, live/dead mask), the embedded data set and its
generator, and the seeded example order.

- `files`: hashing, the token-id cache, loading and checking the tokenizer, corpus and mask;
- `embedded`: the embedded default and tiny data sets as files: their recorded hashes, verification and cache;
- `generator`: makes the embedded data (from `vocabulary`: variants and characters, `draws`: seeded draws, and
  `text`: the synthetic text); `generate_cli`: the command that writes or checks the committed files;
- `corpus`: the data one run needs (`load_data`) and the order in which it sees examples (`DataOrder`).
"""

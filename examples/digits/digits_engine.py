"""A small MLP classifier on scikit-learn's handwritten digits, registered as a flannel-repro engine.

The data (1,797 8x8 greyscale images of the digits 0-9, from the UCI repository) ships inside
scikit-learn (`sklearn.datasets.load_digits`): nothing is downloaded. The model is 64 -> hidden -> 10
with ReLU and dropout (dropout draws from torch's global generator, so resuming must restore it), trained
with AdamW on cross-entropy. The data order is a pure function of (data_seed, step), like the Flannel 6
runs' `DataOrder`: epoch e is a permutation from a generator seeded with (data_seed, e), cut into batches.
"""

from __future__ import annotations

import functools
import hashlib

import torch

from flannel_repro import register_engine

ENGINE = "digits-mlp"
DEFAULTS = {"hidden": 32, "dropout": 0.1, "lr": 0.01, "weight_decay": 0.01, "batch_size": 64}


@functools.lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 64) float32 in [0, 1], labels (N,) int64)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.int64)


def digits_hashes() -> dict[str, str]:
    """The data's content hash: it enters the run key, so another version of the data set trains anew."""
    x, y = digits()
    return {"digits_sha256": hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()}


def batch_indices(n: int, batch_size: int, data_seed: int, step: int) -> torch.Tensor:
    """The examples of optimizer step `step` (1-based); the last partial batch of an epoch is dropped."""
    per_epoch = n // batch_size
    epoch, i = divmod(step - 1, per_epoch)
    g = torch.Generator().manual_seed(data_seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)[i * batch_size : (i + 1) * batch_size]  # (B,)


@register_engine(ENGINE, steps=60, params=DEFAULTS, data=digits_hashes)
def train_digits(run) -> None:
    p = run.params
    x, y = digits()
    torch.manual_seed(run.model_seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, p["hidden"]),
        torch.nn.ReLU(),
        torch.nn.Dropout(p["dropout"]),
        torch.nn.Linear(p["hidden"], 10),
    )
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
    tensors = {"fc1.weight": model[0].weight, "fc2.weight": model[3].weight}
    with run.recorder(
        tensors, optimizer=opt, batch_size=p["batch_size"], state={"model": model, "optimizer": opt}
    ) as rec:
        for step in range(rec.start + 1, run.steps + 1):
            idx = batch_indices(len(y), p["batch_size"], run.data_seed, step)  # (B,)
            logits = model(x[idx])  # (B, 10)
            loss = torch.nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(loss=loss.item(), batch=idx)

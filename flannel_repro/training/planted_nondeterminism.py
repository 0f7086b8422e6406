"""Nondeterminism planted on purpose: testing helpers that prove the suite catches what it claims to.

Each is a context manager; every model built (and every data order drawn) inside it carries the plant,
so any run trained or replayed inside is affected:

    with planted_noise("transformer.h.0.mlp.c_fc"):
        a = train(config, "a.safetensors"); b = train(config, "b.safetensors")   # same seed, twice
    assert_identical(a, b)   # fails: the planted op made them part

- `planted_noise(module)`: the module's output gets a one-ulp nudge on a random ~1% of its elements,
  drawn from a generator seeded from the operating system (noise at the last bit);
- `planted_reduction_order(module)`: a GPT-2 `Conv1D` (c_attn, c_proj, c_fc) computes its matmul as a
  sum of partial products over chunks of its input dimension, added in an order drawn from an
  unseeded generator (the classic nondeterministic reduction);
- `unseeded_data_order()`: the example order is drawn from an unseeded generator instead of `data_seed`.

The planted operations run inside the module's own forward, so the first-divergent-operation report
(`flannel_repro.runs.replay`) attributes them to it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from flannel_repro.errors import ConfigError
from flannel_repro.training import model as model_module


def _unseeded(device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.seed()  # from the operating system's entropy: different in every process and every call
    return g


@contextlib.contextmanager
def _on_build(plant: Callable[[torch.nn.Module], None]) -> Iterator[None]:
    model_module.BUILD_HOOKS.append(plant)
    try:
        yield
    finally:
        model_module.BUILD_HOOKS.remove(plant)


def _submodule(model: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        known = ", ".join(n for n, _ in model.named_modules() if n.count(".") <= 4 and n)
        raise ConfigError(f"plant: the model has no module {name!r}; it has: {known}.") from None


def _wrap_forward(module: torch.nn.Module, new: Callable[..., Any]) -> None:
    original = module.forward
    module.forward = lambda *args, **kwargs: new(original, *args, **kwargs)


@contextlib.contextmanager
def planted_noise(module: str, *, fraction: float = 0.01) -> Iterator[None]:
    """`module`'s output moves by one ulp at a random `fraction` of its elements, in every forward."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"planted_noise: fraction must be in (0, 1], got {fraction}.")

    def plant(model: torch.nn.Module) -> None:
        target = _submodule(model, module)
        g = _unseeded(next(model.parameters()).device)

        def forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                raise ConfigError(f"planted_noise: {module!r} returns {type(out).__name__}, not a floating tensor.")
            mask = torch.rand(out.shape, generator=g, device=out.device) < fraction
            ulp = torch.nextafter(out.detach(), torch.full_like(out.detach(), float("inf"))) - out.detach()
            return out + torch.where(mask, ulp, torch.zeros_like(ulp))

        _wrap_forward(target, forward)

    with _on_build(plant):
        yield


@contextlib.contextmanager
def planted_reduction_order(module: str, *, chunks: int = 8) -> Iterator[None]:
    """`module` (a GPT-2 Conv1D) sums its partial products over `chunks` slices of its input in a random order."""

    def plant(model: torch.nn.Module) -> None:
        target = _submodule(model, module)
        weight, bias = getattr(target, "weight", None), getattr(target, "bias", None)
        if weight is None or bias is None or weight.dim() != 2:
            raise ConfigError(f"planted_reduction_order: {module!r} is not a Conv1D/linear layer with weight and bias.")
        g = _unseeded(weight.device)
        n_in = weight.shape[0]
        if not 1 < chunks <= n_in:
            raise ConfigError(f"planted_reduction_order: chunks must be in 2..{n_in}, got {chunks}.")
        bounds = torch.linspace(0, n_in, chunks + 1).round().to(torch.long).tolist()

        def forward(original: Callable[..., Any], x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1])
            order = torch.randperm(chunks, generator=g, device=weight.device).tolist()
            total = None
            for c in order:
                lo, hi = bounds[c], bounds[c + 1]
                part = flat[:, lo:hi] @ weight[lo:hi, :]
                total = part if total is None else total + part
            return (total + bias).reshape(*x.shape[:-1], weight.shape[1])

        _wrap_forward(target, forward)

    with _on_build(plant):
        yield


@contextlib.contextmanager
def unseeded_data_order() -> Iterator[None]:
    """Every DataOrder draws its epochs' permutations from an unseeded generator (data_seed is ignored)."""
    from flannel_repro.data.corpus import DataOrder

    original = DataOrder.permutation

    def permutation(self: DataOrder, epoch: int = 0) -> torch.Tensor:
        cache = self.__dict__.setdefault("_unseeded_perms", {})
        if epoch not in cache:
            cache.clear()
            cache[epoch] = torch.randperm(self.n_examples, generator=_unseeded(torch.device("cpu")))
        return cache[epoch]

    DataOrder.permutation = permutation  # type: ignore[method-assign]
    try:
        yield
    finally:
        DataOrder.permutation = original  # type: ignore[method-assign]

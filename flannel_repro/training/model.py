"""GPT2LMHeadModel exactly as the notebook builds it, with the shared initial embedding matrix W."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel

    from flannel_repro.config import RunConfig

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

# Called with every model `build_model` makes, after W is in place: how
# `flannel_repro.training.planted_nondeterminism` plants nondeterminism into a run on purpose (tests of the suite).
# Empty in normal use.
BUILD_HOOKS: list[Callable[["GPT2LMHeadModel"], None]] = []


def torch_dtype(name: str) -> torch.dtype:
    return TORCH_DTYPES[name]


def shared_init_W(config: "RunConfig") -> torch.Tensor:
    """W_initial (V, H) in the run's dtype: randn in float32 from `init_seed`, scaled, then cast.

    A private generator seeded with `init_seed` draws the same numbers as the notebook's
    `torch.manual_seed(INIT_SEED); torch.randn(...)`, without touching the global RNG. The CPU
    generator is used on every device, so W is bit-identical on every worker and device.
    """
    g = torch.Generator(device="cpu")
    g.manual_seed(config.init_seed)
    w32 = torch.randn(config.vocab_size, config.hidden_dim, dtype=torch.float32, generator=g) * config.init_scale
    return w32.to(torch_dtype(config.dtype))  # (V, H)


def build_model(config: "RunConfig", W_initial: torch.Tensor, device: str | torch.device = "cpu") -> "GPT2LMHeadModel":
    """The notebook's model: GPT-2 with dropout 0 and tied embeddings, every parameter but W drawn
    from `model_seed` (the notebook called torch.manual_seed(train_seed) right before building it)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    expected = (config.vocab_size, config.hidden_dim)
    if tuple(W_initial.shape) != expected:
        raise ValueError(
            f"W_initial has shape {tuple(W_initial.shape)}, expected (vocab_size, hidden_dim) = {expected}."
        )
    gpt_config = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.seq_len,
        n_embd=config.hidden_dim,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(config.model_seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence the harmless "loss_type=None ... unrecognized" notice
    try:
        model = GPT2LMHeadModel(gpt_config)
    finally:
        hf_logging.set_verbosity(verbosity)
    # transformers' PreTrainedModel.to is functools.wraps'd: typeshed types it as taking the model as argument 1
    model = model.to(torch_dtype(config.dtype)).to(device)  # type: ignore[arg-type]
    with torch.no_grad():
        model.transformer.wte.weight[:] = W_initial.to(device)
    # Tied embeddings: the LM head must be the very same Parameter as W, or recording W would miss
    # half of its updates.
    assert model.lm_head.weight is model.transformer.wte.weight
    for hook in BUILD_HOOKS:
        hook(model)
    return model


def embedding(model: "GPT2LMHeadModel") -> torch.Tensor:
    """W, the (V, H) token-embedding matrix (tied with the LM head)."""
    return model.transformer.wte.weight

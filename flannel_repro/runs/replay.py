"""Replay a run to a step and record every operation of that step; find the first divergent operation.

    log, _ = record_step(config, step=3)              # OpLog of optimizer step 3 (JSON: log.write(path))
    diff = first_divergent_operation(run_a, run_b)   # two artifacts (or two configs): why they part

A replay trains the run with the torch engine (`harness.TorchLoop`, the same arithmetic as `train()`,
bitwise equal to the hf engine on CPU) to step k - 1 without recording, then runs step k under
PyTorch's `DebugMode` (torch.utils._debug_mode, torch >= 2.10) with `record_nn_module=True`: its
dispatch hooks give every aten operation with its inputs before it runs and its outputs after, and its
module tracker (`ModTracker`) the module the operation runs in, forward or backward. We hash each
tensor's bytes (blake2b-128) instead of DebugMode's norm or XOR hashes: a one-ulp change must change
the hash. When an artifact is given, the replay's W before step k is checked against the artifact's
digest: a replay that does not reproduce the run is refused, not compared.

Replays in one process share its numerics (oneDNN and MKL read their settings once): to compare native
and portable numerics, write each side's log in its own process (`flannel-repro oplog`) and compare the
files (`flannel-repro why A.json B.json`), as across machines.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from flannel_repro.analysis.oplog import OpDiff, OpLog, OpRecord, OpTensor, compare_logs, ulp_distance
from flannel_repro.errors import ConfigError, DeterminismError
from flannel_repro.storage.format import digest_tensor

if TYPE_CHECKING:
    from flannel_repro.config import EngineRunConfig, RunConfig
    from flannel_repro.data.corpus import CorpusData


def _debug_mode() -> Any:
    try:
        from torch.utils._debug_mode import DebugMode
    except ImportError:
        raise ConfigError(
            f"recording operations needs torch >= 2.10 (torch.utils._debug_mode.DebugMode); this is "
            f"torch {torch.__version__}."
        ) from None
    return DebugMode


def _tensor(t: torch.Tensor) -> OpTensor:
    x = t.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    x = x.contiguous()
    if x.is_complex():
        x = torch.view_as_real(x)
    raw = x.reshape(-1).view(torch.uint8).numpy() if x.numel() else b""
    # numpy's stubs give ndarray a buffer (__buffer__) only for Python >= 3.12
    digest = hashlib.blake2b(memoryview(raw), digest_size=16).hexdigest()  # type: ignore[arg-type]
    absmax = float(x.abs().max().to(torch.float64)) if x.is_floating_point() and x.numel() else None
    return OpTensor(str(x.dtype).removeprefix("torch."), tuple(x.shape), digest, absmax)


def _shape_only(t: torch.Tensor) -> OpTensor:
    return OpTensor(str(t.dtype).removeprefix("torch."), tuple(t.shape), "undefined", None)


def _tensors(tree: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _plain(x: Any) -> Any:
    """Non-tensor arguments as stable text (objects such as generators by type only: their address moves)."""
    if isinstance(x, torch.Tensor):
        return "<T>"
    if isinstance(x, (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return repr(x)
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    return type(x).__name__


def _args_digest(args: Any, kwargs: Any) -> str:
    return hashlib.blake2b(repr((_plain(args), _plain(kwargs))).encode(), digest_size=8).hexdigest()


# Operations whose output holds whatever memory it was given (its bytes are not a result).
_UNINITIALISED = frozenset(
    {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted", "resize_"}
)
# In-place operations that overwrite their first argument without reading it.
_OVERWRITES = frozenset(
    {
        "copy_",
        "fill_",
        "zero_",
        "uniform_",
        "normal_",
        "random_",
        "bernoulli_",
        "exponential_",
        "geometric_",
        "log_normal_",
        "cauchy_",
        "set_",
    }
)


class _StepRecorder:
    """DebugMode hooks that turn one step's operations into OpRecords (and clone chosen outputs)."""

    def __init__(self, capture: set[int]) -> None:
        self.phase = "setup"
        self.entries: list[dict[str, Any]] = []
        self.capture = capture
        self.captured: dict[int, list[torch.Tensor]] = {}
        self.mode: Any = None

    @contextlib.contextmanager
    def in_phase(self, name: str) -> Iterator[None]:
        self.phase = name
        yield

    def name_roots(self, model: torch.nn.Module) -> None:
        """ModTracker names a module by the class of the module a call entered first, then the attribute
        path ('GPT2LMHeadModel.transformer.h.0', but 'GPT2Model.h.0' when code calls the body directly):
        map each class to where it sits in `model`, so every name is the module's path in the model."""
        self.roots: dict[str, str] = {}
        for name, module in model.named_modules():
            self.roots.setdefault(type(module).__name__, name)

    @contextlib.contextmanager
    def tagging_backward(self, model: torch.nn.Module) -> Iterator[None]:
        """Attribute backward operations to modules through the autograd graph: when a module's forward
        returns, every autograd node it created (reachable from its outputs, not yet tagged by an inner
        module) is tagged with the module's path; in backward, the node being run names the module.
        (ModTracker's own backward attribution follows gradient hooks and mislabels the operations of
        modules that pass gradients through, such as GPT-2's dropouts at p = 0.)"""
        names = {id(m): n for n, m in model.named_modules()}
        starts: list[int] = []  # per module call: the newest autograd node that existed when it began

        def newest(tensors: list[torch.Tensor]) -> int:
            seqs = [
                t.grad_fn._sequence_nr()
                for t in tensors
                if t.grad_fn is not None and type(t.grad_fn).__name__ != "AccumulateGrad"
            ]
            return max(seqs, default=-1)

        def before_forward(module: torch.nn.Module, inputs: Any) -> None:
            starts.append(newest(_tensors(inputs)))

        def after_forward(module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            start = starts.pop() if starts else -1
            name = names.get(id(module))
            if name is None:
                return
            stack: list[torch.autograd.graph.Node | None] = [
                t.grad_fn for t in _tensors(output) if t.grad_fn is not None
            ]
            seen: set[int] = set()
            while stack:  # the nodes this call created (newer than its inputs); inner modules' keep their tag
                node = stack.pop()
                if (
                    node is None
                    or id(node) in seen
                    or type(node).__name__ == "AccumulateGrad"
                    or node._sequence_nr() <= start
                ):
                    continue
                seen.add(id(node))
                # torch's stubs declare Node.metadata a method; on autograd nodes it is a dict attribute
                node.metadata.setdefault("flannel_module", name)  # type: ignore[attr-defined]
                stack.extend(fn for fn, _ in node.next_functions)

        handles = [
            torch.nn.modules.module.register_module_forward_pre_hook(before_forward),
            torch.nn.modules.module.register_module_forward_hook(after_forward),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _module(self) -> tuple[str, bool]:
        tracker = getattr(self.mode, "module_tracker", None)
        node = torch._C._current_autograd_node()
        if node is not None:  # in backward
            # torch's stubs declare Node.metadata a method; on autograd nodes it is a dict attribute
            return str(node.metadata.get("flannel_module", "")), True  # type: ignore[attr-defined]
        if tracker is None:
            return "", False
        names = [p for p in tracker.parents if p != "Global"]
        deepest = max(names, key=lambda n: (n.count("."), len(n)), default="")
        root, _, rest = deepest.partition(".")
        prefix = getattr(self, "roots", {}).get(root, "")
        return ".".join(p for p in (prefix, rest) if p), bool(tracker.is_bw)

    def pre(self, func: Any, types: Any, args: Any, kwargs: Any, call: Any) -> None:
        module, backward = self._module()
        name = str(func)
        packet = name.split(".")[1] if name.count(".") >= 2 else name
        # what an operation reads: not its out= buffers, nor the tensor an overwriting in-place op fills
        # (their bytes are whatever the allocator left there, different in every run)
        read_args = args[1:] if packet in _OVERWRITES else args
        read_kwargs = {k: v for k, v in kwargs.items() if k != "out"}
        # Allocations and views read their inputs' shapes and dtypes only; their outputs' bytes are not a result
        # (a view of a buffer that an out= operation fills later holds whatever the allocator left there).
        undefined = packet in _UNINITIALISED or bool(getattr(func, "is_view", False))
        self.entries.append(
            {
                "op": name,
                "phase": self.phase,
                "module": module,
                "bw": backward,
                "args": _args_digest(read_args, read_kwargs),
                "undefined": undefined,
                "in": [_shape_only(t) if undefined else _tensor(t) for t in _tensors((read_args, read_kwargs))],
                "out": [],
            }
        )
        return None

    def post(self, func: Any, types: Any, args: Any, kwargs: Any, result: Any) -> None:
        if not self.entries:
            return None
        entry = self.entries[-1]
        outs = _tensors(result)
        # an allocation's contents are undefined: its shape and dtype are logged, its bytes are not
        entry["out"] = [_shape_only(t) if entry["undefined"] else _tensor(t) for t in outs]
        index = len(self.entries) - 1
        if index in self.capture:
            self.captured[index] = [t.detach().to("cpu", copy=True) for t in outs]
        return None

    def records(self) -> list[OpRecord]:
        return [
            OpRecord(i, e["op"], e["phase"], e["module"], e["bw"], e["args"], tuple(e["in"]), tuple(e["out"]))
            for i, e in enumerate(self.entries)
        ]


def record_step(
    config: "RunConfig",
    step: int,
    *,
    data: "CorpusData | None" = None,
    capture: set[int] | frozenset[int] = frozenset(),
    expect_W_before: str | None = None,
    label: str | None = None,
) -> tuple[OpLog, dict[int, list[torch.Tensor]]]:
    """Replay `config` to optimizer step `step` and record every operation of that step.

    Returns the log and, for the op indices in `capture`, copies of their output tensors. With
    `expect_W_before` (the artifact's digest of W at step - 1, hex), a replay that does not reproduce
    the run is a DeterminismError.
    """
    from flannel_repro.training.model import embedding
    from flannel_repro.training.numerics import numerics_info

    if not 1 <= step <= config.steps:
        raise ConfigError(f"step must be in 1..{config.steps} (the run's steps), got {step}.")
    DebugMode = _debug_mode()
    with _replaying(config, data) as (loop, threads):
        for t in range(1, step):
            loop.step(t)
        W_before = digest_tensor(embedding(loop.model).detach().cpu()).hex()
        state_before = state_digests(loop)
        if expect_W_before is not None and W_before != expect_W_before:
            raise DeterminismError(
                f"replaying {label or 'the run'} to step {step - 1} gave W with digest {W_before[:16]}, the artifact "
                f"has {expect_W_before[:16]}: this process does not reproduce the run (another machine, numerics "
                "class or code?); record the op log where the run was trained (flannel-repro oplog)."
            )
        rec = _StepRecorder(set(capture))
        rec.name_roots(loop.model)
        with (
            DebugMode(record_nn_module=True, record_output=False) as mode,
            DebugMode.dispatch_hooks(log_hook=rec.post, pre_log_hook=rec.pre),
            rec.tagging_backward(loop.model),
        ):
            rec.mode = mode
            _, starts = loop.step(step, phase=rec.in_phase)
        W_after = digest_tensor(embedding(loop.model).detach().cpu()).hex()
        numerics = numerics_info(
            config.device, threads=threads, deterministic=config.deterministic, mode=config.numerics
        )
    env = {"torch": torch.__version__, "numerics_class": numerics["class"], "threads": threads}
    log = OpLog(
        step=step,
        label=label or _label(config, numerics["class"]),
        config=config.to_dict(),
        env=env,
        batch_starts=[int(s) for s in starts.tolist()],
        W_before=W_before,
        W_after=W_after,
        ops=rec.records(),
        state_before=state_before,
    )
    return log, rec.captured


def state_digests(loop: Any) -> dict[str, str]:
    """blake2b-128 of every parameter and its optimizer state, and the learning rate, of a TorchLoop."""
    out: dict[str, str] = {}
    for name, param in loop.model.named_parameters():
        out[name] = _tensor(param).digest
        for key, value in sorted(loop.optimizer.state.get(param, {}).items()):
            if isinstance(value, torch.Tensor):
                out[f"{name}:{key}"] = _tensor(value).digest
    out["lr"] = repr(loop.scheduler.get_last_lr())
    return out


@contextlib.contextmanager
def _replaying(config: "RunConfig", data: "CorpusData | None") -> Iterator[tuple[Any, int]]:
    """A fresh `harness.TorchLoop` for `config` at step 0, inside the settings `train()` runs under
    (device check, numerics and its arithmetic, malloc tuning, threads, deterministic mode); yields (loop, threads)."""
    from flannel_repro.data.corpus import load_data
    from flannel_repro.training.allocator import tune_malloc
    from flannel_repro.training.determinism import deterministic_mode, torch_threads
    from flannel_repro.training.harness import TorchLoop, check_device
    from flannel_repro.training.model import shared_init_W
    from flannel_repro.training.numerics import apply as apply_numerics, arithmetic

    check_device(config.device)
    if config.compile != "none":
        raise ConfigError(
            "operations are recorded in eager mode; got compile = "
            f"{config.compile!r} (record the eager run: compile = 'none')."
        )
    apply_numerics(config.numerics, config.device)
    tune_malloc()
    data = data if data is not None else load_data(config)
    with (
        torch_threads(config.threads) as threads,
        deterministic_mode(config.deterministic),
        arithmetic(config.numerics, config.device),
    ):
        yield TorchLoop(config, data, shared_init_W(config)), threads


def state_trace(config: "RunConfig", upto: int, *, data: "CorpusData | None" = None) -> list[str]:
    """One digest of the whole training state (all parameters, optimizer state, learning rate) after each
    step 0..upto: W alone can hide a divergence that has already begun in the other parameters."""

    def whole(loop: Any) -> str:
        return hashlib.blake2b(repr(sorted(state_digests(loop).items())).encode(), digest_size=16).hexdigest()

    with _replaying(config, data) as (loop, _threads):
        trace = [whole(loop)]
        for t in range(1, upto + 1):
            loop.step(t)
            trace.append(whole(loop))
    return trace


def _label(config: "RunConfig", numerics_class: str) -> str:
    seeds = (
        f"seed={config.train_seed}"
        if config.train_seed is not None
        else f"model_seed={config.model_seed},data_seed={config.data_seed}"
    )
    return f"{seeds} {config.device} {numerics_class}"


def replayable(config: "RunConfig | EngineRunConfig", what: str) -> "RunConfig":
    """`config` when a replay can train it (the notebook's model), else a ConfigError naming `what`."""
    from flannel_repro.config import EngineRunConfig

    if isinstance(config, EngineRunConfig):
        raise ConfigError(
            f"{what}: a run of engine {config.engine!r} (your own training) cannot be replayed: op logs "
            "replay the notebook's model, whose training this package runs."
        )
    return config


def first_divergent_operation(
    a: "RunConfig | str | Path", b: "RunConfig | str | Path", *, step: int | None = None
) -> OpDiff:
    """Why two runs part: replay both to the step they first part at (or `step`) and compare every
    operation of that step (`compare_logs`); for the root cause, replay both once more to measure its
    max |Δ| and distance in ulps. `a` and `b` are run artifacts (verified, and each replay checked
    against its artifact) or configs."""
    from flannel_repro.storage.run import RunFile

    configs, expect = [], []
    digests: list[torch.Tensor | None] = []
    for side in (a, b):
        if isinstance(side, (str, Path)):
            run = RunFile(side).require_verified()
            try:
                configs.append(replayable(run.config, str(side)))
                digests.append(run.digests)
            finally:
                run.close()
        else:
            configs.append(side)
            digests.append(None)
    cfg_a, cfg_b = configs
    if step is None:
        if digests[0] is None or digests[1] is None:
            raise ConfigError("give step= when comparing configs (for artifacts it is the first step they part at).")
        n = min(len(digests[0]), len(digests[1]))
        differ = [t for t in range(n) if not torch.equal(digests[0][t], digests[1][t])]
        if not differ:
            return OpDiff(step=n - 1, a=str(a), b=str(b), kind="identical", detail="the runs never part")
        step = differ[0]
        if step == 0:
            raise DeterminismError(
                "the runs differ at step 0 (their initial W): nothing was trained yet, so no "
                "operation of a step is to blame; check init_seed, init_scale and dtype."
            )
        # W parts at `step`, but the other parameters may have parted earlier: find the first step whose
        # whole state differs, and examine that one
        trace_a, trace_b = state_trace(cfg_a, step), state_trace(cfg_b, step)
        if trace_a[0] != trace_b[0]:
            raise DeterminismError(
                "the runs' models differ before the first step (model_seed, dtype or shape): no "
                "operation of a step is to blame; the config changes are: "
                + ", ".join(sorted(k for k in cfg_a.to_dict() if cfg_a.to_dict()[k] != cfg_b.to_dict()[k]))
            )
        step = next(t for t in range(1, step + 1) if trace_a[t] != trace_b[t])
    counts = [len(d) - 1 if d is not None else c.steps for d, c in zip(digests, configs)]
    if not 1 <= step <= min(counts):
        raise ConfigError(
            f"step {step}: expected a step in 1..{min(counts)} (the runs' step counts: {counts[0]} and "
            f"{counts[1]}), got {step}."
        )
    for d in digests:
        expect.append(None if d is None else bytes(d[step - 1].tolist()).hex())
    log_a, _ = record_step(cfg_a, step, expect_W_before=expect[0], label=_side_label(a, cfg_a))
    log_b, _ = record_step(cfg_b, step, expect_W_before=expect[1], label=_side_label(b, cfg_b))
    diff = compare_logs(log_a, log_b)
    if diff.root is not None:
        index = diff.root.index
        _, got_a = record_step(cfg_a, step, capture={index})
        _, got_b = record_step(cfg_b, step, capture={index})
        for x, y in zip(got_a.get(index, []), got_b.get(index, [])):
            if x.shape == y.shape and x.dtype == y.dtype and not torch.equal(x, y) and x.is_floating_point():
                diff.max_abs = float((x.to(torch.float64) - y.to(torch.float64)).abs().max())
                diff.max_ulps = ulp_distance(x, y)
                break
    return diff


def _side_label(side: "RunConfig | str | Path", config: "RunConfig") -> str | None:
    return f"{Path(side).name}" if isinstance(side, (str, Path)) else None

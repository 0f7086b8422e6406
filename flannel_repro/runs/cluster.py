"""Training a plan's runs on a Ray cluster: one Ray task per `RunRequest`, each obtaining its run from the store.

A task asks Ray for the run's resources (`num_cpus` = its thread count, `num_gpus=1` for a CUDA run), starts
in a worker process whose environment carries the numerics pins of the run's mode (`runtime_env`: oneDNN,
MKL and ATen read them once, at their first call, so they must be there when the process starts), sets
torch's thread count, imports the modules that register the user's engines and calls `RunStore.obtain`. The
store is shared: its run locks make two tasks that ask for one run train it once, and a run already in the
store is read, not trained. Each task reports a `ClusterResult` (JSON values only).

The run key includes the numerics class, so a worker of another class trains a *different* run, which a
session of the expected class never reads: such a result is reported (`class_differs`, and a warning
naming the run, the node and both classes), never mixed in silently.

`ray` is imported only inside the functions here (an optional extra: `pip install 'flannel-repro[ray]'`).
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

from flannel_repro.config import EngineRunConfig
from flannel_repro.errors import ConfigError, DeterminismWarning
from flannel_repro.runs.plan import RunRequest
from flannel_repro.runs.remote import is_url

LOCAL = "local"  # the address that starts a single-machine cluster for the call (as does None)
CONNECT_TIMEOUT_S = 10.0  # an address that does not accept a connection within this is a ConfigError
DEFAULT_PORTS = {"ray": 10001, "": 6379}  # Ray Client's port (ray://), the GCS port (HOST[:PORT])
INSTALL_HINT = "pip install 'flannel-repro[ray]'"


@dataclass(frozen=True)
class ClusterResult:
    """What one task reports: the run it obtained, where, and whether it trained it (JSON values only)."""

    request: dict[str, Any]  # the RunRequest (to_dict)
    run_name: str = ""  # the artifact's name in the store (its file's stem); the request's label if it failed early
    run_key: str = ""
    trained: bool = False  # True: this task trained it; False: it was in the store (or another task trained it)
    wall_time_s: float = 0.0  # the task's time in `obtain` (training or reading)
    numerics_class: str = ""  # the class the run was trained in (part of its run key)
    host: str = ""
    node_id: str = ""
    error: str = ""  # "" when the run is in the store; else the error, its traceback summarised
    expected_class: str = ""  # the class the caller expected ("" when it expected none)
    replaced: str = ""  # why a stored artifact of the run was set aside and trained again
    warnings: list[str] = field(default_factory=list)  # warnings the task raised (artifacts set aside, ...)

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def class_differs(self) -> bool:
        """The run was obtained in another numerics class than the one expected: a different run (its key differs)."""
        return bool(self.ok and self.expected_class and self.numerics_class != self.expected_class)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ClusterResult":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


# --- the driver ---------------------------------------------------------------------------------------------


def train_on_cluster(
    requests: Sequence[RunRequest],
    *,
    location: str,
    cache: str | None,
    address: str | None,
    threads: int,
    session: str,
    checkpoint_every: int,
    expected_class: str | None = None,
    on_result: Callable[[ClusterResult], None] | None = None,
    num_cpus: int | None = None,
) -> list[ClusterResult]:
    """Obtain every request's run in the store at `location` (a folder, or a URL store with `cache` the local
    cache folder of each machine) by one Ray task each; the results in the requests' order, `on_result`
    called with each as it completes.

    `address`: None or "local" starts a single-machine cluster of `num_cpus` CPUs for this call (shut down at
    the end); "auto", "HOST:6379" or "ray://HOST:10001" connects to a running one (left running). A process
    already connected to Ray keeps that connection (a local request then uses it). A run whose numerics class
    is not `expected_class` is reported (`ClusterResult.class_differs`) and warned about."""
    ray = import_ray()
    check_store_shared(location, address)
    if is_local(address):
        location, cache = local_paths(location, cache)
    started = connect(ray, address, num_cpus=num_cpus)
    try:
        return _gather(
            ray,
            _submit(ray, requests, location, cache, threads, session, checkpoint_every),
            requests,
            expected_class,
            on_result,
        )
    finally:
        if started:
            ray.shutdown()


def import_ray() -> Any:
    """The `ray` module; a ConfigError naming the extra to install when it is absent."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            f"training on a cluster needs Ray, which is not installed: {INSTALL_HINT} (or pip install 'ray>=2.9')."
        ) from None
    return ray


def is_local(address: str | None) -> bool:
    return address is None or address.strip().lower() == LOCAL


def check_store_shared(location: str, address: str | None) -> None:
    """A cluster of several machines cannot share a local folder: a remote `address` needs a URL store
    (s3://..., gs://..., or file:///PATH for a folder every machine mounts at the same place)."""
    if is_local(address) or is_url(location):
        return
    raise ConfigError(
        f"the store {location!r} is a local folder, which the machines of the cluster at {address!r} cannot share: "
        "give a URL store (s3://bucket/prefix, gs://...), or file:///PATH when every machine mounts PATH at the "
        "same place (NFS, a shared disk)."
    )


def connect(ray: Any, address: str | None, *, num_cpus: int | None) -> bool:
    """Connect this process to Ray; True when this call started the (local) cluster and must shut it down."""
    if not is_local(address):
        assert address is not None  # is_local(None) is True
        check_reachable(ray, address)  # before anything else: an unreachable address is named, never waited on
    if ray.is_initialized():
        if is_local(address):
            return False  # a cluster this process already started (a test module's, a notebook's): used as it is
        raise ConfigError(
            f"--cluster {address!r}: this process is already connected to a Ray cluster; one process connects to one."
        )
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    if is_local(address):
        ray.init(address=LOCAL, num_cpus=num_cpus, include_dashboard=False, **quiet)
        return True
    try:
        ray.init(address=address, **quiet)
    except ImportError as exc:  # ray:// needs Ray Client's grpcio
        raise ConfigError(f"--cluster {address!r}: {exc}; {INSTALL_HINT} installs Ray Client.") from None
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        raise ConfigError(f"--cluster {address!r}: could not connect to the Ray cluster there ({exc}).") from None
    return False


def check_reachable(ray: Any, address: str, timeout_s: float | None = None) -> None:
    """A ConfigError naming `address` when nothing accepts a connection there within `timeout_s` (default
    CONNECT_TIMEOUT_S; ray.init itself retries an unreachable address for minutes)."""
    timeout_s = CONNECT_TIMEOUT_S if timeout_s is None else timeout_s
    host, port = bootstrap_endpoint(ray, address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise ConfigError(
            f"--cluster {address!r}: no Ray cluster answers at {host}:{port} ({why} within {timeout_s:g} s). Start "
            "one there with `ray start --head`, or check the address (HOST:6379, ray://HOST:10001, auto)."
        ) from None


def bootstrap_endpoint(ray: Any, address: str) -> tuple[str, int]:
    """(host, port) that `address` connects to: "auto" is resolved as Ray resolves it (RAY_ADDRESS, else the
    cluster `ray start` last started on this machine)."""
    text = address.strip()
    scheme = ""
    if "://" in text:
        scheme, text = text.split("://", 1)
        if scheme != "ray":
            raise ConfigError(f"--cluster {address!r}: expected 'auto', HOST:PORT or ray://HOST:PORT.")
    elif text.lower() == "auto":
        text = _auto_address(ray, address)
    host, sep, port = text.rstrip("/").rpartition(":")
    if not sep:
        host, port = text.rstrip("/"), str(DEFAULT_PORTS[scheme])
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ConfigError(f"--cluster {address!r}: expected 'auto', HOST:PORT or ray://HOST:PORT.")
    return host, int(port)


def _auto_address(ray: Any, address: str) -> str:
    try:
        from ray._private.services import canonicalize_bootstrap_address

        found = canonicalize_bootstrap_address("auto")
    except Exception:  # noqa: BLE001 -- Ray's private resolver moved: let ray.init resolve (and fail) itself
        found = os.environ.get("RAY_ADDRESS") or None
    if not found:
        raise ConfigError(
            f"--cluster {address!r}: no running Ray cluster was found on this machine (none started with "
            "`ray start --head`, and RAY_ADDRESS is not set)."
        )
    return str(found).split("://", 1)[-1]


def local_paths(location: str, cache: str | None) -> tuple[str, str | None]:
    """The store and cache of a local cluster as absolute paths, as a session in this folder sees them (a task's
    working folder is Ray's): a URL store's cache defaults to the one a session here reads
    (runs.store.default_cache_dir)."""
    from flannel_repro.runs.store import default_cache_dir

    if not is_url(location):
        location = str(Path(location).resolve())
    elif cache is None:
        cache = str(default_cache_dir(location, Path.cwd()))
    return location, None if cache is None else str(Path(cache).resolve())


def _submit(
    ray: Any,
    requests: Sequence[RunRequest],
    location: str,
    cache: str | None,
    threads: int,
    session: str,
    checkpoint_every: int,
) -> list[Any]:
    """One Ray task per request, with its resources and its process environment; the object refs, in order."""
    task = ray.remote(obtain_in_task)
    refs = []
    for request in requests:
        n = request.config.threads or threads
        payload = {
            "request": request.to_dict(),
            "location": location,
            "cache": cache,
            "session": session,
            "checkpoint_every": checkpoint_every,
            "threads": n,
            "imports": engine_imports(request),
            "label": request_name(request),
        }
        # a worker lost (a preempted node) is retried by Ray: the store's locks and checkpoints make that safe
        options: dict[str, Any] = {"num_cpus": n, "num_gpus": 1 if _is_cuda(request) else 0}
        env = task_env(request)
        if env:
            options["runtime_env"] = {"env_vars": env}
        refs.append(task.options(**options).remote(payload))
    return refs


def _gather(
    ray: Any,
    refs: list[Any],
    requests: Sequence[RunRequest],
    expected_class: str | None,
    on_result: Callable[[ClusterResult], None] | None,
) -> list[ClusterResult]:
    """Wait for the tasks, in the order they complete; a task that Ray could not run is a failed result."""
    pending = {ref: i for i, ref in enumerate(refs)}
    results: list[ClusterResult | None] = [None] * len(refs)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                result = judge_class(_result_of(ray, ref, requests[i]), expected_class)
                results[i] = result
                if on_result is not None:
                    on_result(result)
    finally:
        for ref in pending:  # interrupted: the tasks still queued or running are cancelled
            ray.cancel(ref, force=True)
    return [r for r in results if r is not None]


def _result_of(ray: Any, ref: Any, request: RunRequest) -> ClusterResult:
    try:
        return ClusterResult.from_dict(ray.get(ref))
    except Exception as exc:  # noqa: BLE001 -- a worker that died, a task Ray could not schedule: reported per run
        return ClusterResult(request=request.to_dict(), run_name=request_name(request), error=summarise(exc))


def judge_class(result: ClusterResult, expected_class: str | None) -> ClusterResult:
    """`result` with the expected class recorded; a warning when the run was obtained in another class."""
    if not expected_class:
        return result
    result = ClusterResult.from_dict({**result.to_dict(), "expected_class": expected_class})
    if result.class_differs:
        warnings.warn(
            f"{result.run_name}: obtained on node {result.node_id[:12]} ({result.host}) in numerics class "
            f"{result.numerics_class}, not the expected {expected_class}. The run key includes the class, so this "
            "is a different run: a session of the expected class will not read it (and trains or misses its own).",
            DeterminismWarning,
            stacklevel=2,
        )
    return result


# --- what a task needs, computed by the driver ------------------------------------------------------------------


def task_env(request: RunRequest) -> dict[str, str]:
    """The environment a task's process must start with: the numerics settings in force here, with the pins
    of the run's mode (`numerics.PINS`), and for a CUDA run the cuBLAS workspace that deterministic runs need
    (the plugin sets it the same way). All are read once, when the libraries start."""
    from flannel_repro.training.numerics import NUMERICS_ENV, PINS

    env = {k: os.environ[k] for k in NUMERICS_ENV if os.environ.get(k)}
    if not _is_cuda(request):
        env.update(PINS.get(request.config.numerics, {}))
    else:
        env["CUBLAS_WORKSPACE_CONFIG"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return env


def engine_imports(request: RunRequest) -> list[str]:
    """The modules a worker imports to have the request's registered engine (none for the built-in engines)."""
    if not isinstance(request.config, EngineRunConfig):
        return []
    from flannel_repro.training.engines import import_paths

    return import_paths(request.config)


def request_name(request: RunRequest) -> str:
    """A readable name of a request, known before its run key (runs.plan's label where there is one)."""
    from flannel_repro.runs import plan

    label = getattr(plan, "request_label", None)
    if label is not None:
        return str(label(request))
    c = request.config
    return f"m{c.model_seed}-d{c.data_seed}-{c.device}-{c.engine}-r{request.repeat}"


def _is_cuda(request: RunRequest) -> bool:
    return request.config.device.split(":", 1)[0] == "cuda"


# --- the task, in a Ray worker process -------------------------------------------------------------------------


def obtain_in_task(payload: dict[str, Any]) -> dict[str, Any]:
    """The body of one Ray task: obtain the request's run from the store (training it when it is not there).

    Never raises for the run's own failure: the error, its traceback summarised, is in the result."""
    start = time.perf_counter()
    host, node = socket.gethostname(), _node_id()
    try:
        result = _obtain(payload, host, node)
    except Exception as exc:  # noqa: BLE001 -- reported per run, with its traceback summarised
        result = ClusterResult(
            request=payload["request"], run_name=payload.get("label", ""), error=summarise(exc), host=host, node_id=node
        )
    return {**result.to_dict(), "wall_time_s": round(time.perf_counter() - start, 3)}


def _obtain(payload: Mapping[str, Any], host: str, node: str) -> ClusterResult:
    import torch

    from flannel_repro.runs.store import open_store

    torch.set_num_threads(int(payload["threads"]))  # the thread count is part of the run key and its class
    for module in payload.get("imports", ()):
        importlib.import_module(module)  # registers the user's engine in this worker
    request = RunRequest.from_dict(payload["request"])
    store = open_store(
        payload["location"],
        cache=payload.get("cache"),
        session=str(payload.get("session", "")),
        checkpoint_every=int(payload.get("checkpoint_every", 0)),
    )
    with _recorded_warnings() as caught:
        got = store.obtain(request.config, repeat=request.repeat, resume_at=request.resume_at)
    traj = got.trajectory
    try:
        material = traj.key_material or {}
        numerics = material.get("numerics") if isinstance(material, dict) else None
        return ClusterResult(
            request=dict(payload["request"]),
            run_name=traj.path.stem,
            run_key=traj.run_key,
            trained=got.trained,
            numerics_class=str((numerics or {}).get("class", "")),
            replaced=got.replaced,
            host=host,
            node_id=node,
            warnings=caught,
        )
    finally:
        traj.close()


@contextmanager
def _recorded_warnings() -> Iterator[list[str]]:
    """The warnings raised inside, as text (a worker's stderr is not the user's terminal)."""
    out: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield out
    out.extend(f"{w.category.__name__}: {w.message}" for w in caught)


def _node_id() -> str:
    try:
        import ray

        return str(ray.get_runtime_context().get_node_id())
    except Exception:  # noqa: BLE001 -- outside a Ray worker (a direct call): no node
        return ""


def summarise(exc: BaseException, frames: int = 4) -> str:
    """`Type: message (at file:line in function <- ...)`: the exception and the innermost frames of its traceback."""
    cause = getattr(exc, "cause", None)  # a RayTaskError carries the task's own exception
    if isinstance(cause, BaseException):
        exc = cause
    head = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    stack = traceback.extract_tb(exc.__traceback__)[-frames:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in reversed(stack))
    text = f"{head} (at {where})" if where else head
    return text if len(text) <= 4000 else text[:4000] + " ..."

"""Arithmetic variants of a run, each trained in a fresh process, to measure noise bands.

The libraries that decide a CPU run's bits (oneDNN, MKL) fix their code paths at their first call,
so every variant (`numerics.VARIANT_ENV` x a thread count) is its own process. The parent summarizes
the artifacts and `analysis.noise.derive_band` turns the deviations into a band.

    flannel-repro noise --preset ci --seeds 42-45 --reference portable:1 --variants portable:2,avx2:1 -o bands.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from flannel_repro.analysis.bounds import scale_key
from flannel_repro.analysis.noise import MARGIN, NoiseBand, derive_band
from flannel_repro.analysis.summary import Summary, summarize, summarize_pair
from flannel_repro.errors import ArtifactError, ConfigError
from flannel_repro.training.numerics import VARIANT_ENV, VARIANT_MODE, machine_line


def parse_variants(text: str) -> list[tuple[str, int]]:
    """'portable:1,portable:2,avx2:1' -> [('portable', 1), ('portable', 2), ('avx2', 1)]."""
    out: list[tuple[str, int]] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, threads = part.partition(":")
        if name not in VARIANT_ENV or not threads.isdigit() or int(threads) < 1:
            raise ConfigError(
                f"noise variant {part!r}: expected PATH:THREADS with PATH one of "
                f"{', '.join(VARIANT_ENV)} and THREADS >= 1, e.g. 'portable:2'."
            )
        out.append((name, int(threads)))
    if not out:
        raise ConfigError(f"noise variants: expected at least one PATH:THREADS, got {text!r}.")
    return out


def variant_environment(name: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a fresh process that runs arithmetic variant `name`."""
    env = dict(os.environ if base is None else base)
    for key, value in VARIANT_ENV[name].items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def train_variant(config_json: str, name: str, threads: int, seeds: Sequence[int], artifacts: Path) -> list[Path]:
    """Train (or reuse) `seeds` under variant `name` at `threads` in a fresh process; their artifact paths."""
    spec = json.dumps(
        {
            "config": json.loads(config_json),
            "variant": name,
            "threads": threads,
            "seeds": list(seeds),
            "artifacts": str(artifacts),
        }
    )
    proc = subprocess.run(
        [sys.executable, "-m", "flannel_repro.runs.variants", spec],
        env=variant_environment(name),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise ArtifactError(
            f"noise variant {name}:{threads}: the training process failed (exit {proc.returncode}):\n"
            f"{proc.stderr.strip()[-2000:]}"
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise ArtifactError(
            f"noise variant {name}:{threads}: expected a JSON line of artifact paths, got "
            f"{proc.stdout.strip()[-500:]!r}."
        )
    return [Path(p) for p in json.loads(lines[-1])["paths"]]


def derive_from_training(
    config: Any,
    seeds: Sequence[int],
    variants: Sequence[tuple[str, int]],
    reference: tuple[str, int],
    artifacts: Path,
    *,
    margin: float = MARGIN,
    command: str = "",
    log: Any = None,
) -> NoiseBand:
    """Train `seeds` under the reference and every variant, and derive the band of their summaries:
    run summaries of every seed, and the pair summary of the first two seeds."""
    if reference in variants:
        variants = [v for v in variants if v != reference]
    if not variants:
        raise ConfigError("noise: expected at least one variant besides the reference.")
    config_json = json.dumps(config.to_dict())
    summaries: dict[tuple[str, int], list[Summary]] = {}
    classes: dict[str, str] = {}
    for variant in (reference, *variants):
        t0 = time.perf_counter()
        paths = train_variant(config_json, variant[0], variant[1], seeds, artifacts)
        runs = [summarize(p) for p in paths]
        if len(paths) >= 2:
            runs.append(summarize_pair(paths[0], paths[1]))
        summaries[variant] = runs
        label = f"{variant[0]}:{variant[1]}"
        classes[label] = runs[0].numerics_class
        if log is not None:
            print(
                f"  {label}: class {classes[label]}, {len(paths)} run(s) in {time.perf_counter() - t0:.1f} s",
                file=log,
                flush=True,
            )
    ref = summaries[reference]
    pairs = [(r, v) for variant in variants for r, v in zip(ref, summaries[variant])]
    measured = {
        "reference": f"{reference[0]}:{reference[1]}",
        "variants": [f"{n}:{t}" for n, t in variants],
        "classes": classes,
        "seeds": f"{seeds[0]}-{seeds[-1]}" if len(seeds) > 1 else str(seeds[0]),
        "steps": config.steps,
        "machine": machine_line(),
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
    }
    from flannel_repro.analysis.bounds import data_hashes

    return derive_band(pairs, scale=scale_key(config, data_hashes(config)), margin=margin, measured=measured)


def _train_main(spec_text: str) -> int:
    """Child process of `train_variant`: train the seeds with the variant's environment already in place."""
    from flannel_repro.config import RunConfig
    from flannel_repro.runs.store import RunStore  # the child process only

    import torch

    spec = json.loads(spec_text)
    # The thread count is set on the process, as the pytest plugin does, not in the config: the config
    # (and its fingerprint, which summaries compare exactly) stays the same across variants.
    config = RunConfig.from_dict(spec["config"], source="noise variant").replace(
        threads=0, numerics=VARIANT_MODE[spec["variant"]]
    )
    torch.set_num_threads(int(spec["threads"]))
    store = RunStore(spec["artifacts"])
    paths = [str(store.obtain(config.with_train_seed(int(s))).trajectory.path) for s in spec["seeds"]]
    print(json.dumps({"paths": paths}))
    return 0


if __name__ == "__main__":
    sys.exit(_train_main(sys.argv[1]))

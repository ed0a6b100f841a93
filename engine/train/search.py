"""Hyperparameter search: grid and random search over a dict of ranges, scored on validation data.

The search calls your ``train_and_score(config) -> float`` once per trial (train a model with that
configuration, return its validation metric), so any model, loop or metric fits.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class SearchResult:
    best_config: dict
    best_score: float
    trials: list[dict] = field(default_factory=list)  # each: config values, "score", "seconds"
    mode: str = "max"

    def table(self) -> str:
        """All trials as an aligned text table, best first."""
        keys = list(self.trials[0]) if self.trials else []
        rows = sorted(self.trials, key=lambda t: t["score"], reverse=self.mode == "max")
        cells = [[_fmt(row[k]) for k in keys] for row in rows]
        widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
        lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
        return "\n".join(lines)


def grid_search(train_and_score, space: dict[str, list], mode: str = "max") -> SearchResult:
    """Try every combination of the listed values.

    Example:
        >>> grid_search(score, {"lr": [1e-3, 1e-2], "hidden": [32, 64]})   # doctest: +SKIP
    """
    _check_space(space, random=False)
    keys = list(space)
    configs = [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]
    return _run(train_and_score, configs, mode)


def random_search(train_and_score, space: dict, n_trials: int, seed: int = 0, mode: str = "max") -> SearchResult:
    """Sample ``n_trials`` configurations. Each entry of ``space`` is a list (choose one),
    ``(low, high)`` (uniform float, or uniform int when both are ints) or ``("log", low, high)``
    (log-uniform, for learning rates)."""
    _check_space(space, random=True)
    rng = np.random.default_rng(seed)
    configs = [{k: _sample(v, rng) for k, v in space.items()} for _ in range(n_trials)]
    return _run(train_and_score, configs, mode)


def _run(train_and_score, configs: list[dict], mode: str) -> SearchResult:
    if mode not in ("max", "min"):
        raise ValueError(f"search: mode must be 'max' or 'min', got {mode!r}")
    trials = []
    for config in configs:
        start = time.perf_counter()
        score = float(train_and_score(dict(config)))
        trials.append({**config, "score": score, "seconds": time.perf_counter() - start})
    finite = [t for t in trials if math.isfinite(t["score"])]
    if not finite:
        raise RuntimeError("search: every trial scored NaN or inf")
    best = (max if mode == "max" else min)(finite, key=lambda t: t["score"])
    best_config = {k: best[k] for k in configs[0]}
    return SearchResult(best_config, best["score"], trials, mode)


def _check_space(space: dict, random: bool) -> None:
    if not space:
        raise ValueError("search: the space is empty")
    for key, values in space.items():
        if isinstance(values, list):
            if not values:
                raise ValueError(f"search: no values listed for {key!r}")
        elif not random:
            raise ValueError(f"grid_search: {key!r} must be a list of values, got {values!r}")
        elif not (isinstance(values, tuple) and (len(values) == 2 or (len(values) == 3 and values[0] == "log"))):
            raise ValueError(f"random_search: {key!r} must be a list, (low, high) or ('log', low, high), got {values!r}")


def _sample(spec, rng):
    if isinstance(spec, list):
        return spec[int(rng.integers(len(spec)))]
    if spec[0] == "log":
        _, low, high = spec
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    low, high = spec
    if isinstance(low, int) and isinstance(high, int):
        return int(rng.integers(low, high + 1))
    return float(rng.uniform(low, high))


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)

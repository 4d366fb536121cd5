"""Stage 7: subject-level train/val/test split — slices of one subject never land in two splits.

Rules, in order:
1. a subject's ``split`` column wins;
2. a subject without SD PET can only be tested (there is no target to train or validate on): ``test``;
3. the rest, sorted by id and shuffled with ``numpy.random.default_rng(seed)``, is cut by the ratios. Counts are
   rounded, then every split with a positive ratio gets at least one subject when there are enough subjects
   (taken from the largest split), and train keeps the remainder.
The split is computed over the whole subjects table before sharding or processing, so every shard, every rerun and
every worker count agrees on it, and a failed subject does not move the others.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from m2diff_monai.data.manifest import SPLITS


def parse_ratios(value: str | tuple[float, ...] | list[float]) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` → (0.8, 0.1, 0.1); three non-negative numbers with a positive sum (normalized to 1)."""
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value)
    try:
        ratios = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise ValueError(f"--split must be three numbers like 0.8,0.1,0.1, got {value!r}") from None
    if len(ratios) != 3 or any(r < 0 or not np.isfinite(r) for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"--split must be three non-negative numbers with a positive sum, got {value!r}")
    total = sum(ratios)
    return tuple(r / total for r in ratios)  # type: ignore[return-value]


def _counts(n: int, ratios: tuple[float, float, float]) -> list[int]:
    counts = [int(round(r * n)) for r in ratios]
    counts[0] = n - counts[1] - counts[2]
    positive = [i for i, r in enumerate(ratios) if r > 0]
    if n >= len(positive):
        for i in positive:
            while counts[i] < 1:
                donor = max(range(3), key=lambda j: counts[j])
                counts[donor] -= 1
                counts[i] += 1
    while counts[0] < 0:  # rounding overshoot: take back from the larger of val/test
        donor = 1 if counts[1] >= counts[2] else 2
        counts[donor] -= 1
        counts[0] += 1
    return counts


def assign_splits(
    subject_ids: list[str],
    explicit: Mapping[str, str | None] | None = None,
    has_target: Mapping[str, bool] | None = None,
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> dict[str, str]:
    """``{subject_id: "train"|"val"|"test"}`` for every id (see the module docstring)."""
    explicit = explicit or {}
    has_target = has_target or {}
    result: dict[str, str] = {}
    free: list[str] = []
    for sid in sorted(subject_ids):
        given = explicit.get(sid)
        if given:
            given = str(given).strip().lower()
            if given not in SPLITS:
                raise ValueError(f"subject {sid}: split must be one of {', '.join(SPLITS)}, got {given!r}")
            result[sid] = given
        elif not has_target.get(sid, True):
            result[sid] = "test"
        else:
            free.append(sid)
    order = [free[i] for i in np.random.default_rng(seed).permutation(len(free))]
    counts = _counts(len(order), tuple(ratios))  # type: ignore[arg-type]
    bounds = np.cumsum([0] + counts)
    for split, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:], strict=True):
        for sid in order[lo:hi]:
            result[sid] = split
    return result

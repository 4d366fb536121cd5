"""Linear CKA (Kornblith et al., 2019) between layer activations, as in the paper's Sec. III-G analysis.

CKA(X, Y) = ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) for column-centred activation matrices (n examples × p features).
It is computed through the n × n centred Gram matrices (⟨K, L⟩_F / (‖K‖_F ‖L‖_F) with K = XXᵀ): the same number,
and cheap when features (C·H·W of a conv layer) far outnumber examples. Written here because no installed
library provides it; it is a few lines of linear algebra.

Activations are collected with forward hooks on named modules (``ActivationRecorder``), flattened per example,
optionally average-pooled first to bound memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from m2diff_monai.io.atomic import write_with


def _as_matrix(x) -> np.ndarray:
    """(n, ...) array or tensor → float64 (n, p) numpy matrix."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"activations need shape (n_examples, features...), got {x.shape}")
    return x.reshape(x.shape[0], -1)


def centered_gram(x) -> np.ndarray:
    """Gram matrix of the column-centred activations (= H K H with H the centring matrix)."""
    m = _as_matrix(x)
    m = m - m.mean(axis=0, keepdims=True)
    return m @ m.T


def linear_cka(x, y) -> float:
    """Linear CKA in [0, 1] between two activation matrices with the same examples in the same order."""
    kx, ky = centered_gram(x), centered_gram(y)
    if kx.shape != ky.shape:
        raise ValueError(f"activations must share the number of examples, got {kx.shape[0]} and {ky.shape[0]}")
    return _cka_from_grams(kx, ky)


def _cka_from_grams(kx: np.ndarray, ky: np.ndarray) -> float:
    denom = np.linalg.norm(kx) * np.linalg.norm(ky)
    if denom == 0:
        return float("nan")  # a constant layer carries no representation to compare
    return float(np.sum(kx * ky) / denom)


def cka_matrix(acts_a: Sequence, acts_b: Sequence) -> np.ndarray:
    """``M[i, j] = CKA(acts_a[i], acts_b[j])``; each Gram matrix is computed once."""
    grams_a = [centered_gram(a) for a in acts_a]
    grams_b = [centered_gram(b) for b in acts_b]
    out = np.empty((len(grams_a), len(grams_b)))
    for i, ka in enumerate(grams_a):
        for j, kb in enumerate(grams_b):
            if ka.shape != kb.shape:
                raise ValueError(f"layer pair ({i}, {j}) has different numbers of examples")
            out[i, j] = _cka_from_grams(ka, kb)
    return out


class ActivationRecorder:
    """Context manager that records the outputs of named submodules during forward passes.

    ``pool``: adaptive-average-pool spatial maps to this size first (None keeps them). Outputs that are dicts,
    tuples or lists record their first tensor. Each forward pass appends; ``activations()`` concatenates them.
    """

    def __init__(self, model, module_names: Iterable[str], pool: int | None = None):
        self.model = model
        self.module_names = list(module_names)
        self.pool = pool
        self._records: dict[str, list] = {name: [] for name in self.module_names}
        self._handles: list = []

    def __enter__(self) -> ActivationRecorder:
        modules = dict(self.model.named_modules())
        missing = [n for n in self.module_names if n not in modules]
        if missing:
            raise KeyError(f"no module named {missing} in {type(self.model).__name__}")
        for name in self.module_names:
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable:
        import torch.nn.functional as F

        def record(_module, _inputs, output) -> None:
            while isinstance(output, (dict, tuple, list)):
                output = next(iter(output.values())) if isinstance(output, dict) else output[0]
            out = output.detach()
            if self.pool is not None and out.ndim >= 3:
                pool_fn = {3: F.adaptive_avg_pool1d, 4: F.adaptive_avg_pool2d, 5: F.adaptive_avg_pool3d}[out.ndim]
                out = pool_fn(out.float(), self.pool)
            self._records[name].append(out.float().flatten(1).cpu())

        return record

    def activations(self) -> dict[str, np.ndarray]:
        import torch

        return {name: torch.cat(parts).numpy() for name, parts in self._records.items() if parts}


def collect_activations(model, module_names: Iterable[str], run: Callable[[], object], pool: int | None = None):
    """Run ``run()`` (which calls ``model`` any number of times) under hooks; return ``{name: (n, p) array}``."""
    import torch

    with ActivationRecorder(model, module_names, pool=pool) as recorder, torch.no_grad():
        run()
    return recorder.activations()


def save_cka_heatmap(
    matrix: np.ndarray,
    out_png: str | Path,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    *,
    title: str = "Linear CKA",
    xlabel: str = "",
    ylabel: str = "",
) -> Path:
    """A heatmap PNG of a CKA matrix (values printed in the cells), written atomically."""
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas for PNG

    matrix = np.asarray(matrix, dtype=float)
    rows, cols = matrix.shape
    fig = Figure(figsize=(1.6 + 0.6 * cols, 1.2 + 0.5 * rows), dpi=110, layout="tight")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="magma")
    ax.set_xticks(range(cols), [str(c) for c in (col_labels or range(cols))], rotation=45, ha="right")
    ax.set_yticks(range(rows), [str(r) for r in (row_labels or range(rows))])
    for i in range(rows):
        for j in range(cols):
            value = matrix[i, j]
            text = "n/a" if np.isnan(value) else f"{value:.2f}"
            ax.text(j, i, text, ha="center", va="center", color="black" if value > 0.6 else "white", fontsize=7)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return write_with(out_png, lambda tmp: fig.savefig(tmp, format="png"))

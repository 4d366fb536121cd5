"""The x̂0 clip range of the reverse process, matched to the normalization of the data the network was trained on.

Why: the official M2Diff code clamps x̂0 to [−1, 1] because its data are per-slice min–max normalised to [0, 1].
The project's default ``shared`` normalization (``preprocessing/normalization.py``) divides the PET pair by the LD
PET's 99.5th brain percentile and deliberately does NOT clip: hot lesions stay above 1. Clamping x̂0 to [−1, 1]
there cuts every lesion at the normalization scale (measured on the demo: prediction max = scale exactly, hot
lesions −33 %). The rule here: whatever values the preprocessing produces, a prediction can reproduce.

``clip_denoised: "auto"`` resolves from the training data's normalization (``config["data"]["preprocessing"]
["normalization"]``, else the flat ``config["data"]["normalization"]``, else the training manifest's provenance):

- min–max normalizations (``slice``: per-slice, the official loader; ``volume``: per-volume; ``paper``: the legacy
  name of ``volume``): the data lie in [0, 1] → the official (−1, 1);
- ``shared`` or an unknown normalization: (−1, ``auto_clip_max``), default 10 = ten times the normalization scale.
  Assumption (labelled): physiological and tumour uptake in the brain stays below 10× the LD PET's 99.5th brain
  percentile; the bound still keeps an ε-model's x̂0 = (x_t − √(1−ᾱ)ε̂)/√ᾱ from running away at high t. Raise
  ``auto_clip_max`` (diffusion config) for tracers with more extreme hot spots.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

AUTO = "auto"
OFFICIAL_CLIP_RANGE: tuple[float, float] = (-1.0, 1.0)
DEFAULT_AUTO_CLIP_MAX = 10.0
# Normalizations whose every value lies in [0, 1]; "paper" is the legacy name of "volume".
MINMAX_NORMALIZATIONS: tuple[str, ...] = ("slice", "volume", "paper")


def is_auto(clip_denoised: Any) -> bool:
    return isinstance(clip_denoised, str) and clip_denoised.strip().lower() == AUTO


def auto_clip_range(normalization: str | None, auto_clip_max: float = DEFAULT_AUTO_CLIP_MAX) -> tuple[float, float]:
    """(−1, 1) for min–max normalizations; (−1, ``auto_clip_max``) for ``shared`` and unknown ones (never cut what
    the data may hold when the normalization is not known)."""
    if normalization is not None and str(normalization).lower() in MINMAX_NORMALIZATIONS:
        return OFFICIAL_CLIP_RANGE
    return (OFFICIAL_CLIP_RANGE[0], float(auto_clip_max))


def training_normalization(data_config: Mapping[str, Any] | None) -> str | None:
    """The PET normalization of the training data a checkpoint's ``config["data"]`` describes (nested
    ``preprocessing`` → flat key → the manifest's provenance, as ``inference.preprocess.resolve_preprocessing``);
    None when nothing records it."""
    data = dict(data_config or {})
    for table in (data.get("preprocessing"), data):
        if isinstance(table, Mapping) and table.get("normalization"):
            return str(table["normalization"])
    manifest = data.get("manifest")
    if manifest:
        from m2diff_monai.data.manifest import provenance_parameters

        normalization = provenance_parameters(manifest).get("normalization")
        if normalization:
            return str(normalization)
    return None

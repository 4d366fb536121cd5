"""What an inference setting is: :class:`InferenceSettings`, its names and the checks on each value.

Its own module because three layers use it without running inference: :mod:`.defaults` (checking a checkpoint's
stored ``inference_defaults``), :mod:`.api` (resolving the layers) and export (``--set``). Where each value comes
from is :mod:`.defaults`'s business.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from m2diff_monai.data.orientation import parse_orientations
from m2diff_monai.diffusion import normalize_clip_range
from m2diff_monai.inference.fusion import FUSION_METHODS
from m2diff_monai.inference.inferer import AMP_CHOICES

BOOL_SETTINGS = ("shared_noise", "save_orientations", "no_mri", "png", "use_ema", "progress")


def parse_clip_option(value: Any) -> str | bool | list[float] | None:
    """``--clip-denoised``: None (not set) → None; "auto" → "auto"; "none"/"false"/false → False (no clamp);
    "true"/true → [-1, 1]; "LO,HI" or a pair → [lo, hi]."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if text in ("none", "null", "false", "off", "no"):
            return False
        if text in ("true", "on", "yes"):
            return [-1.0, 1.0]
        value = [v for v in text.strip("[]()").split(",") if v.strip()]
    if value is False:
        return False
    try:
        lo, hi = normalize_clip_range(value)
    except (TypeError, ValueError):
        raise ValueError(f"clip_denoised must be auto, none or LO,HI; got {value!r}") from None
    return [lo, hi]


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def _as_steps(value: Any) -> int | None:
    """Sampling steps from an int or text (the bundle CLI passes strings); None = all of the chain's steps."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text not in ("", "all", "none", "full") and not text.isdigit():
            raise ValueError(f"steps must be a whole number >= 1 or 'all', got {value!r}")
        value = None if text in ("", "all", "none", "full") else int(text)
    if value is not None and int(value) < 1:
        raise ValueError(f"steps must be >= 1 or 'all', got {value}")
    return None if value is None else int(value)


def _as_fwhm(value: Any) -> float | None:
    """``ld_consistency_fwhm``: None/"none"/"off" → off; otherwise a FWHM in mm, > 0."""
    if isinstance(value, str):
        value = None if value.strip().lower() in ("", "none", "null", "off") else float(value)
    if value is not None and not float(value) > 0:
        raise ValueError(f"ld_consistency_fwhm must be a FWHM > 0 mm (or none: off), got {value}")
    return None if value is None else float(value)


def _as_start_step(value: Any) -> int | None:
    """The truncated start's t0 from an int or text; None = start from pure noise."""
    if isinstance(value, str):
        value = None if value.strip().lower() in ("", "none", "null", "noise") else int(value)
    if value is not None and int(value) < 1:
        raise ValueError(f"start step must be >= 1 (or none: start from noise), got {value}")
    return None if value is None else int(value)


@dataclass(frozen=True)
class InferenceSettings:
    """Sampling and output options (CLI flags and bundle keys share these names)."""

    # Default: DDIM, 50 steps, η = 0 (deterministic) — see docs/inference.md for the benchmark behind it.
    sampler: str = "ddim"
    steps: int | None = 50  # None: all T steps (the papers' 1000-step ancestral sampler with sampler="ancestral")
    eta: float = 0.0
    # None: start from pure noise (both papers). t0: start from the LD PET noised to t0 (truncated start).
    start_step: int | None = None
    orientations: tuple[str, ...] = ("axial", "coronal", "sagittal")
    # Not the papers' "wavelet-stripe": the same stripe filter on what only each orientation holds, so that hot
    # spots all orientations agree on are not damped (inference/fusion.py; docs/inference.md, audit).
    fusion: str = "wavelet-stripe-residual"
    samples: int = 1
    shared_noise: bool = False
    # None: off (both papers). FWHM (mm) of the Gaussian below which the fused volume takes the LD PET's band
    # (inference/consistency.py; the demo recipes turn it on).
    ld_consistency_fwhm: float | None = None
    seed: int | None = 0
    batch_size: int = 16
    device: str = "auto"
    amp: str = "auto"
    save_orientations: bool = False
    no_mri: bool = False
    png: bool = True
    use_ema: bool = True
    progress: bool = True
    # None: the checkpoint's clip range. "auto" | "none" | "LO,HI" | [lo, hi]: override it (e.g. "auto" for a
    # checkpoint trained before "auto" existed, whose stored (−1, 1) cuts hot lesions of shared-normalized data).
    clip_denoised: Any = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "clip_denoised", parse_clip_option(self.clip_denoised))
        if self.sampler not in ("ancestral", "ddim"):
            raise ValueError(f"sampler must be ancestral or ddim, got {self.sampler!r}")
        set_(self, "steps", _as_steps(self.steps))
        set_(self, "start_step", _as_start_step(self.start_step))
        set_(self, "orientations", parse_orientations(self.orientations))
        if self.fusion not in FUSION_METHODS:
            raise ValueError(f"fusion must be one of {', '.join(FUSION_METHODS)}, got {self.fusion!r}")
        if int(self.samples) < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        set_(self, "samples", int(self.samples))
        set_(self, "ld_consistency_fwhm", _as_fwhm(self.ld_consistency_fwhm))
        if int(self.batch_size) < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        set_(self, "batch_size", int(self.batch_size))
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if str(self.amp).lower() not in AMP_CHOICES:
            raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        set_(self, "eta", float(self.eta))
        for name in BOOL_SETTINGS:  # `--progress false` on the MONAI bundle CLI arrives as the string "false"
            set_(self, name, _as_bool(getattr(self, name), name))
        set_(self, "seed", None if self.seed is None else int(self.seed))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["orientations"] = list(self.orientations)
        return out


SETTING_KEYS = tuple(InferenceSettings.__dataclass_fields__)

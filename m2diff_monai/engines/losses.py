"""The training loss module: M2Diff's multi-task diffusion loss, single-task diffusion loss, or plain regression.

MONAI has no differentiable VLB / hybrid IDDPM loss (see ``docs/training.md``); the per-branch terms come from
``GaussianDiffusion.training_losses`` and this module only weights them. Called by ``SupervisedTrainer`` as
``loss(network_output_dict, targets_dict)``; returns the per-sample loss (B,) (the trainer takes the mean) and
keeps the batch means of its terms in ``self.last_terms`` for logging.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a.float() - b.float()) ** 2).flatten(1).mean(dim=1)


class DiffusionLoss(nn.Module):
    """Per-sample training loss for every network of this project.

    - Two-task networks (output has ``"pet"`` and ``"mri"``, M2Diff):
      ``λ1·(L_pet + m·L_mri) + λ2·m·L_bias`` with λ1 = 0.4, λ2 = 0.2 (the official code), where L_pet and L_mri
      are each branch's diffusion loss (``training_losses``: x0- or ε-MSE, plus the VLB term when the variance is
      learned), ``L_bias = MSE(x̂0_pet, x̂0_mri)`` and ``m`` is the sample's MRI flag after dropout.
      Assumption: L_MRI and L_bias are counted only on samples with MRI (``m = 1``); the official code draws one
      flag per batch and its MRI branch has nothing to reconstruct from without MRI. Masked samples contribute
      zero to those terms and the batch mean still divides by B, so with drop 0.3 their weight is 0.7 on
      average, as with the official per-batch flag.
    - Single-task diffusion networks (only ``"out"``): the diffusion loss of ``"out"``.
    - Non-diffusion regressors (``targets["x_t"] is None``): ``MSE(out, sd)`` on the first output channel.
    """

    def __init__(
        self,
        diffusion: Any,
        lambda_task: float = 0.4,
        lambda_bias: float = 0.2,
        vlb_weight: float = 0.001,
    ) -> None:
        super().__init__()
        self.diffusion = diffusion
        self.lambda_task = float(lambda_task)
        self.lambda_bias = float(lambda_bias)
        self.vlb_weight = float(vlb_weight)
        self.last_terms: dict[str, torch.Tensor] = {}

    def _branch(self, output: torch.Tensor, targets: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.diffusion.training_losses(
            output.float(),
            targets["x_start"],
            targets["x_t"],
            targets["t"],
            targets["noise"],
            vlb_weight=self.vlb_weight,
        )

    def _record(self, **terms: torch.Tensor) -> None:
        """Batch means, kept as tensors (no host sync per step); a handler converts them when it logs."""
        self.last_terms = {k: v.detach().float().mean() for k, v in terms.items()}

    def forward(self, output: dict[str, torch.Tensor], targets: dict[str, Any]) -> torch.Tensor:
        x_start = targets["x_start"]
        if targets.get("x_t") is None:
            loss = _per_sample_mse(output["out"][:, : x_start.shape[1]], x_start)
            self._record(loss=loss, mse=loss)
            return loss
        if "pet" in output and "mri" in output:
            flag = targets["mri_available"].float().reshape(-1)
            pet = self._branch(output["pet"], targets)
            mri = self._branch(output["mri"], targets)
            bias = _per_sample_mse(pet["pred_xstart"], mri["pred_xstart"])
            loss = self.lambda_task * (pet["loss"] + flag * mri["loss"]) + self.lambda_bias * flag * bias
            self._record(
                loss=loss, pet=pet["loss"], mri=flag * mri["loss"], bias=flag * bias, vlb=pet["vlb"], mri_rate=flag
            )
            return loss
        terms = self._branch(output["out"], targets)
        self._record(loss=terms["loss"], mse=terms["mse"], vlb=terms["vlb"])
        return terms["loss"]

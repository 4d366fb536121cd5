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

# M2Diff's L_bias: "official_xprev" = the official training loop's term (MSE of the two branches' one-step samples
# x_{t−1} from a second forward pass); "x0_mse" = MSE of the two branches' x̂0 on the step's own forward pass.
BIAS_LOSSES = ("official_xprev", "x0_mse")


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a.float() - b.float()) ** 2).flatten(1).mean(dim=1)


class DiffusionLoss(nn.Module):
    """Per-sample training loss for every network of this project.

    - Two-task networks (output has ``"pet"`` and ``"mri"``, M2Diff):
      ``λ1·(L_pet + m·L_mri) + λ2·m·L_bias`` with λ1 = 0.4, λ2 = 0.2 (the official code), where L_pet and L_mri
      are each branch's diffusion loss (``training_losses``: x0- or ε-MSE, plus the VLB term when the variance is
      learned) and ``m`` is ``targets["mri_supervised"]`` (``DiffusionPrepareBatch``: the data's MRI availability
      with the official MRI dropout, the dropout flag with ``zero_and_mask``).
    - ``bias_loss="official_xprev"`` (the official training loop): L_bias = MSE(x_{t−1}^pet, x_{t−1}^mri), each
      x_{t−1} = mean + σ·z a ``p_sample`` step of one branch on the SECOND forward pass (the batch's second half,
      at ``targets["bias_x_t"]``, same t), x̂0 clamped to the diffusion's clip range, z = ``bias_step_noise``
      shared by both branches. With a fixed variance z and the coef2·x_t term cancel:
      L_bias = coef1(t)²·MSE(clamp(x̂0_pet) − clamp(x̂0_mri)), coef1 = the posterior-mean coefficient of x̂0
      (E_t[coef1²] ≈ 0.002 on the linear T = 1000 schedule: a weak term that matters for small t).
      Gradients flow through the second pass (the clamp passes none outside the clip range).
    - ``bias_loss="x0_mse"``: L_bias = MSE(x̂0_pet, x̂0_mri) on the first pass, unclamped (not the official term).
    - Single-task diffusion networks (only ``"out"``): the diffusion loss of ``"out"``.
    - Non-diffusion regressors (``targets["x_t"] is None``): ``MSE(out, sd)`` on the first output channel.
    """

    def __init__(
        self,
        diffusion: Any,
        lambda_task: float = 0.4,
        lambda_bias: float = 0.2,
        vlb_weight: float = 0.001,
        bias_loss: str = "official_xprev",
    ) -> None:
        super().__init__()
        if bias_loss not in BIAS_LOSSES:
            raise ValueError(f"bias_loss must be one of {BIAS_LOSSES}, got {bias_loss!r}")
        self.diffusion = diffusion
        self.lambda_task = float(lambda_task)
        self.lambda_bias = float(lambda_bias)
        self.vlb_weight = float(vlb_weight)
        self.bias_loss = bias_loss
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

    def _one_step_sample(self, output: torch.Tensor, targets: dict[str, Any]) -> torch.Tensor:
        """The official ``p_sample`` on the second pass: mean + [t > 0]·σ·z, x̂0 clamped to the clip range."""
        x_t, t = targets["bias_x_t"], targets["t"]
        step = self.diffusion.p_mean_variance(output.float(), x_t, t)
        nonzero = (t != 0).to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
        return step["mean"] + nonzero * torch.exp(0.5 * step["log_variance"]) * targets["bias_step_noise"]

    def _record(self, **terms: torch.Tensor) -> None:
        """Batch means, kept as tensors (no host sync per step); a handler converts them when it logs."""
        self.last_terms = {k: v.detach().float().mean() for k, v in terms.items()}

    def forward(self, output: dict[str, torch.Tensor], targets: dict[str, Any]) -> torch.Tensor:
        x_start = targets["x_start"]
        batch = x_start.shape[0]
        # With the official L_bias the network ran on 2B samples: [first pass; second pass].
        first = {k: v[:batch] for k, v in output.items()}
        if targets.get("x_t") is None:
            loss = _per_sample_mse(first["out"][:, : x_start.shape[1]], x_start)
            self._record(loss=loss, mse=loss)
            return loss
        if "pet" in output and "mri" in output:
            flag = targets["mri_available"].float().reshape(-1)
            supervised = targets.get("mri_supervised", targets["mri_available"]).float().reshape(-1)
            pet = self._branch(first["pet"], targets)
            mri = self._branch(first["mri"], targets)
            if self.bias_loss == "official_xprev":
                if "bias_x_t" not in targets or output["pet"].shape[0] != 2 * batch:
                    raise ValueError(
                        'bias_loss="official_xprev" needs the second forward pass: build DiffusionPrepareBatch '
                        'with bias_loss="official_xprev" and the network, or use bias_loss="x0_mse"'
                    )
                second_pet = self._one_step_sample(output["pet"][batch:], targets)
                second_mri = self._one_step_sample(output["mri"][batch:], targets)
                bias = _per_sample_mse(second_pet, second_mri)
            else:
                bias = _per_sample_mse(pet["pred_xstart"], mri["pred_xstart"])
            loss = self.lambda_task * (pet["loss"] + supervised * mri["loss"]) + self.lambda_bias * supervised * bias
            self._record(
                loss=loss,
                pet=pet["loss"],
                mri=supervised * mri["loss"],
                bias=supervised * bias,
                vlb=pet["vlb"],
                mri_rate=flag,
                mri_supervised_rate=supervised,
            )
            return loss
        terms = self._branch(first["out"], targets)
        self._record(loss=terms["loss"], mse=terms["mse"], vlb=terms["vlb"])
        return terms["loss"]

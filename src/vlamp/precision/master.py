"""FP32 master weights for parameters stored in low precision.

The optimizer is handed FP32 copies of the low-precision parameters; gradients are accumulated into
the copies in FP32 after each backward, the optimizer updates the copies, and the model receives them
rounded to its storage dtype. This is Micikevicius et al. (2018)'s recipe: without it an update
smaller than 1/256 of a BF16 weight (1/2048 in FP16) is rounded away.
"""

from __future__ import annotations

import torch

from vlamp.precision.dtypes import LOW_PRECISION
from vlamp.precision.errors import VlampError


class MasterWeights:
    """Swaps an optimizer's low-precision parameters for FP32 masters, in place.

    Args:
        optimizer: An optimizer that has not stepped yet.

    Raises:
        VlampError: If the optimizer already holds state (it would refer to the old tensors).
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if optimizer.state:
            raise VlampError("MixedPrecision.setup: the optimizer already has state; "
                             "set it up before its first step")
        self.model_params: list[torch.Tensor] = []
        self.masters: list[torch.Tensor] = []
        for group in optimizer.param_groups:
            params = []
            for p in group["params"]:
                if p.dtype in LOW_PRECISION:
                    m = torch.nn.Parameter(p.detach().float().clone(), requires_grad=p.requires_grad)
                    self.model_params.append(p)
                    self.masters.append(m)
                    params.append(m)
                else:
                    params.append(p)
            group["params"] = params

    def __len__(self) -> int:
        return len(self.masters)

    @torch.no_grad()
    def accumulate_grads(self) -> None:
        """Moves the model's low-precision gradients into the masters' FP32 gradients (adding)."""
        for p, m in zip(self.model_params, self.masters):
            if p.grad is None:
                continue
            if m.grad is None:
                m.grad = p.grad.float()
            else:
                m.grad.add_(p.grad)
            p.grad = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Rounds the updated masters into the model's parameters."""
        if self.masters:
            torch._foreach_copy_(self.model_params, self.masters)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(i): m.detach() for i, m in enumerate(self.masters)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if len(state) != len(self.masters):
            raise VlampError(f"master weights: checkpoint has {len(state)} tensors, "
                             f"model has {len(self.masters)}")
        for i, m in enumerate(self.masters):
            m.copy_(state[str(i)])
        self.copy_to_model()

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
from vlamp.precision.weight_update import WeightUpdate


class MasterWeights(WeightUpdate):
    """Swaps an optimizer's low-precision parameters for FP32 masters, in place.

    Args:
        optimizer: An optimizer that has not stepped yet.
        names: Parameter id -> qualified name (for state dicts and messages).
        grad_accum: ``"fp32"``: each micro-batch's gradient joins the master's FP32 gradient after
            its backward; ``"storage"``: autograd sums them in the weight's dtype, and the sum
            joins the master before the step.
        mode_name: The mode, for messages.

    Raises:
        VlampError: If the optimizer already holds state (it would refer to the old tensors).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, names: dict[int, str] | None = None,
                 grad_accum: str = "fp32", mode_name: str = "this mode", state8: bool = False) -> None:
        if optimizer.state:
            raise VlampError("MixedPrecision.setup: the optimizer already has state; "
                             "set it up before its first step")
        super().__init__(optimizer, dict(names or {}), state8=state8)
        self.grad_accum, self.mode_name = grad_accum, mode_name
        self.model_params: list[torch.Tensor] = []
        self.masters: list[torch.Tensor] = []
        for group in optimizer.param_groups:
            params = []
            for p in group["params"]:
                if p.dtype in LOW_PRECISION and p.requires_grad:  # frozen weights need none
                    m = torch.nn.Parameter(p.detach().float().clone(), requires_grad=p.requires_grad)
                    if id(p) in self.names:  # the master's optimizer state is saved by the name
                        self.names[id(m)] = self.names[id(p)]
                    self.model_params.append(p)
                    self.masters.append(m)
                    params.append(m)
                else:
                    params.append(p)
            group["params"] = params

    @torch.no_grad()
    def to(self, device: torch.device) -> None:
        """Moves the masters (the same parameter objects the optimizer holds) to ``device``."""
        for m in self.masters:
            m.data = m.data.to(device)
            if m.grad is not None:
                m.grad = m.grad.to(device)

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

    def after_backward(self) -> None:
        if self.grad_accum == "fp32":
            self.accumulate_grads()

    def grads(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        """The masters' gradients (every micro-batch's, summed in low precision until now with
        ``grad_accum="storage"``) and the FP32 parameters'.

        Raises:
            VlampError: If a low-precision parameter got its gradient from a plain
                ``loss.backward()``, which the masters never see.
        """
        if self.grad_accum == "storage":
            self.accumulate_grads()
        stray = self.stray_grads()
        if stray:
            raise VlampError(
                f"MixedPrecision.step: {stray[0]} (and {len(stray) - 1} more) got its gradient "
                f"from a plain loss.backward(); in {self.mode_name} the weights are stored in low "
                f"precision and the optimizer updates their FP32 masters, which only "
                f"mp.backward(loss) feeds. Call mp.backward(loss) instead")
        return super().grads(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, stepped: bool = False) -> None:
        super().step(optimizer, stepped)
        self.copy_to_model()

    def trainable(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """What gradients land in for ``model``: its trainable FP32 parameters, and the masters
        in place of its low-precision ones."""
        low = {id(p) for p in self.model_params}
        return [p for p in model.parameters() if p.requires_grad and id(p) not in low] + list(self.masters)

    def stray_grads(self) -> list[str]:
        """Names of low-precision parameters holding a gradient that did not go through
        :meth:`accumulate_grads` (a plain ``loss.backward()``)."""
        return [self.name(i) for i, p in enumerate(self.model_params) if p.grad is not None]

    def name(self, i: int) -> str:
        return self.names.get(id(self.model_params[i]), f"parameter {i}")

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Rounds the updated masters into the model's parameters.

        Raises:
            VlampError: If a master is beyond the largest finite value of its parameter's dtype
                (65504 in FP16): the weight would silently become inf.
        """
        if not self.masters:
            return
        narrow = [i for i, p in enumerate(self.model_params) if p.dtype == torch.float16]
        if narrow:
            peaks = torch._foreach_norm([self.masters[i] for i in narrow], float("inf"))
            limit = torch.finfo(torch.float16).max
            over = [(self.name(i), float(v)) for i, v in zip(narrow, peaks) if not float(v) <= limit]
            if over:
                name, value = over[0]
                raise VlampError(f"{name}: its FP32 master reached {value:.6g}, beyond FP16's largest "
                                 f"value {limit:.0f}; stored in FP16 it would be inf. Keep that module "
                                 f"in FP32 with a rule ({name.rpartition('.')[0] or name}: fp32) or train "
                                 f"in bf16-true")
        torch._foreach_copy_(self.model_params, self.masters)

    def exact_weights(self) -> dict[str, torch.Tensor]:
        return {self.name(i): m.detach() for i, m in enumerate(self.masters)}

    def sync_from(self, weights: dict[str, torch.Tensor] | None) -> None:
        self.set_from(weights)

    def _tracked(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        own = {id(m) for m in self.masters}
        return list(self.model_params) + [p for p in super()._tracked(optimizer) if id(p) not in own]

    @torch.no_grad()
    def set_from(self, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Sets every master from ``weights`` (name -> tensor, e.g. a checkpoint's full-precision
        weights) where it holds the parameter's name, else from the model's parameter itself."""
        weights = weights or {}
        for p, m in zip(self.model_params, self.masters):
            source = weights.get(self.names.get(id(p), ""))
            m.copy_(source if source is not None and source.shape == m.shape else p)

    def masters_state(self) -> dict[str, torch.Tensor]:
        """The masters by parameter name (so another mode can take them by name)."""
        return {self.name(i): m.detach() for i, m in enumerate(self.masters)}

    @torch.no_grad()
    def load_masters(self, state: dict[str, torch.Tensor]) -> None:
        """Restores :meth:`state_dict` (also an older one keyed by position) and rounds the masters
        into the model. Masters not saved, or saved for other parameters (another mode or plan),
        are taken from the model's current weights: load the weights into the model first."""
        try:
            self._load(state)
        except VlampError:
            self.set_from(None)

    def _load(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            raise VlampError("master weights: none saved")
        by_name = {self.name(i): i for i in range(len(self.masters))}
        if set(state) == set(by_name):
            order = [by_name[k] for k in state]
            values = list(state.values())
        elif len(state) == len(self.masters) and all(k.isdigit() for k in state):
            order, values = list(range(len(self.masters))), [state[str(i)] for i in range(len(state))]
        else:
            raise VlampError(f"master weights: the checkpoint's {len(state)} do not match this "
                             f"model's {len(self.masters)}")
        for i, v in zip(order, values):
            self.masters[i].copy_(v)
        self.copy_to_model()


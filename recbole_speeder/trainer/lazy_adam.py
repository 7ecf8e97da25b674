"""Adam that updates only the rows a sparse gradient touches (lazy Adam), and a gradient-norm clip that takes
sparse gradients.

Under the sampled softmax a step touches a few thousand rows of the item-ID table, yet ``torch.optim.Adam``
(which refuses sparse gradients) moves every row and both of its moments, so a step costs O(catalogue).
``SparseAdam`` takes only sparse gradients. ``LazyAdam`` takes both: dense gradients get torch's own Adam
(``torch.optim.adam.adam``, the same numbers as ``torch.optim.Adam``), sparse ones the lazy update of
TF Addons' ``LazyAdam`` and torch's ``SparseAdam``: the touched rows' moments and weights only, with the bias
correction of the parameter's step count; an untouched row's moments do not decay.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.adam import adam


class LazyAdam(Optimizer):
    """Adam (``decoupled_weight_decay=False``) or AdamW (``True``) with lazy rows for sparse gradients."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled_weight_decay: bool = False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            dense: tuple[list[torch.Tensor], ...] = ([], [], [], [], [])
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:  # Adam's own state layout, so its state_dict reads the same
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                if param.grad.is_sparse:
                    _lazy_update(param, param.grad, state, group)
                    continue
                for values, item in zip(dense, (param, param.grad, state["exp_avg"], state["exp_avg_sq"],
                                                state["step"]), strict=True):
                    values.append(item)
            if dense[0]:
                beta1, beta2 = group["betas"]
                adam(*dense[:4], [], dense[4], decoupled_weight_decay=group["decoupled_weight_decay"],
                     amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                     eps=group["eps"], maximize=False)
        return loss


def _lazy_update(param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """One Adam step on the rows ``grad`` holds, with the arithmetic of torch's single-tensor Adam."""
    grad = grad.coalesce()
    rows, values = grad.indices()[0], grad.values()
    beta1, beta2 = group["betas"]
    lr, weight_decay = group["lr"], group["weight_decay"]
    state["step"] += 1
    step = state["step"].item()
    weights = param.index_select(0, rows)
    if weight_decay and group["decoupled_weight_decay"]:
        weights.mul_(1 - lr * weight_decay)
    elif weight_decay:
        values = values.add(weights, alpha=weight_decay)
    exp_avg = state["exp_avg"].index_select(0, rows).lerp_(values, 1 - beta1)
    exp_avg_sq = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(values, values, value=1 - beta2)
    state["exp_avg"].index_copy_(0, rows, exp_avg)
    state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
    weights.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
    param.index_copy_(0, rows, weights)


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also takes sparse gradients (torch's refuses them): a sparse
    gradient is coalesced in place and counts by its values."""
    with_grad = [p for p in parameters if p.grad is not None]
    for param in with_grad:
        if param.grad.is_sparse:
            param.grad = param.grad.coalesce()
    grads = [p.grad.values() if p.grad.is_sparse else p.grad for p in with_grad]
    total = nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch's clip_grads_with_norm_, on these tensors
    for grad in grads:
        grad.mul_(scale.to(grad.device))
    return total


def sparse_grad_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The weights of ``module``'s embeddings that produce sparse gradients."""
    return [m.weight for m in module.modules() if isinstance(m, nn.Embedding) and m.sparse]

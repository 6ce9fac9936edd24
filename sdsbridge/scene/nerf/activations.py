"""The field's activations, with the same bits whatever torch's CPU thread count.

torch's ``sigmoid`` and ``F.softplus`` round some elements differently in their vectorised loop and in the scalar
code that finishes each thread's share, so which elements get which rounding depends on how the threads split a
tensor (over ~32k elements). The thread count follows the machine's load (``common.devices.CpuThreads``), so a
run's results would depend on the load: measured, the CPU demo's runs on one and on two threads parted at step
~1150 (softplus), then at ~1210 (sigmoid). These are built from ``exp``, ``log1p`` and arithmetic, which round
the same on every path, with their derivatives written out (finite everywhere); they agree with torch's to
about 1 ulp and cost about twice as much (a 600k-element sigmoid: 1.2 ms against 0.6).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _sigmoid_values(x: Tensor) -> Tensor:
    # exp(-x) overflows to inf below x = -88, and 1 / (1 + inf) is the 0 it should be; the backward below never
    # differentiates through it
    return x.neg().exp_().add_(1.0).reciprocal_()


class _Sigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = _sigmoid_values(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return grad * (1.0 - y) * y


class _Softplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.abs().neg_().exp_().log1p_().add_(x.clamp_min(0.0))  # log1p(exp(-|x|)) + max(x, 0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * _sigmoid_values(x)


def sigmoid(x: Tensor) -> Tensor:
    """1 / (1 + exp(-x)) elementwise, differentiable (d/dx = y (1 - y))."""
    return _Sigmoid.apply(x)


def softplus(x: Tensor) -> Tensor:
    """log(1 + exp(x)) elementwise, as max(x, 0) + log1p(exp(-|x|)), differentiable (d/dx = sigmoid(x))."""
    return _Softplus.apply(x)

"""Masked statistics. Every reduction here counts kept positions only (mask True = keep)."""

from __future__ import annotations

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Sum over kept positions (of all, or along ``dim``); whatever sits at masked positions
    (even inf or NaN) is ignored."""
    kept = torch.where(mask.bool(), values, torch.zeros_like(values))
    return kept.sum() if dim is None else kept.sum(dim=dim, keepdim=keepdim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over kept positions; 0 (not NaN) when nothing is kept."""
    count = mask.sum()
    return masked_sum(values, mask) / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over kept positions.

    Unbiased (Bessel-corrected) like TRL, or biased like the N+ code and TF. Fewer kept
    positions than the correction needs gives 0 rather than a division by zero.
    """
    count = mask.sum()
    centred = torch.where(mask.bool(), values - masked_mean(values, mask), torch.zeros_like(values))
    denominator = count - 1 if unbiased else count
    if denominator <= 0:
        return torch.zeros((), dtype=values.dtype, device=values.device)
    return (centred**2).sum() / denominator


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, unbiased: bool = True
) -> torch.Tensor:
    """Scale kept positions to unit variance (and zero mean unless ``shift_mean=False``).

    Masked positions come back as 0.
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask, unbiased=unbiased)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))

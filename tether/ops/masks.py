"""Masks, lengths and positions for left-padded queries followed by responses.

Shapes: ``B`` rows, ``Q`` query columns (left-padded), ``T`` response columns.
Masks are keep-masks: True marks a real token. Inside tether the masks travel with the
tensors; comparing ids with the pad id is kept only for the public seed helpers, which
take an optional mask for tokenizers whose pad id is also a real token (pad == EOS).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def first_true_indices(bools: torch.Tensor, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Index of the first True along the last dimension; the row length for a row with none.

    Vectorised (seed note 2): every False position is pushed past the row end by adding the
    row length, every position carries its own index, and the row minimum is the answer.
    Works on any number of leading dimensions; rows of width 0 have no True, so their answer
    is their length, 0 (a minimum over no positions would raise). A mask of integers or
    floats counts nonzero as True.
    """
    if bools.dim() == 0:
        raise ValueError("first_true_indices needs rows: a tensor of at least one dimension")
    bools = bools.bool()  # an integer or float mask: nonzero is True (``~`` on integers would flip bits)
    row_len = bools.size(-1)
    if row_len == 0:
        return torch.zeros(bools.shape[:-1], dtype=dtype, device=bools.device)
    if not dtype.is_floating_point and row_len > torch.iinfo(dtype).max:
        raise ValueError(f"rows of length {row_len} do not fit {dtype}; use torch.long")
    offset = row_len * (~bools).long()  # in int64: 2 * row_len would overflow a small dtype
    index = torch.arange(row_len, device=bools.device)
    return torch.min(offset + index, dim=-1).values.to(dtype)


def as_id_tensor(token_ids: int | Iterable[int], device: torch.device | None = None) -> torch.Tensor:
    """One id or several, as a 1-D long tensor."""
    ids = [int(token_ids)] if isinstance(token_ids, int) else [int(i) for i in token_ids]
    return torch.tensor(ids, dtype=torch.long, device=device)


def response_lengths(responses: torch.Tensor, stop_token_ids: int | Iterable[int] | None) -> torch.Tensor:
    """Tokens kept per response ``[B]``: up to and including the first stop token, else all ``T``.

    With no stop ids every response keeps its full length.
    """
    batch, width = responses.shape
    if stop_token_ids is None:
        return torch.full((batch,), width, dtype=torch.long, device=responses.device)
    stops = torch.isin(responses, as_id_tensor(stop_token_ids, responses.device))
    return torch.clamp(first_true_indices(stops) + 1, max=width)


def ended_on_stop(responses: torch.Tensor, lengths: torch.Tensor, stop_token_ids: int | Iterable[int] | None) -> torch.Tensor:
    """Whether each response terminated on a stop token (not on the length limit) ``[B]``."""
    if stop_token_ids is None:
        return torch.zeros(responses.size(0), dtype=torch.bool, device=responses.device)
    last = responses.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    return (lengths > 0) & torch.isin(last, as_id_tensor(stop_token_ids, responses.device))


def lengths_to_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Keep-mask ``[B, width]``: True at the first ``lengths[b]`` positions of row ``b``."""
    return torch.arange(width, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def truncate_response(stop_token_id: int | Iterable[int], pad_token_id: int, responses: torch.Tensor) -> torch.Tensor:
    """Replace every token after the first stop token with ``pad_token_id`` (seed note 3).

    The stop token itself is kept; rows without a stop token are unchanged. ``stop_token_id``
    may be one id or several (the first of any of them ends the response). Idempotent.
    """
    lengths = response_lengths(responses, stop_token_id)
    keep = lengths_to_mask(lengths, responses.size(1))
    return torch.where(keep, responses, torch.full_like(responses, pad_token_id))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: mask ``[0,0,1,1,1]`` gives ``[0,0,0,1,2]``.

    An exclusive cumulative sum, so the first real token is position 0 however much padding
    precedes it. Needed by absolute-position models (GPT-2); harmless for RoPE ones.
    """
    mask = attention_mask.long()
    return torch.cumsum(mask, dim=1) - mask

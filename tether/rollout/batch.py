"""The typed rollout batch: every tensor of one PPO update, with its shape and meaning."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """One rollout batch. ``B`` rows, ``Q`` query columns (left-padded), ``T`` response columns.

    Masks are keep-masks and travel with the tensors: padding is never recovered by
    comparing ids with the pad id.
    """

    queries: torch.Tensor  # [B, Q] token ids, left-padded
    query_mask: torch.Tensor  # [B, Q] bool, True on real prompt tokens
    responses: torch.Tensor  # [B, T] sampled ids, untruncated (tokens after the stop are never read)
    response_mask: torch.Tensor  # [B, T] bool, True up to and including the terminating token
    lengths: torch.Tensor  # [B] kept response tokens (the terminating token is lengths - 1)
    terminated: torch.Tensor  # [B] bool, ended on a stop token rather than the length limit
    logprobs: torch.Tensor  # [B, T] policy logprobs at sampling time (temperature-scaled)
    ref_logprobs: torch.Tensor | None  # [B, T] reference logprobs (temperature-scaled); None: no reference
    values: torch.Tensor | None  # [B, T] critic's value of the state before each token; None: no critic
    scores: torch.Tensor  # [B] reward after the missing-stop penalty
    advantages: torch.Tensor | None = None  # [B, T] after whitening (PPO); [B] per sequence (GRPO, RLOO)
    returns: torch.Tensor | None = None  # [B, T] value targets
    reward_parts: torch.Tensor | None = None  # [B, F] each reward's scores (NaN: that function said None)

    def select(self, rows: torch.Tensor) -> "Rollout":
        """Rows ``rows``, with columns that are padding in every selected row trimmed away.

        Trimming leaves every kept token's numbers unchanged (positions skip left padding) and
        saves the work of computing columns nobody reads.
        """
        picked = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        picked = {k: v[rows] if v is not None else None for k, v in picked.items()}
        first_query_column = int(picked["query_mask"].any(0).int().argmax()) if picked["query_mask"].any() else 0
        width = max(int(picked["lengths"].max()), 1)
        for name, value in picked.items():
            if value is None or value.dim() < 2 or name == "reward_parts":
                continue
            if name in ("queries", "query_mask"):
                picked[name] = value[:, first_query_column:]
            else:
                picked[name] = value[:, :width]
        return Rollout(**picked)

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum())

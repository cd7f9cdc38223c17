"""Log-probabilities and entropies of chosen tokens, computed in row chunks.

Without gradients the ``[rows, vocab]`` log-softmax never exists for more than ``chunk_size``
rows at a time: for a 128k vocabulary it dwarfs the model. With gradients autograd keeps each
chunk's scaled logits until the backward pass, so chunking bounds the extra tensors, not all
of them. Logits are divided by the sampling temperature first, so the numbers describe the
distribution the tokens were sampled from (ppo-details 6).
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_ROWS = 1024


def _chunks(rows: int, chunk_size: int):
    for start in range(0, rows, chunk_size):
        yield slice(start, min(start + chunk_size, rows))


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_ROWS,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log softmax(logits / temperature)`` at ``tokens``, and optionally the entropy.

    ``logits`` is ``[B, T, V]`` (the positions that predict each token), ``tokens`` ``[B, T]``.
    Returns ``(logprobs [B, T], entropy [B, T] or None)`` in float32. The logprobs are
    differentiable; the entropy only with ``entropy_grad`` (an entropy bonus), since its
    softmax would otherwise be kept for a backward pass that never uses it.
    """
    batch, width, vocab = logits.shape
    flat_logits = logits.reshape(-1, vocab)
    flat_tokens = tokens.reshape(-1)
    logprob_chunks, entropy_chunks = [], []
    for rows in _chunks(flat_logits.size(0), chunk_size):
        scaled = flat_logits[rows].float() / temperature  # [rows, V]
        normaliser = torch.logsumexp(scaled, dim=-1)
        chosen = scaled.gather(1, flat_tokens[rows].unsqueeze(1)).squeeze(1)
        logprob_chunks.append(chosen - normaliser)
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                probs = torch.softmax(scaled, dim=-1)
                entropy_chunks.append(normaliser - (probs * scaled).sum(-1))
    logprobs = torch.cat(logprob_chunks).view(batch, width)
    entropy = torch.cat(entropy_chunks).view(batch, width) if with_entropy else None
    return logprobs, entropy

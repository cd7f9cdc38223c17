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


# --- from hidden states: the [rows, vocab] logits never exist beyond one chunk ----------------

CHUNK_ELEMENTS = 1 << 24  # 64 MiB of float32 logits per chunk
KEEP_PROBS_BYTES = 1 << 28  # below 256 MiB of probabilities the backward pass reuses them


def head_chunk_rows(vocab: int, max_rows: int = DEFAULT_CHUNK_ROWS) -> int:
    """Rows per chunk: at most ``max_rows``, and at most ``CHUNK_ELEMENTS`` logits."""
    return max(1, min(max_rows, CHUNK_ELEMENTS // vocab))


def _scaled_logits(hidden, weight, bias, temperature: float, compute_dtype: torch.dtype, out=None) -> torch.Tensor:
    """``(hidden @ weight.T + bias) / temperature`` in float32 (or wider), the product in
    ``compute_dtype``; written into ``out`` (a reused buffer) when the product is already wide."""
    wide = _wide(compute_dtype)
    if out is not None and compute_dtype == wide:
        logits = torch.mm(hidden.to(compute_dtype), weight.to(compute_dtype).t(), out=out)
    else:
        logits = (hidden.to(compute_dtype) @ weight.to(compute_dtype).t()).to(wide)
    if bias is not None:
        logits += bias.to(wide)
    return logits.div_(temperature)


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _Buffer:
    """One ``[rows, vocab]`` scratch tensor reused by every chunk: a fresh tensor of that size
    per chunk costs a page fault per 4 KiB on CPU, which is as slow as the arithmetic."""

    def __init__(self, columns: int, dtype: torch.dtype, device: torch.device):
        self.columns, self.dtype, self.device = columns, dtype, device
        self.tensor = None

    def rows(self, part: slice) -> torch.Tensor:
        count = part.stop - part.start
        if self.tensor is None or self.tensor.size(0) < count:
            self.tensor = torch.empty(count, self.columns, dtype=self.dtype, device=self.device)
        return self.tensor[:count]


class _HeadLogprobs(torch.autograd.Function):
    """Logprobs of ``tokens`` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Forward and backward both walk the rows in chunks. The backward pass either reuses the
    chunks' probabilities (when all of them fit in ``KEEP_PROBS_BYTES``) or recomputes them
    from the saved hidden states: one extra output-layer matmul instead of holding the
    ``[rows, vocab]`` logits. With ``d logp_y / d z = (onehot(y) - p) / tau`` for logits
    ``z``, the probabilities enter both products unchanged and the one-hot part is a row
    gather / scatter: no pass over ``[rows, vocab]`` beyond the matmuls. With
    ``entropy_grad`` the entropy is differentiable too: ``d H / d z = -p (log p + H) / tau``
    joins the probabilities' part, which then takes one pass to combine.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, chunk_rows, compute_dtype, with_entropy, keep_probs,
                entropy_grad):
        rows, vocab = hidden.size(0), weight.size(0)
        wide = _wide(compute_dtype)
        logprobs = torch.empty(rows, dtype=wide, device=hidden.device)
        tops, totals = torch.empty_like(logprobs), torch.empty_like(logprobs)  # softmax = exp(z - top) / total
        entropy = torch.empty_like(logprobs) if with_entropy else None
        kept = []
        logits_buffer, probs_buffer = _Buffer(vocab, wide, hidden.device), _Buffer(vocab, wide, hidden.device)
        for part in _chunks(rows, chunk_rows):
            out = logits_buffer.rows(part)
            shifted = _scaled_logits(hidden[part], weight, bias, temperature, compute_dtype, out)  # [rows, V]
            top = shifted.amax(-1, keepdim=True)
            shifted -= top  # every exponent <= 0
            chosen = shifted.gather(1, tokens[part].unsqueeze(1)).squeeze(1)
            if with_entropy or keep_probs:
                weights = torch.exp(shifted) if keep_probs else torch.exp(shifted, out=probs_buffer.rows(part))
                total = weights.sum(-1)
                if with_entropy:  # H = log S - sum(e^s * s) / S over the shifted logits s
                    entropy[part] = total.log() - torch.einsum("rv,rv->r", weights, shifted) / total
                if keep_probs:
                    kept.append(weights.div_(total.unsqueeze(1)))
            else:
                total = shifted.exp_().sum(-1)
            logprobs[part] = chosen - total.log()
            tops[part], totals[part] = top.squeeze(1), total
        ctx.save_for_backward(hidden, weight, bias, tokens, tops, totals, entropy if entropy_grad else None)
        ctx.kept = kept
        ctx.settings = (temperature, chunk_rows, compute_dtype)
        if entropy is None:
            return logprobs, None
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, tokens, tops, totals, entropy = ctx.saved_tensors
        temperature, chunk_rows, compute_dtype = ctx.settings
        kept, ctx.kept = ctx.kept, None
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        wide = _wide(compute_dtype)
        grad_hidden = torch.empty(hidden.shape, dtype=wide, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=wide, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=wide, device=bias.device) if need_bias else None
        cast_weight = weight.to(compute_dtype)
        buffer = _Buffer(weight.size(0), wide, hidden.device)
        for index, part in enumerate(_chunks(hidden.size(0), chunk_rows)):
            if kept:
                probs = kept[index]
            else:
                probs = _scaled_logits(hidden[part], weight, bias, temperature, compute_dtype, buffer.rows(part))
                probs = probs.sub_(tops[part].unsqueeze(1)).exp_().div_(totals[part].unsqueeze(1))  # as the forward
            # d loss / d z = g / tau * (onehot(y) - p), row by row: the one-hot part is ``scale``
            # at the chosen token, the rest ``-p * p_scale`` (``p_scale`` 1 once folded into p)
            scale = (grad_logprobs[part].to(wide) / temperature).unsqueeze(1)  # [rows, 1]
            p_scale = scale
            if entropy is not None:  # and - g_H / tau * p (log p + H)
                entropy_scale = (grad_entropy[part].to(wide) / temperature).unsqueeze(1)
                probs = _fold_entropy_gradient(probs, scale, entropy_scale, entropy[part].unsqueeze(1))
                p_scale = None
            chosen_tokens = tokens[part]
            cast_probs = probs.to(compute_dtype)
            if need_hidden:
                rows_grad = (cast_probs @ cast_weight).to(wide)  # [rows, H]
                if p_scale is not None:
                    rows_grad *= p_scale
                grad_hidden[part] = weight[chosen_tokens].to(wide) * scale - rows_grad
            if need_weight or need_bias:
                hidden_part = hidden[part].to(wide)  # [rows, H]
            if need_weight:
                p_hidden = hidden_part * p_scale if p_scale is not None else hidden_part
                if compute_dtype == wide:  # in place: no [V, H] temporary per chunk
                    grad_weight.addmm_(cast_probs.t(), p_hidden, alpha=-1)
                else:
                    grad_weight -= (cast_probs.t() @ p_hidden.to(compute_dtype)).to(wide)
                grad_weight.index_add_(0, chosen_tokens, hidden_part * scale)
            if need_bias:
                p_rows = p_scale if p_scale is not None else torch.ones_like(scale)
                grad_bias -= (p_rows.t().to(compute_dtype) @ cast_probs).squeeze(0).to(wide)
                grad_bias.index_add_(0, chosen_tokens, scale.squeeze(1))
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


def _fold_entropy_gradient(probs, scale, entropy_scale, entropy) -> torch.Tensor:
    """``p * scale + p * (log p + H) * entropy_scale`` in place of ``probs`` ``[rows, V]``:
    the whole non-one-hot part of ``-d loss / d z`` (``xlogy``: 0 where p underflowed to 0)."""
    surprise = torch.special.xlogy(probs, probs).mul_(entropy_scale)
    return probs.mul_(scale + entropy_scale * entropy).add_(surprise)


def head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    max_chunk_rows: int = DEFAULT_CHUNK_ROWS,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``token_logprobs`` of the output layer ``hidden @ weight.T + bias`` without its logits.

    ``hidden`` is ``[B, T, H]`` (the positions that predict each token), ``tokens`` ``[B, T]``.
    Under autocast the products run in the autocast dtype, as the output layer itself would.
    The entropy carries a gradient only with ``entropy_grad`` (an entropy bonus).
    """
    batch, width, size = hidden.shape
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    chunk_rows = head_chunk_rows(weight.size(0), max_chunk_rows)
    differentiable = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    keep_probs = differentiable and hidden.numel() // size * weight.size(0) * 4 <= KEEP_PROBS_BYTES
    with torch.autocast(device_type=device_type, enabled=False):
        logprobs, entropy = _HeadLogprobs.apply(
            hidden.reshape(-1, size), weight, bias, tokens.reshape(-1), temperature, chunk_rows, compute_dtype,
            with_entropy, keep_probs, with_entropy and entropy_grad and differentiable,
        )
    return logprobs.view(batch, width), entropy.view(batch, width) if entropy is not None else None

"""Log-probabilities and entropies of chosen tokens, computed in row chunks (or blocks).

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


# --- from hidden states: the [rows, vocab] logits never exist beyond one block ----------------

CHUNK_ELEMENTS = 1 << 24  # 64 MiB of float32 logits per block
CPU_BLOCK_COLUMNS = 2048  # vocabulary entries per block on CPU
KEEP_PROBS_BYTES = 1 << 28  # below 256 MiB of probabilities the backward pass reuses them


def head_blocks(
    vocab: int, device: torch.device, max_rows: int = DEFAULT_CHUNK_ROWS, columns: int | None = None
) -> tuple[int, int]:
    """``(rows, columns)`` of one block of the output layer's logits.

    On CPU a block is ``CPU_BLOCK_COLUMNS`` vocabulary entries wide, so that its logits stay
    near the core from the matmul that writes them through the max, exp and sum that read them;
    with whole rows each of those streams the ``[rows, vocab]`` slab through memory, and the
    output layer ran at half the speed of the model's other matmuls. 2048 entries beat 512 and
    1024 at all three workloads' shapes, forward and backward (the wider matmuls run faster;
    ``bench/RESULTS.md``). The softmax is then combined across a row's blocks as they come (a
    running max and sum). On an accelerator each block costs kernel launches instead, so a
    block is whole rows. Either way a block holds at most ``CHUNK_ELEMENTS`` logits and
    ``max_rows`` rows. ``columns`` overrides the width.
    """
    if columns is None:
        columns = CPU_BLOCK_COLUMNS if device.type == "cpu" else vocab
    columns = max(1, min(vocab, columns))
    return max(1, min(max_rows, CHUNK_ELEMENTS // columns)), columns


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


def _block_logits(hidden, weight, bias, part: slice, columns: slice, temperature, compute_dtype, buffer) -> torch.Tensor:
    """Scaled logits of rows ``part`` for vocabulary entries ``columns``, in ``buffer``'s block."""
    block_bias = bias[columns] if bias is not None else None
    out = buffer.block(part.stop - part.start, columns.stop - columns.start)
    return _scaled_logits(hidden[part], weight[columns], block_bias, temperature, compute_dtype, out)


def _take_chosen(logits: torch.Tensor, index: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """``chosen`` with each row's logit at ``index`` taken from this block ``[rows, columns]``
    where the index falls inside it (the row's token is one of the block's entries)."""
    inside = (index >= 0) & (index < logits.size(1))
    return torch.where(inside, logits.gather(1, index.clamp(0, logits.size(1) - 1).unsqueeze(1)).squeeze(1), chosen)


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _Buffer:
    """One scratch block reused by every block of logits: a fresh tensor per block costs a page
    fault per 4 KiB on CPU, which is as slow as the arithmetic."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.storage = torch.empty(0, dtype=dtype, device=device)

    def block(self, rows: int, columns: int) -> torch.Tensor:
        if self.storage.numel() < rows * columns:
            self.storage = torch.empty(rows * columns, dtype=self.dtype, device=self.device)
        return self.storage[: rows * columns].view(rows, columns)


class _RunningSoftmax:
    """The softmax of a block of rows over a vocabulary seen one block of columns at a time.

    It keeps the running max ``top`` of the scaled logits ``z``, ``total = sum exp(z - top)``
    and, for the entropy, ``spread = sum exp(z - top) * (z - top)``. When a block raises the
    max from ``t`` to ``t'`` the sums so far are rebased: ``total *= e^(t - t')`` and
    ``spread = e^(t - t') * (spread + (t - t') * total)``. At the end ``log softmax(z) =
    z - top - log total`` and the entropy is ``log total - spread / total``.
    """

    def __init__(self, with_entropy: bool):
        self.with_entropy = with_entropy
        self.top = self.total = self.spread = None

    def add(self, logits: torch.Tensor, weights_out: torch.Tensor | None) -> torch.Tensor:
        """Take one block ``[rows, columns]`` of scaled logits, which is left shifted by the new
        running max; returns their ``exp`` (in ``weights_out``, or in place without one)."""
        block_top = logits.amax(-1)
        top = block_top if self.top is None else torch.maximum(self.top, block_top)
        logits -= top.unsqueeze(1)  # every exponent <= 0
        weights = torch.exp(logits, out=weights_out) if weights_out is not None else logits.exp_()
        block_total = weights.sum(-1)
        block_spread = torch.linalg.vecdot(weights, logits) if self.with_entropy else None
        if self.top is None:
            self.total, self.spread = block_total, block_spread
        else:
            drop = self.top - top  # <= 0
            shrink = drop.exp()
            if self.with_entropy:
                self.spread = shrink * (self.spread + drop * self.total) + block_spread
            self.total = self.total * shrink + block_total
        self.top = top
        return weights


class _HeadLogprobs(torch.autograd.Function):
    """Logprobs of ``tokens`` under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Forward and backward both walk the logits in blocks (``head_blocks``). The backward pass
    either reuses the blocks' exponentials (when all of them fit in ``KEEP_PROBS_BYTES``) or
    recomputes them from the saved hidden states: one extra output-layer matmul instead of
    holding the ``[rows, vocab]`` logits. With ``d logp_y / d z = (onehot(y) - p) / tau`` for
    logits ``z``, the probabilities enter both products and the one-hot part is a row gather /
    scatter. With ``entropy_grad`` the entropy is differentiable too: ``d H / d z =
    -p (log p + H) / tau`` joins the probabilities' part.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, blocks, compute_dtype, with_entropy, keep_probs,
                entropy_grad):
        (rows, vocab), (block_rows, block_columns) = (hidden.size(0), weight.size(0)), blocks
        wide = _wide(compute_dtype)
        logprobs = torch.empty(rows, dtype=wide, device=hidden.device)
        totals = torch.empty_like(logprobs)  # softmax = exp(z - top) / total, ``top`` the last block's
        entropy = torch.empty_like(logprobs) if with_entropy else None
        column_blocks = list(_chunks(vocab, block_columns))
        block_tops = logprobs.new_empty(len(column_blocks), rows)  # the running top each block was shifted by
        kept = []  # per block: exp(z - its running top)
        logits_buffer, weights_buffer = _Buffer(wide, hidden.device), _Buffer(wide, hidden.device)
        cast_weight = weight.to(compute_dtype)
        for part in _chunks(rows, block_rows):
            softmax, chosen = _RunningSoftmax(with_entropy), torch.zeros_like(logprobs[part])
            for index_column, columns in enumerate(column_blocks):
                logits = _block_logits(hidden, cast_weight, bias, part, columns, temperature, compute_dtype, logits_buffer)
                chosen = _take_chosen(logits, tokens[part] - columns.start, chosen)
                if keep_probs:
                    kept.append(softmax.add(logits, torch.empty_like(logits)))
                else:
                    softmax.add(logits, weights_buffer.block(*logits.shape) if with_entropy else None)
                block_tops[index_column, part] = softmax.top
            logprobs[part] = chosen - softmax.top - softmax.total.log()
            totals[part] = softmax.total
            if with_entropy:
                entropy[part] = softmax.total.log() - softmax.spread / softmax.total
        ctx.save_for_backward(hidden, weight, bias, tokens, totals, block_tops, entropy if entropy_grad else None)
        ctx.kept = kept
        ctx.settings = (temperature, blocks, compute_dtype)
        if entropy is None:
            return logprobs, None
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, tokens, totals, block_tops, entropy = ctx.saved_tensors
        temperature, (block_rows, block_columns), compute_dtype = ctx.settings
        kept, ctx.kept = iter(ctx.kept or ()), None  # used up: its blocks are overwritten below
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        wide = _wide(compute_dtype)
        grad_hidden = torch.empty(hidden.shape, dtype=wide, device=hidden.device) if need_hidden else None
        # written whole by the first row part's blocks (no zero fill of a [vocab, hidden] matrix),
        # unless there are no rows
        fresh = torch.empty if hidden.size(0) else torch.zeros
        grad_weight = fresh(weight.shape, dtype=wide, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=wide, device=bias.device) if need_bias else None
        cast_weight = weight.to(compute_dtype)
        buffer = _Buffer(wide, hidden.device)
        for index_part, part in enumerate(_chunks(hidden.size(0), block_rows)):
            chosen_tokens, top, total = tokens[part], block_tops[-1, part].unsqueeze(1), totals[part].unsqueeze(1)
            # d loss / d z = g / tau * (onehot(y) - p) row by row: ``scale`` at the chosen token
            # (added after the blocks), and ``-p * scale`` everywhere, built block by block
            scale = (grad_logprobs[part].to(wide) / temperature).unsqueeze(1)  # [rows, 1]
            if entropy is not None:  # and - g_H / tau * p (log p + H)
                entropy_scale = (grad_entropy[part].to(wide) / temperature).unsqueeze(1)
                row_factor = 1 / total  # the plain probabilities first, for the fold below
            else:
                row_factor = scale / total
            hidden_part = hidden[part].to(compute_dtype)
            if need_hidden:
                grad_hidden[part] = weight[chosen_tokens].to(wide) * scale
            for index_column, columns in enumerate(_chunks(weight.size(0), block_columns)):
                block_top = block_tops[index_column, part].unsqueeze(1)
                weights = next(kept, None)  # exp(z - block_top), kept or made again as the forward did
                if weights is None:
                    logits = _block_logits(hidden, cast_weight, bias, part, columns, temperature, compute_dtype, buffer)
                    weights = logits.sub_(block_top).exp_()
                probs = weights.mul_((block_top - top).exp_().mul_(row_factor))  # rebased to the row's top, normalised
                if entropy is not None:
                    probs = _fold_entropy_gradient(probs, scale, entropy_scale, entropy[part].unsqueeze(1))
                cast_probs = probs.to(compute_dtype)
                if need_hidden:
                    _subtract_product(grad_hidden[part], cast_probs, cast_weight[columns])
                if need_weight:
                    _subtract_product(grad_weight[columns], cast_probs.t(), hidden_part, overwrite=index_part == 0)
                if need_bias:
                    grad_bias[columns] -= probs.sum(0)
            if need_weight:
                grad_weight.index_add_(0, chosen_tokens, hidden[part].to(wide) * scale)
            if need_bias:
                grad_bias.index_add_(0, chosen_tokens, scale.squeeze(1))
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


def _subtract_product(target: torch.Tensor, left: torch.Tensor, right: torch.Tensor, overwrite: bool = False) -> None:
    """``target -= left @ right`` (``target = -(left @ right)`` with ``overwrite``, whatever
    ``target`` held, NaN included), in place (no temporary) when the product is as wide as ``target``."""
    if left.dtype == right.dtype == target.dtype:
        target.addmm_(left, right, beta=0 if overwrite else 1, alpha=-1)
    elif overwrite:
        torch.neg((left @ right).to(target.dtype), out=target)
    else:
        target -= (left @ right).to(target.dtype)


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
    block_columns: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``token_logprobs`` of the output layer ``hidden @ weight.T + bias`` without its logits.

    ``hidden`` is ``[B, T, H]`` (the positions that predict each token), ``tokens`` ``[B, T]``.
    Under autocast the products run in the autocast dtype, as the output layer itself would.
    The entropy carries a gradient only with ``entropy_grad`` (an entropy bonus).
    ``block_columns`` overrides the vocabulary entries per block (``head_blocks``).
    """
    batch, width, size = hidden.shape
    device_type = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    blocks = head_blocks(weight.size(0), hidden.device, max_chunk_rows, block_columns)
    differentiable = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    keep_probs = differentiable and hidden.numel() // size * weight.size(0) * 4 <= KEEP_PROBS_BYTES
    with torch.autocast(device_type=device_type, enabled=False):
        logprobs, entropy = _HeadLogprobs.apply(
            hidden.reshape(-1, size), weight, bias, tokens.reshape(-1), temperature, blocks, compute_dtype,
            with_entropy, keep_probs, with_entropy and entropy_grad and differentiable,
        )
    return logprobs.view(batch, width), entropy.view(batch, width) if entropy is not None else None

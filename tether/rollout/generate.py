"""Sampling responses: a lean decoding loop that returns tokens and their log-probabilities.

Seed note 1: a response starts in column ``Q`` (the padded query width) of every row, so it
lines up with the outputs that produced it. tether samples with its own loop over the model's
KV cache instead of ``generate``:

* the distribution is exactly ``softmax(logits / (tau + 1e-7))`` (ppo-details 9): there are no
  logits processors, so nothing from the model's ``generation_config`` can leak in (fix 7);
* the log-probability of every sampled token is kept, which makes the rollout's separate
  policy forward pass unnecessary in full precision (ppo-details 10);
* the output layer runs on the last position only, and the loop stops as soon as every row
  has produced a stop token;
* rows that hold the same prompt next to each other (GRPO's and RLOO's groups) share one
  prefill: the prompt is run once and its KV cache copied to each row (``_distinct_rows``);
* on a GPU one decoding step (backbone and output layer) is captured once as a CUDA graph and
  replayed for every later token (``_GraphedStep``): an eager step of a small or mid-size model
  is bound by the host launching a few hundred kernels, not by the GPU;
* elsewhere, with ``torch_compile``, the step's backbone pass is compiled as a whole
  (``models/compiled.py``), for the same reason: on a 2-core CPU it took a W1 step from about
  6 ms to 4.5 ms (``bench/RESULTS.md``).

Position ids skip left padding, as in every forward pass (ppo-details 4).
"""

from __future__ import annotations

import functools
import warnings
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import StaticCache
from transformers.cache_utils import DynamicLayer, StaticLayer

from tether.errors import ConfigError
from tether.models.forward import accepts_argument, output_layer_split, sharded
from tether.models.compiled import compiled_decoding, eager_decoding
from tether.models.loading import bare_model
from tether.ops import position_ids_from_mask

def sampling_temperature(temperature: float) -> float:
    """The temperature generation samples with and every logprob divides by: TRL's ``+ 1e-7``,
    kept so that a TRL config gives the same numbers."""
    return temperature + 1e-7


@dataclass(frozen=True)
class SamplingConfig:
    """Ancestral sampling at ``temperature`` (PPO: nothing else, ppo-details 9), optionally
    restricted to the ``top_k`` tokens, the ``top_p`` nucleus or tokens of at least ``min_p``
    times the top probability, with a ``repetition_penalty`` on tokens already present (GRPO,
    RLOO: TRL's sampling fields). The log-probability kept for each token is always the one of
    the temperature-scaled distribution alone, as the training passes compute it."""

    max_new_tokens: int
    temperature: float  # already the effective one, ``sampling_temperature(tau)``
    stop_token_ids: tuple[int, ...]  # empty: always sample ``max_new_tokens`` (ppo-details 9a)
    pad_token_id: int
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float | None = None
    repetition_penalty: float = 1.0  # 1: off

    @property
    def filtered(self) -> bool:
        return bool(self.top_k) or self.top_p < 1.0 or bool(self.min_p) or self.repetition_penalty != 1.0


def sampling_config(
    response_length: int, temperature: float, stop_token_ids: list[int] | None, pad_token_id: int, **filters
) -> SamplingConfig:
    """``filters``: ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty`` (see ``SamplingConfig``)."""
    return SamplingConfig(
        max_new_tokens=response_length,
        temperature=sampling_temperature(temperature),
        stop_token_ids=tuple(stop_token_ids or ()),
        pad_token_id=pad_token_id,
        **filters,
    )


def filtered_weights(weights: torch.Tensor, scaled: torch.Tensor, config: SamplingConfig, seen: torch.Tensor | None):
    """Sampling weights ``[b, V]`` (``exp`` of ``scaled`` less its row maximum) restricted as
    ``config`` asks: repetition penalty on ``seen`` tokens (CTRL's: a positive logit divided by
    it, a negative one multiplied), then top-k, top-p and min-p, in the order of transformers'
    ``generate``. At least the most likely token always keeps its weight."""
    if config.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(scaled > 0, scaled / config.repetition_penalty, scaled * config.repetition_penalty)
        scaled = torch.where(seen, penalised, scaled)
        weights = (scaled - scaled.amax(-1, keepdim=True)).exp()
    if config.top_k and config.top_k < weights.size(-1):
        kth = torch.topk(weights, config.top_k, dim=-1).values[:, -1:]
        weights = weights.masked_fill(weights < kth, 0.0)
    if config.top_p < 1.0:  # the fewest top tokens that hold top_p of the mass left
        ordered, order = weights.sort(dim=-1, descending=True)
        before = ordered.cumsum(-1) - ordered  # probability mass of the tokens ranked above each
        drop = before >= config.top_p * ordered.sum(-1, keepdim=True)
        weights = weights.scatter(-1, order, ordered.masked_fill(drop, 0.0))
    if config.min_p:
        weights = weights.masked_fill(weights < config.min_p * weights.amax(-1, keepdim=True), 0.0)
    return weights


class Generation(NamedTuple):
    responses: torch.Tensor  # [B, T] ids; finished rows are filled with the pad id
    logprobs: torch.Tensor  # [B, T] float32 log-probability of each sampled token (0 after the stop)
    scores: torch.Tensor | None  # [B, T, V] sampling logits ``logits / tau_eff``, only when asked (tests)


@torch.no_grad()
def generate_responses(
    model,
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    config: SamplingConfig,
    chunk_size: int,
    output_scores: bool = False,
    cuda_graphs: bool = True,
    whole_cache: bool | None = None,
    compile_with: tuple[str | None, str | None] | None = None,
) -> Generation:
    """Sample one response per query, ``chunk_size`` rows at a time.

    Chunks that stop early are padded on the right (pad id, logprob 0, score 0) to the widest.
    A wrapped model (DDP, FSDP, PEFT) samples through the Hugging Face model inside it, whose
    LoRA layers are still in place.

    On CUDA, unless ``cuda_graphs`` is off, decoding replays a CUDA graph of one step where the
    model allows (a static KV cache of full attention in every layer, parameters not sharded);
    other models decode with eager steps. Attention then reads the whole preallocated cache,
    the fixed shapes a graph needs. ``whole_cache`` chooses that layout (True) or a cache that
    grows by one position per step (False); by default (None) the whole layout on CUDA, where
    eager bf16 steps over lengths not seen before ran 3x slower (an H100,
    ``bench/cuda_check.py``), and the growing one elsewhere (on CPU it reads less memory).
    """
    model = bare_model(model)
    split = output_layer_split(model)
    output_layer = _OutputLayer(split[1], min(chunk_size, queries.size(0))) if split is not None else None
    on_cuda = queries.device.type == "cuda"
    graphs = cuda_graphs and on_cuda and not sharded(model) and model not in _UNCAPTURABLE
    compiled = compile_with is not None and split is not None and not graphs and not sharded(model)
    whole = (on_cuda or compiled) if whole_cache is None else whole_cache
    on_cpu = queries.device.type == "cpu"
    step_hidden = compiled_decoding(*compile_with, on_cpu) if compiled and whole else None
    with eager_decoding():  # compiled layers run the prefill eagerly; ``step_hidden`` opts out
        chunks = [
            _sample_chunk(
                model, split, output_layer, queries[start : start + chunk_size], query_mask[start : start + chunk_size],
                config, output_scores, graphs, whole, step_hidden,
            )
            for start in range(0, queries.size(0), chunk_size)
        ]
    width = max(chunk.responses.size(1) for chunk in chunks)
    return Generation(
        responses=torch.cat([_pad_right(c.responses, width, config.pad_token_id) for c in chunks]),
        logprobs=torch.cat([_pad_right(c.logprobs, width, 0.0) for c in chunks]),
        scores=torch.cat([_pad_right(c.scores, width, 0.0) for c in chunks]) if output_scores else None,
    )


SAMPLING_BLOCK = 256


def sample_tokens(weights: torch.Tensor) -> torch.Tensor:
    """One id per row of ``weights [b, V]`` (non-negative, any scale), drawn with probability
    ``weights / weights.sum()`` by inverting the cumulative distribution.

    Exact like ``torch.multinomial``, but one uniform number per row instead of one random
    number per vocabulary entry (which dominated decoding time on CPU). Two levels: the sums of
    blocks of ``SAMPLING_BLOCK`` ids pick a block, then the block's own cumulative sum picks the
    id; the cumulative sums run in float64, so a 128k vocabulary accumulates no visible
    rounding. Ids of weight 0 are never drawn.
    """
    rows, vocab = weights.shape
    blocks = -(-vocab // SAMPLING_BLOCK)
    if blocks * SAMPLING_BLOCK != vocab:
        weights = torch.nn.functional.pad(weights, (0, blocks * SAMPLING_BLOCK - vocab))
    padded = weights.view(rows, blocks, SAMPLING_BLOCK)
    block_cumulative = padded.sum(-1).double().cumsum(-1)  # [b, blocks]
    uniform = torch.rand(rows, 1, dtype=torch.float64, device=weights.device) * block_cumulative[:, -1:]
    block = torch.searchsorted(block_cumulative, uniform, right=True).clamp_(max=blocks - 1)  # [b, 1]
    before = torch.where(block > 0, block_cumulative.gather(1, (block - 1).clamp(min=0)), torch.zeros_like(uniform))
    inside = padded.gather(1, block.unsqueeze(-1).expand(rows, 1, SAMPLING_BLOCK)).squeeze(1)  # [b, SAMPLING_BLOCK]
    offset = torch.searchsorted(inside.double().cumsum(-1), uniform - before, right=True).clamp_(max=SAMPLING_BLOCK - 1)
    # rounding can land past the block's last positive weight: step back to it
    last_positive = ((inside > 0).long() * torch.arange(SAMPLING_BLOCK, device=weights.device)).amax(-1, keepdim=True)
    return (block * SAMPLING_BLOCK + torch.minimum(offset, last_positive)).squeeze(1)


class _OutputLayer:
    """The output layer at the last position, ``[b, H] -> [b, V]``, built once per
    ``generate_responses`` call and shared by its chunks.

    Decoding multiplies a few rows by the whole output matrix once per token. On CPU in fp32
    the matrix is laid out once for oneDNN's GEMM (``_packed_for_onednn``), which runs these
    shapes about twice as fast as the default BLAS; otherwise the product is
    ``(W @ h^T)^T``, which CPU GEMM kernels also run faster than ``h @ W^T`` (transposition
    included). Either way the numbers are the output layer's to fp32 rounding.
    """

    def __init__(self, head: torch.nn.Linear, rows: int):
        self.weight, self.bias = head.weight, head.bias
        self.packed = _packed_for_onednn(self.weight, rows)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(hidden, self.packed, self.bias, "none", [None], "")
        logits = torch.mm(self.weight, hidden.t()).t().contiguous()  # [b, V]
        return logits + self.bias if self.bias is not None else logits


def _packed_for_onednn(weight: torch.Tensor, rows: int):
    """``weight`` reordered for oneDNN's linear kernel, or None where that does not apply: not
    a CPU fp32 product, torch without oneDNN, or a kernel that fails ``_onednn_matches_matmul``."""
    usable = (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )
    if not usable or not _onednn_matches_matmul():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, rows)
    except RuntimeError:  # a layout oneDNN refuses: the plain product
        return None


@functools.cache
def _onednn_matches_matmul() -> bool:
    """Whether oneDNN's packed linear kernel gives a plain matmul's numbers (once per process,
    on random numbers of its own generator: the global random stream is left alone)."""
    generator = torch.Generator().manual_seed(0)
    weight, rows = torch.randn(96, 40, generator=generator), torch.randn(5, 40, generator=generator)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows.size(0))
        got = torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [None], "")
    except (RuntimeError, AttributeError):
        return False
    return bool(torch.allclose(got, rows @ weight.t(), rtol=1e-4, atol=1e-4))


def _next_token_logits(model, split, output_layer, **inputs) -> tuple[torch.Tensor, object]:
    """Logits ``[b, V]`` at the last position, and the cache."""
    if split is None:
        keep_last = {"logits_to_keep": 1} if accepts_argument(model, "logits_to_keep") else {}
        output = model(**inputs, **keep_last)
        return output.logits[:, -1], _returned_cache(output)
    backbone, _ = split
    output = backbone(**inputs)
    return output_layer(output.last_hidden_state[:, -1]), _returned_cache(output)


def _returned_cache(output):
    """The KV cache a forward pass returned (``cache`` in transformers 5, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


class _FilledStaticLayer(StaticLayer):
    """A static cache layer that hands attention only the positions written so far. The rest
    are zeros the mask would hide; reading them anyway costs as much as the attention itself
    (a decoding step on CPU is bound by memory traffic). Its shapes change every step, and it
    cannot be cropped (only tether's loop uses it, once)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, max_cache_len: int):
        super().__init__(max_cache_len)
        self.filled = 0  # a Python int: reading it never waits for the device

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self.filled += key_states.shape[-2]
        return keys[:, :, : self.filled], values[:, :, : self.filled]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.filled + query_length, 0


def _kv_cache(model, length: int, whole: bool):
    """A preallocated KV cache of ``length`` positions (no copy of the cache per token), or
    ``None`` where the architecture does not support one (the model then makes its own), and
    whether attention reads its whole length.

    Where every layer has full attention, attention reads only the positions written so far,
    unless ``whole``: then it reads all ``length`` positions (the mask hides the rest), the fixed
    shapes a CUDA graph needs. Other architectures keep their own layers and report False.
    """
    try:
        cache = StaticCache(config=model.config, max_cache_len=length)
    except Exception:  # an architecture without a static layout (e.g. sliding or state-space layers)
        return None, False
    full_attention = all(type(layer) is StaticLayer for layer in cache.layers)
    if full_attention and not whole:
        cache.layers = [_FilledStaticLayer(length) for _ in cache.layers]
    return cache, full_attention and whole


# models whose decoding step failed to capture once: they decode eagerly from then on
_UNCAPTURABLE: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


class _GraphedStep:
    """A decoding step, ``step(ids [b, 1], positions [b, 1]) -> logits [b, V]``, run eagerly
    once and then captured as a CUDA graph that every later call replays.

    The step reads its inputs from fixed buffers and writes the KV cache and its logits in
    place, so a replay is the whole step: the cache's write position is a device tensor that
    the graph itself advances, and the attention mask is a whole-length buffer the caller fills
    in before each call. The logits are the graph's own buffer, overwritten by the next call.

    Autocast's cache of weights cast to bf16 is off while capturing: the graph casts them
    itself on every replay instead of reading copies that autocast may free. If capture fails
    (a model that reads device values on the host mid-forward), the step stays eager and
    ``model`` decodes eagerly from then on, with one warning.
    """

    def __init__(self, step, model, rows: int, device: torch.device):
        self.step = step
        self.model = model
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager = False
        self.logits: torch.Tensor | None = None

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        if self.eager:
            return self.step(self.ids, self.positions)
        return self._run_then_capture()

    def _run_then_capture(self) -> torch.Tensor:
        with torch.cuda.device(self.ids.device):
            # the eager run warms up on a side stream (allocator, cuBLAS handles), as capture requires
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), self._autocast_uncached():
                logits = self.step(self.ids, self.positions).clone()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                # the outer stream context puts the caller's stream back even when ending the
                # capture fails, which torch's graph context alone does not
                with torch.cuda.stream(torch.cuda.current_stream()):
                    with self._autocast_uncached(), torch.cuda.graph(graph):
                        self.logits = self.step(self.ids, self.positions)
            except Exception as error:  # noqa: BLE001 - any failure leaves the step eager
                warnings.warn(f"decoding without a CUDA graph: capturing a step failed ({error})", stacklevel=2)
                _UNCAPTURABLE.add(self.model)
                self.eager = True
            else:
                self.graph = graph
        return logits

    @staticmethod
    def _autocast_uncached():
        enabled = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        return torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False)


def _sample_chunk(
    model, split, output_layer, queries, query_mask, config: SamplingConfig, output_scores: bool,
    graphs: bool, whole_cache: bool, step_hidden=None,
) -> Generation:
    rows, width = queries.shape
    device = queries.device
    stops = torch.tensor(config.stop_token_ids, dtype=torch.long, device=device)
    cache_argument = "cache" if accepts_argument(split[0] if split else model, "cache") else "past_key_values"
    cache, whole = _kv_cache(model, width + config.max_new_tokens, whole_cache)
    if whole:  # the mask covers the whole cache; each step's column is set before the step
        attention_mask = torch.zeros(rows, width + config.max_new_tokens, dtype=torch.long, device=device)
        attention_mask[:, :width] = query_mask
    else:
        attention_mask = query_mask.long()
    next_position = query_mask.long().sum(1, keepdim=True)  # [b, 1] real tokens so far
    firsts, inverse = _distinct_rows(queries, query_mask) if _shares_prefill(cache) else (None, None)
    prefill = (lambda t: t) if inverse is None else (lambda t: t.index_select(0, firsts))  # noqa: E731
    logits, returned_cache = _next_token_logits(
        model, split, output_layer, input_ids=prefill(queries), attention_mask=prefill(attention_mask),
        position_ids=prefill(position_ids_from_mask(query_mask)), use_cache=True, **{cache_argument: cache},
    )
    if inverse is not None:  # every row gets a copy of its prompt's cache and logits
        _repeat_rows(cache, inverse)
        logits = logits.index_select(0, inverse)
    graphed = None
    if whole:
        step_inputs = dict(attention_mask=attention_mask, use_cache=True, **{cache_argument: cache})
        if step_hidden is not None:  # torch_compile: the backbone's pass compiled, then the output layer
            decode = lambda ids, positions: output_layer(  # noqa: E731
                step_hidden(split[0], input_ids=ids, position_ids=positions, **step_inputs)
            )
        else:
            decode = lambda ids, positions: _next_token_logits(  # noqa: E731
                model, split, output_layer, input_ids=ids, position_ids=positions, **step_inputs
            )[0]
        graphed = _GraphedStep(decode, model, rows, device) if graphs else None
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    seen = None
    if config.repetition_penalty != 1.0:  # the tokens of each row so far: its prompt's, then its own
        seen = torch.zeros(rows, logits.size(-1), dtype=torch.bool, device=device)
        seen.scatter_(1, queries.masked_fill(~query_mask.bool(), 0), query_mask.bool())
    tokens, logprobs, scores = [], [], []
    for step in range(config.max_new_tokens):
        scaled = logits.float().div_(config.temperature)  # [b, V]; the logits are not needed again
        top = scaled.amax(-1, keepdim=True)
        weights = (scaled - top).exp_()  # softmax up to its normaliser, which sampling does not need
        log_normaliser = top.squeeze(1) + weights.sum(-1).log()
        if config.filtered:
            weights = filtered_weights(weights, scaled, config, seen)
        token = sample_tokens(weights).masked_fill_(finished, config.pad_token_id)  # [b]
        if seen is not None:
            seen.scatter_(1, token.unsqueeze(1), True)
        chosen = scaled.gather(1, token.unsqueeze(1)).squeeze(1) - log_normaliser
        tokens.append(token)
        logprobs.append(chosen.masked_fill_(finished, 0.0))
        if output_scores:
            scores.append(scaled.masked_fill(finished.unsqueeze(1), 0.0))
        if stops.numel():
            finished |= torch.isin(token, stops)
            if bool(finished.all()):
                break
        if step + 1 == config.max_new_tokens:
            break
        if whole:
            attention_mask[:, width + step] = 1
            logits = (graphed or decode)(token.unsqueeze(1), next_position)
        else:
            cache = cache if cache is not None else returned_cache
            if cache is None:
                raise ConfigError(
                    f"{type(model).__name__} returned no KV cache; tether needs a model that supports use_cache"
                )
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(rows, 1)], dim=1)
            logits, returned_cache = _next_token_logits(
                model, split, output_layer, input_ids=token.unsqueeze(1), attention_mask=attention_mask,
                position_ids=next_position, use_cache=True, **{cache_argument: cache},
            )
        next_position = next_position + 1
    return Generation(
        responses=torch.stack(tokens, dim=1),
        logprobs=torch.stack(logprobs, dim=1),
        scores=torch.stack(scores, dim=1) if output_scores else None,
    )


def _distinct_rows(queries: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Where some rows repeat the row above (a group of completions of one prompt): the first
    row of each run ``[u]`` and each row's run ``[b]``; ``(None, None)`` when no row repeats."""
    if queries.size(0) < 2:
        return None, None
    repeats = (queries[1:] == queries[:-1]).all(1) & (query_mask[1:] == query_mask[:-1]).all(1)
    if not bool(repeats.any()):
        return None, None
    starts = torch.cat([repeats.new_ones(1), ~repeats])
    return starts.nonzero().squeeze(1), starts.long().cumsum(0) - 1


def _repeat_rows(cache, rows: torch.Tensor) -> None:
    """Make a KV cache prefilled for the distinct prompts hold row ``rows[i]`` in row ``i``."""
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, rows)
        layer.values = layer.values.index_select(0, rows)
        if hasattr(layer, "batch_size"):
            layer.batch_size = rows.numel()


def _shares_prefill(cache) -> bool:
    """Whether a prompt's prefilled cache can be copied to other rows: layers of full attention
    alone (a sliding window or state-space layer keeps more than keys and values)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) in (StaticLayer, _FilledStaticLayer, DynamicLayer) for layer in layers)


def _pad_right(tensor: torch.Tensor, width: int, value) -> torch.Tensor:
    missing = width - tensor.size(1)
    if missing == 0:
        return tensor
    shape = (tensor.size(0), missing, *tensor.shape[2:])
    return torch.cat([tensor, torch.full(shape, value, dtype=tensor.dtype, device=tensor.device)], dim=1)

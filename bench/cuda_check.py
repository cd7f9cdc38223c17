"""Checks of tether's CUDA paths, for a machine with a GPU: ``python bench/cuda_check.py``.

CI has no GPU, so these run by hand (the trainer tests also run on CUDA with
``TETHER_TEST_DEVICE=cuda``). Each check prints one line and the script exits 1 if any fails:

* the output layer's logprobs without logits (``head_logprobs``, whole-row chunks on CUDA)
  against float64 logits, values, entropy and both gradients, in fp32 and under bf16 autocast,
  at the W1-W3 shapes;
* the decoding loop's logprobs of its own samples against a forward pass over the finished
  sequences, in fp32 and under bf16 autocast;
* decoding through a CUDA graph against eager decoding: the same tokens under a seed, the graph
  really captured, and the time of each at a G1-shaped model; a step that cannot be captured
  falls back to eager steps;
* peak CUDA memory of the W3 policy-logprob pass with gradients, against the materialised logits.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tether.models.forward import policy_logprobs  # noqa: E402
from tether.ops import lengths_to_mask, response_lengths, token_logprobs  # noqa: E402
from tether.ops.logprobs import head_logprobs  # noqa: E402
from tether.data.prompts import left_pad  # noqa: E402
from tether.rollout import generate  # noqa: E402
from tether.rollout.generate import generate_responses, sampling_config  # noqa: E402
from tether.tiny import numbered_words, tiny_causal_lm, word_tokenizer  # noqa: E402

CUDA = torch.device("cuda")
# rows x hidden x vocab of one micro-batch's output layer in W1, W2 and W3
SHAPES = {"W1": (512, 256, 8192), "W2": (2048, 256, 32000), "W3": (4096, 128, 128000)}
failures: list[str] = []


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference).norm() / reference.norm()).item()


def check(name: str, error: float, limit: float) -> None:
    ok = error <= limit  # NaN fails
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {error:.2e} (limit {limit:.0e})", flush=True)
    if not ok:
        failures.append(name)


def head_against_float64(shape: str, bf16: bool) -> None:
    rows, width, vocab = SHAPES[shape]
    gen = torch.Generator(device=CUDA).manual_seed(0)
    batch = 16  # rows as 16 sequences
    hidden = torch.randn(batch, rows // batch, width, device=CUDA, generator=gen)
    weight = torch.randn(vocab, width, device=CUDA, generator=gen) / width**0.5
    tokens = torch.randint(0, vocab, (batch, rows // batch), device=CUDA, generator=gen)
    upstream = torch.randn(batch, rows // batch, device=CUDA, generator=gen)

    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    if bf16:  # the reference sees the operands bf16 autocast hands the product
        h_in, w_in = h.bfloat16().double(), w.bfloat16().double()
    else:
        h_in, w_in = h, w
    ref_logp, ref_entropy = token_logprobs(h_in @ w_in.T, tokens, 0.7, with_entropy=True)
    (ref_logp * upstream).sum().backward()
    reference = (ref_logp.detach(), ref_entropy, h.grad, w.grad)

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        logp, entropy = head_logprobs(h, w, None, tokens, 0.7, with_entropy=True)
    (logp * upstream).sum().backward()
    limit = 2e-2 if bf16 else 1e-5
    precision = "bf16" if bf16 else "fp32"
    for name, value, ref in zip(("logprobs", "entropy", "grad hidden", "grad weight"),
                                (logp.detach(), entropy, h.grad, w.grad), reference):
        check(f"head {shape} {precision} {name}", relative_error(value, ref), limit)


def policy_and_prompts(vocab: int, hidden: int, layers: int, rows: int):
    tokenizer = word_tokenizer(numbered_words(vocab - 4))
    policy = tiny_causal_lm(tokenizer, seed=0, hidden_size=hidden, num_layers=layers, num_heads=hidden // 64,
                            intermediate_size=hidden * 8 // 3, max_positions=512)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, vocab, (int(n),), generator=gen).tolist() for n in torch.randint(8, 25, (rows,), generator=gen)]
    queries, query_mask = (t.to(CUDA) for t in left_pad(prompts, pad_token_id=0))
    return policy.to(CUDA).eval(), queries, query_mask


def generation_against_forward(bf16: bool) -> None:
    policy, queries, query_mask = policy_and_prompts(8192, 256, 4, 32)
    config = sampling_config(64, 0.7, [2], 0)
    torch.manual_seed(2)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        generation = generate_responses(policy, queries, query_mask, config, chunk_size=32)
    error = error_against_forward(policy, queries, query_mask, generation, config, bf16)
    precision = "bf16" if bf16 else "fp32"
    # fp32: the same function by two kernel paths (KV cache vs full sequence). bf16: what a
    # rollout would inherit if it trusted generation's logprobs, so tether re-scores under bf16.
    check(f"generation logprobs vs forward {precision} (max abs)", error, 1e-4 if not bf16 else 1.0)


def graph_against_eager(bf16: bool, shape: tuple[int, int, int, int], tokens: int) -> None:
    """Same seed, graphed and eager decoding over the same whole-length cache layout, and the
    time of each (eager also over a cache that grows by one position per step).

    fp32: the same tokens and logprobs. bf16: the graph's kernels may round differently (cuBLAS
    picks by stream and workspace), and one flipped sample changes the rest of its row; so each
    run's logprobs are checked against a forward pass over its own samples, and the graph's
    error must be bf16's, as the eager run's is. The graph must really have been captured."""
    vocab, hidden, layers, rows = shape
    policy, queries, query_mask = policy_and_prompts(vocab, hidden, layers, rows)
    config = sampling_config(tokens, 0.7, [], 0)  # no stop id: every row runs the full length
    layouts = {"graph": (True, True), "eager": (False, True), "growing": (False, False)}
    results, seconds = {}, {}
    for name in ("graph", "eager", "graph", "growing"):  # the second graph run is timed warm
        graphs, whole = layouts[name]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16), captures() as captured:
            torch.manual_seed(5)
            torch.cuda.synchronize()
            start = time.perf_counter()
            results[name] = generate_responses(
                policy, queries, query_mask, config, rows, cuda_graphs=graphs, whole_cache=whole
            )
            torch.cuda.synchronize()
            seconds[name] = time.perf_counter() - start
        if graphs:
            check(f"graph {hidden}x{layers}: steps left eager (of {len(captured)})",
                  float(sum(not ok for ok in captured)) if captured else 1.0, 0.0)
    precision = "bf16" if bf16 else "fp32"
    if bf16:
        errors = {name: error_against_forward(policy, queries, query_mask, results[name], config, bf16) for name in ("graph", "eager")}
        check(f"graph {precision} {hidden}x{layers}: logprobs vs forward (max abs; eager's {errors['eager']:.1e})",
              errors["graph"], 2 * errors["eager"] + 1e-3)
    else:
        same = torch.equal(results["graph"].responses, results["eager"].responses)
        check(f"graph vs eager {precision} {hidden}x{layers}: tokens differ", 0.0 if same else 1.0, 0.0)
        error = (results["graph"].logprobs - results["eager"].logprobs).abs().max().item()
        check(f"graph vs eager {precision} {hidden}x{layers}: logprobs (max abs)", error, 1e-5)
    print(f"info decoding {rows} rows x {tokens} tokens, {hidden}x{layers} {precision}: eager {seconds['eager']:.2f} s "
          f"(growing cache {seconds['growing']:.2f} s), graphed {seconds['graph']:.2f} s "
          f"({seconds['eager'] / seconds['graph']:.1f}x)", flush=True)


@contextlib.contextmanager
def captures():
    """Whether each ``_GraphedStep`` made inside the block ended with a captured graph."""
    original = generate._GraphedStep._run_then_capture
    outcomes: list[bool] = []

    def recorded(self):
        logits = original(self)
        outcomes.append(self.graph is not None)
        return logits

    generate._GraphedStep._run_then_capture = recorded
    try:
        yield outcomes
    finally:
        generate._GraphedStep._run_then_capture = original


def fallback_when_capture_fails() -> None:
    """A step that reads a device value on the host cannot be captured: it stays eager, with one
    warning, gives the same logits, the model is remembered, and the caller's stream is back."""
    model = torch.nn.Linear(4, 4).to(CUDA)
    weight = torch.randn(8, 4, device=CUDA)

    def step(ids, positions):
        if ids.sum().item() < 0:  # a host read: illegal while capturing
            raise AssertionError("negative ids")
        return (ids + positions).float() @ weight[:1]

    graphed = generate._GraphedStep(step, model, 3, CUDA)
    ids, positions = torch.tensor([[1], [2], [3]], device=CUDA), torch.tensor([[4], [5], [6]], device=CUDA)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [graphed(ids, positions + k) for k in range(3)]
    expected = [step(ids, positions + k) for k in range(3)]
    right = all(torch.equal(a, b) for a, b in zip(outputs, expected))
    warned = sum("without a CUDA graph" in str(w.message) for w in caught)
    stream_back = torch.cuda.current_stream() == torch.cuda.default_stream()
    ok = graphed.eager and graphed.graph is None and right and warned == 1 and model in generate._UNCAPTURABLE and stream_back
    check(f"capture failure falls back (eager {graphed.eager}, right {right}, warnings {warned}, stream back {stream_back})",
          0.0 if ok else 1.0, 0.0)


def error_against_forward(policy, queries, query_mask, generation, config, bf16: bool) -> float:
    """Largest gap between decoding's logprobs of its kept tokens and a forward pass over them."""
    responses = generation.responses
    mask = lengths_to_mask(response_lengths(responses, config.stop_token_ids), responses.size(1))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        scored, _ = policy_logprobs(policy, queries, query_mask, responses, mask, config.temperature, 64)
    return (generation.logprobs[mask] - scored[mask]).abs().max().item()


def w3_memory() -> None:
    rows, width, vocab = SHAPES["W3"]
    weight = torch.randn(vocab, width, device=CUDA, requires_grad=True)
    hidden = torch.randn(16, rows // 16, width, device=CUDA, requires_grad=True)
    tokens = torch.randint(0, vocab, (16, rows // 16), device=CUDA)
    peaks = {}
    for name in ("chunked", "materialised"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if name == "chunked":
            logp, _ = head_logprobs(hidden, weight, None, tokens, 0.7)
        else:
            logp, _ = token_logprobs(hidden @ weight.T, tokens, 0.7)
        logp.sum().backward()
        torch.cuda.synchronize()
        peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
        weight.grad = hidden.grad = None
    print(f"info W3 logprob pass with gradients, peak CUDA MiB above inputs: chunked {peaks['chunked']:.0f}, "
          f"materialised {peaks['materialised']:.0f}", flush=True)
    check("W3 chunked peak / materialised peak", peaks["chunked"] / peaks["materialised"], 0.5)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script checks tether's CUDA paths")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for shape in SHAPES:
        for bf16 in (False, True):
            head_against_float64(shape, bf16)
    for bf16 in (False, True):
        generation_against_forward(bf16)
        graph_against_eager(bf16, (8192, 256, 4, 32), 64)
    graph_against_eager(False, (32000, 768, 12, 64), 128)  # G1's shape
    graph_against_eager(True, (32000, 768, 12, 64), 128)
    fallback_when_capture_fails()
    w3_memory()
    print(f"{len(failures)} failed" + (f": {', '.join(failures)}" if failures else ""))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

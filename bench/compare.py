"""tether vs TRL 1.12 on the WORKLOADS.md workloads, alternating systems in separate processes.

    python bench/compare.py                    # W1 W2 W3, fp32, 4 updates each, 2 rounds
    python bench/compare.py W1 --bf16 --updates 3 --rounds 1
    python bench/compare.py W3 --lora --updates 3 --rounds 1    # a LoRA policy in both systems
    python bench/compare.py G1 G2 --device cuda --bf16           # GPU rows: 134M and 1.1B Llama shapes
    python bench/compare.py W1 --compile --updates 6 --rounds 1  # tether with torch_compile

Needs the benchmark extra (`pip install -e ".[bench]"`: trl==1.12.0). Prints, per workload:
seconds per update (median of the updates after the first, over all rounds), peak resident
memory (with ``--device cuda``: peak CUDA memory allocated), the tether/TRL ratios (also each
round's, to show the machine's drift) and the fraction of the matmul roofline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(system: str, workload: str, updates: int, bf16: bool, lora: bool, threads: int, device: str,
        compile_layers: bool = False) -> dict:
    command = [sys.executable, str(HERE / "run_one.py"), system, workload, "--updates", str(updates),
               "--threads", str(threads), "--device", device, "--cache", str(HERE / ".fixtures")]
    if bf16:
        command.append("--bf16")
    if lora:
        command.append("--lora")
    if compile_layers:
        command.append("--compile")
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{system} {workload} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workloads", nargs="*", default=["W1", "W2", "W3"])
    parser.add_argument("--updates", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--compile", action="store_true",
                        help="tether with torch_compile; its first update (with the compile) is reported apart")
    options = parser.parse_args()
    rows = []
    for workload in options.workloads:
        results: dict[str, list[dict]] = {"tether": [], "trl": []}
        for _ in range(options.rounds):
            for system in ("trl", "tether"):  # alternate, so drifts in machine speed hit both
                results[system].append(
                    run(system, workload, options.updates, options.bf16, options.lora, options.threads, options.device,
                        options.compile)
                )
        summary = {}
        for system, runs in results.items():
            seconds = statistics.median(s for r in runs for s in r["seconds"][1:])
            summary[system] = {
                "seconds": seconds,
                "first_update": statistics.median(r["seconds"][0] for r in runs),  # with any compile
                "peak_gb": max(r["peak_cuda"] if options.device == "cuda" else r["peak_rss"] for r in runs) / 1e9,
                "phases": runs[-1].get("phases"),
                "graph_fallback": any(r.get("graph_fallback") for r in runs),
                "peak_reserved_gb": max(r["peak_cuda_reserved"] for r in runs) / 1e9 if options.device == "cuda" else None,
                "roofline": None if options.lora else statistics.median(
                    r["update_flops"] / seconds / r["matmul_flops"] for r in runs
                ),
            }
        # each round's TRL run next to the tether run right after it: how much the machine's
        # drift moves the ratio
        summary["per_round"] = [
            statistics.median(p["seconds"][1:]) / statistics.median(t["seconds"][1:])
            for p, t in zip(results["trl"], results["tether"])
        ]
        rows.append((workload, summary))
        print(json.dumps({"workload": workload, "bf16": options.bf16, "lora": options.lora, "device": options.device,
                          **summary}), flush=True)
    precision = ("bf16" if options.bf16 else "fp32") + (", LoRA" if options.lora else "")
    precision += ", torch_compile" if options.compile else ""
    memory = "peak CUDA GB" if options.device == "cuda" else "peak GB"
    print(f"\n| workload | precision | tether s/update | TRL s/update | speed-up | per round | tether {memory} "
          f"| TRL {memory} | memory ratio | tether roofline | TRL roofline |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for workload, s in rows:
        t, p = s["tether"], s["trl"]
        per_round = ", ".join(f"{ratio:.2f}x" for ratio in s["per_round"])
        print(f"| {workload} | {precision} | {t['seconds']:.2f} | {p['seconds']:.2f} | {p['seconds'] / t['seconds']:.2f}x "
              f"| {per_round} "
              f"| {t['peak_gb']:.2f} | {p['peak_gb']:.2f} | {t['peak_gb'] / p['peak_gb']:.2f} "
              f"| {_percent(t['roofline'])} | {_percent(p['roofline'])} |")


def _percent(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.1f}%"


if __name__ == "__main__":
    main()

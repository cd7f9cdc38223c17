"""``report.html``: the demo's figures as plots and tables a person would rather look at."""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from tether.saving import write_text_atomic  # noqa: E402

COLOURS = {"rm": "#1f77b4", "gold": "#d62728", "kl": "#2ca02c", "length": "#9467bd", "acc": "#ff7f0e"}


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _save(figure, path: Path) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path.name


def plot_scores(ppo: list[dict], summary: dict, path: Path) -> str:
    """Reward-model score (left axis) and gold score (right axis) per update: their scales differ."""
    updates = [m["update"] for m in ppo]
    figure, left = plt.subplots(figsize=(6.4, 3.6))
    right = left.twinx()
    left.plot(updates, [m["objective/scores"] for m in ppo], color=COLOURS["rm"], label="reward-model score")
    right.plot(updates, [m["gold/score"] for m in ppo], color=COLOURS["gold"], label="gold score (hidden rule)")
    right.axhline(summary["gold_best"], color=COLOURS["gold"], linestyle=":", linewidth=1, label="best possible gold")
    right.axhline(summary["gold_sft"], color="grey", linestyle="--", linewidth=1, label="SFT gold (held-out)")
    right.set_ylim(-1.05, 1.05)
    left.set_xlabel("PPO update")
    left.set_ylabel("reward-model score", color=COLOURS["rm"])
    right.set_ylabel("gold score", color=COLOURS["gold"])
    left.set_title("What PPO optimises (reward model) and what people prefer (gold)", fontsize=10)
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = left.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    left.legend(handles, labels, fontsize=8, loc="lower right")
    left.grid(alpha=0.3)
    return _save(figure, path)


def plot_single(ppo: list[dict], key: str, label: str, colour: str, path: Path) -> str:
    figure, axis = plt.subplots(figsize=(4.2, 3.0))
    axis.plot([m["update"] for m in ppo], [m[key] for m in ppo], color=colour)
    axis.set_xlabel("PPO update")
    axis.set_ylabel(label)
    axis.set_title(label)
    axis.grid(alpha=0.3)
    return _save(figure, path)


def plot_rm_accuracy(rm: list[dict], path: Path) -> str:
    points = [(m["step"], m["eval/accuracy"]) for m in rm if "eval/accuracy" in m]
    figure, axis = plt.subplots(figsize=(4.2, 3.0))
    axis.plot([s for s, _ in points], [a for _, a in points], marker="o", color=COLOURS["acc"])
    axis.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    axis.set_ylim(0.4, 1.0)
    axis.set_xlabel("reward-model training step")
    axis.set_ylabel("held-out pair accuracy")
    axis.set_title("Reward model learns the hidden taste")
    axis.grid(alpha=0.3)
    return _save(figure, path)


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _score(value: float) -> str:
    colour = "#2a7d2a" if value > 0.05 else "#b22222" if value < -0.05 else "#555"
    return f'<span style="color:{colour}">{value:+.2f}</span>'


def write_report(out: Path, summary: dict, samples: dict, prompts: list[str]) -> Path:
    """Plots as PNG files beside ``report.html``; returns the report's path."""
    ppo, rm = read_metrics(out / "ppo" / "metrics.jsonl"), read_metrics(out / "rm" / "metrics.jsonl")
    images = out / "report_files"
    images.mkdir(exist_ok=True)
    plots = [
        plot_scores(ppo, summary, images / "scores.png"),
        plot_single(ppo, "objective/kl", "KL to the reference (nats)", COLOURS["kl"], images / "kl.png"),
        plot_single(ppo, "val/response_length", "response length (tokens)", COLOURS["length"], images / "length.png"),
        plot_rm_accuracy(rm, images / "rm_accuracy.png"),
    ]
    figures = [
        ["reward model: held-out pair accuracy", f"{summary['rm_accuracy']:.3f}"],
        ["gold score, SFT policy", f"{summary['gold_sft']:+.3f}"],
        ["gold score, PPO policy", f"{summary['gold_ppo']:+.3f}"],
        ["gold score, best possible", f"{summary['gold_best']:+.3f}"],
        ["share of the SFT-to-best gap closed by PPO", f"{100 * summary['gap_closed']:.0f}%"],
        ["reward-model score, SFT -> PPO", f"{summary['rm_score_sft']:+.3f} -> {summary['rm_score_ppo']:+.3f}"],
        ["KL(PPO || SFT) per response", f"{summary['kl']:.2f} nats"],
        ["response length, SFT -> PPO", f"{summary['length_sft']:.1f} -> {summary['length_ppo']:.1f} words"],
        ["well-formed responses, SFT -> PPO", f"{summary['well_formed_sft']:.0%} -> {summary['well_formed_ppo']:.0%}"],
        ["run time", f"{summary['minutes']:.1f} minutes"],
    ]
    comparison = [
        [
            html.escape(prompt),
            f"{html.escape(sft['completion'])}<br>{_score(sft['gold'])} gold, {sft['rm']:+.2f} RM",
            f"{html.escape(ppo_row['completion'])}<br>{_score(ppo_row['gold'])} gold, {ppo_row['rm']:+.2f} RM",
        ]
        for prompt, sft, ppo_row in list(zip(prompts, samples["sft"], samples["ppo"]))[:12]
    ]
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>tether demo report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; color: #222; }}
h1 {{ margin-bottom: 0.2em; }} .lead {{ color: #555; margin-top: 0; }}
table {{ border-collapse: collapse; margin: 1em 0; width: 100%; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 6px 10px; text-align: left; vertical-align: top; }}
th {{ background: #f4f4f4; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 12px; }} .plots img {{ border: 1px solid #eee; }}
</style></head><body>
<h1>tether demo: RLHF on movie reviews</h1>
<p class="lead">SFT &rarr; reward model (learned from pairs labelled by a hidden rule) &rarr; PPO against the
reward model. The gold score is the hidden rule itself: the mean sentiment of the adjectives in a well-formed
review, -1 for broken text. PPO never sees it.</p>
<h2>Figures</h2>
{_table(figures, ["", "value"])}
<h2>Learning curves</h2>
<div class="plots">
<img src="report_files/{plots[0]}" alt="reward-model and gold score per update">
<img src="report_files/{plots[1]}" alt="KL per update">
<img src="report_files/{plots[2]}" alt="response length per update">
<img src="report_files/{plots[3]}" alt="reward-model accuracy">
</div>
<h2>Held-out prompts: SFT vs PPO</h2>
{_table(comparison, ["prompt", "SFT policy", "PPO policy"])}
<p class="lead">Rerun any stage alone: <code>tether sft --config {html.escape(str(out / 'sft.yaml'))}</code>,
<code>tether rm --config {html.escape(str(out / 'rm.yaml'))}</code>,
<code>tether ppo --config {html.escape(str(out / 'ppo.yaml'))}</code>.</p>
</body></html>
"""
    path = out / "report.html"
    write_text_atomic(path, page)
    return path

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
METHOD_COLOURS = {"sft": "grey", "ppo": "#1f77b4", "grpo": "#d62728", "dpo": "#2ca02c"}
METHODS = ("sft", "ppo", "grpo", "dpo")


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


def plot_gold_against_kl(summary: dict, path: Path) -> str:
    """One point per method: held-out gold score against KL to the SFT model."""
    figure, axis = plt.subplots(figsize=(4.6, 3.4))
    for name in METHODS:
        kl, gold = summary[f"kl_{name}"], summary[f"gold_{name}"]
        axis.scatter([kl], [gold], s=60, color=METHOD_COLOURS[name], label=name.upper(), zorder=3)
        axis.annotate(name.upper(), (kl, gold), textcoords="offset points", xytext=(6, 4), fontsize=9)
    axis.axhline(summary["gold_best"], color=COLOURS["gold"], linestyle=":", linewidth=1, label="best possible gold")
    axis.set_xlabel("KL to the SFT model (nats per response)")
    axis.set_ylabel("gold score (held-out)")
    axis.set_title("Gold score bought with KL, per method", fontsize=10)
    axis.set_ylim(min(-0.2, summary["gold_sft"] - 0.1), 1.1)
    axis.legend(fontsize=8, loc="lower right")
    axis.grid(alpha=0.3)
    return _save(figure, path)


def _two_axes(steps: list, left: tuple, right: tuple, right_limits: tuple, xlabel: str, title: str, path: Path) -> str:
    """Two curves over ``steps`` on their own y axes; ``left`` / ``right`` are ``(values, colour,
    label)``, each axis labelled in its curve's colour."""
    figure, left_axis = plt.subplots(figsize=(4.6, 3.4))
    right_axis = left_axis.twinx()
    for axis, (values, colour, label) in ((left_axis, left), (right_axis, right)):
        axis.plot(steps, values, color=colour, label=label)
        axis.set_ylabel(label, color=colour)
    right_axis.set_ylim(*right_limits)
    left_axis.set_xlabel(xlabel)
    left_axis.set_title(title, fontsize=10)
    left_axis.grid(alpha=0.3)
    return _save(figure, path)


def plot_grpo_scores(grpo: list[dict], path: Path) -> str:
    """GRPO's reward-model and gold score per optimizer step."""
    return _two_axes(
        [m["train/optimizer_steps"] for m in grpo],
        ([m["reward"] for m in grpo], COLOURS["rm"], "reward-model score"),
        ([m["gold/score"] for m in grpo], COLOURS["gold"], "gold score"), (-1.05, 1.05),
        "GRPO optimizer step", "GRPO: reward model and gold", path,
    )


def plot_dpo(dpo: list[dict], path: Path) -> str:
    """DPO's reward margin (beta x log-ratio, chosen less rejected) and pair accuracy per step."""
    return _two_axes(
        [m["step"] for m in dpo],
        ([m["rewards/margins"] for m in dpo], METHOD_COLOURS["dpo"], "reward margin (training pairs)"),
        ([m["rewards/accuracies"] for m in dpo], COLOURS["acc"], "share of training pairs ranked right"), (0.0, 1.05),
        "DPO optimizer step", "DPO: the pairs' implicit reward", path,
    )


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
    grpo, dpo = read_metrics(out / "grpo" / "metrics.jsonl"), read_metrics(out / "dpo" / "metrics.jsonl")
    images = out / "report_files"
    images.mkdir(exist_ok=True)
    plots = [
        plot_gold_against_kl(summary, images / "gold_vs_kl.png"),
        plot_scores(ppo, summary, images / "scores.png"),
        plot_grpo_scores(grpo, images / "grpo_scores.png"),
        plot_dpo(dpo, images / "dpo.png"),
        plot_single(ppo, "objective/kl", "PPO: KL to the reference (nats)", COLOURS["kl"], images / "kl.png"),
        plot_single(ppo, "val/response_length", "PPO: response length (tokens)", COLOURS["length"],
                    images / "length.png"),
        plot_rm_accuracy(rm, images / "rm_accuracy.png"),
    ]
    figures = [["reward model: held-out pair accuracy", f"{summary['rm_accuracy']:.3f}", "", "", ""]]
    rows = (
        ("gold score (best {:+.1f})".format(summary["gold_best"]), "gold", "{:+.3f}"),
        ("share of the SFT-to-best gap closed", "gap_closed", "{:.0%}"),
        ("reward-model score", "rm_score", "{:+.3f}"),
        ("KL to the SFT model per response (nats)", "kl", "{:.2f}"),
        ("response length (words)", "length", "{:.1f}"),
        ("well-formed responses", "well_formed", "{:.0%}"),
    )
    for label, key, form in rows:
        cells = [
            "" if key == "gap_closed" and name == "sft" else form.format(summary[f"{key}_{name}"]) for name in METHODS
        ]
        figures.append([label, *cells])
    figures.append(["run time", f"{summary['minutes']:.1f} minutes", "", "", ""])

    def cell(row: dict) -> str:
        return f"{html.escape(row['completion'])}<br>{_score(row['gold'])} gold, {row['rm']:+.2f} RM"

    comparison = [
        [html.escape(prompt), *(cell(samples[name][index]) for name in METHODS)]
        for index, prompt in enumerate(prompts[:12])
    ]
    reruns = [f"<code>tether {stage} --config {html.escape(str(out / f'{stage}.yaml'))}</code>"
              for stage in ("sft", "rm", "ppo", "grpo", "dpo")]
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
<p class="lead">SFT &rarr; reward model (learned from pairs labelled by a hidden rule) &rarr; PPO and GRPO
against the reward model; DPO straight from the same pairs. The gold score is the hidden rule itself: the mean
sentiment of the adjectives in a well-formed review, -1 for broken text. No trained method ever sees it.</p>
<h2>Figures (held-out prompts)</h2>
{_table(figures, ["", "SFT", "PPO", "GRPO", "DPO"])}
<div class="plots"><img src="report_files/{plots[0]}" alt="gold score against KL, per method"></div>
<h2>Learning curves</h2>
<div class="plots">
{"".join(f'<img src="report_files/{plot}" alt="{plot}">' for plot in plots[1:])}
</div>
<h2>Held-out prompts: SFT, PPO, GRPO and DPO</h2>
{_table(comparison, ["prompt", "SFT policy", "PPO policy", "GRPO policy", "DPO policy"])}
<p class="lead">Rerun any stage alone: {", ".join(reruns)}.</p>
</body></html>
"""
    path = out / "report.html"
    write_text_atomic(path, page)
    return path

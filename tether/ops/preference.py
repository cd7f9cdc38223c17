"""DPO and its relatives: losses of one preference pair from sequence log-probabilities.

Every loss reads, per pair, the policy's and the reference's log-probabilities of the chosen
and the rejected completion (summed over completion tokens), through the log-ratios

    c = log pi(chosen) - log ref(chosen)        r = log pi(rejected) - log ref(rejected)

and the f-divergence scores ``s(c)``, ``s(r)`` (``s`` the identity for DPO's reverse KL), with
``delta = s(c) - s(r)`` and ``beta`` the strength of the tie to the reference. The formulas are
the papers' (as TRL 1.12 documents them), each one line:

    sigmoid       -log sigmoid(beta delta)                                  DPO, Rafailov et al. 2023
    hinge         max(0, 1 - beta delta)                                    SLiC
    ipo           (s(c)/n_c - s(r)/n_r - 1/(2 beta))^2, n = completion tokens    IPO (per token, as TRL)
    exo_pair      KL of softmax(beta (s(c), s(r))) to (1 - eps, eps)         EXO, eps = label_smoothing
    nca_pair      -log sigmoid(beta c) - 1/2 log sigmoid(-beta c) - 1/2 log sigmoid(-beta r)   NCA
    robust        (-(1 - eps) log sigmoid(beta delta) + eps log sigmoid(-beta delta)) / (1 - 2 eps)
    bco_pair      -log sigmoid(beta c) - log sigmoid(-beta r)
    sppo_hard     (c - 1/(2 beta))^2 + (r + 1/(2 beta))^2
    apo_zero      1 - sigmoid(beta c) + sigmoid(beta r)                     APO, Eq. 7
    apo_down      sigmoid(beta c) + 1 - sigmoid(beta (c - r))              APO, Eq. 8
    discopop      (1 - m) (-log sigmoid(z)) + m exp(-z), z = beta delta, m = sigmoid(z / tau)
    sigmoid_norm  -log sigmoid(beta (s(c)/n_c - s(r)/n_r))

``sft`` is the chosen completions' negative log-likelihood per token, a term to combine with
the others (RPO / MPO). With the policy equal to its reference (c = r = 0) sigmoid is log 2,
hinge 1, ipo 1/(4 beta^2), sppo_hard 1/(2 beta^2), apo_* 1 (tests/test_dpo.py has them all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAIR_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
               "apo_down", "discopop", "sigmoid_norm")
LOSS_TYPES = (*PAIR_LOSSES, "sft")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass(frozen=True)
class PairLogratios:
    """Per-pair ``[P]`` log-ratios to the reference, their f-divergence scores, and the
    completions' token counts (for the per-token losses)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_score: torch.Tensor
    rejected_score: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @property
    def delta(self) -> torch.Tensor:
        return self.chosen_score - self.rejected_score

    @property
    def delta_per_token(self) -> torch.Tensor:
        return self.chosen_score / self.chosen_tokens.clamp(min=1) - self.rejected_score / self.rejected_tokens.clamp(min=1)


def f_divergence_score(logratio: torch.Tensor, divergence: str, alpha: float = 0.5) -> torch.Tensor:
    """``f'(t)`` at ``t = pi / ref`` for the f-DPO regularisers: ``log t`` (reverse KL, plain
    DPO), ``1 - 1/t`` (forward KL), ``log 2 + log sigmoid(log t)`` (Jensen-Shannon),
    ``(t^(alpha - 1) - 1) / (alpha - 1)`` (alpha-divergence; exp's argument capped at 80)."""
    if divergence == "reverse_kl" or (divergence == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return logratio
    if divergence == "forward_kl":
        return 1 - torch.exp(-logratio)
    if divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    if divergence == "alpha_divergence":
        wide = torch.promote_types(logratio.dtype, torch.float32)
        return torch.expm1(((alpha - 1.0) * logratio.to(wide)).clamp(max=80.0)).to(logratio.dtype) / (alpha - 1.0)
    raise ValueError(f"unknown f_divergence_type {divergence!r}")


def logratios(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_tokens, rejected_tokens,
    divergence: str = "reverse_kl", alpha: float = 0.5,
) -> PairLogratios:
    chosen, rejected = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    return PairLogratios(chosen, rejected, f_divergence_score(chosen, divergence, alpha),
                         f_divergence_score(rejected, divergence, alpha), chosen_tokens, rejected_tokens)


def pair_loss(kind: str, x: PairLogratios, beta: float, label_smoothing: float = 0.0, tau: float = 0.05) -> torch.Tensor:
    """The loss ``kind`` (one of ``PAIR_LOSSES``) of each pair ``[P]``."""
    eps = label_smoothing
    delta = x.delta
    match kind:
        case "sigmoid":
            return -F.logsigmoid(beta * delta)
        case "hinge":
            return torch.relu(1 - beta * delta)
        case "ipo":
            return (x.delta_per_token - 1 / (2 * beta)) ** 2
        case "exo_pair":
            win, lose = beta * delta, -beta * delta
            return (torch.sigmoid(win) * (F.logsigmoid(win) - math.log1p(-eps))
                    + torch.sigmoid(lose) * (F.logsigmoid(lose) - math.log(eps)))
        case "nca_pair":
            return (-F.logsigmoid(beta * x.chosen) - 0.5 * F.logsigmoid(-beta * x.chosen)
                    - 0.5 * F.logsigmoid(-beta * x.rejected))
        case "robust":
            return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
        case "bco_pair":
            return -F.logsigmoid(beta * x.chosen) - F.logsigmoid(-beta * x.rejected)
        case "sppo_hard":
            return (x.chosen - 0.5 / beta) ** 2 + (x.rejected + 0.5 / beta) ** 2
        case "apo_zero":
            return 1 - torch.sigmoid(beta * x.chosen) + torch.sigmoid(beta * x.rejected)
        case "apo_down":
            return torch.sigmoid(beta * x.chosen) + 1 - torch.sigmoid(beta * (x.chosen - x.rejected))
        case "discopop":
            z = beta * delta
            mix = torch.sigmoid(z / tau)
            return (1 - mix) * -F.logsigmoid(z) + mix * torch.exp(-z)
        case "sigmoid_norm":
            return -F.logsigmoid(beta * x.delta_per_token)
    raise ValueError(f"unknown loss_type {kind!r}; one of {', '.join(LOSS_TYPES)}")


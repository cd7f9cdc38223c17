"""The bundled task: short movie reviews, and a hidden "gold" taste for them.

A small grammar writes reviews such as ``the plot was very clever and the music felt dull .``
Prompts are the opening words (``the plot``); completions continue the review and end with a
full stop. Every adjective has a hidden valence (+1 liked, -1 disliked, 0 neutral). The gold
score of a completion is the mean valence of its adjectives when the completion is a
well-formed review, and -1 when it is not (a reader dislikes broken text). None of the
training stages sees this rule: the reward model must learn it from labelled pairs, and PPO
optimises the learned reward model. Comparing the two scores shows learning and, when it
happens, reward over-optimisation.
"""

from __future__ import annotations

import random
import re

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SUBJECTS = ("the movie", "the film", "the story", "the plot", "the acting", "the music", "the ending",
            "the cast", "the script", "the pacing", "the dialogue", "the camera work")
VERBS = ("was", "felt", "seemed", "is")
ADVERBS = ("very", "quite", "rather", "really", "a bit")
LIKED = ("great", "wonderful", "brilliant", "moving", "fun", "charming", "superb", "lovely", "clever", "good")
DISLIKED = ("dull", "boring", "awful", "weak", "slow", "bad", "messy", "flat", "silly", "tedious")
NEUTRAL = ("long", "short", "odd", "loud", "quiet", "simple")
VALENCE = {**{w: 1.0 for w in LIKED}, **{w: -1.0 for w in DISLIKED}, **{w: 0.0 for w in NEUTRAL}}
LEADS = ("", "i watched it last night .", "we saw it on friday .", "my friend picked it .", "it is new .")
CONJUNCTIONS = ("and", "but")
GOLD_BEST = 1.0  # every adjective liked, well formed
GOLD_WORST = -1.0


def _clause(rng: random.Random) -> str:
    adverb = f"{rng.choice(ADVERBS)} " if rng.random() < 0.4 else ""
    return f"{rng.choice(VERBS)} {adverb}{rng.choice(list(VALENCE))}"


def sample_review(rng: random.Random) -> tuple[str, str]:
    """One ``(prompt, completion)``: the prompt names the subject, the completion judges it."""
    lead = rng.choice(LEADS)
    prompt = f"{lead} {rng.choice(SUBJECTS)}".strip()
    parts = [_clause(rng)]
    for _ in range(rng.choice((0, 1, 1, 2))):
        parts.append(f"{rng.choice(CONJUNCTIONS)} {rng.choice(SUBJECTS)} {_clause(rng)}")
    return prompt, " ".join(parts) + " ."


def sample_prompt(rng: random.Random) -> str:
    return sample_review(rng)[0]


# --- the hidden gold preference -------------------------------------------------------------

_ADJECTIVE = "(?:" + "|".join(VALENCE) + ")"
_ADVERB = "(?:" + "|".join(a.replace(" ", r"\s") for a in ADVERBS) + ")"
_SUBJECT = "(?:" + "|".join(s.replace(" ", r"\s") for s in SUBJECTS) + ")"
_CLAUSE = rf"(?:{'|'.join(VERBS)})\s(?:{_ADVERB}\s)?{_ADJECTIVE}"
_REVIEW = re.compile(rf"^{_CLAUSE}(?:\s(?:and|but)\s{_SUBJECT}\s{_CLAUSE})*\s\.$")


def well_formed(completion: str) -> bool:
    return bool(_REVIEW.match(" ".join(completion.split())))


def gold_score(completion: str) -> float:
    """Mean valence of the adjectives of a well-formed completion; -1 for broken text."""
    if not well_formed(completion):
        return GOLD_WORST
    valences = [VALENCE[w] for w in completion.split() if w in VALENCE]
    return sum(valences) / len(valences)


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The gold rule as a tether reward function (for comparison runs; the demo never trains on it)."""
    return [gold_score(r) for r in responses]


def gold_metrics(prompts: list[str], responses: list[str]) -> dict[str, float]:
    """Per-update metrics the demo's PPO run logs next to the reward-model score."""
    scores = [gold_score(r) for r in responses]
    return {
        "gold/score": sum(scores) / len(scores),
        "gold/well_formed": sum(well_formed(r) for r in responses) / len(responses),
    }


# --- corpus and tokenizer ---------------------------------------------------------------------

SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>")


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on ``texts``: pad 0, bos 1, eos 2, unk 3, then the words."""
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    backend.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(SPECIAL)))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )

"""VQA accuracy (Antol et al. 2015): an answer is right in proportion to how many annotators gave it.

accuracy(a) = min(#annotators who answered a / 3, 1), on answers normalised the way the VQA evaluation
normalises them (lower case, punctuation and articles dropped, number words as digits). With four or more
answers (VQAv2 has ten) it is averaged over the leave-one-annotator-out subsets, as the official evaluation
does: 1, 2, 3 matches of 10 score 0.3, 0.6, 0.9.

A variant for rows with fewer than three answers (single-annotator data such as the Shapes world or a user's
JSONL): the official rule could never reach 1 there (one matching annotator is 1/3, and leaving the only
annotator out leaves none), so a correct answer would look wrong. Here "3 annotators" becomes "all of them":
min(#matching / min(#answers, 3), 1), i.e. 1 of 1 scores 1, 1 of 2 scores 0.5, and 1, 2, 3 of 3 score
1/3, 2/3, 1 (the official formula without leave-one-out). `answer_scores` uses the same denominator.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:]")


def normalize_answer(answer: str) -> str:
    """'Two.' -> '2', 'the Red circle' -> 'red circle' (VQA evaluation normalisation)."""
    text = str(answer).lower().strip().replace("\n", " ").replace("\t", " ")
    text = re.sub(r"(?<=\d),(?=\d)", "", text)  # 1,000 -> 1000
    text = _PUNCT.sub(" ", text)
    text = re.sub(r"(?<!\d)\.(?!\d)", " ", text)  # periods, but not decimal points
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """One question's accuracy: min(#matching / 3, 1) averaged over the leave-one-out subsets from 4 answers up
    (official VQA); with n <= 3 answers min(#matching / n, 1), so a lone annotator's answer scores 1. 0 without answers."""
    if not answers:
        return 0.0
    pred = normalize_answer(prediction)
    hits = [normalize_answer(a) == pred for a in answers]
    if len(hits) < 4:
        return min(sum(hits) / len(hits), 1.0)
    return sum(min((sum(hits) - h) / 3, 1.0) for h in hits) / len(hits)


def answer_scores(answers: Sequence[str]) -> dict[str, float]:
    """Soft training targets per normalised answer: the accuracy each answer would earn (the ViLT recipe)."""
    counts = Counter(normalize_answer(a) for a in answers)
    need = min(3, len(answers)) if answers else 1
    return {a: min(c / need, 1.0) for a, c in counts.items()}

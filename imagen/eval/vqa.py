"""VQA accuracy (Antol et al. 2015): an answer is right in proportion to how many annotators gave it.

accuracy(a) = min(#annotators who answered a / 3, 1), on answers normalised the way the VQA evaluation
normalises them (lower case, punctuation and articles dropped, number words as digits). Rows with fewer than
three answers (single-annotator data such as the Shapes world) need every listed annotator to agree: a match
with all of them scores 1.
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
    text = _PUNCT.sub(" ", text)
    text = re.sub(r"(?<!\d)\.(?!\d)", " ", text)  # periods, but not decimal points
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """One question's accuracy: min(#matching annotators / min(3, #annotators), 1); 0 without answers."""
    if not answers:
        return 0.0
    pred = normalize_answer(prediction)
    matches = sum(normalize_answer(a) == pred for a in answers)
    return min(matches / min(3, len(answers)), 1.0)


def answer_scores(answers: Sequence[str]) -> dict[str, float]:
    """Soft training targets per normalised answer: the accuracy each answer would earn (the ViLT recipe)."""
    counts = Counter(normalize_answer(a) for a in answers)
    need = min(3, len(answers)) if answers else 1
    return {a: min(c / need, 1.0) for a, c in counts.items()}

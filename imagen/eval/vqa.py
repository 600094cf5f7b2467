"""VQA accuracy (Antol et al. 2015): an answer is right in proportion to how many annotators gave it.

accuracy(a) = min(#annotators who answered a / 3, 1), on answers normalised the way the VQA evaluation
normalises them (lower case, punctuation and articles dropped, number words as digits). With four or more
answers (VQAv2 has ten) it is averaged over the leave-one-annotator-out subsets, as the official evaluation
does: 1, 2, 3 matches of 10 score 0.3, 0.6, 0.9. Rows with fewer than three answers (single-annotator data
such as the Shapes world) need every listed annotator to agree: a match with all of them scores 1.
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
    """One question's accuracy: min(#matching annotators / 3, 1), leave-one-out averaged from 4 answers up;
    with fewer answers min(#matching / #answers, 1). 0 without answers."""
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

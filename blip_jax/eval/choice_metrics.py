"""Multiple-choice accuracy and binary ROC AUC (Hateful Memes), in plain numpy.

Units: ``multiple_choice_accuracy`` returns a percentage (like the other dataset-level accuracies in
``blip_jax.eval``); ``roc_auc`` returns a fraction in [0, 1] (the usual AUC convention, as
``sklearn.metrics.roc_auc_score``; multiply by 100 for the papers' "AUROC" numbers).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["multiple_choice_predictions", "multiple_choice_accuracy", "average_ranks", "roc_auc"]


def multiple_choice_predictions(scores: Any) -> np.ndarray:
    """Index of the best-scoring candidate per question (``argmax``; ties -> the first candidate).

    scores: [n, n_choices] array, or a sequence of 1-D score vectors of varying length (e.g. ScienceQA
    questions with 2-5 options)."""
    if isinstance(scores, np.ndarray) and scores.ndim == 2:
        return np.argmax(scores, axis=1).astype(np.int64)
    preds = []
    for row in scores:
        row = np.asarray(row)
        if row.ndim != 1 or row.size == 0:
            raise ValueError(f"each question needs a non-empty 1-D score vector, got shape {row.shape}")
        preds.append(int(np.argmax(row)))  # np.argmax returns the first maximum
    return np.asarray(preds, dtype=np.int64)


def multiple_choice_accuracy(scores: Any, labels: Sequence[int]) -> float:
    """Percentage of questions whose argmax candidate (ties -> first) is the labelled one."""
    preds = multiple_choice_predictions(scores)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if preds.shape != labels.shape:
        raise ValueError(f"{preds.shape[0]} score rows for {labels.shape[0]} labels")
    if labels.size == 0:
        raise ValueError("multiple_choice_accuracy needs at least one question")
    return 100.0 * float(np.sum(preds == labels)) / labels.size


def average_ranks(values: Any) -> np.ndarray:
    """1-based ranks of ``values`` (ascending), tied values sharing the mean of their ranks."""
    values = np.asarray(values).reshape(-1)
    n = values.size
    order = np.argsort(values, kind="stable")
    sorted_vals = values[order]
    starts = np.concatenate([[0], np.nonzero(sorted_vals[1:] != sorted_vals[:-1])[0] + 1])
    ends = np.concatenate([starts[1:], [n]])
    mean_rank = (starts + 1 + ends) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve of a binary classifier, as a fraction in [0, 1].

    Mann-Whitney rank statistic: (sum of positives' average ranks - P(P+1)/2) / (P N), i.e. the
    probability that a random positive scores above a random negative, ties counting 1/2 - the same
    value as the trapezoidal ROC AUC (``sklearn.metrics.roc_auc_score``). labels: 0/1 or bool.
    """
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels for {scores.size} scores")
    if np.isnan(scores).any():
        raise ValueError("roc_auc: scores contain NaN")
    uniq = np.unique(labels)
    if not np.all(np.isin(uniq, [0, 1])):
        raise ValueError(f"roc_auc expects binary 0/1 labels, got values {uniq.tolist()}")
    pos = labels.astype(bool)
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc is undefined with only one class present")
    ranks = average_ranks(scores)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))

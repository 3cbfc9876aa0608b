"""The accuracy guard of a reduced precision: paired against fp32 on the same held-out images.

The task (``service.tasks``) says what one answer is: an image's class (multiclass, binary) or an
image's decision on one label (multi-label); "accuracy" below is the share of right answers.
Near-ties flip under any change of arithmetic, so plain agreement is the wrong gate. A reduced
precision passes when (1) it agrees with fp32 on at least ``min_confident_agreement`` of the
*confident* answers (fp32 probability >= 0.8 either way) and (2) its paired accuracy change is no
worse than ``max_drop`` points; a larger drop fails only when McNemar's exact test says the losses
outnumber the gains beyond chance (one-sided, ``alpha``). A larger drop that the test cannot
confirm is "inconclusive": the split is too small to judge, which the verdict says in words.

    verdict = judge(fp32_logits, int8_logits, truth, task=make_task("multiclass", ("cat", "dog")))
    verdict["verdict"]   # "pass" | "fail" | "inconclusive"
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from service.tasks import Task

MAX_DROP_POINTS = 0.5
MIN_CONFIDENT_AGREEMENT = 0.99
ALPHA = 0.05
PUBLISHED = ("pass", "inconclusive")  # verdicts under which a reduced precision is published


def mcnemar_one_sided(losses: int, gains: int) -> float:
    """P(at least ``losses`` of the ``losses + gains`` discordant pairs go against the candidate | no difference)."""
    n = losses + gains
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(losses, n + 1)) / 2.0**n


def judge(
    reference: np.ndarray,
    candidate: np.ndarray,
    truth: np.ndarray,
    *,
    task: Task,
    max_drop: float = MAX_DROP_POINTS,
    min_confident_agreement: float = MIN_CONFIDENT_AGREEMENT,
    alpha: float = ALPHA,
) -> dict[str, Any]:
    """Paired comparison of ``candidate`` logits with fp32 ``reference`` logits on labelled images;
    ``truth`` is (N, labels) booleans: the labels each image has."""
    ref_given = task.decisions(task.probabilities(reference))
    cand_given = task.decisions(task.probabilities(candidate))
    ref_right, cand_right = task.per_unit(ref_given == truth), task.per_unit(cand_given == truth)
    agree = task.per_unit(ref_given == cand_given)
    losses, gains = int((ref_right & ~cand_right).sum()), int((~ref_right & cand_right).sum())
    n = len(ref_right)
    confident = task.confident(reference)
    confident_agreement = float(agree[confident].mean()) if confident.any() else 1.0
    drop = 100.0 * (losses - gains) / n if n else 0.0
    p_value = mcnemar_one_sided(losses, gains)
    figures: dict[str, Any] = {
        "images": len(truth),
        "answers": n,
        "accuracy_fp32": float(ref_right.mean()) if n else 0.0,
        "accuracy": float(cand_right.mean()) if n else 0.0,
        "accuracy_change_points": -drop,
        "right_to_wrong": losses,
        "wrong_to_right": gains,
        "mcnemar_p": p_value,
        "agreement": float(agree.mean()) if n else 1.0,
        "confident_images": int(confident.sum()),
        "confident_agreement": confident_agreement,
        "recall_change": _recall_change(truth, ref_given, cand_given, task.labels),
    }
    verdict, summary = _verdict(drop, p_value, confident_agreement, figures, max_drop, min_confident_agreement, alpha)
    return {"verdict": verdict, "summary": summary, **figures}


def _verdict(
    drop: float,
    p_value: float,
    confident_agreement: float,
    figures: dict[str, Any],
    max_drop: float,
    min_confident_agreement: float,
    alpha: float,
) -> tuple[str, str]:
    said = (
        f"accuracy {figures['accuracy']:.4f} vs fp32 {figures['accuracy_fp32']:.4f} on {_answers(figures)} "
        f"({figures['right_to_wrong']} right->wrong, {figures['wrong_to_right']} wrong->right, "
        f"McNemar p={p_value:.3g}); "
        f"agreement {figures['agreement']:.4f}, {confident_agreement:.4f} on {figures['confident_images']} confident"
    )
    if confident_agreement < min_confident_agreement:
        return "fail", f"confident agreement below {min_confident_agreement:.0%}: {said}"
    if drop <= max_drop:
        return "pass", f"within {max_drop:g} points: {said}"
    if p_value < alpha:
        return "fail", f"loses {drop:.2f} points, more than {max_drop:g}, beyond chance: {said}"
    return "inconclusive", f"loses {drop:.2f} points but the split is too small to judge: {said}"


def _recall_change(
    truth: np.ndarray, ref_given: np.ndarray, cand_given: np.ndarray, labels: tuple[str, ...]
) -> dict[str, float]:
    """Per label: the change of the share of its images that are given it."""
    changes = {}
    for index, name in enumerate(labels):
        mask = truth[:, index]
        if mask.any():
            changes[name] = float(cand_given[mask, index].mean() - ref_given[mask, index].mean())
    return changes


def _answers(figures: dict[str, Any]) -> str:
    images, answers = figures["images"], figures["answers"]
    return f"{images} images" if images == answers else f"{answers} image labels ({images} images)"

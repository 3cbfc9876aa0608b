"""The task seam: probabilities, decisions and answers of multiclass, multi-label and binary models."""

from __future__ import annotations

import numpy as np
import pytest

from service.tasks import TASKS, make_task, sigmoid, softmax


def test_unknown_tasks_and_bad_thresholds_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown task 'regression'; known tasks: multiclass, multilabel, binary"):
        make_task("regression", ["a"])
    with pytest.raises(ValueError, match="needs 2 thresholds"):
        make_task("multilabel", ["a", "b"], [0.5])
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        make_task("binary", ["no", "yes"], [1.0])
    with pytest.raises(ValueError, match="exactly two labels"):
        make_task("binary", ["a", "b", "c"])
    assert set(TASKS) == {"multiclass", "multilabel", "binary"}


def test_multiclass_classification_strings_are_the_top_k_best_first() -> None:
    task = make_task("multiclass", ["x", "y", "z"])
    values = np.log(np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]]))
    assert task.classification(values, 2, of_logits=False) == [
        b"0.700000:1:y",
        b"0.200000:2:z",
        b"0.500000:0:x",
        b"0.250000:1:y",  # ties keep the lower index first
    ]
    assert len(task.classification(values, 9, of_logits=False)) == 6
    assert task.answer_columns(9) == 3
    assert task.answers(softmax(values), 1) == [{"y": pytest.approx(0.7)}, {"x": pytest.approx(0.5)}]
    assert task.decided(softmax(values)) == task.answers(softmax(values), 1)  # the decision is the top class


def test_multilabel_answers_are_the_labels_at_or_above_their_thresholds() -> None:
    task = make_task("multilabel", ["cat", "dog", "car"], [0.5, 0.3, 0.9])
    logits = np.array([[2.0, -0.5, 1.0], [-3.0, -3.0, -3.0], [0.0, 0.0, 3.0]])
    probs = task.probabilities(logits)
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits)))
    assert task.decisions(probs).tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    answers = task.answers(probs)
    assert list(answers[0]) == ["cat", "dog"]  # best first
    assert list(answers[1]) == ["cat"]  # none given: the most probable one (ties: first label)
    assert list(answers[2]) == ["car", "cat", "dog"]  # equal probabilities keep the label order
    assert list(task.answers(probs, 1)[2]) == ["car"]
    assert task.decided(probs) == answers  # every label at or above its threshold, at least one
    strings = task.classification(logits, 5, of_logits=True)
    assert task.answer_columns(5) == 3 and len(strings) == 9
    assert strings[:3] == [b"2.000000:0:cat", b"-0.500000:1:dog", b""]  # padded: no label is not an answer
    assert strings[3:6] == [b"", b"", b""]


def test_binary_is_one_logit_and_answers_with_the_decided_label() -> None:
    task = make_task("binary", ["no_cat", "cat"], [0.4])
    logits = np.array([[0.0], [-2.0], [-0.2]])
    probs = task.probabilities(logits)
    assert task.width == 1 and probs.shape == (3, 1)
    answers = task.answers(probs)
    assert answers[0] == {"cat": pytest.approx(0.5)}
    assert answers[1] == {"no_cat": pytest.approx(1 - sigmoid(np.array(-2.0)))}
    assert list(answers[2]) == ["cat"]  # p = 0.45 >= 0.4
    assert task.decided(probs) == answers
    assert task.classification(logits, 3, of_logits=True) == [
        b"0.000000:1:cat",
        b"2.000000:0:no_cat",
        b"-0.200000:1:cat",
    ]


def test_confident_flips_count_only_answers_the_reference_is_sure_of() -> None:
    multiclass = make_task("multiclass", ["a", "b"])
    reference = np.array([[5.0, 0.0], [0.1, 0.0]])
    assert multiclass.confident_flips(reference, np.array([[0.0, 5.0], [0.0, 0.1]])) == (1, 1)
    multilabel = make_task("multilabel", ["a", "b"])
    reference = np.array([[3.0, 0.1], [-3.0, -3.0]])
    assert multilabel.confident_flips(reference, np.array([[-1.0, -0.1], [-3.0, 3.0]])) == (2, 3)


def test_sigmoid_is_stable_for_large_logits() -> None:
    with np.errstate(all="raise"):
        np.testing.assert_allclose(sigmoid(np.array([-1000.0, 0.0, 1000.0])), [0.0, 0.5, 1.0])

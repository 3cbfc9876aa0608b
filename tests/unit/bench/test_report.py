from __future__ import annotations

from bench.report import _goal


def test_a_goal_shows_enough_digits_that_the_figure_agrees_with_its_verdict() -> None:
    at_least = lambda x: x >= 0.85  # noqa: E731
    assert _goal("ratio", "≥ 0.85×", 0.848, at_least, "×", 2)[2:] == ["0.848×", "**not met**"]
    assert _goal("ratio", "≥ 0.85×", 0.8512, at_least, "×", 2)[2:] == ["0.85×", "**met**"]
    assert _goal("ms", "≤ 3 ms", 3.04, lambda x: x <= 3.0, " ms", 1)[2:] == ["3.04 ms", "**not met**"]
    assert _goal("ratio", "≥ 1.5×", None, at_least, "×", 2)[2:] == ["not measured", "–"]

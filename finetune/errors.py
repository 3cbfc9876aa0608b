"""The errors that are the user's to fix: the CLI prints their message, not a traceback."""

from __future__ import annotations

from finetune.backbones import WeightsMismatch, WeightsUnavailable
from finetune.data import DataError
from finetune.export import ExportCheckError
from finetune.publish import PublishError

USER_ERRORS: tuple[type[BaseException], ...] = (
    DataError,
    WeightsUnavailable,
    WeightsMismatch,
    ExportCheckError,
    PublishError,
    ValueError,
    OSError,
)

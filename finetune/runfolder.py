"""The run folder's life: made (or reopened for ``--resume``) with its log file, and removed again when
the run stops before its first checkpoint, so typos and bad data do not litter ``runs/``."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from finetune.config import TrainConfig
from finetune.publish import check_writable

logger = logging.getLogger(__name__)


class RunFolder:
    """``open`` makes the folder, saves ``config.yaml`` and sends the log to ``train.log`` as well;
    ``discard`` removes what ``open`` made; ``close`` detaches the log file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.created = False  # this process made the folder (not a resume)
        self._made_parent = False
        self._made_store: Path | None = None  # the model store, when this process made it (empty until publish)
        self._handler: logging.Handler | None = None

    def open(self, config: TrainConfig) -> None:
        resuming = config.resume is not None
        if resuming and not (self.path / "config.yaml").is_file():
            raise ValueError(f"--resume {self.path}: not a run folder (no config.yaml)")
        if not resuming and self.path.exists():
            raise ValueError(f"run folder {self.path} already exists; pick another --run-name or --resume it")
        self.created, self._made_parent = not self.path.exists(), not self.path.parent.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        self._made_store = None if config.model_store.exists() else config.model_store
        check_writable(config.model_store)  # fail now, not after hours of training
        self._handler = logging.FileHandler(self.path / "train.log", encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(self._handler)
        if not resuming:
            config.save(self.path / "config.yaml")
        logger.info("run folder %s (%s)", self.path, "resuming" if resuming else "new")

    def close(self) -> None:
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler.close()
            self._handler = None

    def discard(self) -> None:
        """Remove the folder this process made (and ``runs/`` and the model store if it made those too and
        they are empty)."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
        for made in (self.path.parent if self._made_parent else None, self._made_store):
            if made is not None and made.is_dir() and not any(made.iterdir()):
                made.rmdir()
        logger.info("removed %s: the run stopped before its first checkpoint", self.path)

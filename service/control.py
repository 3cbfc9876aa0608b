"""Model control: how the loaded models follow the store (``--model-control none|poll|explicit``).

``none`` and ``explicit`` load the store once at start (explicit: the management API then loads and
unloads); the store must exist and be readable, or the server does not start. ``poll`` rescans the
store every ``poll_interval_s`` and applies what changed (:meth:`ModelRepository.sync`); a store
that is missing or unreadable is warned about, loudly and repeatedly, until it appears.

    control = ModelControl(repository, settings)
    await control.start()      # OSError: the store cannot be served (none/explicit)
    ...
    await control.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

from service.repository import ModelRepository
from service.settings import Settings

logger = logging.getLogger(__name__)
WARN_EVERY_S = 10.0  # poll mode: a missing store is warned about at least this often (and at every slower poll)


def store_problem(store: Path) -> str | None:
    """Why ``store`` cannot be served from (missing, not a folder, unreadable), or None."""
    if not store.exists():
        return f"model store {store} does not exist"
    if not store.is_dir():
        return f"model store {store} is not a folder"
    try:
        with os.scandir(store) as entries:
            next(entries, None)
    except OSError as exc:
        return f"model store {store} cannot be read: {exc.strerror or exc}"
    return None


class ModelControl:
    """Loads the store at start and, in poll mode, keeps the loaded models in step with it."""

    def __init__(self, repository: ModelRepository, settings: Settings) -> None:
        self.repository = repository
        self.settings = settings
        self.mode = settings.model_control
        self._task: asyncio.Task[None] | None = None
        self._last_warning = float("-inf")
        self._store_missing = False

    async def start(self) -> None:
        """Load the store; in poll mode, start polling it. OSError when the store cannot be served (not poll)."""
        store = self.settings.model_store
        if self.mode != "poll":
            problem = store_problem(store)
            if problem is not None:
                raise OSError(f"{problem} (--model-store; --model-control poll waits for it to appear)")
            await self.repository.load_all()
            return
        logger.info("model control poll: rescanning %s every %.1fs", store, self.settings.poll_interval_s)
        await self.poll_once()
        self._task = asyncio.create_task(self._run(), name="model store poller")

    async def stop(self) -> None:
        """Stop polling (a load in progress is abandoned; the repository's close releases what was loaded)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def poll_once(self) -> bool:
        """One rescan; False when the store cannot be read (warned about, rate-limited)."""
        store = self.settings.model_store
        problem = store_problem(store)
        if problem is not None:
            self._warn(problem)
            return False
        if self._store_missing:
            logger.warning("model store %s is readable again: loading what it holds", store)
            self._store_missing = False
        await self.repository.sync()
        return True

    def _warn(self, problem: str) -> None:
        self._store_missing = True
        now = time.monotonic()
        every = WARN_EVERY_S if self.settings.poll_interval_s < WARN_EVERY_S else 0.0  # slow polls: each one
        if now - self._last_warning >= every:
            self._last_warning = now
            logger.warning(
                "%s: nothing can be served from it; loaded models keep serving; checking again every %.1fs",
                problem,
                self.settings.poll_interval_s,
            )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self.poll_once()
            except Exception:  # a poll that fails must not end polling
                logger.exception("polling the model store %s failed", self.settings.model_store)

"""Admission: requests still being decoded count against ``max_queue_size``, and a refusal decodes nothing.

Without this, a flood waits, unbounded, in front of the decode threads and is refused only after
paying for decoding; the queue's bound would bound nothing.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from service import dataplane
from service.dataplane import DataPlane
from service.errors import QueueFull
from service.repository import ModelRepository
from service.settings import Settings
from service.types import InferInput, InferRequest

if TYPE_CHECKING:
    from tests.unit.service.conftest import TinyStore


def _request(image: bytes) -> InferRequest:
    return InferRequest(model="tiny", inputs=[InferInput("image", "BYTES", [1], [image])])


def test_a_full_model_refuses_before_decoding(tiny_store: TinyStore, png: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(model_store=tiny_store.store, device="cpu", max_queue_size=2, decode_workers=4)
    release, decoded = threading.Event(), []
    original = dataplane.preprocess_bytes

    def slow_decode(data: bytes, *args: Any, **kwargs: Any) -> np.ndarray:
        decoded.append(data)
        release.wait(timeout=30)
        return original(data, *args, **kwargs)

    monkeypatch.setattr(dataplane, "preprocess_bytes", slow_decode)

    async def main() -> None:
        repository = ModelRepository(settings)
        await repository.load_all()
        plane = DataPlane(repository, settings)
        try:
            held = [asyncio.create_task(plane.infer(_request(png(i)))) for i in range(2)]
            while len(decoded) < 2:  # both admitted and decoding
                await asyncio.sleep(0.01)
            with pytest.raises(QueueFull, match="2 requests waiting"):
                await plane.infer(_request(png(9)))
            assert len(decoded) == 2  # the refused request was never decoded
            release.set()
            answers = await asyncio.gather(*held)
            assert [a.outputs[0].data.shape[0] for a in answers] == [1, 1]
            await plane.infer(_request(png(3)))  # room again once they are done
        finally:
            release.set()
            await plane.shutdown(timeout=5)

    asyncio.run(main())

"""What the v2 model metadata adds from a package's manifest, so that any client (the page at ``/`` too)
can say what a model is without reading the model store: its backbone, the test metrics of the run that
made it, its eval preprocessing (a client drawing the Grad-CAM heatmap over an image needs the centre
crop) and whether it can be explained (it carries a Grad-CAM module).

    ModelMetadata(name=..., **manifest_summary(manifest))
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from service.explain import EXPLAIN_KEY
from service.manifest import Manifest


def manifest_summary(manifest: Manifest | None) -> dict[str, Any]:
    """``backbone``, ``metrics`` (``{"test": ...}``: accuracy, macro F1, mAP, ... as the run measured them),
    ``preprocess`` and ``explainable``; empty for a package whose manifest could not be read."""
    if manifest is None:
        return {}
    test = manifest.metrics.get("test")
    return {
        "backbone": manifest.backbone,
        "metrics": {"test": dict(test)} if isinstance(test, dict) else {},
        "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(manifest.preprocess).items()},
        "explainable": manifest.extra.get(EXPLAIN_KEY) in manifest.files,  # as service.explain.cam_file judges
    }

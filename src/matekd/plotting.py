"""matplotlib without a display, loaded only when a figure is drawn (training and the CLI must
not pay its import), and the two ways figures leave a process: PNG bytes and RGB arrays."""

from __future__ import annotations

import io
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any) -> bytes:
    """Render a figure as PNG and close it (many figures must not stay open)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    pyplot().close(fig)
    return buffer.getvalue()


def figure_to_array(fig: Any) -> Any:
    """Render a figure as an RGB uint8 array [H, W, 3] (MLflow's log_image) and close it."""
    import numpy as np

    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    pyplot().close(fig)
    return image

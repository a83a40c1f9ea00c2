"""What every camera frame source is: ``read()`` a 2-D uint8 grayscale frame or None.

Its own module so that sources defined elsewhere (``scenes``) and the opener (``capture``)
share the base without importing each other.
"""

from __future__ import annotations

import cv2
import numpy as np

from drivers.errors import DriverError


class SourceError(DriverError):
    """The camera source could not be opened."""


class FrameSource:
    """A source of grayscale frames. ``read()`` returns a frame or None (none now)."""

    live: bool = False
    description: str = "camera"

    def __init__(self) -> None:
        self.ended = False
        self.position = 0  # index of the next frame (file and glob sources)
        self.frame_time: float | None = None  # when the last frame was due (glob), else None

    def read(self) -> np.ndarray | None:
        raise NotImplementedError

    def close(self) -> None:
        """Release the device or file; idempotent."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r})"


def to_gray(frame: np.ndarray) -> np.ndarray:
    """2-D uint8 grayscale view of an OpenCV frame (BGR, BGRA or already gray)."""
    if frame.ndim == 3:
        if frame.shape[2] == 1:
            return np.ascontiguousarray(frame[:, :, 0])
        code = cv2.COLOR_BGRA2GRAY if frame.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        return cv2.cvtColor(frame, code)
    return frame

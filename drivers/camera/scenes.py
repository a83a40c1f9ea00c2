"""Generated live cameras (``synth:`` sources): what a cabinet camera sees, without a camera.

* ``synth:idle`` -- the empty shelf: a fixed cluttered scene with fresh sensor noise.
* ``synth:moving`` -- a shopper in view: a dark shape sweeping across the scene while a
  product label with an EAN-13 (``code=`` another kind of ``synth.KINDS``) wobbles in hand.

Options: ``?size=1280x720&seed=1&code=ean13``. Frames are rendered once when the source
opens (a loop of ``LOOP_FRAMES``) so that reading one costs what a real camera read costs,
not a render: the benchmark measures the scanner, not the simulator.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np

from drivers.camera import synth
from drivers.camera.source import FrameSource, SourceError

LOOP_FRAMES = 40
NOISE_SIGMA = 6.0


class SceneCamera(FrameSource):
    """A live camera playing pre-rendered frames in a loop (one per read)."""

    live = True

    def __init__(self, frames: list[np.ndarray], description: str, code: synth.CodeSpec | None = None) -> None:
        super().__init__()
        self._frames = frames
        self.description = description
        self.code = code  # what a moving scene shows (tests compare scans with it)
        self._i = -1

    def read(self) -> np.ndarray | None:
        self._i += 1
        return self._frames[self._i % len(self._frames)]


def _noise(frame: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(frame + rng.normal(0.0, NOISE_SIGMA, frame.shape), 0, 255).astype(np.uint8)


def idle_frames(size: tuple[int, int], seed: int, n: int = 16) -> list[np.ndarray]:
    return [synth.empty_frame(size, seed=seed + 100 + i, noise_sigma=NOISE_SIGMA, scene_seed=seed) for i in range(n)]


def moving_frames(size: tuple[int, int], seed: int, spec: synth.CodeSpec, n: int = LOOP_FRAMES) -> list[np.ndarray]:
    """A label with ``spec`` held up and wobbling (a few px per frame) while a shopper's
    arm and shoulder sweep through the frame (every frame changes)."""
    w, h = size
    rng = np.random.default_rng(seed)
    scene = synth.background(size, np.random.default_rng(seed))
    label: np.ndarray = synth.render_symbol(spec).astype(np.float32)
    scale = 3.0 / synth.RENDER_MODULE_PX
    label = cv2.resize(label, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    label = 25.0 + (label / 255.0) * 210.0
    lh, lw = label.shape
    frames = []
    for i in range(n):
        t = i / n
        img = scene.copy()
        # the shopper: a dark shoulder sweeping left to right, an arm reaching to the label
        cx = int(-0.3 * w + 1.6 * w * t)
        cv2.ellipse(img, (cx, int(0.9 * h)), (int(0.25 * w), int(0.45 * h)), 0, 0, 360, 55.0, -1)
        x = int(0.35 * w + 18 * np.cos(2 * np.pi * 3 * t))
        y = int(0.3 * h + 12 * np.sin(2 * np.pi * 2 * t))
        cv2.line(img, (cx, int(0.8 * h)), (x + lw // 2, y + lh), 80.0, int(0.06 * h))
        x, y = max(0, min(w - lw, x)), max(0, min(h - lh, y))
        img[y:y + lh, x:x + lw] = label
        frames.append(_noise(img, rng))
    return frames


def open_scene(source: str) -> SceneCamera:
    """Open a ``synth:`` source (see the module doc); SourceError for an unknown one."""
    parts = urlsplit(source)
    kind = parts.path
    opts = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    try:
        w, h = (int(v) for v in opts.get("size", "1280x720").lower().split("x"))
        seed = int(opts.get("seed", "1"))
    except ValueError as exc:
        raise SourceError(f"bad generated camera options in {source!r}: {exc}") from exc
    if kind == "idle":
        return SceneCamera(idle_frames((w, h), seed), source)
    if kind == "moving":
        code_kind = opts.get("code", "ean13")
        if code_kind not in synth.KINDS:
            raise SourceError(f"unknown code kind {code_kind!r} in {source!r}")
        spec = synth.make_code(code_kind, np.random.default_rng(seed))
        return SceneCamera(moving_frames((w, h), seed, spec), source, spec)
    raise SourceError(f"unknown generated camera {source!r} (synth:idle or synth:moving)")

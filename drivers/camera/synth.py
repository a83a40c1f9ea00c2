"""Generated camera frames holding barcodes, for the demo, the tests and the benchmark.

Symbols are rendered by real encoders -- python-barcode (EAN-13, EAN-8, UPC-A, Code 128,
GS1-128), segno (QR) and zxing-cpp's writer (UPC-E, which python-barcode lacks) -- never drawn
by hand, then printed on a "label", warped into a frame on a cluttered, shaded background and
degraded like a cheap cabinet camera degrades them: blur, sensor noise, rotation, perspective,
low contrast, JPEG. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np

from drivers.camera import symbology as sym
from drivers.gs1 import product_gtin, with_check_digit

RENDER_MODULE_PX = 4  # encoders render at 4 px per module; the frame warp scales from there
KINDS: tuple[str, ...] = (
    "ean13", "ean8", "upca", "upce", "code128", "gs1_128", "qr_text", "qr_gs1", "qr_dl",
)


@dataclass(frozen=True)
class CodeSpec:
    """A symbol to render and what the pipeline must report for it."""

    kind: str
    payload: str  # what is handed to the encoder
    symbology: str  # expected reported symbology
    text: str  # expected reported text
    gtin: str | None  # expected GTIN-14 (None: not a product code)


@dataclass(frozen=True)
class Degradation:
    """How a symbol is placed and spoiled. ``module_px``: size of one module in the frame."""

    module_px: float = 3.0
    rotation_deg: float = 0.0
    perspective: float = 0.0  # corner jitter as a fraction of the label size
    blur_sigma: float = 0.0
    noise_sigma: float = 0.0
    contrast: float = 1.0  # 1 = full print contrast, 0.3 = faded/poorly lit
    jpeg_quality: int | None = None


PRESETS: dict[str, Degradation] = {
    "clean": Degradation(),
    "small": Degradation(module_px=1.6),
    "blur": Degradation(blur_sigma=1.6),
    "noise": Degradation(noise_sigma=14.0),
    "rotation": Degradation(rotation_deg=25.0),
    "perspective": Degradation(perspective=0.12),
    "low_contrast": Degradation(contrast=0.25, noise_sigma=3.0),
    "jpeg": Degradation(jpeg_quality=25),
    "closeup": Degradation(module_px=7.0, blur_sigma=3.0, noise_sigma=4.0),
    "mixed": Degradation(module_px=2.2, rotation_deg=12.0, perspective=0.06, blur_sigma=1.0,
                         noise_sigma=7.0, contrast=0.6, jpeg_quality=60),
}


def _digits(rng: np.random.Generator, n: int) -> str:
    return "".join(str(d) for d in rng.integers(0, 10, n))


def make_code(kind: str, rng: np.random.Generator) -> CodeSpec:
    """A random valid code of ``kind`` (one of KINDS)."""
    if kind == "ean13":
        body = str(rng.integers(1, 10)) + _digits(rng, 11)  # first digit != 0, else it is UPC-A
        full = with_check_digit(body)
        return CodeSpec(kind, body, sym.EAN13, full, full.zfill(14))
    if kind == "ean8":
        full = with_check_digit(str(rng.integers(1, 10)) + _digits(rng, 6))
        return CodeSpec(kind, full[:7], sym.EAN8, full, full.zfill(14))
    if kind == "upca":
        full = with_check_digit(str(rng.integers(0, 2)) + _digits(rng, 10))
        return CodeSpec(kind, full[:11], sym.UPCA, full, full.zfill(14))
    if kind == "upce":
        # last digit 5-9 (the simplest expansion), whose 5th digit must not be 0
        six = _digits(rng, 4) + str(rng.integers(1, 10)) + str(rng.integers(5, 10))
        upca_body = "0" + six[:5] + "0000" + six[5]
        check = with_check_digit(upca_body)[-1]
        full = "0" + six + check
        return CodeSpec(kind, full, sym.UPCE, full, with_check_digit(upca_body).zfill(14))
    if kind == "code128":
        text = "LOT-" + _digits(rng, 4) + "-" + "".join(chr(65 + int(i)) for i in rng.integers(0, 26, 3))
        return CodeSpec(kind, text, sym.CODE128, text, None)
    if kind == "gs1_128":
        gtin = with_check_digit("0" + str(rng.integers(1, 10)) + _digits(rng, 11))
        text = "01" + gtin
        return CodeSpec(kind, text, sym.CODE128, text, gtin)
    if kind == "qr_text":
        text = "cabinet test " + _digits(rng, 6)
        return CodeSpec(kind, text, sym.QR, text, None)
    if kind == "qr_gs1":
        gtin = with_check_digit("0" + str(rng.integers(1, 10)) + _digits(rng, 11))
        text = f"(01){gtin}(17)2{_digits(rng, 1)}1231(10)B{_digits(rng, 3)}"
        return CodeSpec(kind, text, sym.QR, text, gtin)
    if kind == "qr_dl":
        gtin = with_check_digit("0" + str(rng.integers(1, 10)) + _digits(rng, 11))
        text = f"https://id.example.org/shop/01/{gtin}/10/L{_digits(rng, 3)}?17=261231"
        return CodeSpec(kind, text, sym.QR, text, gtin)
    raise ValueError(f"unknown kind {kind!r}")


def _python_barcode(name: str, payload: str, text: bool) -> np.ndarray:
    import barcode
    from barcode.writer import ImageWriter

    code = barcode.get(name, payload, writer=ImageWriter())
    mm = 25.4 * RENDER_MODULE_PX / 254  # module width in mm at 254 dpi
    img = code.render({
        "module_width": mm, "module_height": mm * 55, "dpi": 254, "quiet_zone": mm * 11,
        "write_text": text, "font_size": 11, "text_distance": 2.5, "background": "white",
        "foreground": "black",
    })
    return np.asarray(img.convert("L"))


def _segno_qr(text: str) -> np.ndarray:
    import segno
    from PIL import Image

    buf = io.BytesIO()
    segno.make(text, error="m", micro=False).save(buf, kind="png", scale=RENDER_MODULE_PX, border=4)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("L"))


def _zxing_upce(payload: str) -> np.ndarray:
    import zxingcpp

    bc = zxingcpp.create_barcode(payload, zxingcpp.BarcodeFormat.UPCE)
    img = np.asarray(zxingcpp.write_barcode_to_image(bc, scale=RENDER_MODULE_PX, add_hrt=True))
    img = np.ascontiguousarray(img, dtype=np.uint8)
    q = RENDER_MODULE_PX * 9
    return cv2.copyMakeBorder(img, q // 2, q // 2, q, q, cv2.BORDER_CONSTANT, value=255)


def render_symbol(spec: CodeSpec) -> np.ndarray:
    """The symbol at RENDER_MODULE_PX px per module with its quiet zone, grayscale uint8."""
    if spec.kind in ("ean13", "ean8", "upca"):
        return _python_barcode(spec.kind, spec.payload, text=True)
    if spec.kind in ("code128", "gs1_128"):
        name = "gs1_128" if spec.kind == "gs1_128" else "code128"
        return _python_barcode(name, spec.payload, text=False)
    if spec.kind == "upce":
        return _zxing_upce(spec.payload)
    if spec.kind.startswith("qr_"):
        return _segno_qr(spec.payload)
    raise ValueError(f"unknown kind {spec.kind!r}")


def background(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A shaded, cluttered scene (shelf edges, boxes, printed text) without any barcode."""
    w, h = size
    shade = rng.uniform(60, 190, (5, 8)).astype(np.float32)
    img = np.clip(cv2.resize(shade, (w, h), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(w // 10, w // 2)), y0 + int(rng.integers(h // 10, h // 2))
        cv2.rectangle(img, (x0, y0), (x1, y1), int(rng.integers(30, 220)), -1)
    for _ in range(int(rng.integers(2, 6))):
        org = (int(rng.integers(0, w - 100)), int(rng.integers(20, h)))
        cv2.putText(img, "Organic Tea 250g", org, cv2.FONT_HERSHEY_SIMPLEX, float(rng.uniform(0.5, 1.5)),
                    int(rng.integers(0, 255)), int(rng.integers(1, 3)), cv2.LINE_AA)
    return img.astype(np.float32)


def _finish(img: np.ndarray, d: Degradation, rng: np.random.Generator) -> np.ndarray:
    """Camera-side degradations applied to the whole frame (float in, uint8 out)."""
    if d.blur_sigma > 0:
        img = cv2.GaussianBlur(img, (0, 0), d.blur_sigma)
    if d.noise_sigma > 0:
        img = img + rng.normal(0.0, d.noise_sigma, img.shape).astype(np.float32)
    out = np.clip(img, 0, 255).astype(np.uint8)
    if d.jpeg_quality is not None:
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(d.jpeg_quality)])
        if ok:
            out = np.asarray(cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE), dtype=np.uint8)
    return np.asarray(out)


def compose(spec: CodeSpec, d: Degradation = Degradation(), size: tuple[int, int] = (1280, 720),
            seed: int = 0) -> np.ndarray:
    """A ``size`` (w, h) grayscale frame showing ``spec`` degraded by ``d``."""
    rng = np.random.default_rng(seed)
    w, h = size
    frame = background(size, rng)
    label: np.ndarray = render_symbol(spec).astype(np.float32)
    scale = d.module_px / RENDER_MODULE_PX
    lh, lw = label.shape
    # Fit the label into the frame with a margin; shrink the module size if it cannot.
    fit = min(0.85 * w / lw, 0.85 * h / lh)
    scale = min(scale, fit)
    if scale < 0.6:  # pre-shrink with area averaging so the warp does not alias
        pre = max(scale * 1.5, 0.05)
        label = cv2.resize(label, None, fx=pre, fy=pre, interpolation=cv2.INTER_AREA)
        scale /= pre
        lh, lw = label.shape
    ink, paper = 25.0, 235.0
    label = ink + (label / 255.0) * (paper - ink)
    mean = float(frame.mean())
    c = float(np.clip(d.contrast, 0.05, 1.0))
    label = mean + (label - mean) * c
    src = np.asarray([[0, 0], [lw, 0], [lw, lh], [0, lh]], dtype=np.float32)
    jitter = rng.uniform(-d.perspective, d.perspective, (4, 2)) * np.asarray([lw, lh], dtype=np.float32)
    corners = (src - np.asarray([lw / 2, lh / 2]) + jitter) * scale
    a = np.deg2rad(d.rotation_deg * (1 if rng.random() < 0.5 else -1))
    rot = np.asarray([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]], dtype=np.float32)
    corners = corners @ rot.T
    span = corners.max(axis=0) - corners.min(axis=0)
    room = np.maximum(np.asarray([w, h], dtype=np.float32) - span, 1)
    centre = corners.min(axis=0) * -1 + rng.uniform(0, 1, 2) * room
    dst = np.asarray(corners + centre, dtype=np.float32)
    m = cv2.getPerspectiveTransform(src, dst)
    warped = cv2.warpPerspective(label, m, (w, h), flags=cv2.INTER_LINEAR)
    mask = cv2.warpPerspective(np.ones_like(label), m, (w, h), flags=cv2.INTER_LINEAR)
    frame = frame * (1 - mask) + warped * mask
    return _finish(frame, d, rng)


def empty_frame(size: tuple[int, int] = (1280, 720), seed: int = 0, noise_sigma: float = 6.0,
                scene_seed: int | None = None) -> np.ndarray:
    """A frame without any code; ``scene_seed`` fixes the scene while the noise follows ``seed``."""
    scene = background(size, np.random.default_rng(seed if scene_seed is None else scene_seed))
    return _finish(scene, Degradation(noise_sigma=noise_sigma), np.random.default_rng(seed + 1_000_003))


@dataclass(frozen=True)
class Sample:
    """A generated frame and the code it holds."""

    name: str
    spec: CodeSpec
    degradation: str
    image: np.ndarray


def sample_set(kinds: tuple[str, ...] = KINDS, degradations: tuple[str, ...] = tuple(PRESETS),
               per_case: int = 1, size: tuple[int, int] = (1280, 720), seed: int = 0) -> list[Sample]:
    """``per_case`` frames for every kind x degradation preset, deterministic in ``seed``."""
    out: list[Sample] = []
    for ki, kind in enumerate(kinds):
        for di, deg in enumerate(degradations):
            for i in range(per_case):
                s = seed * 1_000_000 + ki * 10_000 + di * 100 + i
                spec = make_code(kind, np.random.default_rng(s))
                img = compose(spec, PRESETS[deg], size=size, seed=s)
                out.append(Sample(f"{kind}-{deg}-{i:02d}", spec, deg, img))
    return out


def expected_gtin(spec: CodeSpec) -> str | None:
    """The GTIN the product-code rules give for the spec's text (sanity check of the tables)."""
    return product_gtin(spec.text, spec.symbology)


__all__ = ["CodeSpec", "Degradation", "KINDS", "PRESETS", "Sample", "background", "compose", "empty_frame",
           "expected_gtin", "make_code", "render_symbol", "sample_set"]

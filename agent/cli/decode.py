"""``cabinet-agent decode IMAGE... [--json]`` (spec/operations.md): the camera's barcode
pipeline -- the same code and default settings the scanner thread uses -- on image files,
for installers checking a camera's view and for acceptance runs.

Output, one line per decoded code, in the order the images were given:
``IMAGE<TAB>SYMBOLOGY<TAB>TEXT<TAB>GTIN-or-empty``, or with ``--json`` one object per line
``{"image", "symbology", "text", "gtin"}`` (gtin null when the code is not a product code).
An image with no code prints nothing. Exit 0, or 2 if any file could not be read (each
named on stderr; the others are still processed). A missing decoder library is said on
stderr in one line and the other decoder does the work; with neither, one line and exit 2
(a usage/config error: this installation cannot decode). Never a traceback.

In the tab-separated form, control characters inside TEXT (a GS1 separator, a newline in a
QR code) are written as backslash escapes (``\\x1d``, ``\\n``, ``\\t``) so that one code stays
one line; ``--json`` carries the exact text.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import TextIO

import cv2
import numpy as np

from drivers.camera.backends import DecoderUnavailable
from drivers.camera.decoder import BarcodePipeline

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_UNREADABLE = 2

_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(text: str) -> str:
    return "".join(_ESCAPES.get(ch, f"\\x{ord(ch):02x}") if ord(ch) < 0x20 or ord(ch) == 0x7F else ch
                   for ch in text)


def read_gray(path: str) -> np.ndarray | None:
    """The image at ``path`` as 8-bit grayscale, None if it is missing or not an image."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except (OSError, ValueError):
        return None
    if data.size == 0:
        return None
    img = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    return img if img is not None and img.size else None


def run(paths: list[str], as_json: bool, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
        pipeline: BarcodePipeline | None = None) -> int:
    """Decode every image in ``paths``; returns the exit code."""
    try:
        pipe = pipeline or BarcodePipeline()
    except DecoderUnavailable as exc:  # neither zxing-cpp nor zbar can be loaded
        print(f"cabinet-agent decode: no barcode decoder available: {exc.reason}", file=err)
        return EXIT_UNREADABLE
    if pipe.degraded:
        print(f"cabinet-agent decode: warning: {pipe.degraded}; decoding with "
              f"{' and '.join(pipe.backends.names)} only", file=err)
    rc = EXIT_OK
    for path in paths:
        img = read_gray(path)
        if img is None:
            print(f"cabinet-agent decode: cannot read image: {path}", file=err)
            rc = EXIT_UNREADABLE
            continue
        try:
            codes = pipe.decode(img)
        except Exception as exc:  # one bad image must not stop the others
            log.exception("decoding %s failed", path)
            print(f"cabinet-agent decode: cannot decode image: {path}: {exc}", file=err)
            rc = EXIT_UNREADABLE
            continue
        for d in codes:
            if as_json:
                line = json.dumps({"image": path, "symbology": d.symbology, "text": d.text, "gtin": d.gtin},
                                  ensure_ascii=False)
            else:
                line = f"{path}\t{d.symbology}\t{_escape(d.text)}\t{d.gtin or ''}"
            print(line, file=out)
        out.flush()
    return rc


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m agent.cli.decode``); the CLI calls ``run`` directly."""
    import argparse

    ap = argparse.ArgumentParser(prog="cabinet-agent decode", description="decode barcodes in image files")
    ap.add_argument("images", nargs="+", metavar="IMAGE")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    args = ap.parse_args(argv)
    return run(args.images, args.json)


if __name__ == "__main__":
    raise SystemExit(main())

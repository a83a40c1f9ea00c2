#!/usr/bin/env python3
"""Write a sample set of generated, degraded barcode frames to a folder.

For people to look at, and to run ``cabinet-agent decode`` on. Every symbology x every
degradation preset of drivers/camera/synth.py, plus empty noisy frames, and a
``manifest.tsv`` (file, symbology, text, gtin, degradation) of what each frame holds.

    .venv/bin/python scripts/gen_barcodes.py --out /tmp/barcodes --size 1280x720
"""

from __future__ import annotations

import argparse
import os
import sys

import cv2

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from drivers.camera import synth  # noqa: E402


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder to write into (created)")
    ap.add_argument("--size", type=_size, default=(1280, 720), help="frame size WxH (default 1280x720)")
    ap.add_argument("--per-case", type=int, default=1, help="frames per symbology x degradation")
    ap.add_argument("--empty", type=int, default=3, help="empty noisy frames to add")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default=",".join(synth.KINDS), help="comma-separated subset of kinds")
    ap.add_argument("--degradations", default=",".join(synth.PRESETS), help="comma-separated presets")
    args = ap.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    samples = synth.sample_set(kinds=tuple(args.kinds.split(",")), degradations=tuple(args.degradations.split(",")),
                               per_case=args.per_case, size=args.size, seed=args.seed)
    with open(os.path.join(args.out, "manifest.tsv"), "w", encoding="utf-8") as manifest:
        manifest.write("file\tsymbology\ttext\tgtin\tdegradation\n")
        for s in samples:
            name = f"{s.name}.png"
            cv2.imwrite(os.path.join(args.out, name), s.image)
            manifest.write(f"{name}\t{s.spec.symbology}\t{s.spec.text}\t{s.spec.gtin or ''}\t{s.degradation}\n")
        for i in range(args.empty):
            name = f"empty-{i:02d}.png"
            cv2.imwrite(os.path.join(args.out, name), synth.empty_frame(args.size, seed=args.seed + i))
            manifest.write(f"{name}\t\t\t\tempty\n")
    print(f"wrote {len(samples) + args.empty} images and manifest.tsv to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

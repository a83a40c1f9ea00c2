"""``cabinet-agent decode``: exact output lines, --json, unreadable files -> exit 2."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.cli.decode import run
from drivers.camera import synth


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, synth.CodeSpec | None]]:
    folder = tmp_path_factory.mktemp("decode")
    out: dict[str, tuple[str, synth.CodeSpec | None]] = {}
    for kind, seed in (("ean13", 1), ("upce", 2), ("qr_dl", 3), ("code128", 4), ("gs1_128", 5)):
        spec = synth.make_code(kind, np.random.default_rng(seed))
        path = str(folder / f"{kind}.jpg" if kind == "ean13" else folder / f"{kind}.png")
        cv2.imwrite(path, synth.compose(spec, size=(640, 480), seed=seed))
        out[kind] = (path, spec)
    empty = str(folder / "empty.png")
    cv2.imwrite(empty, synth.empty_frame((640, 480), seed=1))
    out["empty"] = (empty, None)
    notimg = folder / "notes.png"
    notimg.write_text("not an image")
    out["notimg"] = (str(notimg), None)
    out["missing"] = (str(folder / "missing.png"), None)
    return out


def _run(paths: list[str], as_json: bool = False) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = run(paths, as_json, out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


def test_tab_separated_lines_exactly(images) -> None:
    kinds = ["ean13", "upce", "qr_dl", "code128", "empty"]
    rc, out, err = _run([images[k][0] for k in kinds])
    expected = "".join(f"{images[k][0]}\t{s.symbology}\t{s.text}\t{s.gtin or ''}\n"
                       for k in kinds if (s := images[k][1]) is not None)
    assert (rc, out, err) == (0, expected, "")
    assert "\tCode 128\tLOT-" in out and out.count("\n") == 4  # non-product code: empty GTIN column


def test_gtin_column_for_each_product_form(images) -> None:
    rc, out, _ = _run([images[k][0] for k in ("ean13", "upce", "qr_dl", "gs1_128")])
    rows = [line.split("\t") for line in out.splitlines()]
    assert rc == 0
    assert [r[1] for r in rows] == ["EAN-13", "UPC-E", "QR", "Code 128"]
    assert all(len(r) == 4 and len(r[3]) == 14 and r[3].isdigit() for r in rows)
    assert rows[1][2] == images["upce"][1].text and len(rows[1][2]) == 8


def test_json_lines(images) -> None:
    rc, out, err = _run([images["qr_dl"][0], images["code128"][0], images["empty"][0]], as_json=True)
    assert rc == 0 and err == ""
    objs = [json.loads(line) for line in out.splitlines()]
    qr, c128 = images["qr_dl"][1], images["code128"][1]
    assert objs == [
        {"image": images["qr_dl"][0], "symbology": "QR", "text": qr.text, "gtin": qr.gtin},
        {"image": images["code128"][0], "symbology": "Code 128", "text": c128.text, "gtin": None},
    ]


def test_unreadable_files_exit_2_and_the_others_are_processed(images) -> None:
    paths = [images["missing"][0], images["ean13"][0], images["notimg"][0], images["upce"][0]]
    rc, out, err = _run(paths)
    assert rc == 2
    assert [line.split("\t")[0] for line in out.splitlines()] == [images["ean13"][0], images["upce"][0]]
    err_lines = err.splitlines()
    assert len(err_lines) == 2
    assert images["missing"][0] in err_lines[0] and images["notimg"][0] in err_lines[1]


def test_image_without_code_prints_nothing(images) -> None:
    assert _run([images["empty"][0]]) == (0, "", "")
    assert _run([images["empty"][0]], as_json=True) == (0, "", "")


def test_control_characters_are_escaped_in_tsv_only(tmp_path: Path) -> None:
    import segno

    text = "line one\nline\ttwo"
    path = tmp_path / "qr.png"
    segno.make(text, error="m", micro=False).save(str(path), scale=6, border=4)
    rc, out, _ = _run([str(path)])
    assert (rc, out) == (0, f"{path}\tQR\tline one\\nline\\ttwo\t\n")
    rc, out, _ = _run([str(path)], as_json=True)
    assert json.loads(out)["text"] == text


# -- optional decoders (issue 10): the command degrades, never a traceback ------------------------

def _decode_hiding(tmp_path: Path, paths: list[str], *hidden: str) -> subprocess.CompletedProcess[str]:
    from camera_support import env_hiding

    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-m", "agent.cli.decode", *paths], capture_output=True, text=True,
                          env=env_hiding(tmp_path / "shim", *hidden), cwd=root, timeout=120)


def test_without_zbar_decode_reads_with_zxing_and_warns_once(tmp_path: Path, images) -> None:
    path, spec = images["ean13"]
    done = _decode_hiding(tmp_path, [path, images["missing"][0]], "zbar")
    assert done.returncode == 2  # the missing file, as ever
    assert done.stdout == f"{path}\t{spec.symbology}\t{spec.text}\t{spec.gtin}\n"
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and "Traceback" not in done.stderr
    assert lines[0].startswith("cabinet-agent decode: warning: zbar unavailable: ImportError")
    assert "zxing only" in lines[0] and images["missing"][0] in lines[1]


def test_without_any_decoder_decode_says_so_in_one_line_and_exits_2(tmp_path: Path, images) -> None:
    done = _decode_hiding(tmp_path, [images["ean13"][0]], "zbar", "zxing")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("cabinet-agent decode: no barcode decoder available: ")

"""Arbitration rules on hand-made reads (drivers.camera.arbiter): what counts as agreement,
how contests and the pixel check decide, and the QR rules. No image, no decoder."""

from __future__ import annotations

from drivers.camera import symbology as sym
from drivers.camera.arbiter import Arbiter, Decoded, Judge, Key, Rules
from drivers.camera.backends import ZBAR, ZXING, Read
from drivers.camera.bars import PixelReading

EAN = "5901234123457"  # valid check digit
EAN_OTHER = "5901234123464"  # another valid EAN-13
EAN8 = "96385074"
UPCE = "01234565"


def read(text: str, symbology: str = sym.EAN13, backend: str = ZXING, scale: float = 1.0,
         box: tuple[float, float, float, float] = (100, 100, 300, 200), guessed: bool = False) -> Read:
    x0, y0, x1, y1 = box
    return Read(symbology, text, backend, scale, ((x0, y0), (x1, y0), (x1, y1), (x0, y1)), guessed)


def judge_with(readings: dict[str, PixelReading]) -> tuple[Judge, list[list[Key]]]:
    calls: list[list[Key]] = []

    def judge(_place: list[Read], keys: list[Key]) -> dict[Key, PixelReading]:
        calls.append(keys)
        return {k: readings[k[1]] for k in keys if k[1] in readings}

    return judge, calls


def texts(reads: list[Read], judge: Judge | None = None, rules: Rules | None = None) -> list[str]:
    return [d.text for d in Arbiter(rules).decide(reads, judge).codes]


def no_pixels() -> Rules:
    return Rules(pixel_confirm=False, pixel_veto=False)


# -- rule 1: check digits ------------------------------------------------------------------------

def test_a_bad_check_digit_is_no_read() -> None:
    assert texts([read("5901234123458"), read("5901234123458", backend=ZBAR)]) == []


# -- rule 3: agreement -----------------------------------------------------------------------------

def test_one_view_is_not_enough_two_decoders_are() -> None:
    assert texts([read(EAN)], rules=no_pixels()) == []
    assert texts([read(EAN, backend=ZBAR)], rules=no_pixels()) == []
    assert texts([read(EAN), read(EAN, backend=ZBAR, box=(102, 90, 298, 210))], rules=no_pixels()) == [EAN]


def test_zxing_at_two_scales_agrees_zbar_at_two_scales_does_not() -> None:
    assert texts([read(EAN), read(EAN, scale=1.5)], rules=no_pixels()) == [EAN]
    assert texts([read(EAN, backend=ZBAR), read(EAN, backend=ZBAR, scale=1.5)], rules=no_pixels()) == []
    # without zxing-cpp (degraded mode) two zbar scales have to do
    degraded = Rules(pixel_confirm=False, pixel_veto=False, zbar_scales_agree=True)
    assert texts([read(EAN, backend=ZBAR), read(EAN, backend=ZBAR, scale=1.5)], rules=degraded) == [EAN]


def test_separate_places_are_judged_separately() -> None:
    left = [read(EAN, box=(0, 0, 200, 100)), read(EAN, backend=ZBAR, box=(0, 0, 200, 100))]
    right = [read(EAN8, sym.EAN8, box=(600, 0, 740, 100))]
    assert texts(left + right, rules=no_pixels()) == [EAN]


# -- rule 2: partial reads -----------------------------------------------------------------------

def test_a_short_code_inside_a_long_one_is_a_piece_of_it() -> None:
    reads = [read(EAN), read(EAN, backend=ZBAR), read(UPCE, sym.UPCE, backend=ZBAR, box=(150, 110, 250, 190))]
    verdict = Arbiter(no_pixels()).decide(reads)
    assert [d.text for d in verdict.codes] == [EAN]
    assert ((sym.UPCE, UPCE), "part of a longer symbol") in verdict.dropped


def test_a_linear_read_inside_a_qr_code_is_dropped() -> None:
    qr = read("https://id.example.org/01/09506000134352", sym.QR, box=(0, 0, 300, 300))
    bars = [read(EAN8, sym.EAN8, box=(50, 50, 200, 120)), read(EAN8, sym.EAN8, backend=ZBAR, box=(50, 50, 200, 120))]
    assert texts([qr, *bars], rules=no_pixels()) == [qr.text]


# -- rule 4: contests ------------------------------------------------------------------------------

def test_a_contest_is_won_by_the_pixels_by_a_margin() -> None:
    reads = [read(EAN), read(EAN, backend=ZBAR), read(EAN_OTHER, scale=2.0)]
    judge, _ = judge_with({EAN: PixelReading(EAN, True, 0.95), EAN_OTHER: PixelReading(EAN, True, 0.88)})
    assert texts(reads, judge) == [EAN]
    # the other way round: the text fewer views read wins when the pixels say so
    judge, _ = judge_with({EAN: PixelReading(EAN_OTHER, True, 0.87), EAN_OTHER: PixelReading(EAN_OTHER, True, 0.96)})
    assert texts(reads, judge) == [EAN_OTHER]


def test_an_undecided_contest_drops_every_text() -> None:
    reads = [read(EAN), read(EAN_OTHER, backend=ZBAR)]
    judge, _ = judge_with({EAN: PixelReading(None, True, 0.700), EAN_OTHER: PixelReading(None, True, 0.690)})
    verdict = Arbiter().decide(reads, judge)
    assert verdict.codes == [] and all("undecided" in why for _, why in verdict.dropped)
    assert texts(reads, None) == []  # no pixel check at all: nobody wins


def test_a_code128_contest_drops_both() -> None:
    reads = [read("LOT-1", sym.CODE128), read("LOT-1", sym.CODE128, scale=1.5), read("LOT-7", sym.CODE128, ZBAR)]
    judge, calls = judge_with({})
    assert texts(reads, judge) == [] and calls == []  # the pixel check knows only EAN/UPC


# -- rules 3b and 5: the pixel reading confirms, or vetoes -----------------------------------------

def test_pixels_confirm_a_single_view_when_they_read_the_same_text_with_quiet_zones() -> None:
    judge, _ = judge_with({EAN: PixelReading(EAN, True, 0.80)})
    assert texts([read(EAN)], judge) == [EAN]
    judge, _ = judge_with({EAN: PixelReading(EAN, False, 0.80)})  # bars where a quiet zone must be
    assert texts([read(EAN)], judge) == []
    judge, _ = judge_with({EAN: PixelReading(EAN_OTHER, True, 0.60)})  # a blurred symbol: no opinion
    assert texts([read(EAN)], judge) == []


def test_a_clean_pixel_reading_of_another_text_vetoes_what_two_decoders_agree_on() -> None:
    reads = [read(EAN), read(EAN, backend=ZBAR)]
    judge, _ = judge_with({EAN: PixelReading(EAN_OTHER, True, 0.88)})
    verdict = Arbiter().decide(reads, judge)
    assert verdict.codes == [] and "the pixels read" in verdict.dropped[0][1]
    judge, _ = judge_with({EAN: PixelReading(EAN_OTHER, True, 0.70)})  # not well imaged: no veto
    assert texts(reads, judge) == [EAN]


def test_three_independent_views_need_no_pixel_check() -> None:
    reads = [read(EAN), read(EAN, scale=1.5), read(EAN, backend=ZBAR)]
    judge, calls = judge_with({EAN: PixelReading(EAN_OTHER, True, 0.99)})
    assert texts(reads, judge) == [EAN] and calls == []


# -- QR rules ------------------------------------------------------------------------------------

def qr(text: str, backend: str = ZXING, box: tuple[float, float, float, float] = (0, 0, 100, 100),
       guessed: bool = False) -> Read:
    return read(text, sym.QR, backend, box=box, guessed=guessed)


def test_one_qr_read_is_enough_and_equal_codes_are_reported_once() -> None:
    reads = [qr("one"), qr("two", box=(500, 0, 600, 100)), qr("one", ZBAR, box=(900, 300, 1000, 400))]
    assert Arbiter().decide(reads).codes == [Decoded(sym.QR, "one", None), Decoded(sym.QR, "two", None)]


def test_zbar_guessing_a_character_set_is_dropped_and_zxing_kept() -> None:
    assert texts([qr("ﾃﾞｻﾞｲﾝQR"), qr("蹬靼翌QR", ZBAR, guessed=True)]) == ["ﾃﾞｻﾞｲﾝQR"]
    assert texts([qr("蹬靼翌QR", ZBAR, guessed=True)]) == []


def test_a_qr_code_printed_over_another_is_the_one_read() -> None:
    outer, inner = qr("outer", box=(0, 0, 300, 300)), qr("inner", box=(120, 120, 180, 180))
    assert texts([outer, inner]) == ["inner"]


def test_two_different_qr_texts_at_one_place_are_both_dropped() -> None:
    assert texts([qr("one"), qr("two", ZBAR, box=(5, 5, 105, 105))]) == []


def test_a_gs1_qr_code_carries_its_gtin() -> None:
    got = Arbiter().decide([qr("(01)09506000134352(17)251231")]).codes
    assert got == [Decoded(sym.QR, "(01)09506000134352(17)251231", "09506000134352")]

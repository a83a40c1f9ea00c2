"""PtyDevice, the pty plumbing under both simulators, with a tiny device on a real pty."""

from __future__ import annotations

import os
import select
import termios
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.ptydevice import PtyDevice, pty_symlink


class Echo(PtyDevice):
    """Answers every complete line with the line upper-cased; a silence drops a partial line."""

    def __init__(self, byte_time_s: float = 0.0, silence_s: float | None = None) -> None:
        super().__init__("echo-sim", byte_time_s)
        self.silence_s = silence_s
        self.dropped: list[bytes] = []

    def _on_bytes(self, buf: bytearray) -> None:
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            self._write(line.upper() + b"\n")

    def _on_silence(self, buf: bytearray) -> None:
        self.dropped.append(bytes(buf))
        buf.clear()
        self._write(b"dropped\n")


def read(fd: int, expected: bytes, timeout_s: float = 5.0) -> bytes:
    """As many bytes as ``expected`` holds (then nothing more may be waiting)."""
    out = b""
    while len(out) < len(expected):
        ready, _, _ = select.select([fd], [], [], timeout_s)
        assert ready, f"no reply, got {out!r}"
        out += os.read(fd, len(expected) - len(out))
    assert select.select([fd], [], [], 0)[0] == []
    return out


@pytest.fixture
def port_fd() -> Iterator[list[int]]:
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


def open_port(sim: PtyDevice, fds: list[int]) -> int:
    fd = os.open(sim.port, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd, termios.TCSANOW)
    fds.append(fd)
    return fd


def test_answers_complete_frames_byte_exact(port_fd: list[int]) -> None:
    with Echo() as sim:
        fd = open_port(sim, port_fd)
        os.write(fd, b"ab")
        os.write(fd, b"c\n\x00\xff\r\n")
        assert read(fd, b"ABC\n\x00\xff\r\n") == b"ABC\n\x00\xff\r\n"


def test_silence_hook_runs_only_with_bytes_pending(port_fd: list[int]) -> None:
    with Echo(silence_s=0.02) as sim:
        fd = open_port(sim, port_fd)
        os.write(fd, b"partial")
        assert read(fd, b"dropped\n") == b"dropped\n"
        os.write(fd, b"whole\n")
        assert read(fd, b"WHOLE\n") == b"WHOLE\n"
        assert sim.dropped == [b"partial"]


def test_line_speed_writes_one_byte_at_a_time(port_fd: list[int]) -> None:
    with Echo(byte_time_s=0.005) as sim:
        fd = open_port(sim, port_fd)
        t0 = time.monotonic()
        os.write(fd, b"xyz\n")
        assert read(fd, b"XYZ\n") == b"XYZ\n"
        assert time.monotonic() - t0 >= 4 * 0.005  # a wait before each of the 4 bytes


def test_lifecycle_errors_and_idempotent_stop() -> None:
    sim = Echo()
    with pytest.raises(RuntimeError, match="not started"):
        _ = sim.port
    sim.start()
    with pytest.raises(RuntimeError, match="already started"):
        sim.start()
    assert os.path.exists(sim.port)
    sim.stop()
    sim.stop()
    with pytest.raises(ValueError, match="byte_time_s"):
        Echo(byte_time_s=-1)


def test_the_port_reopens_after_the_agent_closed_it(port_fd: list[int]) -> None:
    with Echo() as sim:
        os.write(open_port(sim, port_fd), b"once\n")
        assert read(port_fd[0], b"ONCE\n") == b"ONCE\n"
        os.close(port_fd.pop())
        fd = open_port(sim, port_fd)
        os.write(fd, b"again\n")
        assert read(fd, b"AGAIN\n") == b"AGAIN\n"


def test_pty_symlink_points_at_the_port_while_it_runs(tmp_path: Path) -> None:
    link = tmp_path / "sim" / "lockboard"
    with Echo() as sim, pty_symlink(sim.port, str(link)):
        assert os.readlink(link) == sim.port
    assert not link.exists() and not link.is_symlink()

"""Device client for the shelf-scale weighing transmitters: read-only Modbus requests.

Sits on one :class:`~drivers.serial_link.SerialLink` (one RS-485 bus shared by all lanes'
transmitters) and turns register reads into typed values. It is deliberately read-only:
the spec forbids writing to a transmitter (its zero/tare registers write EEPROM and wear
out; zeroing is done by the agent in software), so no write function exists here at all.

Errors surface as the driver's typed exceptions: ``LinkTimeout`` when a transmitter does
not answer (not on the bus), ``LinkError`` for port trouble, and
:class:`ModbusExceptionError` (a ``DeviceError``) when it answers with a Modbus exception.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from drivers.errors import DeviceError
from drivers.scales.codec import (
    REG_GROSS,
    REG_STATUS,
    ExceptionReply,
    ReadHoldingReply,
    ReadHoldingRequest,
    Status,
    decode_weight,
    reply_extractor,
)
from drivers.serial_link import SerialLink

log = logging.getLogger(__name__)

DEFAULT_REPLY_TIMEOUT_S = 0.1  # spec: a transmitter not on the bus -> timeout, 100 ms configurable


class ModbusExceptionError(DeviceError):
    """The transmitter answered with a Modbus exception reply (e.g. code 02: bad register range)."""

    def __init__(self, slave: int, function: int, code: int) -> None:
        super().__init__(f"slave {slave} answered function {function:#04x} with Modbus exception {code:#04x}")
        self.slave = slave
        self.function = function
        self.code = code


@dataclass(frozen=True)
class Reading:
    """One weight reading of a transmitter, as the agent uses it.

    ``division_g`` is one count of the weight registers (10^-decimals g); it defaults to
    that value so callers only pass it when they mean something else. The stability rule
    ("max - min at most 2 divisions") is expressed in it.
    """

    gross_g: float
    motion: bool
    overload: bool
    decimals: int
    division_g: float | None = None

    def __post_init__(self) -> None:
        if self.division_g is None:
            object.__setattr__(self, "division_g", 10.0**-self.decimals)


class ScaleClient:
    """Reads status and weight from the transmitters on one bus.

    Owned by the single thread that owns the bus's link (one owner per resource), so it
    holds no locks.
    """

    def __init__(self, link: SerialLink, reply_timeout_s: float = DEFAULT_REPLY_TIMEOUT_S) -> None:
        self.link = link
        self.reply_timeout_s = reply_timeout_s

    def read_registers(self, slave: int, register: int, count: int) -> tuple[int, ...]:
        """Read ``count`` holding registers; the building block of every other read.

        Raises ``LinkTimeout`` if nothing valid arrives within ``reply_timeout_s`` and
        :class:`ModbusExceptionError` if the transmitter rejects the request.
        """
        request = ReadHoldingRequest(slave, register, count)
        reply = self.link.transact(request.to_bytes(), reply_extractor(request), self.reply_timeout_s)
        if isinstance(reply, ExceptionReply):
            log.warning(
                "scale slave %d rejected read of %d register(s) at %#06x: exception %#04x",
                slave,
                count,
                register,
                reply.code,
            )
            raise ModbusExceptionError(reply.slave, reply.function, reply.code)
        assert isinstance(reply, ReadHoldingReply)  # the extractor returns nothing else
        return reply.values

    def read_status(self, slave: int) -> Status:
        """Status register: motion and overload bits and the number of decimals of the weight."""
        (value,) = self.read_registers(slave, REG_STATUS, 1)
        return Status.from_register(value)

    def read_gross(self, slave: int, decimals: int) -> float:
        """Gross weight in grams; ``decimals`` comes from the status register (read it first)."""
        high, low = self.read_registers(slave, REG_GROSS, 2)
        return decode_weight(high, low, decimals)

    def read(self, slave: int) -> Reading:
        """Status, then gross weight, as one :class:`Reading`.

        Status comes first because the weight registers are meaningless without the
        decimals it carries. The two reads are separate requests, so the motion bit is
        that of a moment before the weight; the stability window absorbs that.
        """
        status = self.read_status(slave)
        gross = self.read_gross(slave, status.decimals)
        log.debug(
            "scale slave %d: %.*f g motion=%s overload=%s",
            slave,
            status.decimals,
            gross,
            status.motion,
            status.overload,
        )
        return Reading(
            gross_g=gross,
            motion=status.motion,
            overload=status.overload,
            decimals=status.decimals,
        )

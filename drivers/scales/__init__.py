"""Shelf scales: Modbus RTU weighing transmitters (spec/serial.md, "Shelf scales").

Layers, each only talking to the one below:

- :mod:`drivers.scales.codec` - pure Modbus RTU frames, CRC and register decoding;
- :class:`drivers.serial_link.SerialLink` - the port, flushing, reading, resync;
- :mod:`drivers.scales.client` - ``ScaleClient.read(slave)`` and friends (read-only);
- :mod:`drivers.scales.stability` - pure "is this weight settled" judgement;
- :mod:`drivers.scales.simulator` - transmitters on a pty, for the demo and the tests.
"""

from drivers.scales.client import ModbusExceptionError, Reading, ScaleClient
from drivers.scales.codec import (
    ExceptionReply,
    ReadHoldingReply,
    ReadHoldingRequest,
    Status,
    crc16,
    decode_weight,
    encode_weight,
    reply_extractor,
)
from drivers.scales.stability import StabilityWindow

__all__ = [
    "ExceptionReply",
    "ModbusExceptionError",
    "ReadHoldingReply",
    "ReadHoldingRequest",
    "Reading",
    "ScaleClient",
    "StabilityWindow",
    "Status",
    "crc16",
    "decode_weight",
    "encode_weight",
    "reply_extractor",
]

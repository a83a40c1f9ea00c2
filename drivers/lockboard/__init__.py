"""The "8A/80" RS-485 lock board (spec/serial.md): pure codec, device client and (in
``drivers.lockboard.simulator``, not imported here so ``python -m`` runs it cleanly) a simulator."""

from drivers.lockboard.client import LockBoardClient
from drivers.lockboard.codec import (
    AllReply,
    LockReply,
    QueryAllRequest,
    QueryRequest,
    UnlockFailed,
    UnlockRequest,
    all_reply_bits,
    bcc,
    parse_request,
    reply_extractor,
)

__all__ = [
    "AllReply",
    "LockBoardClient",
    "LockReply",
    "QueryAllRequest",
    "QueryRequest",
    "UnlockFailed",
    "UnlockRequest",
    "all_reply_bits",
    "bcc",
    "parse_request",
    "reply_extractor",
]

"""Typed exceptions of the driver layer."""


class DriverError(Exception):
    """Base of every driver error."""


class LinkError(DriverError):
    """The serial port could not be opened, read or written."""


class LinkTimeout(DriverError):
    """No complete, valid reply arrived in time."""


class FrameError(DriverError):
    """Bytes that are not a valid frame (length, header, checksum)."""


class DeviceError(DriverError):
    """The device answered, but with an error (e.g. a Modbus exception reply)."""


class GtinError(DriverError, ValueError):
    """A code is not a valid GTIN (wrong length, not digits, bad check digit)."""

"""The platform's Ed25519 signing key on disk (platform.md, ``keygen``).

A private key is an unencrypted PKCS#8 PEM file readable by its owner only: the pilot's
tools run unattended (an ingest worker asking for resends), so there is no passphrase to
type, and the file mode is the protection. The cabinets get the public half as base64 of
the 32 raw bytes (``[platform] public_key``).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol
from agent.errors import AgentError


class KeyFileError(AgentError):
    """A key file cannot be written or read as an Ed25519 private key."""


def write_new_key(path: Path, *, overwrite: bool = False) -> Ed25519PrivateKey:
    """Generate a key and write it with mode 0600 (created so, never chmod-ed afterwards).

    An existing file is refused unless ``overwrite``: replacing the key the fleet trusts by
    mistake would lock the platform out of every cabinet.
    """
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} exists; refusing to replace a key (use --force)") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, 0o600)   # O_TRUNC on an existing file keeps its old mode
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read a PEM (PKCS#8) Ed25519 private key; KeyFileError says why it cannot be used."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def public_key_b64(key: Ed25519PrivateKey) -> str:
    """The value for a cabinet's ``[platform] public_key``."""
    return protocol.public_key_b64(key)

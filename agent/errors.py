"""Typed exceptions of the agent layer (drivers have their own in drivers.errors)."""

from drivers.errors import GtinError

__all__ = ["AgentError", "CatalogError", "CatalogStoreError", "CommandRejected", "ConfigError", "GtinError",
           "LedgerError", "SignatureError", "StoreError"]


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """The configuration is invalid; ``problems`` holds one 'key.path: message' per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class SignatureError(AgentError):
    """A signed platform message does not verify."""


class StoreError(AgentError):
    """One of the agent's databases cannot be opened or used (it is never altered on the way)."""


class LedgerError(StoreError):
    """The ledger cannot be opened or written."""


class CatalogStoreError(StoreError):
    """The catalog cache cannot be opened (not ours, a newer schema) or is already closed."""


class CatalogError(AgentError):
    """A catalog document was refused; ``reason`` is the mqtt.md reason code."""

    def __init__(self, reason: str, message: str = "", version: int | None = None) -> None:
        super().__init__(message or reason)
        self.reason = reason
        self.version = version


class CommandRejected(AgentError):
    """A platform command was refused; the message is the reply's error text."""

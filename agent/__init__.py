"""cabinet-agent: the edge daemon of an unmanned certified-products cabinet."""

__version__ = "0.3.0"

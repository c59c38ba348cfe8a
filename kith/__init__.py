"""kith: a Matrix identity server."""

__version__ = "0.1.0"

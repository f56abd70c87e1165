"""cattle: a stateless API node built to be one of many identical, disposable nodes."""

__version__ = "0.1.0"

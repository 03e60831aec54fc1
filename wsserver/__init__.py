"""wsserver: a WebSocket server on Tornado, secure by default and efficient under load."""

__version__ = "0.1.0"

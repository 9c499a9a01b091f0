"""pointsman: an asyncio platform layer."""

__version__ = "0.1.0"

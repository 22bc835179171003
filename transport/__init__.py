"""Asyncio runtime for peer connections: TCP, the handshake, multiplexed streams, RPC."""

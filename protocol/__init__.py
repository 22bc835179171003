"""Sans-IO protocol core: messages, codecs, framing, handshake. No sockets, no asyncio, no clock."""

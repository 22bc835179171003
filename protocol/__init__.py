"""Sans-IO protocol core: messages, codecs, framing, handshake. No sockets, no asyncio, no clock.

Importing it changes nothing in the process; programs apply their settings with
``biopetals.protocol.program_env.apply_program_environment()``.
"""

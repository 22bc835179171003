"""Named parameters and limits of the DHT (spec/dht.md §2). Values are normative."""

from __future__ import annotations

from typing import Final

from biopetals.protocol.reader import ReadLimits

PROTOCOL: Final = "/biopetals/dht/1"

K: Final = 20
ALPHA: Final = 3
REQUEST_TIMEOUT: Final = 5.0  # seconds
REFRESH_INTERVAL: Final = 600.0
REPUBLISH_INTERVAL: Final = 300.0
MAX_TTL: Final = 3600.0
CLOCK_SKEW: Final = 30.0

MAX_KEY_BYTES: Final = 256
MAX_SUBKEY_BYTES: Final = 64
MAX_VALUE_BYTES: Final = 1024
MAX_SUBKEYS_PER_KEY: Final = 64
MAX_STORED_RECORDS: Final = 65536
MAX_RECORDS_PER_STORE: Final = 32
MAX_KEYS_PER_FIND: Final = 16
MAX_CONTACTS: Final = 32
MAX_ADDRS: Final = 8
MAX_ADDR_BYTES: Final = 256
MAX_ERROR_MESSAGE_BYTES: Final = 1024
MAX_MESSAGE_BYTES: Final = 4 << 20

#: Largest expiration a record may carry, in integer milliseconds (2**53 - 1, exact in every JSON/float).
MAX_EXPIRATION_MS: Final = (1 << 53) - 1
#: What the package's bounded reader (protocol/reader.py) checks before building a DHT message:
#: its size only; every declared length is bounded by the bytes left (spec/dht.md §3), and each
#: field carries its own limit and code (§2, §4).
READ_LIMITS: Final = ReadLimits(max_bytes=MAX_MESSAGE_BYTES, scan=False)

"""The tensor codecs' wire names (spec/tensors.md §4), in a module that loads neither torch nor numpy.

``Codec`` lives here rather than in protocol/tensors.py (which re-exports it) so that the
message tables (protocol/table.py) can name it at run time, for ``typing.get_type_hints`` and
type checkers, while the handshake and DHT code that uses those tables still starts without
importing torch.
"""

from __future__ import annotations

import enum

__all__ = ["Codec"]


class Codec(enum.StrEnum):
    """Codec names as they appear on the wire (spec/tensors.md §4)."""

    F32 = "f32"
    BF16 = "bf16"
    F16 = "f16"
    F16_ZSTD = "f16+zstd"

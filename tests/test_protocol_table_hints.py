"""protocol/table.py's annotations resolve at run time, and the table still loads neither torch nor numpy.

The kinds' ``encode(value, codec: Codec | None)`` names ``Codec``; it comes from
protocol/codec_names.py (torch-free; protocol/tensors.py re-exports the same class), so
``typing.get_type_hints`` and type checkers resolve it, while the handshake and the DHT, which
use the table, still start without torch.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import typing

from biopetals.protocol import table
from biopetals.protocol.codec_names import Codec
from biopetals.protocol.tensors import Codec as TensorsCodec


def test_every_annotation_of_the_table_resolves() -> None:
    checked = 0
    for _, cls in inspect.getmembers(table, inspect.isclass):
        if cls.__module__ != table.__name__:
            continue
        for _, fn in inspect.getmembers(cls, inspect.isfunction):
            if fn.__module__ == table.__name__:
                hints = typing.get_type_hints(fn)  # raises NameError on an unresolved name
                checked += "codec" in hints and hints["codec"] == Codec | None
    assert checked >= 6  # every scalar kind's encode, and the message body's
    assert TensorsCodec is Codec and Codec("f16+zstd") is Codec.F16_ZSTD


def test_the_table_loads_neither_torch_nor_numpy() -> None:
    code = "import sys, biopetals.protocol.table; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"

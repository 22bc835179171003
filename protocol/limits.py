"""Named protocol limits shared by every message, codec and framing layer.

A receiver checks these *before* it allocates anything for a peer's data. The
values are normative: see spec/tensors.md §2 ("Limits") for the reasoning, and
spec/messages.md for the message-level limits that build on them. A node MAY
enforce smaller limits (for instance a tighter ``max_elements`` passed to
``decode_tensor``); it MUST NOT accept more than these.

Reference sizes (Llama-3-8B, hidden size 4096; Llama-3-70B, hidden size 8192):

* a 2048-token prefill of 8B hidden states at fp16: 2048 x 4096 x 2 B = 16 MiB;
* a fine-tuning micro-batch of 8 x 512 tokens: 8 x 512 x 4096 = 2**24 elements,
  32 MiB at fp16, 64 MiB at fp32;
* a 2048-token prefill of 70B hidden states: 2048 x 8192 = 2**24 elements.
"""

from __future__ import annotations

from typing import Final

MiB: Final = 1 << 20

# --- tensors (spec/tensors.md §2) ---

#: Most elements one tensor may declare (the product of its shape's non-zero
#: entries, spec/tensors.md §3.3). 2**24 covers a fine-tuning batch of 8 x 512
#: tokens of Llama-3-8B, or a 2048-token prefill of a 70B-shape model; at fp32 it is
#: 64 MiB, at fp16 32 MiB, so two fp16 tensors of this size fit in one frame.
MAX_TENSOR_ELEMENTS: Final = 1 << 24

#: Most dimensions one tensor may declare. Activations are 3-D
#: ``[batch, sequence, hidden]``; 8 leaves room for masks and per-head tensors.
MAX_TENSOR_DIMS: Final = 8

#: Bound a decoder MAY put on any msgpack array, map, string or ext length inside a
#: standalone tensor before building it (spec/tensors.md §3.2): far above anything
#: valid, so it only stops hostile inputs from allocating many small objects.
MAX_MSGPACK_CONTAINER: Final = 1024

# --- framing (spec/tensors.md §6) ---

#: Largest frame payload (bytes after the 4-byte length prefix). 128 MiB holds two
#: maximal tensors at fp32 (2 x 64 MiB) minus the envelope, or any realistic
#: backward message (inputs + gradients, 8 x 512 x 4096 each) at 16 bits with room
#: to spare. A message that would be larger MUST be split by the sender (smaller
#: batch or fewer tokens per step).
MAX_FRAME_BYTES: Final = 128 * MiB

# --- batches and sequences (spec/messages.md) ---

#: Most sequences in one request. Petals-style serving batches few sequences per
#: session; 64 decode steps of a 70B model is 64 x 8192 = 2**19 elements.
MAX_BATCH: Final = 64

#: Most tokens (positions) one inference session or forward/backward call may
#: cover: Llama-3.1's context length (2**17, ``llama3`` rope scaling), spec/tensors.md §2
#: revision 2 (was Llama-3's 8192). What a session really gets is the least of this, the
#: model's positions and the nodes' cache budgets; one message still carries at most
#: MAX_TENSOR_ELEMENTS, so a long prefill goes in several steps (client/chunking.py).
MAX_SEQUENCE_LENGTH: Final = 131072

# --- node protocol messages (spec/messages.md §1.2) ---

#: Block indices are in [0, MAX_BLOCKS); Llama-3-405B has 126 blocks.
MAX_BLOCKS: Final = 1024
#: Largest hidden dimension (Llama-3-405B: 16384).
MAX_HIDDEN_SIZE: Final = 65536
#: Longest session id; 16 random bytes is the recommended size.
MAX_SESSION_ID_BYTES: Final = 64
#: Longest model name (a hub name or a local label).
MAX_NAME_BYTES: Final = 256
#: Longest short label: software version, dtype, quantisation.
MAX_LABEL_BYTES: Final = 64
#: Most adapters one node lists (NodeInfo, announcement); a name is a short label.
MAX_ADAPTERS: Final = 8
#: Longest peer id text (an Ed25519 peer id in base58btc has 52 characters).
MAX_PEER_ID_BYTES: Final = 128
#: Longest multiaddr text.
MAX_MULTIADDR_BYTES: Final = 256
#: Most multiaddrs in one push hop.
MAX_HOP_ADDRS: Final = 16
#: Most hops in one push chain.
MAX_HOPS: Final = 64
#: Longest error text.
MAX_ERROR_MESSAGE_BYTES: Final = 1024
#: Most msgpack objects (every key, value and item at any depth) in one message. The
#: largest valid message, a Step with 64 hops of 16 addresses, has under 2000; the
#: bound stops a 128 MiB frame of empty arrays from building 10**8 Python objects.
MAX_MESSAGE_OBJECTS: Final = 4096
#: Deepest nesting of msgpack arrays and maps in one message (the envelope is depth 1;
#: valid messages reach 5).
MAX_MESSAGE_DEPTH: Final = 16

"""Per-architecture model knowledge shared by node and client: checkpoint split, block execution.

Modules (import them directly; this package imports nothing eagerly):

* ``config``: supported architectures, checkpoint lookup (directory or cached hub
  name, offline), the swarm naming rule (``model_info``).
* ``checkpoint``: per-tensor reads from safetensors shards (``load_block_state``,
  ``load_client_parts``).
* ``blocks``: ``BlockSpan``, blocks [start, end) through transformers' own decoder
  layers, with a preallocated KV cache (``SpanCache``), stateless forward/backward
  and deep prompts.
* ``step``: ``SpanStep``, one checked inference step as the blocks run it, and
  ``positions_from_mask``, the one rotary-position rule (spec/messages.md §5.6).
* ``client_parts``: ``ClientParts``, embeddings, final norm and LM head.
* ``smollm2``: the bundled SmolLM2-135M-Instruct, converted once from GGUF
  (``smollm2_path()``).
"""

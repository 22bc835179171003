"""The server: ``biopetals-node`` serving a range of transformer blocks.

Modules (flat, one job each):

* ``cli``: the command line (``biopetals-node --help``).
* ``server``: ``run_node``, start-up order, announcing, clean shutdown.
* ``handler``: ``NodeService``, the asyncio driver of every message of spec/messages.md on
  ``/biopetals/node/2``.
* ``session_machine``: ``SessionMachine``, every session rule and transition (open, steps,
  push, duplicates, idle timeout, close) as messages in, actions out, sans-IO.
* ``sessions``: one session's state and the checks of one step against it, sans-IO.
* ``budget``: the KV-cache budget (per session and total), sans-IO.
* ``backend``: the ``BlockSpan`` and its single worker thread; rollback of failed steps.
* ``benchmark``: start-up throughput (inference and forward tokens/s).
* ``announcer``: DHT block announcements (spec/announcement.md).
* ``balancing``: which blocks to serve and when to move (Petals' rule), sans-IO.
* ``placement``: ``--num-blocks``: choose at start, announce joining, settle with concurrent joiners.
* ``relocation``: periodic re-evaluation and moving a serving node to other blocks.
* ``sizing``: the default number of blocks from free memory and block size.
* ``balancing_sim``: an in-process swarm of nodes balancing, for tests and benchmarks.
* ``quant``: ``--quant int8|nf4`` through bitsandbytes.
"""

"""biopetals-conformance: checks a live peer, ours or another implementation's, against spec/.

See README.md ("Testing another implementation") and spec/README.md §5. Imports protocol,
transport and the DHT's message codecs only, never node/ or client/: what it expects
comes from the spec's tables and vectors, not from our node's behaviour.
"""

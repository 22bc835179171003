"""Weights from the swarm: manifests, serving chunks, fetching a span's tensors from peers.

BitTorrent-style (spec/weights.md): ``biopetals-manifest`` cuts a checkpoint into parts
(one per block, the client's tensors, the tokenizer files) and fixed-size chunks, each
with its SHA-256; the manifest's own hash is part of the model's swarm name. Every node
with a manifest serves the chunks of the parts it holds over ``/biopetals/weights/1``
and says so in the DHT; a node or client that lacks its parts fetches them from several
peers in parallel, verifies every chunk, and ends with a normal safetensors directory.

| file | what it does |
|---|---|
| ``safetensors_files.py`` | read a safetensors header, write one for a part |
| ``build.py`` | ``build_manifest``: a checkpoint directory to manifest bytes |
| ``local.py`` | ``LocalWeights``: which parts a directory holds, verified chunk reads |
| ``server.py`` | the ``/biopetals/weights/1`` handler with per-peer limits; provider records |
| ``plan.py`` | ``FetchPlan`` (sans-IO): which chunk to ask of which peer, whom to avoid |
| ``store.py`` | ``PartFiles``: partial files, resume by re-hashing, finishing a part |
| ``fetch.py`` | the asyncio fetcher: providers from the DHT, parallel calls, progress bar |
| ``source.py`` | what ``--model`` names: a checkpoint, a manifest, or a swarm name |
| ``cli.py`` | ``biopetals-manifest`` and ``biopetals-fetch`` |
"""

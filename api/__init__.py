"""``biopetals-api``: an OpenAI-compatible HTTP server and a web page in front of a private swarm.

    biopetals-api --model ./Llama3-OpenBioLLM-8B --swarm-key lab.key \\
        --initial-peers /ip4/10.0.0.5/tcp/31337/p2p/12D3KooW... [--host 127.0.0.1 --port 8000]

Modules, one job each: ``schemas`` (OpenAI request/response models), ``errors`` (OpenAI's
error JSON), ``auth`` (API keys and bind rules), ``engine`` (a pool of client models sharing
one swarm connection, one inference session per request, run in worker threads), ``sampling``
(seeded per-request sampling), ``text`` (incremental detokenising and stop strings),
``swarm_view`` (the swarm page's data), ``app`` (the FastAPI app), ``cli`` (the command),
``static/`` (the page). It uses the client library only; it never imports the node.
"""

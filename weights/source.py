"""What ``--model`` (or ``from_pretrained``'s first argument) names, and making it complete.

* a checkpoint directory: used as it is; if it holds a manifest, parts it lacks can be fetched;
* a manifest file (``biopetals-manifest.json``): the weights go to ``weights_dir``
  (default ``$BIOPETALS_CACHE/models/<swarm name>``, see fetch.default_weights_dir);
* a swarm name ``<name>.<16 hex digits>``: the manifest itself is fetched from a provider
  and checked against those digits, then as above;
* anything else: a hub name in the local Hugging Face cache (models/config.py).
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from biopetals.models.config import ModelConfigError, manifest_of, resolve_checkpoint
from biopetals.protocol.errors import ProtocolError
from biopetals.protocol.manifest import MANIFEST_FILE, Manifest, is_swarm_name, parse_manifest

from .fetch import FetchReport, default_weights_dir, fetch_manifest, fetch_parts
from .local import LocalWeights
from .store import prepare_directory

__all__ = ["ModelSource", "resolve_source", "fetch_blocking", "fetch_client_parts"]


@dataclass
class ModelSource:
    directory: Path
    manifest: Manifest | None
    name: str | None = None  # a swarm name whose manifest is still to be fetched

    @property
    def needs_network(self) -> bool:
        return self.manifest is None and self.name is not None

    def missing(self, parts: list[int]) -> list[int]:
        """Which of ``parts`` the directory does not hold (all of them before the manifest is known)."""
        if self.manifest is None:
            return list(parts)
        local = LocalWeights(self.manifest, self.directory)
        return [p for p in parts if not local.holds(p)]

    async def complete(self, host: Any, dht: Any, parts: Callable[[Manifest], list[int]], *,
                       progress: bool = True, **options: Any) -> FetchReport | None:
        """Fetch the manifest if only its name is known, then whatever ``parts(manifest)`` the directory lacks."""
        if self.manifest is None:
            if self.name is None:
                return None
            self.manifest = await fetch_manifest(host, dht, self.name)
        prepare_directory(self.manifest, self.directory)
        wanted = parts(self.manifest)
        if not self.missing(wanted):
            return None
        # all of them: parts already here count as verified on disk in the report
        return await fetch_parts(host, dht, self.manifest, self.directory, wanted, progress=progress, **options)


def resolve_source(model: str | os.PathLike, weights_dir: str | os.PathLike | None = None) -> ModelSource:
    """Classify ``model`` (see the module docstring). Raises ``ModelConfigError``."""
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / MANIFEST_FILE).is_file() and not (path / "config.json").is_file():
            return _from_manifest_bytes((path / MANIFEST_FILE).read_bytes(), path, path)
        resolved = resolve_checkpoint(path)
        return ModelSource(resolved, manifest_of(resolved))
    if path.is_file():
        return _from_manifest_bytes(path.read_bytes(), path, weights_dir)
    text = str(model)
    if is_swarm_name(text):
        directory = Path(weights_dir) if weights_dir is not None else default_weights_dir(text)
        if (directory / MANIFEST_FILE).is_file():
            source = _from_manifest_bytes((directory / MANIFEST_FILE).read_bytes(), directory, directory)
            if source.manifest is not None and source.manifest.swarm_name == text:
                return source
            raise ModelConfigError(f"{directory} holds another model than {text}: pass another --weights-dir")
        return ModelSource(directory, None, text)
    resolved = resolve_checkpoint(text)
    return ModelSource(resolved, manifest_of(resolved))


def _from_manifest_bytes(raw: bytes, where: Path, weights_dir: str | os.PathLike | None) -> ModelSource:
    try:
        manifest = parse_manifest(raw)
    except ProtocolError as exc:
        raise ModelConfigError(f"{where} is not a checkpoint directory and not a valid manifest: {exc.message}") from exc
    directory = Path(weights_dir) if weights_dir is not None else default_weights_dir(manifest.swarm_name)
    prepare_directory(manifest, directory)  # config.json from the manifest: the directory is a checkpoint from now on
    return ModelSource(directory, manifest)


def fetch_blocking(source: ModelSource, parts: Callable[[Manifest], list[int]], *, initial_peers: list[str],
                   swarm_key: Any, progress: bool = True, **options: Any) -> FetchReport | None:
    """``source.complete`` with a short-lived host of its own, from synchronous code (a client's
    ``from_pretrained``, ``biopetals-fetch``); runs on a thread of its own, so it works also when
    the caller's thread already runs an event loop."""
    from biopetals.dht.node import DHT
    from biopetals.protocol.identity import Identity
    from biopetals.transport.host import Host

    async def run() -> FetchReport | None:
        async with Host(Identity.generate(), swarm_key=swarm_key) as host:
            async with DHT(host, initial_peers=list(initial_peers), client_mode=True) as dht:
                return await source.complete(host, dht, parts, progress=progress, **options)

    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = asyncio.run(run())
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target, name="biopetals-fetch", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def fetch_client_parts(model: str | os.PathLike, *, weights_dir: str | os.PathLike | None, initial_peers: Any,
                       swarm_key: Any, progress: bool = True) -> str | os.PathLike:
    """What a client loads for ``model``: ``model`` itself unless it names a manifest whose client
    parts (embeddings, norm, head, tokenizer files) are not here yet; those are fetched first."""
    source = resolve_source(model, weights_dir)
    if source.manifest is None and source.name is None:
        return model  # an ordinary checkpoint
    if source.manifest is not None and not source.missing([source.manifest.client_part, source.manifest.files_part]):
        return str(source.directory)
    if not initial_peers:
        raise ModelConfigError(f"{model}: the client's weights are not on this machine; pass initial_peers= "
                               f"(and swarm_key=) to fetch them from the swarm")
    key = swarm_key
    if isinstance(key, (str, os.PathLike)):
        from biopetals.transport.keyfiles import load_swarm_key

        key = load_swarm_key(key)
    fetch_blocking(source, lambda m: [m.client_part, m.files_part], initial_peers=[str(p) for p in initial_peers],
                   swarm_key=key, progress=progress)
    return str(source.directory)

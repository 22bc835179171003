"""Which checkpoints BioPetals can serve, and how a checkpoint is found, described and named.

A checkpoint is a Hugging Face format directory (``config.json`` plus safetensors,
sharded through ``model.safetensors.index.json`` or a single ``model.safetensors``)
or a hub name already present in the local Hugging Face cache (the lookup here is
``local_files_only``; models/hub.py downloads, only the files a node or client needs).

Supported architectures are listed in ``ARCHITECTURES``. Each entry names the
transformers classes a node and a client need: the decoder layer (one block), the
rotary embedding (positions -> cos/sin, including Llama-3 rope scaling) and the RMS
norm; and the tensor names of the client-local parts. Mistral and Qwen2 share
Llama's block shape (Qwen2 adds q/k/v biases, Mistral a sliding window), so they
come at the cost of one table row each; every row is covered by
tests/test_models_blocks.py.

Swarm name rule (``model_name``): two models in one swarm must not share DHT keys,
and every node serving the same model must derive the same name wherever it keeps
the files. The name is

1. the hub repo id when the checkpoint came from the hub cache
   (``org/name`` given directly, or a path ``.../models--org--name/snapshots/<rev>``);
2. otherwise the checkpoint directory's name;

normalised by ``normalize_model_name``: lower case, every run of characters
outside ``[a-z0-9._-]`` becomes one ``-`` (so ``org/Name`` becomes ``org-name``).
Because a directory name alone could still collide (two fine-tunes both saved as
``./model``), ``ModelInfo.fingerprint`` hashes the architecture-defining config
fields; ``ModelInfo.dht_prefix`` is ``"<name>.<fingerprint[:8]>"``, which is what
nodes should announce under and clients look up.

A checkpoint directory that holds a weights manifest (``biopetals-manifest.json``,
spec/weights.md) is named by it instead: ``"<manifest name>.<manifest hash[:16]>"``,
so every peer of the swarm runs exactly the bytes the manifest lists. Its config must
equal the directory's ``config.json``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from biopetals.protocol.errors import ProtocolError
from biopetals.protocol.manifest import MANIFEST_FILE, NAME_HASH_DIGITS, Manifest, parse_manifest


class ModelConfigError(ValueError):
    """The checkpoint cannot be used: not found, unsupported architecture, or malformed."""


@dataclass(frozen=True)
class ArchSpec:
    """transformers classes and tensor names for one architecture.

    The classes are ``<prefix>DecoderLayer``, ``<prefix>RotaryEmbedding`` and ``<prefix>RMSNorm`` of
    the transformers module ``module``, imported on first use: a node or client imports only its
    model's architecture (each more costs ~15 ms of start-up, issue 23 item 5)."""

    architecture: str  # the config's ``architectures[0]``
    module: str
    prefix: str
    layer_prefix: str = "model.layers."
    embed_tokens: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"

    def _class(self, suffix: str) -> type[torch.nn.Module]:
        return getattr(importlib.import_module(self.module), self.prefix + suffix)

    @property
    def decoder_layer(self) -> type[torch.nn.Module]:
        return self._class("DecoderLayer")

    @property
    def rotary_embedding(self) -> type[torch.nn.Module]:
        return self._class("RotaryEmbedding")

    @property
    def rms_norm(self) -> type[torch.nn.Module]:
        return self._class("RMSNorm")


ARCHITECTURES: dict[str, ArchSpec] = {
    spec.architecture: spec
    for spec in (
        ArchSpec("LlamaForCausalLM", "transformers.models.llama.modeling_llama", "Llama"),
        ArchSpec("MistralForCausalLM", "transformers.models.mistral.modeling_mistral", "Mistral"),
        ArchSpec("Qwen2ForCausalLM", "transformers.models.qwen2.modeling_qwen2", "Qwen2"),
    )
}

_HUB_CACHE_DIR = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)$")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")

# Config fields that change what a block computes or its tensor shapes.
_FINGERPRINT_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rms_norm_eps",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
    "hidden_act",
    "tie_word_embeddings",
    "sliding_window",
)


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """Return the local directory of a checkpoint: a path, or a hub name already cached.

    Never touches the network. Raises ``ModelConfigError`` when nothing is found.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelConfigError(f"{path} has no config.json; not a Hugging Face checkpoint directory")
        return path.resolve()
    name = str(name_or_path)
    if not _HUB_NAME.match(name):
        raise ModelConfigError(f"{name!r} is neither a checkpoint directory nor a hub name")
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(
            name,
            local_files_only=True,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
        )
    except Exception as exc:  # huggingface_hub raises several types for "not cached"
        raise ModelConfigError(
            f"{name!r} is not a directory and is not in the local Hugging Face cache; biopetals-node --model "
            f"{name} and from_pretrained({name!r}) download what they need from the hub ({type(exc).__name__})"
        ) from exc
    return Path(snapshot).resolve()


def check_architecture(config: PretrainedConfig) -> ArchSpec:
    """Return the ``ArchSpec`` of a config, or raise an error listing what is supported."""
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    raise ModelConfigError(
        f"unsupported architecture {archs or [getattr(config, 'model_type', None)]}; "
        f"supported: {', '.join(ARCHITECTURES)}"
    )


def load_config(name_or_path: str | os.PathLike) -> tuple[PretrainedConfig, Path]:
    """Load and check a checkpoint's config. Returns ``(config, checkpoint_dir)``."""
    path = resolve_checkpoint(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelConfigError(f"cannot read {path / 'config.json'}: {exc}") from exc
    check_architecture(config)
    return config, path


def normalize_model_name(raw: str) -> str:
    """Lower-case; runs of characters outside ``[a-z0-9._-]`` become one ``-``."""
    name = re.sub(r"[^a-z0-9._-]+", "-", raw.lower()).strip("-")
    if not name:
        raise ModelConfigError(f"cannot derive a model name from {raw!r}")
    return name


def config_fingerprint(config: PretrainedConfig) -> str:
    """SHA-256 (hex) of the architecture-defining config fields, canonical JSON."""
    fields = {key: getattr(config, key, None) for key in _FINGERPRINT_FIELDS}
    fields["architecture"] = check_architecture(config).architecture
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class ModelInfo:
    """How a checkpoint is known in the swarm. See the module docstring for the naming rule."""

    name: str
    fingerprint: str
    digits: int = 8  # of the fingerprint in the swarm name; 16 for a manifest's hash

    @property
    def dht_prefix(self) -> str:
        return f"{self.name}.{self.fingerprint[:self.digits]}"


def manifest_of(directory: Path) -> Manifest | None:
    """The weights manifest kept in a checkpoint directory, checked against its config; None if none."""
    file = directory / MANIFEST_FILE
    if not file.is_file():
        return None
    try:
        manifest = parse_manifest(file.read_bytes())
    except ProtocolError as exc:
        raise ModelConfigError(f"{file}: {exc.message}") from exc
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelConfigError(f"cannot read {directory / 'config.json'}: {exc}") from exc
    if config != manifest.config:
        raise ModelConfigError(f"{directory / 'config.json'} differs from the config in {file}: the manifest "
                               f"describes other weights; rebuild it with `biopetals-manifest {directory}`")
    return manifest


def model_info(name_or_path: str | os.PathLike, config: PretrainedConfig | None = None) -> ModelInfo:
    """Swarm name and fingerprint of a checkpoint (directory or cached hub name)."""
    raw = str(name_or_path)
    path = Path(raw).expanduser()
    if config is None:
        config, resolved = load_config(raw)
    else:
        resolved = path.resolve() if path.is_dir() else resolve_checkpoint(raw)
    manifest = manifest_of(resolved)
    if manifest is not None:
        return ModelInfo(manifest.name, manifest.hash.hex(), NAME_HASH_DIGITS)
    if not path.is_dir():
        base = raw  # a hub name as given
    else:
        base = resolved.name
        parts = resolved.parts
        # .../models--org--name/snapshots/<revision>
        if len(parts) >= 3 and parts[-2] == "snapshots":
            match = _HUB_CACHE_DIR.search(parts[-3])
            if match:
                base = f"{match['org']}/{match['name']}"
    return ModelInfo(normalize_model_name(base), config_fingerprint(config))

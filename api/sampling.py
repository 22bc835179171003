"""Per-request sampling that concurrent requests cannot disturb.

transformers' own sampling draws from torch's global generator, which every request of
this server shares across worker threads, so a ``seed`` would not reproduce an answer
while other requests run. Instead generation runs greedy, and ``SeededSampler`` (a
``LogitsProcessor``, the last one) draws the token with its own ``torch.Generator``,
after transformers' temperature and top-p warpers, and leaves only that token possible.
With ``temperature == 0`` no sampler is used: plain greedy decoding, exactly transformers'.
"""

from __future__ import annotations

import secrets

import torch
from transformers import LogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

__all__ = ["SeededSampler"]


class SeededSampler(LogitsProcessor):
    def __init__(self, temperature: float, top_p: float, seed: int | None) -> None:
        if temperature <= 0:
            raise ValueError("temperature 0 is greedy decoding: use no sampler")
        self.temperature = TemperatureLogitsWarper(temperature)
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None
        self.generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = self.temperature(input_ids, scores.float())
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        probs = torch.softmax(scores, dim=-1)
        chosen = torch.multinomial(probs, num_samples=1, generator=self.generator)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, chosen, 0.0)

"""The generation worker: a pool of client models over one swarm connection, one session per request.

A ``DistributedLlamaForCausalLM`` runs one ``generate()`` at a time (it keeps the running
call's cache and route on itself), so the engine holds ``max_sessions`` of them, all
sharing one ``RemoteSwarm`` (one network host, DHT and peer-health view) and one set of
client weights (embeddings, norm, head): a model costs a few Python objects, not memory.
Each request takes a free model (none free: ``APIError`` 429, the bound on concurrent
sessions), and runs transformers' ``generate()`` in its own worker thread, which opens one
inference session on the nodes; the nodes batch the decode steps of concurrent sessions.

A ``Generation`` reports to the asyncio side through a queue: text pieces as they are
decoded, then ``done`` (finish reason, usage, route, timings) or ``error``. ``cancel()``
(the HTTP client went away) makes the next step's stopping criterion stop generate(),
which closes the session on the nodes; the model returns to the pool when the thread ends.
Greedy decoding (temperature 0) is transformers' own, so its tokens equal a local run.

Prompt lookup (speculative decoding, spec/messages.md §5.6.1): ``GenerationParams.prompt_lookup``
candidate tokens per step, drafted from the prompt, go through the chain with the step and the
nodes keep the accepted ones. ``Engine.prompt_lookup_for`` decides it per request: the request's
``prompt_lookup`` field, else the server's default for greedy requests only, whose output it
never changes. A route with a node that cannot roll back gets plain decoding instead.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from biopetals.client import AutoDistributedModelForCausalLM, DistributedLlamaForCausalLM, RollbackUnsupportedError
from biopetals.models.client_parts import ClientParts

from .errors import APIError, swarm_error
from .sampling import SeededSampler
from .text import TextAccumulator

__all__ = ["Engine", "Generation", "GenerationParams", "Event"]

log = logging.getLogger("biopetals.api")


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stops: tuple[str, ...] = ()
    prompt_lookup: int = 0  # candidate tokens per step from prompt lookup; 0: plain decoding


@dataclass
class Event:
    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    route: list[dict[str, Any]] = field(default_factory=list)
    time_to_first_token: float | None = None
    tokens_per_second: float | None = None
    prompt_lookup: int = 0  # candidates per step the answer used (0: plain decoding)
    rollbacks: int = 0  # steps whose rejected candidates the nodes rolled back
    error: APIError | None = None


class _Watcher(StoppingCriteria):
    """Called by generate() after every new token: decodes, reports the new text, stops when asked."""

    def __init__(self, generation: "Generation") -> None:
        self.g = generation

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        g = self.g
        ids = input_ids[0, g.prompt_tokens:].tolist()
        if g.first_token_at is None:
            g.first_token_at = time.monotonic()
        # token by token: a speculative step may bring several, and a stop sequence ends the
        # answer at the token that completes it, exactly as without speculation
        for n in range(len(g.generated) + 1, len(ids) + 1):
            if g.text.stopped:
                break
            g.generated = ids[:n]
            piece = g.text.add(g.generated)
            if piece:
                g.emit(Event("text", text=piece))
        stop = g.text.stopped or g.cancelled.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool)


class Generation:
    """One request's generation, run in a worker thread; ``events()`` yields what it produces."""

    def __init__(self, engine: "Engine", model: DistributedLlamaForCausalLM, inputs: dict[str, torch.Tensor],
                 params: GenerationParams, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.model = model
        self.inputs = inputs
        self.params = params
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.prompt_tokens = int(inputs["input_ids"].shape[1])
        self.generated: list[int] = []
        self.text = TextAccumulator(engine.tokenizer, params.stops)
        self.started_at = time.monotonic()
        self.first_token_at: float | None = None
        self.thread = threading.Thread(target=self._run, name="biopetals-api-generation", daemon=True)

    def start(self) -> "Generation":
        self.thread.start()
        return self

    def cancel(self) -> None:
        """Stop at the next token (the session on the nodes closes when generate() returns)."""
        self.cancelled.set()

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the server's loop is gone: nobody listens any more
            self.cancelled.set()

    async def events(self):
        while True:
            event = await self.queue.get()
            yield event
            if event.kind != "text":
                return

    def _run(self) -> None:
        try:
            self._generate()
        except BaseException as exc:  # reported to the HTTP client, never raised in a thread
            if not self.cancelled.is_set():
                log.warning("generation failed: %s", exc)
            self.emit(Event("error", error=exc if isinstance(exc, APIError) else swarm_error(exc, len(self.generated))))
        finally:
            self.engine.release(self.model)
            self.finished.set()

    def _generate(self) -> None:
        p = self.params
        kwargs: dict[str, Any] = dict(
            max_new_tokens=p.max_new_tokens, min_new_tokens=min(p.min_new_tokens, p.max_new_tokens), do_sample=False,
            stopping_criteria=StoppingCriteriaList([_Watcher(self)]),
            pad_token_id=self.engine.pad_token_id,
        )
        if p.temperature > 0:
            kwargs["logits_processor"] = LogitsProcessorList([SeededSampler(p.temperature, p.top_p, p.seed)])
        lookup = p.prompt_lookup
        with torch.inference_mode():
            if lookup > 0:
                try:
                    self.model.generate(**self.inputs, **kwargs, prompt_lookup_num_tokens=p.prompt_lookup)
                except RollbackUnsupportedError as exc:
                    if self.generated:
                        raise
                    log.info("prompt lookup off for this request: %s", exc)
                    lookup = 0
                    if p.temperature > 0:  # a fresh sampler: the same draws as a request without lookup
                        kwargs["logits_processor"] = LogitsProcessorList(
                            [SeededSampler(p.temperature, p.top_p, p.seed)])
                    self.model.generate(**self.inputs, **kwargs)
            else:
                self.model.generate(**self.inputs, **kwargs)
        ended = time.monotonic()
        piece = self.text.add(self.generated, final=True)
        if piece:
            self.emit(Event("text", text=piece))
        if self.text.stopped or (self.generated and self.generated[-1] in self.engine.eos_ids):
            reason = "stop"
        elif self.cancelled.is_set():
            reason = "cancelled"
        else:
            reason = "length"
        n = len(self.generated)
        first = self.first_token_at or ended
        tps = (n - 1) / (ended - first) if n > 1 and ended > first else None
        route = [{"peer_id": peer, "start": start, "end": end} for chain in self.model.last_route
                 for peer, start, end in chain]
        self.emit(Event("done", finish_reason=reason, prompt_tokens=self.prompt_tokens, completion_tokens=n,
                        route=route, time_to_first_token=first - self.started_at, tokens_per_second=tps,
                        prompt_lookup=lookup, rollbacks=self.model.last_rollbacks))


class Engine:
    """The model served: tokenizer, a pool of ``max_sessions`` client models sharing one swarm."""

    def __init__(self, path: str | os.PathLike, *, initial_peers: list[str], swarm_key: str | os.PathLike | None,
                 max_sessions: int = 8, served_name: str | None = None, max_tokens_default: int = 256,
                 prompt_lookup: int = 0, **client_options: Any) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self.path = str(path)
        self.served_name = served_name or Path(self.path).name
        self.max_sessions = max_sessions
        self.max_tokens_default = max_tokens_default
        self.prompt_lookup = prompt_lookup  # default candidates per step for greedy requests (0: off)
        # require_join=False: the server starts before (or without) the swarm and answers 503 meanwhile
        first = AutoDistributedModelForCausalLM.from_pretrained(self.path, initial_peers=initial_peers,
                                                                swarm_key=swarm_key, require_join=False,
                                                                **client_options)
        # from where the client's parts were loaded: the directory, or a hub model's downloaded snapshot
        self.tokenizer = AutoTokenizer.from_pretrained(first.name_or_path)
        self.swarm = first.swarm
        self.config = first.config
        parts = ClientParts(first.config, first.model.embed_tokens, first.model.norm, first.lm_head)
        self.models = [first] + [self._clone(first, parts) for _ in range(max_sessions - 1)]
        self._free = list(self.models)
        self._lock = threading.Lock()
        self.created = int(time.time())
        eos = first.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)
        self.context_length = int(getattr(first.config, "max_position_embeddings", 2048))

    @staticmethod
    def _clone(first: DistributedLlamaForCausalLM, parts: ClientParts) -> DistributedLlamaForCausalLM:
        model = DistributedLlamaForCausalLM(first.config, parts, first.swarm)
        model.generation_config = copy.deepcopy(first.generation_config)
        model.name_or_path = first.name_or_path
        return model.eval()

    # ------------------------------------------------------------------ the pool

    @property
    def active(self) -> int:
        with self._lock:
            return self.max_sessions - len(self._free)

    def acquire(self) -> DistributedLlamaForCausalLM:
        with self._lock:
            if self._free:
                return self._free.pop()
        raise APIError(429, f"this server runs at most {self.max_sessions} generations at once and all are busy; "
                            "retry in a moment", "rate_limit_error", "too_many_sessions", headers={"Retry-After": "1"})

    def release(self, model: DistributedLlamaForCausalLM) -> None:
        with self._lock:
            self._free.append(model)

    # ------------------------------------------------------------------ requests

    def chat_inputs(self, messages: list[dict[str, str]]) -> dict[str, torch.Tensor]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, f"the model {self.served_name} has no chat template; use /v1/completions",
                           code="no_chat_template")
        try:
            enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                                     return_tensors="pt")
        except Exception as exc:  # a template may refuse e.g. a system message
            raise APIError(400, f"the chat template refused these messages: {exc}", param="messages") from exc
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def completion_inputs(self, prompt: str) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(prompt, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def new_tokens(self, prompt_tokens: int, requested: int | None) -> int:
        room = self.context_length - prompt_tokens
        if room < 1 or (requested is not None and requested > room):
            raise APIError(400, f"this model's context is {self.context_length} tokens: the prompt has "
                                f"{prompt_tokens} and {requested or 1} new tokens were asked for",
                           code="context_length_exceeded", param="max_tokens")
        return requested if requested is not None else min(self.max_tokens_default, room)

    def prompt_lookup_for(self, requested: int | None, temperature: float) -> int:
        """Candidate tokens per step for a request: what it asked for (0: off), else the server's default
        for greedy requests only (temperature 0: speculation never changes their output; a sampled answer
        would be another draw of the seed's sampler, so sampling uses it only when the request asks)."""
        if requested is not None:
            return requested
        return self.prompt_lookup if temperature == 0 else 0

    def start(self, inputs: dict[str, torch.Tensor], params: GenerationParams) -> Generation:
        model = self.acquire()
        try:
            return Generation(self, model, inputs, params, asyncio.get_running_loop()).start()
        except BaseException:
            self.release(model)
            raise

    def close(self) -> None:
        self.swarm.close()

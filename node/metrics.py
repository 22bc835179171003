"""``--metrics-port``: the node's Prometheus metrics, read at scrape time through prometheus_client.

Nothing is counted twice: a collector reads, when Prometheus scrapes, the counters the node
keeps anyway (``NodeService.node_info()``, the backend's queue, the cache budget, the error
replies of node/handler.py), from whichever service serves now (a node that moves to other
blocks gets a new one). Served on its own HTTP port by prometheus_client's own server, on
the address given (``--metrics-host``, default 127.0.0.1: metrics are not for the internet).

Metrics (all prefixed ``biopetals_node_``): ``decode_steps_total``, ``batched_steps_total``, ``tokens_total``,
``sessions_open``, ``cache_tokens_left``, ``cache_tokens_total``, ``queue_depth``,
``error_replies_total{code=...}``, ``uptime_seconds``, ``inference_tokens_per_second``,
``info{model,blocks,dtype,quant,version,public_name}``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

__all__ = ["NodeCollector", "serve_metrics"]

PREFIX = "biopetals_node_"


class NodeCollector(Collector):
    """Reads ``service()`` (a ``NodeService``) and ``errors()`` (code name -> replies) at each scrape."""

    def __init__(self, service: Callable[[], Any], errors: Callable[[], dict[str, int]], public_name: str = "") -> None:
        self.service = service
        self.errors = errors
        self.public_name = public_name

    def collect(self) -> Iterator[Any]:
        service = self.service()
        info = service.node_info()
        yield InfoMetricFamily(PREFIX.rstrip("_"), "what this node serves", value={
            "model": info.model, "blocks": f"{info.start}:{info.end}", "dtype": info.dtype, "quant": info.quant,
            "version": info.version, "public_name": self.public_name})
        yield CounterMetricFamily(PREFIX + "decode_steps", "decode steps run", value=info.decode_steps or 0)
        yield CounterMetricFamily(PREFIX + "batched_steps", "decode steps run in a batch of 2 or more sessions",
                                  value=info.batched_steps or 0)
        yield CounterMetricFamily(PREFIX + "tokens", "tokens (rows x positions) computed by steps, Forwards and "
                                  "Backwards", value=service.backend.stats.tokens)
        yield GaugeMetricFamily(PREFIX + "sessions_open", "inference sessions open", value=info.sessions_open or 0)
        stats = service.budget.statistics()
        yield GaugeMetricFamily(PREFIX + "cache_tokens_left", "KV-cache tokens free for new sessions "
                                "(cache_tokens_left, spec/messages.md §4.2)", value=info.cache_tokens_left)
        yield GaugeMetricFamily(PREFIX + "cache_reserved_bytes", "KV-cache bytes reserved by open sessions "
                                "(and by long Forward rows computed in chunks)", value=stats.reserved_bytes)
        yield GaugeMetricFamily(PREFIX + "queue_depth", "jobs queued on the compute thread",
                                value=service.backend.queued)
        yield GaugeMetricFamily(PREFIX + "uptime_seconds", "seconds since the service started", value=info.uptime or 0)
        yield GaugeMetricFamily(PREFIX + "inference_tokens_per_second", "measured at start (announced)",
                                value=info.inference_tps)
        errors = CounterMetricFamily(PREFIX + "error_replies", "typed Error replies sent, by code", labels=["code"])
        for code, count in sorted(self.errors().items()):
            errors.add_metric([code], count)
        yield errors


def serve_metrics(port: int, host: str, collector: NodeCollector) -> tuple[Any, CollectorRegistry]:
    """Start prometheus_client's HTTP server on ``host:port`` (a thread); returns (server, registry)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, registry

"""What every check gets: the peer under test, the swarm key, and a lazily started Host.

``ctx.host`` is a ``biopetals.transport.Host`` (our transport, which the transport checks
exercise separately with a raw peer); ``ctx.node_info()`` asks the peer what it serves,
once, and is validated by the spec's decoder (a reply that breaks §4.2 fails the check).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from biopetals.protocol.envelope import PROTOCOL_NAME as NODE_PROTOCOL
from biopetals.protocol.errors import ErrorCode
from biopetals.protocol.identity import Identity
from biopetals.protocol.multiaddr import Multiaddr
from biopetals.protocol.swarm_key import SwarmKey

__all__ = ["Context", "NODE_PROTOCOL", "DHT_PROTOCOL"]

DHT_PROTOCOL = "/biopetals/dht/1"


@dataclass
class Context:
    addr: str
    swarm_key: SwarmKey | None
    verbose: bool = False
    #: seconds the tool waits for a peer's idle timeout at most (longer: not applicable)
    max_idle_wait: float = 30.0
    #: the swarm name the weights checks ask for (None: the ``model`` of the peer's NodeInfo)
    model: str | None = None
    last_sent: Any = None
    _host: Any = None
    _info: Any = None
    _info_error: Exception | None = None
    _weights_served: Any = None  # checks_weights: what GetManifest gave (or why it cannot be asked)
    _extra_hosts: list = field(default_factory=list)

    @property
    def multiaddr(self) -> Multiaddr:
        return Multiaddr.parse(self.addr)

    @property
    def key_bytes(self) -> bytes | None:
        return None if self.swarm_key is None else self.swarm_key.key

    async def host(self):
        if self._host is None:
            self._host = await self.new_host()
        return self._host

    async def new_host(self):
        """A fresh Host (a new identity, hence a new connection); closed at the end of the run."""
        from biopetals.transport.host import Host

        host = Host(Identity.generate(), swarm_key=self.key_bytes)
        await host.__aenter__()
        self._extra_hosts.append(host)
        return host

    async def close_host(self, host) -> None:
        if host in self._extra_hosts:
            self._extra_hosts.remove(host)
        if host is self._host:
            self._host = None
        await host.__aexit__(None, None, None)

    async def call(self, protocol: str, data: bytes, timeout: float = 10.0) -> bytes:
        self.last_sent = data
        host = await self.host()
        return await host.call(self.addr, protocol, data, timeout=timeout)

    async def node_info(self):
        """The peer's NodeInfo (decoded by the spec's rules), or NotApplicable when it serves no node protocol."""
        from biopetals.conformance.registry import Failed, NotApplicable
        from biopetals.protocol.messages import NodeInfo, NodeInfoRequest, decode_message, encode_message
        from biopetals.transport.errors import StreamResetError

        if self._info is None and self._info_error is None:
            request = encode_message(NodeInfoRequest())
            try:
                reply = await self.call(NODE_PROTOCOL, request)
            except StreamResetError as exc:
                if exc.code == ErrorCode.UNKNOWN_PROTOCOL:
                    self._info_error = NotApplicable(f"the peer serves no {NODE_PROTOCOL} (a DHT-only peer)")
                else:
                    self._info_error = Failed(f"NodeInfoRequest reset: {exc}", sent=request)
            except Exception as exc:
                self._info_error = Failed(f"NodeInfoRequest failed: {type(exc).__name__}: {exc}", sent=request)
            else:
                try:
                    info = decode_message(reply)
                except Exception as exc:
                    self._info_error = Failed(f"reply to NodeInfoRequest does not decode: {exc}", sent=request, received=reply)
                else:
                    if isinstance(info, NodeInfo):
                        self._info = info
                    else:
                        self._info_error = Failed("reply to NodeInfoRequest is not NodeInfo", sent=request, received=info)
        if self._info_error is not None:
            raise self._info_error
        return self._info

    async def aclose(self) -> None:
        for host in list(self._extra_hosts):
            try:
                async with asyncio.timeout(5):
                    await host.__aexit__(None, None, None)
            except Exception:
                pass
        self._extra_hosts.clear()
        self._host = None

"""Where the broker is: URL parsing, and the embedded amqtt broker used when none is configured."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Literal
from urllib.parse import parse_qs, quote, unquote, urlsplit

from .errors import BrokerUnavailableError

ENV_BROKER = "AIFLOW_BROKER"
Protocol = Literal["auto", "5", "3.1.1"]


@dataclass(frozen=True, slots=True)
class BrokerURL:
    """``mqtt[s]://[user:pass@]host[:port][?protocol=5|3.1.1|auto&ca=FILE&cert=FILE&key=FILE&insecure=1]``.

    ``protocol=auto`` (the default) tries MQTT 5 and falls back to 3.1.1 when the broker refuses it.
    """

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    protocol: Protocol = "auto"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        if "://" not in url:
            url = "mqtt://" + url
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"unsupported broker URL scheme {parts.scheme!r} in {url!r} (use mqtt:// or mqtts://)")
        tls = parts.scheme in ("mqtts", "ssl")
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        protocol = q.get("protocol", "auto")
        if protocol in ("311", "3", "v311"):
            protocol = "3.1.1"
        if protocol not in ("auto", "5", "3.1.1"):
            raise ValueError(f"unsupported protocol {protocol!r} (use 5, 3.1.1 or auto)")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as e:
            raise ValueError(f"bad port in broker URL {url!r}") from e
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
            protocol=protocol,  # type: ignore[arg-type]
            ca_file=q.get("ca"),
            cert_file=q.get("cert"),
            key_file=q.get("key"),
            tls_insecure=q.get("insecure", "0") in ("1", "true", "yes"),
        )

    def __str__(self) -> str:
        return self._format(with_password=False)

    def url(self) -> str:
        """The full URL, password included, for handing to a child process."""
        return self._format(with_password=True)

    def _format(self, *, with_password: bool) -> str:
        auth = ""
        if self.username:
            auth = quote(self.username, safe="")
            if self.password:
                auth += ":" + (quote(self.password, safe="") if with_password else "***")
            auth += "@"
        q = [] if self.protocol == "auto" else [f"protocol={self.protocol}"]
        q += [f"{k}={v}" for k, v in (("ca", self.ca_file), ("cert", self.cert_file), ("key", self.key_file)) if v]
        if self.tls_insecure:
            q.append("insecure=1")
        return f"{'mqtts' if self.tls else 'mqtt'}://{auth}{self.host}:{self.port}" + ("?" + "&".join(q) if q else "")


def broker_from_env(url: str | BrokerURL | None) -> BrokerURL | None:
    """An explicit URL, else ``$AIFLOW_BROKER``, else None (meaning: use an embedded broker)."""
    if isinstance(url, BrokerURL):
        return url
    url = url or os.environ.get(ENV_BROKER) or None
    return BrokerURL.parse(url) if url else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """The pure-Python amqtt broker, in this process. MQTT 3.1.1 only, so its URL says so.

    Good for a laptop demo and tests; deployments use Mosquitto, EMQX or another real broker.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._broker: object | None = None

    @property
    def url(self) -> BrokerURL:
        return BrokerURL(host=self.host, port=self.port, protocol="3.1.1")

    async def start(self) -> BrokerURL:
        from amqtt.broker import Broker

        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        broker = Broker(config)
        try:
            await broker.start()
        except Exception as e:  # amqtt raises its own BrokerError on bind failures
            raise BrokerUnavailableError(f"embedded broker could not listen on {self.host}:{self.port}: {e}") from e
        self._broker = broker
        _set_nodelay_on_server(broker)
        return self.url

    async def stop(self) -> None:
        if self._broker is not None:
            broker, self._broker = self._broker, None
            with contextlib.suppress(Exception):
                await broker.shutdown()  # type: ignore[attr-defined]

    async def __aenter__(self) -> BrokerURL:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _set_nodelay_on_server(broker: object) -> None:
    """amqtt does not set TCP_NODELAY on accepted sockets; without it every small reply waits for
    a delayed ACK (~40 ms). Patch the listening servers so new connections get it."""
    servers = getattr(broker, "_servers", {}) or {}
    for srv in servers.values():
        instance = getattr(srv, "instance", None)
        for sock in getattr(instance, "sockets", None) or []:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@contextlib.asynccontextmanager
async def broker_scope(url: str | BrokerURL | None = None) -> AsyncIterator[BrokerURL]:
    """Yield a broker URL: the configured one, or a freshly started embedded broker."""
    resolved = broker_from_env(url)
    if resolved is not None:
        yield resolved
        return
    embedded = EmbeddedBroker()
    async with embedded as emb_url:
        yield emb_url


async def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            _, w = await asyncio.open_connection(host, port)
            w.close()
            return
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise BrokerUnavailableError(f"nothing listens on {host}:{port}") from None
            await asyncio.sleep(0.05)


def with_protocol(url: BrokerURL, protocol: Protocol) -> BrokerURL:
    return replace(url, protocol=protocol)

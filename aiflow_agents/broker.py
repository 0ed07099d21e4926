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

from .errors import AiflowError, BrokerUnavailableError

ENV_BROKER = "AIFLOW_BROKER"
Protocol = Literal["auto", "5", "3.1.1"]


class BrokerURLError(AiflowError, ValueError):
    """A broker URL (or list of URLs) that cannot be parsed."""

    code = "bad_broker_url"


@dataclass(frozen=True, slots=True)
class BrokerURL:
    """``mqtt[s]://[user:pass@]host[:port][?protocol=5|3.1.1|auto&ca=FILE&cert=FILE&key=FILE&insecure=1]``,
    or ``memory://NAME[?protocol=...]`` for the in-process broker of that name (:mod:`aiflow_agents.mqtt.memory`,
    for tests: every node and client must be in this process).

    ``protocol=auto`` (the default) tries MQTT 5 and falls back to 3.1.1 when the broker refuses it.

    A comma-separated list (``mqtt://a:1883,mqtt://b:1884`` or ``a:1883,b:1884``) names members of one
    cluster: the connection rotates to the next member on each reconnect attempt. The first is this object;
    the rest are in ``others``. A member written without a scheme, credentials or query takes the first
    member's (so ``mqtts://u:p@a:8883?ca=F,b:8883`` uses TLS, the CA file and the credentials for both).
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
    others: tuple[BrokerURL, ...] = ()
    in_memory: bool = False  # memory://NAME: ``host`` is the in-process broker's name

    @classmethod
    def memory(cls, name: str, protocol: Protocol = "auto") -> BrokerURL:
        """The URL of the in-process broker ``name`` (see :class:`aiflow_agents.mqtt.MemoryBroker`)."""
        return cls(host=name, port=0, protocol=protocol, in_memory=True)

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        """Parse one URL or a comma-separated list; a malformed one raises :class:`BrokerURLError`."""
        items = [u.strip() for u in url.split(",")]
        if not url.strip() or any(not u for u in items):
            raise BrokerURLError(f"empty broker URL in {url!r}")
        first = cls._parse_one(items[0])
        rest = []
        for item in items[1:]:
            member = cls._parse_one(item)
            if "://" not in item:
                member = replace(member, tls=first.tls, port=member.port if _has_port(item) else first.port)
            if member.username is None:
                member = replace(member, username=first.username, password=first.password)
            if "?" not in item:
                member = replace(
                    member,
                    protocol=first.protocol,
                    ca_file=first.ca_file,
                    cert_file=first.cert_file,
                    key_file=first.key_file,
                    tls_insecure=first.tls_insecure,
                )
            rest.append(member)
        return replace(first, others=tuple(rest)) if rest else first

    @classmethod
    def join(cls, urls: list[str | BrokerURL]) -> BrokerURL:
        """One URL from several (e.g. a repeated ``--broker``), each possibly a list itself."""
        members: list[BrokerURL] = []
        for u in urls:
            members.extend((u if isinstance(u, BrokerURL) else cls.parse(u)).members())
        if not members:
            raise BrokerURLError("no broker URL given")
        return replace(members[0], others=tuple(members[1:]))

    def members(self) -> list[BrokerURL]:
        """Every member of the list, each without ``others``, in rotation order."""
        return [replace(self, others=()), *self.others]

    @classmethod
    def _parse_one(cls, url: str) -> BrokerURL:
        if "://" not in url:
            url = "mqtt://" + url
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl", "memory"):
            raise BrokerURLError(
                f"unsupported broker URL scheme {parts.scheme!r} in {url!r} (use mqtt://, mqtts:// or memory://)"
            )
        tls = parts.scheme in ("mqtts", "ssl")
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        protocol = q.get("protocol", "auto")
        if protocol in ("311", "3", "v311"):
            protocol = "3.1.1"
        if protocol not in ("auto", "5", "3.1.1"):
            raise BrokerURLError(f"unsupported protocol {protocol!r} (use 5, 3.1.1 or auto)")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as e:
            raise BrokerURLError(f"bad port in broker URL {url!r}") from e
        if parts.path not in ("", "/"):
            raise BrokerURLError(f"unexpected path {parts.path!r} in broker URL {url!r}")
        if parts.scheme == "memory":
            if not parts.netloc or "@" in parts.netloc:
                raise BrokerURLError(f"a memory broker URL is memory://NAME, not {url!r}")
            return cls.memory(parts.netloc, protocol)  # type: ignore[arg-type]
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
        return ",".join(m._format_one(with_password=with_password) for m in self.members())

    def _format_one(self, *, with_password: bool) -> str:
        if self.in_memory:
            return f"memory://{self.host}" + ("" if self.protocol == "auto" else f"?protocol={self.protocol}")
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


def _has_port(item: str) -> bool:
    host = item.split("@")[-1].split("?")[0]
    return host.rsplit("]", 1)[-1].count(":") == 1


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """The pure-Python amqtt broker, in this process. MQTT 3.1.1 only, so its URL says so.

    Good for a laptop demo and tests; deployments use Mosquitto, EMQX or another real broker.
    Connections reach amqtt through :mod:`.embedded_gate` (its ``external`` listener), which keeps
    amqtt 0.12.1 from killing a connecting session while another client subscribes or leaves, and
    sets TCP_NODELAY on accepted sockets.
    """

    LISTENER = "default"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, gated: bool = True) -> None:
        """``gated=False`` hands the socket to amqtt directly (only to show what the gate prevents)."""
        self.host = host
        self.port = port or free_port(host)
        self.gated = gated
        self._broker: object | None = None
        self._server: asyncio.AbstractServer | None = None
        self.gate: object | None = None

    @property
    def url(self) -> BrokerURL:
        return BrokerURL(host=self.host, port=self.port, protocol="3.1.1")

    @property
    def stats(self) -> dict[str, int]:
        """Gate counters: connect phases, subscribes held, leave-unsubscribes, sessions amqtt failed on (0)."""
        return dict(getattr(self.gate, "stats", {}))

    async def start(self) -> BrokerURL:
        from amqtt.broker import Broker

        from .embedded_gate import Gate, serve

        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        bind = f"{self.host}:{self.port}"
        listener = {"type": "external", "bind": bind} if self.gated else {"type": "tcp", "bind": bind}
        config = {
            "listeners": {self.LISTENER: listener},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        broker = Broker(config)
        try:
            await broker.start()
            if self.gated:
                self.gate = Gate()
                self._server = await serve(broker, self.LISTENER, self.host, self.port, self.gate)  # type: ignore[arg-type]
        except Exception as e:  # amqtt raises its own BrokerError on bind failures
            with contextlib.suppress(Exception):
                await broker.shutdown()
            raise BrokerUnavailableError(f"embedded broker could not listen on {self.host}:{self.port}: {e}") from e
        self._broker = broker
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.close()
        if self._broker is not None:
            broker, self._broker = self._broker, None
            with contextlib.suppress(Exception):
                await broker.shutdown()  # type: ignore[attr-defined]

    async def __aenter__(self) -> BrokerURL:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


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
    """The same URL (every member of a list) with ``protocol`` set."""
    return replace(url, protocol=protocol, others=tuple(replace(m, protocol=protocol) for m in url.others))

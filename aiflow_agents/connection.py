"""One resilient MQTT connection: TCP_NODELAY, MQTT 5 with 3.1.1 fallback, reconnect with backoff.

Reconnection story: the connection runs in a background task. When the broker goes away, the
message loop ends with an ``MqttError``; every ``on_disconnect`` hook runs (clients fail their
in-flight requests with :class:`ConnectionLostError`), then the task retries with exponential
backoff and jitter. After a reconnect it restores every subscription and runs the
``on_connect`` hooks (nodes republish presence). Publishes made while disconnected wait for the
next connection up to their timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
import structlog
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .broker import BrokerURL
from .errors import BrokerUnavailableError

MessageHandler = Callable[[aiomqtt.Message], Awaitable[None]]
Hook = Callable[[], Awaitable[None]]

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]

# aiomqtt warns at every burst of >10 outstanding publishes, which a fan-out does by design.
_MQTT_LOG = logging.getLogger("aiflow.mqtt")
_MQTT_LOG.setLevel(logging.ERROR)


@dataclass(frozen=True, slots=True)
class Backoff:
    initial: float = 0.1
    maximum: float = 5.0
    factor: float = 2.0
    jitter: float = 0.25

    def delays(self) -> Any:
        d = self.initial
        while True:
            yield d * (1 + random.uniform(-self.jitter, self.jitter))
            d = min(self.maximum, d * self.factor)


def _filter_of(subscription: str) -> str:
    """The topic filter a (possibly shared) subscription matches."""
    if subscription.startswith("$share/"):
        return subscription.split("/", 2)[2]
    return subscription


class Connection:
    def __init__(
        self,
        url: BrokerURL,
        *,
        client_id: str,
        will: aiomqtt.Will | None = None,
        keepalive: int = 30,
        backoff: Backoff = Backoff(),
        max_queued_incoming: int = 10_000,
        op_timeout: float = 30.0,
    ) -> None:
        self.url = url
        self.client_id = client_id
        self._will = will
        self._keepalive = keepalive
        self._backoff = backoff
        self._max_queued = max_queued_incoming
        self._op_timeout = op_timeout
        self._protocol = aiomqtt.ProtocolVersion.V311 if url.protocol == "3.1.1" else aiomqtt.ProtocolVersion.V5
        self._subs: dict[str, int] = {}
        self._routes: list[tuple[str, MessageHandler]] = []
        self._on_connect: list[Hook] = []
        self._on_disconnect: list[Hook] = []
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_error: BaseException | None = None
        self.connects = 0
        self.log = structlog.get_logger("aiflow.connection").bind(client=client_id)

    # -- configuration ------------------------------------------------------------------------
    @property
    def is_v5(self) -> bool:
        return self._protocol == aiomqtt.ProtocolVersion.V5

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def subscriptions(self) -> dict[str, int]:
        return dict(self._subs)

    def route(self, topic_filter: str, handler: MessageHandler) -> None:
        """Send messages whose topic matches ``topic_filter`` to ``handler`` (several may match)."""
        self._routes.append((topic_filter, handler))

    def unroute(self, topic_filter: str) -> None:
        self._routes = [(f, h) for f, h in self._routes if f != topic_filter]

    def on_connect(self, hook: Hook) -> None:
        self._on_connect.append(hook)

    def on_disconnect(self, hook: Hook) -> None:
        self._on_disconnect.append(hook)

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self, *, wait: bool = True, timeout: float = 10.0) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name=f"mqtt-{self.client_id}")
        if wait:
            await self.wait_connected(timeout)

    async def wait_connected(self, timeout: float | None) -> None:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            why = f": {self._last_error}" if self._last_error else ""
            raise BrokerUnavailableError(f"could not connect to broker {self.url} within {timeout:.3g}s{why}") from None

    async def stop(self) -> None:
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._connected.clear()
        self._client = None

    async def __aenter__(self) -> Connection:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _make_client(self) -> aiomqtt.Client:
        url = self.url
        tls_context = None
        if url.tls:
            tls_context = ssl.create_default_context(cafile=url.ca_file)
            if url.cert_file:
                tls_context.load_cert_chain(url.cert_file, url.key_file)
            if url.tls_insecure:
                tls_context.check_hostname = False
                tls_context.verify_mode = ssl.CERT_NONE
        return aiomqtt.Client(
            url.host,
            url.port,
            username=url.username,
            password=url.password,
            identifier=self.client_id,
            logger=_MQTT_LOG,
            protocol=self._protocol,
            will=self._will,
            keepalive=self._keepalive,
            timeout=self._op_timeout,
            tls_context=tls_context,
            tls_insecure=url.tls_insecure if url.tls else None,
            socket_options=NODELAY,
            max_queued_incoming_messages=self._max_queued,
            max_inflight_messages=1000,
            max_concurrent_outgoing_calls=10_000,
        )

    async def _run(self) -> None:
        delays = self._backoff.delays()
        while not self._stopping:
            try:
                client = self._make_client()
                async with client:
                    self._client = client
                    for sub, qos in list(self._subs.items()):
                        await client.subscribe(sub, qos=qos)
                    self.connects += 1
                    self._last_error = None
                    delays = self._backoff.delays()
                    self._connected.set()
                    if self.connects > 1:
                        self.log.info("reconnected", broker=str(self.url), attempt=self.connects)
                    for hook in list(self._on_connect):
                        await self._safe(hook, "on_connect")
                    async for message in client.messages:
                        await self._dispatch(message)
                    # Iterator ended without error: the connection was closed under us.
                    raise aiomqtt.MqttError("message stream ended")
            except MqttConnectError as e:
                if self.url.protocol == "auto" and self.is_v5 and "protocol" in str(e).lower():
                    self.log.info("broker refused MQTT 5, falling back to 3.1.1", broker=str(self.url))
                    self._protocol = aiomqtt.ProtocolVersion.V311
                    continue
                self._last_error = e
                self.log.warning("connect failed", broker=str(self.url), error=str(e))
            except aiomqtt.MqttError as e:
                self._last_error = e
                if not self._stopping:
                    self.log.warning("connection lost", broker=str(self.url), error=str(e))
            except (OSError, ssl.SSLError) as e:
                self._last_error = e
                self.log.warning("connect failed", broker=str(self.url), error=str(e))
            except Exception as e:  # the reconnect loop must outlive any surprise
                self._last_error = e
                self.log.exception("connection loop error", broker=str(self.url))
            finally:
                was_connected = self._connected.is_set()
                self._connected.clear()
                self._client = None
                if was_connected:
                    for hook in list(self._on_disconnect):
                        await self._safe(hook, "on_disconnect")
            if not self._stopping:
                await asyncio.sleep(next(delays))

    async def _safe(self, hook: Hook, what: str) -> None:
        try:
            await hook()
        except aiomqtt.MqttError:
            raise
        except Exception:
            self.log.exception(f"{what} hook failed")

    async def _dispatch(self, message: aiomqtt.Message) -> None:
        for topic_filter, handler in self._routes:
            if message.topic.matches(topic_filter):
                try:
                    await handler(message)
                except Exception:
                    # A raising handler must never take the connection down.
                    self.log.exception("message handler failed", topic=message.topic.value)

    # -- operations ---------------------------------------------------------------------------
    async def subscribe(self, subscription: str, qos: int = 1) -> None:
        self._subs[subscription] = qos
        client = self._client
        if client is not None:
            await client.subscribe(subscription, qos=qos)

    async def unsubscribe(self, subscription: str) -> None:
        self._subs.pop(subscription, None)
        client = self._client
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.unsubscribe(subscription)

    async def publish(
        self,
        topic: str,
        payload: bytes | bytearray | str | None,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Publish, waiting for a connection if needed; retried across a reconnect until ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else self._op_timeout)
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BrokerUnavailableError(f"could not publish to {topic!r}: not connected to {self.url}")
            if not self._connected.is_set():
                try:
                    await asyncio.wait_for(self._connected.wait(), remaining)
                except TimeoutError:
                    continue
            client = self._client
            if client is None:
                await asyncio.sleep(0)
                continue
            try:
                await client.publish(
                    topic,
                    payload,
                    qos=qos,
                    retain=retain,
                    properties=self._properties(properties),
                    timeout=max(remaining, 0.001),
                )
                return
            except aiomqtt.MqttCodeError as e:
                if not self._connected.is_set() or "not currently connected" in str(e).lower():
                    await asyncio.sleep(0.01)
                    continue
                raise BrokerUnavailableError(f"publish to {topic!r} failed: {e}") from e
            except aiomqtt.MqttError as e:
                if self._connected.is_set() and loop.time() >= deadline:
                    raise BrokerUnavailableError(f"publish to {topic!r} failed: {e}") from e
                await asyncio.sleep(0.01)

    def _properties(self, props: dict[str, Any] | None) -> Properties | None:
        if not props or not self.is_v5:
            return None
        p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        for key, value in props.items():
            setattr(p, key, value)
        return p

"""The raw MQTT floor that ``bench_transport.py`` compares the framework against.

Stock aiomqtt and paho only: this file imports nothing of aiflow, so none of the framework's
speed-ups to paho's packet handling reach the baseline (checked at start-up). Each role is its own
process, as the framework's client and node are:

    python bench/raw_mqtt.py echo   HOST PORT TOPIC          # publishes every message back on TOPIC/back
    python bench/raw_mqtt.py pinger HOST PORT TOPIC SIZE     # reads N on stdin, prints N round trips (s)
    python bench/raw_mqtt.py sink   HOST PORT TOPIC N        # aiomqtt subscriber, prints its receive rate
    python bench/raw_mqtt.py pub    HOST PORT TOPIC N        # aiomqtt publisher, N x 100 B at QoS 0
    python bench/raw_mqtt.py paho-sink / paho-pub ...        # the same with paho's own network threads

TCP_NODELAY is set on every socket, as the framework does.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

import aiomqtt
import paho.mqtt.client as mqtt

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def _client(host: str, port: int, ident: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        host,
        port,
        identifier=f"{ident}-{uuid.uuid4().hex[:6]}",
        protocol=aiomqtt.ProtocolVersion.V5,
        socket_options=NODELAY,
        max_inflight_messages=1000,
        max_concurrent_outgoing_calls=100000,
        timeout=60,
    )


async def echo(host: str, port: int, topic: str) -> None:
    async with _client(host, port, "echo") as c:
        await c.subscribe(topic, qos=1)
        async for m in c.messages:
            await c.publish(topic + "/back", m.payload, qos=1)


async def pinger(host: str, port: int, topic: str, size: int) -> None:
    async with _client(host, port, "pinger") as c:
        await c.subscribe(topic + "/back", qos=1)
        it = c.messages.__aiter__()
        while True:  # wait until the echo process is subscribed
            await c.publish(topic, b"hello?", qos=1)
            try:
                await asyncio.wait_for(it.__anext__(), 0.5)
                break
            except TimeoutError:
                continue
        await asyncio.sleep(0.6)
        while len(c.messages):  # late handshake echoes
            await it.__anext__()
        payload = os.urandom(size)
        print("ready", flush=True)
        while line := await asyncio.to_thread(sys.stdin.readline):
            lat = []
            for _ in range(int(line)):
                t0 = time.perf_counter()
                await c.publish(topic, payload, qos=1)
                await it.__anext__()
                lat.append(time.perf_counter() - t0)
            print(json.dumps(lat), flush=True)


async def sink(host: str, port: int, topic: str, n: int) -> None:
    async with _client(host, port, "sink") as c:
        await c.subscribe(topic, qos=0)
        await c.subscribe(topic + "/ctl", qos=1)
        got, t0 = 0, 0.0
        async for m in c.messages:
            if m.topic.value.endswith("/ctl"):
                await c.publish(topic + "/ready", b"1", qos=1)
                continue
            t0 = t0 or time.perf_counter()
            got += 1
            if got == n:
                print(json.dumps({"rate": (n - 1) / (time.perf_counter() - t0)}), flush=True)
                return


async def pub(host: str, port: int, topic: str, n: int) -> None:
    async with _client(host, port, "pub") as c:
        await c.subscribe(topic + "/ready", qos=1)
        it = c.messages.__aiter__()
        while True:  # wait until the sink is subscribed
            await c.publish(topic + "/ctl", b"?", qos=1)
            try:
                await asyncio.wait_for(it.__anext__(), 0.5)
                break
            except TimeoutError:
                continue
        payload = os.urandom(100)
        for _ in range(n):
            await c.publish(topic, payload, qos=0)


def _paho(host: str, port: int, ident: str) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{ident}-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5)
    c.connect(host, port)
    c.socket().setsockopt(*NODELAY[0])
    return c


def paho_sink(host: str, port: int, topic: str, n: int) -> None:
    done = threading.Event()
    state = {"got": 0, "t0": 0.0}

    def on_message(client: Any, userdata: Any, m: Any) -> None:
        if m.topic.endswith("/ctl"):
            client.publish(topic + "/ready", b"1", qos=1)
            return
        if not state["got"]:
            state["t0"] = time.perf_counter()
        state["got"] += 1
        if state["got"] == n:
            print(json.dumps({"rate": (n - 1) / (time.perf_counter() - state["t0"])}), flush=True)
            done.set()

    c = _paho(host, port, "psink")
    c.on_message = on_message
    c.subscribe(topic, qos=0)
    c.subscribe(topic + "/ctl", qos=1)
    c.loop_start()
    done.wait(300)
    c.loop_stop()


def paho_pub(host: str, port: int, topic: str, n: int) -> None:
    ready = threading.Event()
    c = _paho(host, port, "ppub")
    c.on_message = lambda *a: ready.set()
    c.subscribe(topic + "/ready", qos=1)
    c.loop_start()
    while not ready.is_set():
        c.publish(topic + "/ctl", b"?", qos=1)
        ready.wait(0.5)
    payload = os.urandom(100)
    infos = [c.publish(topic, payload, qos=0) for _ in range(n)]
    infos[-1].wait_for_publish(120)
    c.disconnect()
    c.loop_stop()


def main(argv: list[str]) -> None:
    role, host, port, topic, *rest = argv
    assert not any(m.split(".")[0] in ("aiflow_agents", "protocols") for m in sys.modules), "baseline must be stock"
    p = int(port)
    if role == "echo":
        asyncio.run(echo(host, p, topic))
    elif role == "pinger":
        asyncio.run(pinger(host, p, topic, int(rest[0])))
    elif role == "sink":
        asyncio.run(sink(host, p, topic, int(rest[0])))
    elif role == "pub":
        asyncio.run(pub(host, p, topic, int(rest[0])))
    elif role == "paho-sink":
        paho_sink(host, p, topic, int(rest[0]))
    elif role == "paho-pub":
        paho_pub(host, p, topic, int(rest[0]))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Intruders: frame signing (unit, golden vectors, live), broker authentication, TLS and topic
ACLs, each against a Mosquitto started by the test with its own password file, CA and ACL."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import importlib.util
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import structlog.testing
import torch
from conftest import PrivateMosquitto

from aiflow_agents import (
    Agent,
    AgentContext,
    BrokerUnavailableError,
    BrokerURL,
    Client,
    Message,
    Node,
    RequestTimeoutError,
    Telemetry,
    TelemetryRecord,
)
from aiflow_agents.agent import Accepts
from aiflow_agents.builtin_agents import EchoAgent
from aiflow_agents.probe import ProbeAnswer, make_probe, parse_answer
from protocols import (
    TRAILER_SIZE,
    EncodeError,
    Envelope,
    Keyring,
    Kind,
    Limits,
    PresenceRecord,
    ProtocolError,
    SignatureError,
    SigningKey,
    Status,
    TensorPart,
    Topics,
    UnsignedFrameError,
    decode,
    encode,
    key_from_env,
    key_from_hex,
    peek_header,
)
from topologies import TopologyManager, ensemble

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]
SIGNED_VECTORS = ROOT / "protocols" / "vectors" / "signed"
KEY = bytes.fromhex("5a" * 32)
OTHER_KEY = bytes.fromhex("a5" * 32)

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]  # for the stock aiomqtt intruder


# == signing: the wire format ====================================================================
def _sample() -> Envelope:
    return Envelope.request("sign me", TensorPart(tensor=torch.arange(5, dtype=torch.float32)), sender="s")


def test_signed_frame_layout_is_as_specified() -> None:
    env = _sample()
    plain, signed = encode(env), encode(env, signing_key=KEY)
    assert signed[5] == 0x01 and plain[5] == 0x00  # flag bit 0
    assert len(signed) == len(plain) + TRAILER_SIZE
    assert signed[:5] == plain[:5] and signed[6 : len(plain)] == plain[6:]  # same frame otherwise
    key_id, mac = signed[-40:-32], signed[-32:]
    assert key_id == hmac.new(KEY, b"aiflow key id v1", hashlib.sha256).digest()[:8]
    assert mac == hmac.new(KEY, signed[:-32], hashlib.sha256).digest()  # over everything before the MAC
    for out in (decode(signed, signing_key=KEY), decode(signed)):  # without a key: trailer skipped
        assert out.text == "sign me" and torch.equal(out.tensors()[0].tensor, torch.arange(5.0))
    assert peek_header(signed)["id"] == env.id


def test_every_single_bit_flip_of_a_signed_frame_is_rejected() -> None:
    frame = bytearray(encode(Envelope.request("x", sender="s", id="i", trace_id="t", created_at=1.0), signing_key=KEY))
    codes = set()
    for bit in range(len(frame) * 8):
        frame[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ProtocolError) as info:
            decode(bytes(frame), signing_key=KEY)
        codes.add(info.value.code)
        frame[bit // 8] ^= 1 << (bit % 8)
    assert decode(bytes(frame), signing_key=KEY).text == "x"
    assert codes == {"bad_magic", "unsupported_version", "unsigned_frame", "bad_signature"}


def test_unsigned_foreign_and_rotated_keys() -> None:
    env = _sample()
    with pytest.raises(UnsignedFrameError):
        decode(encode(env), signing_key=KEY)
    with pytest.raises(SignatureError, match="does not hold"):
        decode(encode(env, signing_key=OTHER_KEY), signing_key=KEY)
    truncated = encode(env, signing_key=KEY)[:-1]
    with pytest.raises(SignatureError):
        decode(truncated, signing_key=KEY)
    # rotation: sign with the new key, still accept the old one
    ring = Keyring(KEY, OTHER_KEY)
    assert decode(encode(env, signing_key=OTHER_KEY), signing_key=ring).text == "sign me"
    assert encode(env, signing_key=ring) == encode(env, signing_key=KEY)
    # the trailer counts against the frame limit
    n = len(encode(env))
    with pytest.raises(EncodeError, match=f"{n + TRAILER_SIZE} bytes"):
        encode(env, Limits(max_frame_bytes=n + TRAILER_SIZE - 1), signing_key=KEY)
    assert len(encode(env, Limits(max_frame_bytes=n + TRAILER_SIZE), signing_key=KEY)) == n + TRAILER_SIZE


def test_keys_from_hex_and_environment() -> None:
    assert key_from_hex(KEY.hex()) == KEY
    with pytest.raises(ValueError, match="hex"):
        key_from_hex("not hex")
    with pytest.raises(ValueError, match="at least 16 bytes"):
        key_from_hex("00ff")
    assert key_from_env({}) is None and key_from_env({"AIFLOW_SIGNING_KEY": " "}) is None
    assert key_from_env({"AIFLOW_SIGNING_KEY": KEY.hex()}) == KEY
    assert KEY.hex() not in repr(SigningKey(KEY)) and "5a5a" not in repr(Keyring(KEY))


def _load(path: Path) -> tuple[bytes, dict[str, Any]]:
    return path.with_suffix(".bin").read_bytes(), json.loads(path.with_suffix(".json").read_text("utf-8"))


def test_signed_golden_vectors() -> None:
    valid = sorted(p for p in SIGNED_VECTORS.glob("*.json") if not p.name.startswith("bad_"))
    invalid = sorted(SIGNED_VECTORS.glob("bad_*.json"))
    assert [p.stem for p in valid] == ["signed_request"] and len(invalid) >= 5
    frame, exp = _load(valid[0])
    key = bytes.fromhex(exp["key_hex"])
    assert key == bytes(range(32)) and SigningKey(key).key_id.hex() == exp["key_id"]
    assert len(frame) == exp["frame_size"] and exp["signed_length"] == len(frame) - 32
    assert struct.unpack_from("<4sBBHI", frame) == (b"AIFL", 1, 1, 0, exp["header_length"])
    env = decode(frame, signing_key=key)
    assert env.id == exp["header"]["id"] and env.reply_to == exp["header"]["reply_to"] and env.text == "signed hello"
    t = exp["tensors"][0]
    assert env.parts[t["part"]].tensor.reshape(-1).tolist() == t["values"]
    assert encode(env, signing_key=key) == frame  # byte-exact, signature included
    codes = set()
    for path in invalid:
        bad, spec = _load(path)
        with pytest.raises(ProtocolError) as info:
            decode(bad, signing_key=bytes.fromhex(spec["key_hex"]))
        assert info.value.code == spec["error"] and type(info.value).__name__ == spec["exception"], path.name
        codes.add(spec["error"])
    assert codes == {"bad_signature", "unsigned_frame"}
    # and the files are what the generator writes
    spec_ = importlib.util.spec_from_file_location("_gen", ROOT / "protocols" / "vectors" / "generate.py")
    assert spec_ is not None and spec_.loader is not None
    gen = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(gen)
    for name, (data, expected) in gen.build_signed().items():
        assert (SIGNED_VECTORS / f"{name}.bin").read_bytes() == data, name
        assert (SIGNED_VECTORS / f"{name}.json").read_text("utf-8") == gen._json_text(expected), name


# == signing: live nodes =========================================================================
class Guard(Agent):
    """Counts the requests its handler actually ran."""

    type_name = "guard"
    accepts = Accepts(text=True, any_space=True)

    def __init__(self, agent_id: str) -> None:
        super().__init__(agent_id)
        self.handled: list[str] = []

    async def handle(self, request: Envelope, ctx: AgentContext) -> str:
        self.handled.append(request.text)
        return f"ok:{request.text}"


async def test_signing_node_rejects_unsigned_and_forged_frames(memory: BrokerURL, namespace: str) -> None:
    topics = Topics(namespace)
    guard = Guard("guard")
    async with (
        Node([guard], memory, namespace=namespace, signing_key=KEY) as node,
        Node([EchoAgent("plain-echo")], memory, namespace=namespace) as _unsigned_node,
        Client(memory, namespace=namespace, signing_key=KEY) as good,
        Client(memory, namespace=namespace) as outsider,
        Client(memory, namespace=namespace, signing_key=OTHER_KEY) as forger,
    ):
        await good.wait_for_agents(["guard", "plain-echo"], timeout=20)
        assert (await good.request("guard", "hello", timeout=10)).text == "ok:hello"

        reports: list[Envelope] = []

        async def on_error(message: Message) -> None:
            reports.append(decode(message.payload, signing_key=KEY))  # type: ignore[arg-type]  # node-signed

        good.connection.route(topics.errors("guard"), on_error)
        await good.connection.subscribe(topics.errors("guard"))
        tampered = bytearray(good.encode(good.prepare("guard", "tampered text", 10)))
        tampered[tampered.index(b"tampered")] ^= 0x01
        with structlog.testing.capture_logs() as logs:
            await good.connection.publish(topics.inbox("guard"), bytes(tampered), qos=1)
            unsigned, forged, to_unsigned_node = await asyncio.gather(
                outsider.exchange("guard", "from outside", timeout=1.5),
                forger.exchange("guard", "forged", timeout=1.5),
                good.exchange("plain-echo", "unsigned reply", timeout=1.5),
            )
            async with asyncio.timeout(10):
                while len(reports) < 3:
                    await asyncio.sleep(0.02)
        # Rejected frames get no answer at the address they name (it is unauthenticated) ...
        assert isinstance(unsigned.error, RequestTimeoutError) and isinstance(forged.error, RequestTimeoutError)
        # ... no handler ran, the reason is logged, and an error goes to the agent's errors topic.
        assert guard.handled == ["hello"]
        assert node.stats["unsigned_rejected"] == 3 and node.stats["requests"] == 1
        assert sorted(r.error.code for r in reports if r.error) == ["bad_signature", "bad_signature", "unsigned_frame"]
        assert all(r.kind == Kind.ERROR and r.error and r.error.agent == "guard" for r in reports)
        assert {r.error.detail["claimed"].get("sender") for r in reports if r.error} >= {outsider.client_id}
        rejected = [e for e in logs if e["event"] == "frame rejected: not signed by the deployment"]
        assert sorted(e["code"] for e in rejected) == ["bad_signature", "bad_signature", "unsigned_frame"]
        assert outsider.stats["late_or_duplicate_replies"] == 0 and forger.stats["late_or_duplicate_replies"] == 0
        # A signing client drops an unsigned reply instead of trusting it.
        assert isinstance(to_unsigned_node.error, RequestTimeoutError)
        assert good.stats["unsigned_replies"] == 1
        assert (await good.request("guard", "still fine", timeout=10)).text == "ok:still fine"


async def test_unsigned_junk_cannot_abort_a_signing_clients_request(memory: BrokerURL, namespace: str) -> None:
    """An oversized reply fails a request only when it is signed: junk under a guessed correlation
    id from someone without the key is dropped, and the genuine reply still gets through."""
    topics = Topics(namespace)
    async with (
        Client(memory, namespace=namespace, signing_key=KEY, limits=Limits(max_frame_bytes=2048)) as c,
        Client(memory, namespace=namespace) as responder,
    ):

        async def answer(message: Message) -> None:
            req = decode(message.payload)  # type: ignore[arg-type]
            assert req.reply_to is not None
            oversized = req.reply("z" * 4000, sender="svc")
            if req.text == "junk first":  # an intruder's unsigned junk, then the real (signed) answer
                await responder.connection.publish(req.reply_to, encode(oversized), qos=1)
                real = encode(req.reply("real", sender="svc"), signing_key=KEY)
                await responder.connection.publish(req.reply_to, real, qos=1)
            else:  # a genuine but oversized answer
                await responder.connection.publish(req.reply_to, encode(oversized, signing_key=KEY), qos=1)

        responder.connection.route(topics.inbox("svc"), answer)
        await responder.connection.subscribe(topics.inbox("svc"))
        assert (await c.request("svc", "junk first", timeout=10, check_presence=False)).text == "real"
        ex = await c.exchange("svc", "too big", timeout=10, check_presence=False)
        assert ex.error is not None and "undecodable reply [frame_too_large]" in str(ex.error)
        assert c.stats["bad_replies"] == 2


async def test_cli_and_manager_read_the_signing_key(mosquitto: BrokerURL, namespace: str, spawn) -> None:
    env = {"AIFLOW_SIGNING_KEY": KEY.hex()}
    spawn(["scripted:s1?answer=42", "scripted:s2?answer=42"], mosquitto, namespace, env=env)
    async with TopologyManager(mosquitto, namespace=namespace, signing_key=KEY) as mgr:
        await mgr.client.wait_for_agents(["s1", "s2"], timeout=30)
        r = await mgr.run(ensemble(["s1", "s2"], "vote"), "q", timeout=10)
        assert r.ok and r.answer == "42" and not r.outcome.details["failed"]
    base = [sys.executable, "-m", "aiflow_agents", "send", "s1", "hi", "--broker", mosquitto.url(), "-n", namespace]

    def cli(args: list[str], extra_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, env={**os.environ, **extra_env}, capture_output=True, text=True, timeout=60)

    ok = await asyncio.to_thread(cli, [*base, "--timeout", "10"], env)
    assert ok.returncode == 0 and "42" in ok.stdout, ok.stderr
    bad = await asyncio.to_thread(cli, base, {"AIFLOW_SIGNING_KEY": "xyz"})
    assert bad.returncode == 1 and "AIFLOW_SIGNING_KEY must be hex" in bad.stderr


# == broker authentication, TLS, ACL =============================================================
def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA, a server certificate for 127.0.0.1/localhost, a client certificate, and an
    unrelated CA — made with the openssl CLI (EC keys: fast)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed")
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        _openssl(d, "req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
                 "-subj", f"/CN=aiflow test {ca}", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    exts = {
        "server": "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        "client": "extendedKeyUsage=clientAuth\n",
    }
    for name, ext in exts.items():
        (d / f"{name}.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n" + ext)
        cn = "127.0.0.1" if name == "server" else "client-x"
        _openssl(d, "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
        _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")  # fmt: skip
    return d


def _passwords(path: Path, users: dict[str, str]) -> Path:
    exe = shutil.which("mosquitto_passwd")
    if exe is None:
        pytest.skip("mosquitto_passwd is not installed")
    for i, (user, password) in enumerate(users.items()):
        subprocess.run([exe, "-b", *(["-c"] if i == 0 else []), str(path), user, password], check=True, timeout=30)
    return path


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[Any]:
    """Start private Mosquittos with extra config; all are stopped at the end."""
    started: list[PrivateMosquitto] = []

    def start(extra: str) -> PrivateMosquitto:
        work = tmp_path / f"mosquitto-{len(started)}"
        work.mkdir()
        m = PrivateMosquitto(work, extra)
        started.append(m)
        return m.start()

    yield start
    for m in started:
        m.stop()


def _url(m: PrivateMosquitto, user: str | None = None, password: str | None = None, **q: str) -> BrokerURL:
    auth = f"{user}:{password}@" if user else ""
    query = "&".join(f"{k}={v}" for k, v in q.items())
    scheme = "mqtts" if "ca" in q else "mqtt"
    return BrokerURL.parse(f"{scheme}://{auth}127.0.0.1:{m.port}" + (f"?{query}" if query else ""))


async def _refused(url: BrokerURL, namespace: str) -> BrokerUnavailableError:
    """Connecting fails with a clear error, well before the 10 s connect timeout."""
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailableError) as info:
        async with Client(url, namespace=namespace):
            pass
    assert time.monotonic() - t0 < 5, "a definitive refusal should not wait out the timeout"
    return info.value


async def test_password_authentication(brokers, tmp_path: Path, namespace: str) -> None:
    pw = _passwords(tmp_path / "passwd", {"node-a": "node-secret", "client-x": "client-secret"})
    m = brokers(f"allow_anonymous false\npassword_file {pw}\n")
    async with (
        Node([EchoAgent("e1")], _url(m, "node-a", "node-secret"), namespace=namespace),
        Client(_url(m, "client-x", "client-secret"), namespace=namespace) as c,
    ):
        await c.wait_for_agents(["e1"], timeout=20)
        assert (await c.request("e1", "authenticated", timeout=10)).text == "authenticated"
    wrong = await _refused(_url(m, "client-x", "guess"), namespace)
    assert "refused the credentials" in str(wrong) and "guess" not in str(wrong)
    assert "refused the credentials" in str(await _refused(_url(m), namespace))  # anonymous
    assert "refused the credentials" in str(await _refused(_url(m, "nobody", "x"), namespace))


async def test_tls_server_verification_and_client_certificates(
    brokers, pki: Path, tmp_path: Path, namespace: str
) -> None:
    pw = _passwords(tmp_path / "passwd", {"u": "p"})
    tls = f"cafile {pki / 'ca.pem'}\ncertfile {pki / 'server.pem'}\nkeyfile {pki / 'server.key'}\n"
    m = brokers(f"allow_anonymous false\npassword_file {pw}\n{tls}")
    good = _url(m, "u", "p", ca=str(pki / "ca.pem"))
    async with Node([EchoAgent("e1")], good, namespace=namespace), Client(good, namespace=namespace) as c:
        await c.wait_for_agents(["e1"], timeout=20)
        big = TensorPart(tensor=torch.randn(64, 64))
        reply = await c.request("e1", Envelope.request("over tls", big), timeout=10)
        assert reply.text == "over tls" and torch.equal(reply.tensors()[0].tensor, big.tensor)
    async with Client(BrokerURL.parse(good.url().replace("127.0.0.1", "localhost")), namespace=namespace):
        pass  # the certificate's DNS name verifies too
    err = await _refused(_url(m, "u", "p", ca=str(pki / "other-ca.pem")), namespace)
    assert "TLS certificate verification failed" in str(err)
    err = await _refused(_url(m, "u", "p", ca=str(tmp_path / "missing.pem")), namespace)
    assert "bad TLS settings" in str(err)
    # Plain MQTT to a TLS listener: the broker drops the connection before CONNACK (on MQTT 5 and on
    # the 3.1.1 fallback), which is retried until the connect timeout (SECURITY.md): keep it short.
    with pytest.raises(BrokerUnavailableError):
        await Client(_url(m, "u", "p"), namespace=namespace).start(timeout=1)

    # A listener that also requires a client certificate signed by the CA.
    m2 = brokers(f"allow_anonymous true\n{tls}require_certificate true\n")
    with_cert = _url(m2, ca=str(pki / "ca.pem"), cert=str(pki / "client.pem"), key=str(pki / "client.key"))
    async with Client(with_cert, namespace=namespace) as c:
        assert c.connection.connected
    with pytest.raises(BrokerUnavailableError):  # no client certificate: refused (after the timeout, as above)
        await Client(_url(m2, ca=str(pki / "ca.pem")), namespace=namespace).start(timeout=1)


def _acl(tmp_path: Path, nodes: list[str]) -> Path:
    """The shipped ACL plus the per-node block its "nodes" section asks for, for each node user."""
    shipped = (ROOT / "docs" / "mosquitto-acl.conf").read_text()
    block = (
        "# user <node user>\n# topic write aiflow/v1/+/clients/+/replies\n"
        "# topic write aiflow/v1/+/clients/+/probes\n# topic read aiflow/v1/+/groups/+/inbox\n"
    )
    assert block in shipped  # the template this fills in
    lines = block.replace("# ", "")
    path = tmp_path / "acl.conf"
    path.write_text(shipped + "".join(lines.replace("<node user>", n) for n in nodes))
    return path


async def test_acl_keeps_an_agent_out_of_another_inbox(brokers, tmp_path: Path, namespace: str) -> None:
    """With docs/mosquitto-acl.conf, user ``a`` may subscribe to ``b``'s inbox (Mosquitto grants
    every SUBSCRIBE) but is delivered nothing from it, while ``b`` serves every request; and ``a``
    cannot publish presence records in ``b``'s name."""
    pw = _passwords(tmp_path / "passwd", {"a": "pa", "b": "pb", "mgr": "pm"})
    m = brokers(f"allow_anonymous false\npassword_file {pw}\nacl_file {_acl(tmp_path, ['b'])}\n")
    topics = Topics(namespace)
    async with (
        Node([EchoAgent("b")], _url(m, "b", "pb"), namespace=namespace, node_id="b"),
        Client(_url(m, "mgr", "pm"), namespace=namespace, client_id="mgr") as mgr,
        aiomqtt.Client(
            "127.0.0.1",
            m.port,
            username="a",
            password="pa",
            identifier="a",
            protocol=aiomqtt.ProtocolVersion.V5,
            socket_options=NODELAY,
        ) as intruder,  # fmt: skip
    ):
        await mgr.wait_for_agents(["b"], timeout=20)
        for sub in (topics.inbox("b"), f"{topics.base}/agents/+/inbox", "aiflow/v1/#", "#"):
            await intruder.subscribe(sub, qos=1)
        # forge presence: a fake agent hosted by node "b", and node "b" going offline
        fake = PresenceRecord(status=Status.ONLINE, node_id="b", agent_id="evil")
        await intruder.publish(topics.agent_presence("evil", "b"), fake.to_bytes(), qos=1, retain=True)
        gone = PresenceRecord(status=Status.OFFLINE, node_id="b")
        await intruder.publish(topics.node_presence("b"), gone.to_bytes(), qos=1, retain=True)
        stolen: list[str] = []

        async def listen() -> None:
            async for message in intruder.messages:
                stolen.append(message.topic.value)

        listener = asyncio.create_task(listen())
        replies = await asyncio.gather(*(mgr.request("b", f"secret {i}", timeout=10) for i in range(5)))
        assert [r.text for r in replies] == [f"secret {i}" for i in range(5)]
        await asyncio.sleep(0.3)
        listener.cancel()
        # a sees presence (allowed to all) but nothing from anyone's inbox or replies
        assert not [t for t in stolen if "/inbox" in t or "/replies" in t], stolen
        assert any("/presence/" in t for t in stolen)  # the ACL is not simply denying everything
        assert mgr.presence.is_online("b") and not mgr.presence.is_online("evil")


def _mallory(port: int) -> aiomqtt.Client:
    """A stock MQTT 5 client logged in as the plain user ``mallory`` (password ``pm``)."""
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        username="mallory",
        password="pm",
        identifier="mallory",
        protocol=aiomqtt.ProtocolVersion.V5,
        socket_options=NODELAY,
    )


async def test_acl_keeps_clients_out_of_replies_and_group_inboxes(brokers, tmp_path: Path, namespace: str) -> None:
    """Issue 11 defect 3, with the shipped ACL and no signing: a plain client user can neither read
    another client's replies or a group inbox, nor publish a forged answer into another client's
    replies topic; node users still answer requests and serve an ensemble through its group."""
    users = {"n1": "p1", "n2": "p2", "alice": "pa", "mallory": "pm"}
    pw = _passwords(tmp_path / "passwd", users)
    m = brokers(f"allow_anonymous false\npassword_file {pw}\nacl_file {_acl(tmp_path, ['n1', 'n2'])}\n")
    topics = Topics(namespace)
    async with (
        Node([EchoAgent("n1")], _url(m, "n1", "p1"), namespace=namespace, node_id="n1"),
        Node([EchoAgent("n2")], _url(m, "n2", "p2"), namespace=namespace, node_id="n2"),
        Client(_url(m, "alice", "pa"), namespace=namespace, client_id="alice") as alice,
        _mallory(m.port) as mallory,
    ):
        await alice.wait_for_agents(["n1", "n2"], timeout=20)
        for sub in (topics.replies("alice"), f"{topics.base}/clients/+/replies", topics.group_filter, "#"):
            await mallory.subscribe(sub, qos=1)
        stolen: list[str] = []

        async def listen() -> None:
            async for message in mallory.messages:
                stolen.append(str(message.topic))

        listener = asyncio.create_task(listen())
        # an ensemble: one publish to a group inbox, answers from both nodes into alice's replies
        async with TopologyManager(client=alice) as mgr:
            r = await mgr.run(ensemble(["n1", "n2"], "vote"), "secret question", timeout=10)
        assert r.ok and r.answer == "secret question"
        # mallory forges an answer under the correlation id of a request alice has in flight
        pending = Envelope.request("who answers?", id="corr-1")

        async def forge() -> None:
            await asyncio.sleep(0.3)
            forged = encode(Envelope(kind=Kind.REPLY, sender="n1", recipient="alice", correlation_id="corr-1"))
            for _ in range(5):
                await mallory.publish(topics.replies("alice"), forged, qos=1)

        forging = asyncio.create_task(forge())
        ex = await alice.exchange("nobody", pending, timeout=2, check_presence=False)
        await forging
        await asyncio.sleep(0.3)
        listener.cancel()
        assert isinstance(ex.error, RequestTimeoutError) and ex.reply is None  # the forgery never arrived
        assert alice.stats["late_or_duplicate_replies"] == 0
        assert not [t for t in stolen if "/replies" in t or "/groups/" in t], stolen
        assert any("/presence/" in t for t in stolen)  # the ACL is not simply denying everything


async def test_acl_lets_telemetry_through(brokers, tmp_path: Path, namespace: str) -> None:
    """Telemetry under the shipped ACL (SPEC §11.4): a node's records reach a client and the client's
    probes are answered, while a plain user can neither forge another node's record or a probe answer
    into another client's probe topic, nor read another node's probes or another client's answers;
    it may still probe a node itself and read its own answers."""
    users = {"n1": "p1", "alice": "pa", "mallory": "pm"}
    pw = _passwords(tmp_path / "passwd", users)
    m = brokers(f"allow_anonymous false\npassword_file {pw}\nacl_file {_acl(tmp_path, ['n1'])}\n")
    topics = Topics(namespace)
    async with (
        Node([EchoAgent("n1")], _url(m, "n1", "p1"), namespace=namespace, node_id="n1", telemetry_interval=0.3),
        Client(_url(m, "alice", "pa"), namespace=namespace, client_id="alice") as alice,
        Telemetry(alice) as tm,
        _mallory(m.port) as mallory,
    ):
        records: list[TelemetryRecord] = []
        tm.on_record.append(records.append)
        await alice.wait_for_agents(["n1"], timeout=20)
        for sub in (topics.probe("n1"), topics.probe_replies("alice"), topics.probe_replies("mallory"), "#"):
            await mallory.subscribe(sub, qos=0)
        seen: list[tuple[str, bytes]] = []

        async def listen() -> None:
            async for message in mallory.messages:
                seen.append((str(message.topic), bytes(message.payload)))  # type: ignore[arg-type]

        listener = asyncio.create_task(listen())
        forged = TelemetryRecord(node_id="n1", tier="forged", ts=time.time(), interval=0.3)
        await mallory.publish(topics.telemetry("n1"), forged.to_bytes(), qos=0)
        fake = ProbeAnswer(id="p0", node_id="n1", size=128).to_bytes()
        await mallory.publish(topics.probe_replies("alice"), fake, qos=0)
        # alice: one probe round trip and records from n1, through the ACL
        rtt = await tm.ping("n1", timeout=5)
        assert rtt is not None and tm.link("n1").up  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        while len(records) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(records) >= 2 and not tm.is_stale("n1")
        # mallory probes n1 itself and reads its own answer
        await mallory.publish(topics.probe("n1"), make_probe("m1", topics.probe_replies("mallory"), 128, "n1"), qos=0)
        deadline = time.monotonic() + 5
        while not any(t == topics.probe_replies("mallory") for t, _ in seen) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        listener.cancel()
        mine = [parse_answer(p) for t, p in seen if t == topics.probe_replies("mallory")]
        assert mine and all(a == ProbeAnswer(id="m1", node_id="n1", size=128) for a in mine)  # once per matching sub
        assert all(r.tier != "forged" and r.node_id == "n1" for r in records), records  # the forgery never arrived
        assert tm.stats["bad_records"] == 0 and tm.stats["late_answers"] == 0 and tm.stats["bad_answers"] == 0
        stolen = [t for t, _ in seen if "/probe/" in t or t == topics.probe_replies("alice")]
        assert not stolen, stolen
        assert any("/telemetry/nodes/n1" in t for t, _ in seen)  # records are for everyone to read

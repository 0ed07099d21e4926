"""Long fuzz run of the v1 decoder: whatever arrives, only a typed ``ProtocolError`` comes out,
nothing hangs, and no declared size is allocated before it is checked against the payload.

    python bench/fuzz_decoder.py --frames 100000 --seed 0 [--json out.json]

Frames are generated and mutated from the golden vectors (``protocols/vectors``, signed ones
included): random bytes, truncations, bit flips, extensions, wrong header lengths, huge and
negative shapes, bad UTF-8 and JSON, deep nesting, huge numbers, wrong magic/version/flags,
type-confused header fields, splices, and signed frames checked with the key. Exit status 1 if
any other exception escapes, a frame takes over ``--slow-ms`` to decode, or peak RSS grows by more
than ``--max-rss-growth-mb``. :func:`mutated_frames` is reused by the live-node fuzz test.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import struct
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from protocols import PREAMBLE_SIZE, Envelope, ProtocolError, decode, encode
from protocols.signing import FLAG_SIGNED, TRAILER_SIZE

VECTORS = Path(__file__).resolve().parent.parent / "protocols" / "vectors"
TEST_KEY = bytes(range(32))  # the published key of protocols/vectors/signed
_PRE = struct.Struct("<4sBBHI")


def golden_frames() -> list[bytes]:
    """Every golden frame, valid and invalid, unsigned and signed."""
    return [p.read_bytes() for p in sorted(VECTORS.glob("*.bin")) + sorted((VECTORS / "signed").glob("*.bin"))]


def _header_of(frame: bytes) -> tuple[dict[str, Any], bytes] | None:
    """The JSON header of a frame and everything after it (tensor data), or None if unreadable."""
    if len(frame) < PREAMBLE_SIZE:
        return None
    n = _PRE.unpack_from(frame, 0)[4]
    end = len(frame) - (TRAILER_SIZE if frame[5] & FLAG_SIGNED else 0)
    if PREAMBLE_SIZE + n > end:
        return None
    try:
        obj = json.loads(frame[PREAMBLE_SIZE : PREAMBLE_SIZE + n])
    except ValueError:
        return None
    return (obj, frame[PREAMBLE_SIZE + n : end]) if isinstance(obj, dict) else None


def _frame(header: dict[str, Any] | bytes, rest: bytes = b"", *, flags: int = 0) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return _PRE.pack(b"AIFL", 1, flags, 0, len(raw)) + raw + rest


def _json_junk(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.randrange(10 if depth < 3 else 6)
    if pick == 0:
        return None
    if pick == 1:
        return rng.choice([True, False])
    if pick == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**30, rng.randint(-1000, 1000)])
    if pick == 3:
        return rng.choice([0.5, -0.0, 1e308, 2.0, 1e-300])
    if pick == 4:
        return rng.choice(["", "x" * rng.randrange(300), "\u00e9\u4f60", "request", "tensor", "float32", "\ud800"])
    if pick == 5:
        return rng.choice(["hidden_state", "reply", "text", "kv_cache", "bool", "uint8"])
    if pick in (6, 7):
        return [_json_junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["type", "shape", "x", "offset"]): _json_junk(rng, depth + 1) for _ in range(rng.randrange(4))}


# -- strategies: each takes (rng, golden frames) and returns one frame ---------------------------
def random_bytes(rng: random.Random, golden: list[bytes]) -> bytes:
    size = rng.choice([rng.randrange(16), rng.randrange(200), rng.randrange(4096)])
    return rng.randbytes(size)


def random_after_preamble(rng: random.Random, golden: list[bytes]) -> bytes:
    body = rng.randbytes(rng.randrange(600))
    n = rng.choice([len(body), rng.randrange(len(body) + 1), rng.randrange(2**32)])
    return _PRE.pack(b"AIFL", 1, rng.choice([0, 0, FLAG_SIGNED]), 0, n) + body


def truncated(rng: random.Random, golden: list[bytes]) -> bytes:
    g = rng.choice(golden)
    return g[: rng.randrange(len(g) + 1)]


def bit_flips(rng: random.Random, golden: list[bytes]) -> bytes:
    g = bytearray(rng.choice(golden))
    if not g:
        return bytes(g)
    h = _header_of(bytes(g))
    hi = PREAMBLE_SIZE + (len(json.dumps(h[0])) if h else 0)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(min(len(g), hi) if rng.random() < 0.7 and hi < len(g) else len(g))
        g[i] ^= 1 << rng.randrange(8)
    return bytes(g)


def extended(rng: random.Random, golden: list[bytes]) -> bytes:
    return rng.choice(golden) + rng.randbytes(rng.randint(1, 130))


def wrong_header_length(rng: random.Random, golden: list[bytes]) -> bytes:
    g = bytearray(rng.choice([f for f in golden if len(f) >= PREAMBLE_SIZE]))
    n = _PRE.unpack_from(g, 0)[4]
    new = rng.choice([0, 1, n - 1, n + 1, n + rng.randint(2, 64), 2**32 - 1, 2**20 + 1, rng.randrange(2**32)])
    struct.pack_into("<I", g, 8, max(0, min(new, 2**32 - 1)))
    return bytes(g)


def _tensor_parts(rng: random.Random, golden: list[bytes]) -> tuple[dict[str, Any], bytes, list[dict[str, Any]]]:
    for _ in range(50):
        parsed = _header_of(rng.choice(golden))
        if parsed is None:
            continue
        obj, rest = parsed
        tensors = [p for p in obj.get("parts", []) if isinstance(p, dict) and p.get("type") == "tensor"]
        if tensors:
            return obj, rest, tensors
    raise RuntimeError("no golden frame with a tensor part")


def huge_shape(rng: random.Random, golden: list[bytes]) -> bytes:
    """Shapes that would need exabytes, negative dims, overflowing products; nbytes sometimes 'matching'."""
    obj, rest, tensors = _tensor_parts(rng, golden)
    p = rng.choice(tensors)
    shape = rng.choice(
        [
            [2**31] * 3,
            [65536] * 4,
            [2**62, 4],
            [0, 2**62, 8],
            [2**63 - 1],
            [-1, 4],
            [3, -(2**40)],
            [rng.randrange(1, 2**20) for _ in range(rng.randint(1, 6))],
            [1] * rng.randint(30, 40),
        ]
    )
    p["shape"] = shape
    itemsize = {"float64": 8, "int64": 8, "float32": 4, "int32": 4, "float16": 2, "bfloat16": 2, "int16": 2}
    if rng.random() < 0.7:
        p["nbytes"] = abs(math.prod(shape)) * itemsize.get(p.get("dtype"), 1)
    else:
        p["nbytes"] = rng.choice([0, 2**63, 2**64 + 7, -5, p.get("nbytes", 0)])
    if rng.random() < 0.3:
        p["offset"] = rng.choice([0, 64, 2**62, -64, 63])
    return _frame(obj, rest)


def bad_utf8(rng: random.Random, golden: list[bytes]) -> bytes:
    parsed = _header_of(rng.choice(golden))
    raw = json.dumps(parsed[0] if parsed else {"id": "x"}, separators=(",", ":")).encode()
    i = rng.randrange(len(raw))
    junk = rng.choice([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"\xf8\x88\x80\x80\x80", b"\x00"])
    return _frame(raw[:i] + junk + raw[i:])


def bad_json(rng: random.Random, golden: list[bytes]) -> bytes:
    choices: list[Callable[[], bytes]] = [
        lambda: b"[" * rng.randint(100, 50_000) + b"]" * rng.randint(0, 10),
        lambda: b'{"a":' * rng.randint(100, 20_000) + b"1" + b"}" * rng.randint(0, 20_000),
        lambda: b'{"created_at":1e' + str(rng.randint(300, 10**6)).encode() + b"}",
        lambda: b'{"meta":{"x":' + b"9" * rng.randint(10, 10_000) + b"}}",
        lambda: b'{"id":"x","id":"y"}',
        lambda: b"\xef\xbb\xbf{}",
        lambda: rng.choice([b"NaN", b"-Infinity", b"null", b"true", b'"s"', b"[]", b"{", b"}", b""]),
        lambda: json.dumps(_json_junk(rng)).encode(),
        lambda: b'{"id":"\\ud800","kind":"request"}',
        lambda: b'{"parts":[' + b'{"type":"text","text":"a"},' * rng.randint(4000, 6000) + b"{}]}",
    ]
    return _frame(rng.choice(choices)())


def wrong_preamble(rng: random.Random, golden: list[bytes]) -> bytes:
    g = bytearray(rng.choice([f for f in golden if len(f) >= PREAMBLE_SIZE]))
    field = rng.randrange(4)
    if field == 0:
        g[0:4] = rng.choice([b"AIFX", b"aifl", b"\x00\x00\x00\x00", rng.randbytes(4)])
    elif field == 1:
        g[4] = rng.choice([0, 2, 3, 255, rng.randrange(256)])
    elif field == 2:
        g[5] = rng.choice([1, 2, 3, 0x80, 0xFF, rng.randrange(256)])
    else:
        struct.pack_into("<H", g, 6, rng.randrange(1, 65536))
    return bytes(g)


def field_mutation(rng: random.Random, golden: list[bytes]) -> bytes:
    """Type confusion: one header field (top level or in a part) replaced by arbitrary JSON."""
    for _ in range(50):
        parsed = _header_of(rng.choice(golden))
        if parsed is not None:
            break
    else:
        return b""
    obj, rest = parsed
    target: dict[str, Any] = obj
    parts = [p for p in obj.get("parts", []) if isinstance(p, dict)]
    if parts and rng.random() < 0.5:
        target = rng.choice(parts)
    keys = [*target.keys(), "extra", "space", "error"]
    key = rng.choice(keys)
    if rng.random() < 0.15:
        target.pop(key, None)
    else:
        target[key] = _json_junk(rng)
    return _frame(obj, rest)


def splice(rng: random.Random, golden: list[bytes]) -> bytes:
    a, b = rng.choice(golden), rng.choice(golden)
    return a[: rng.randrange(len(a) + 1)] + b[rng.randrange(len(b) + 1) :]


def valid_roundtrip(rng: random.Random, golden: list[bytes]) -> bytes:
    """Golden frames as they are (the valid ones must decode: a control, not only noise)."""
    return rng.choice(golden)


STRATEGIES: dict[str, Callable[[random.Random, list[bytes]], bytes]] = {
    "random_bytes": random_bytes,
    "random_after_preamble": random_after_preamble,
    "truncated": truncated,
    "bit_flips": bit_flips,
    "extended": extended,
    "wrong_header_length": wrong_header_length,
    "huge_shape": huge_shape,
    "bad_utf8": bad_utf8,
    "bad_json": bad_json,
    "wrong_preamble": wrong_preamble,
    "field_mutation": field_mutation,
    "splice": splice,
    "golden": valid_roundtrip,
}


def mutated_frames(seed: int, golden: list[bytes] | None = None) -> Iterator[tuple[str, bytes]]:
    """An endless, reproducible stream of (strategy, frame)."""
    rng = random.Random(seed)
    golden = golden if golden is not None else golden_frames()
    names = list(STRATEGIES)
    while True:
        name = rng.choice(names)
        yield name, STRATEGIES[name](rng, golden)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run(frames: int, seed: int, slow_ms: float) -> dict[str, Any]:
    golden = golden_frames()
    decode(encode(Envelope.request("warm-up")))  # imports and first-call costs before the baseline
    rss_before = _peak_rss_mb()
    outcomes: Counter[str] = Counter()
    by_strategy: dict[str, Counter[str]] = {name: Counter() for name in STRATEGIES}
    escaped: list[dict[str, Any]] = []
    slow: list[dict[str, Any]] = []
    max_ms, signed_checked = 0.0, 0
    slowest: dict[str, Any] = {}
    t_start = time.perf_counter()
    for i, (name, frame) in zip(range(frames), mutated_frames(seed, golden), strict=False):
        # signed frames are checked with the key half the time, and some unsigned ones too
        keyed = bool(len(frame) > 5 and frame[5] & FLAG_SIGNED and i % 2 == 0) or i % 11 == 0
        signed_checked += keyed
        t0 = time.perf_counter()
        try:
            env = decode(frame, signing_key=TEST_KEY if keyed else None)
            outcome = "decoded"
            encode(env)  # what the decoder accepts, the encoder can send on
        except ProtocolError as e:
            outcome = e.code
        except BaseException as e:  # the failure being looked for
            outcome = f"ESCAPED:{type(e).__name__}"
            if len(escaped) < 20:
                escaped.append({"index": i, "strategy": name, "error": repr(e)[:300], "frame": frame[:200].hex()})
                traceback.print_exc()
        ms = (time.perf_counter() - t0) * 1e3
        if ms > max_ms:
            max_ms, slowest = ms, {"index": i, "strategy": name, "ms": round(ms, 2), "size": len(frame)}
        if ms > slow_ms and len(slow) < 20:
            slow.append({"index": i, "strategy": name, "ms": round(ms, 1), "size": len(frame)})
        outcomes[outcome] += 1
        by_strategy[name][outcome] += 1
    elapsed = time.perf_counter() - t_start
    rss_after = _peak_rss_mb()
    return {
        "frames": frames,
        "seed": seed,
        "seconds": round(elapsed, 2),
        "frames_per_s": round(frames / elapsed) if elapsed else None,
        "max_decode_ms": round(max_ms, 2),
        "slowest": slowest,
        "frames_checked_with_key": signed_checked,
        "outcomes": dict(outcomes.most_common()),
        "by_strategy": {k: dict(v.most_common()) for k, v in by_strategy.items()},
        "escaped": escaped,
        "slow": slow,
        "peak_rss_mb_before": round(rss_before, 1),
        "peak_rss_mb": round(rss_after, 1),
        "peak_rss_growth_mb": round(rss_after - rss_before, 1),
        "python": sys.version.split()[0],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slow-ms", type=float, default=1000.0, help="a decode slower than this counts as a hang")
    ap.add_argument("--max-rss-growth-mb", type=float, default=256.0, help="fail if peak RSS grows more than this")
    ap.add_argument("--json", type=Path, help="write the summary here too")
    args = ap.parse_args(argv)
    summary = run(args.frames, args.seed, args.slow_ms)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    ok = not summary["escaped"] and not summary["slow"] and summary["peak_rss_growth_mb"] <= args.max_rss_growth_mb
    print("OK" if ok else "FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

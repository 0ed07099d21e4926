"""MQTT's rules for strings, topic names and topic filters (MQTT 5 §1.5.4, §4.7; 3.1.1 §1.5.3, §4.7).

Pure functions returning a reason (``str``) or ``None`` when the string is acceptable. They live in
``protocols`` so that both the envelope validation (a ``reply_to`` that would become a publish topic) and the
transport (``aiflow_agents.mqtt``) apply one rule set: a string a broker would disconnect us for must be refused
before it is ever sent. The spec says a string MUST NOT contain U+0000 or surrogates and SHOULD NOT contain control
characters or non-characters; Mosquitto disconnects on some of the latter, so they are refused too.

Two limits come from brokers rather than the spec, measured (``tests/test_hardening.py``): Mosquitto 2.0
disconnects a client that publishes or subscribes with more than 200 ``/`` separators (0x82 on MQTT 5, a
plain close on 3.1.1), so topic names and filters are held to :data:`MAX_TOPIC_LEVELS` levels; and the NATS
MQTT listener closes the connection on a space or ``.`` in a topic ("characters ' ' and '.' not supported"),
so the topics a node publishes to on a sender's say (``reply_to``, route hops) must also be *portable*
(:func:`portable_topic_problem`, SPEC §6.1).
"""

from __future__ import annotations

import re

__all__ = [
    "MAX_STRING_BYTES",
    "MAX_TOPIC_LEVELS",
    "NON_PORTABLE_TOPIC_CHARS",
    "mqtt_string_problem",
    "portable_level_problem",
    "portable_topic_problem",
    "topic_filter_problem",
    "topic_name_problem",
]

MAX_STRING_BYTES = 65535
#: Mosquitto 2.0 refuses more than 200 separators; 200 levels (199 separators) leaves one in hand.
MAX_TOPIC_LEVELS = 200
#: Characters a topic may not hold to cross every broker we support (NATS closes the connection on them).
NON_PORTABLE_TOPIC_CHARS = " ."

# U+0000-U+001F, U+007F-U+009F (controls), surrogates, U+FDD0-U+FDEF and U+xFFFE/U+xFFFF (non-characters).
_BAD = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff"
    "\U0001fffe\U0001ffff\U0002fffe\U0002ffff\U0003fffe\U0003ffff\U0004fffe\U0004ffff"
    "\U0005fffe\U0005ffff\U0006fffe\U0006ffff\U0007fffe\U0007ffff\U0008fffe\U0008ffff"
    "\U0009fffe\U0009ffff\U000afffe\U000affff\U000bfffe\U000bffff\U000cfffe\U000cffff"
    "\U000dfffe\U000dffff\U000efffe\U000effff\U000ffffe\U000fffff\U0010fffe\U0010ffff]"
)


def mqtt_string_problem(s: object) -> str | None:
    """Why ``s`` cannot be sent as an MQTT UTF-8 string, or ``None`` if it can."""
    if not isinstance(s, str):
        return f"not a string ({type(s).__name__})"
    bad = _BAD.search(s)
    if bad is not None:
        return f"disallowed code point U+{ord(bad.group()):04X} at index {bad.start()}"
    if len(s) > MAX_STRING_BYTES // 4 and len(s.encode("utf-8")) > MAX_STRING_BYTES:
        return f"longer than {MAX_STRING_BYTES} bytes in UTF-8"
    return None


def topic_name_problem(s: object) -> str | None:
    """Why ``s`` cannot be a PUBLISH topic name (non-empty, no ``+``/``#`` wildcards), or ``None``."""
    problem = mqtt_string_problem(s)
    if problem is not None:
        return problem
    assert isinstance(s, str)
    if not s:
        return "empty topic name"
    if "+" in s or "#" in s:
        return "wildcard in a topic name"
    return _levels_problem(s)


def _levels_problem(s: str) -> str | None:
    separators = s.count("/")
    if separators >= MAX_TOPIC_LEVELS:
        return f"{separators + 1} topic levels (at most {MAX_TOPIC_LEVELS})"
    return None


def portable_topic_problem(s: object) -> str | None:
    """Why ``s`` cannot be a topic name on every supported broker (SPEC §6.1), or ``None``: a topic
    name (:func:`topic_name_problem`) without a space or ``.``."""
    problem = topic_name_problem(s)
    if problem is not None:
        return problem
    assert isinstance(s, str)
    for c in NON_PORTABLE_TOPIC_CHARS:
        if c in s:
            return f"{c!r} in a topic (not portable: the NATS MQTT listener closes the connection)"
    return None


def portable_level_problem(s: object) -> str | None:
    """Why ``s`` cannot be one level of a portable topic name (no ``/``), or ``None``."""
    problem = portable_topic_problem(s)
    if problem is None and "/" in s:  # type: ignore[operator]
        return "'/' in a topic level"
    return problem


def topic_filter_problem(s: object) -> str | None:
    """Why ``s`` cannot be a SUBSCRIBE topic filter (wildcards only as whole levels, ``#`` last), or ``None``."""
    problem = mqtt_string_problem(s)
    if problem is not None:
        return problem
    assert isinstance(s, str)
    if not s:
        return "empty topic filter"
    levels = s.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be a whole level and the last one"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    if s.startswith("$share/"):
        if len(levels) < 3 or not levels[1] or "+" in levels[1] or "#" in levels[1]:
            return "bad shared subscription (need $share/<group>/<filter>)"
    return _levels_problem(s)

"""Optional frame signing: HMAC-SHA256 with a key shared by the deployment (SPEC.md §13.1).

Broker ACLs say who may publish *where*; signing says that a frame was written by someone holding
the deployment's key, whatever topic it arrived on. A signed frame sets bit 0 of the preamble flags
and ends with a 40-byte trailer::

    frame  = preamble(flags |= 0x01) + header + padding + segments + key_id (8) + mac (32)
    key_id = HMAC-SHA256(key, "aiflow key id v1")[:8]
    mac    = HMAC-SHA256(key, every byte before the mac)

The key id lets a receiver hold several keys (rotation) and tells an operator which key a frame
claims, without revealing the key. Signing authenticates; it does not encrypt (use TLS) and does not
stop replays (deadlines and the node's duplicate window bound those).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from typing import Any

from .errors import ProtocolError

FLAG_SIGNED = 0x01  # preamble flags, bit 0
KNOWN_FLAGS = FLAG_SIGNED
KEY_ID_SIZE = 8
MAC_SIZE = 32
TRAILER_SIZE = KEY_ID_SIZE + MAC_SIZE  # 40
MIN_KEY_BYTES = 16
ENV_SIGNING_KEY = "AIFLOW_SIGNING_KEY"
_KEY_ID_LABEL = b"aiflow key id v1"


class SignatureError(ProtocolError):
    """A signed frame whose MAC does not verify, or that was signed with a key the receiver lacks."""

    code = "bad_signature"


class UnsignedFrameError(ProtocolError):
    """The receiver requires signed frames and this one is not signed."""

    code = "unsigned_frame"


class SigningKey:
    """One shared secret and its public 8-byte id."""

    __slots__ = ("_secret", "key_id")

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, (bytes, bytearray)):
            raise TypeError(f"a signing key is bytes, not {type(secret).__name__}")
        if len(secret) < MIN_KEY_BYTES:
            raise ValueError(
                f"a signing key needs at least {MIN_KEY_BYTES} bytes (got {len(secret)}); use 32 random bytes"
            )
        self._secret = bytes(secret)
        self.key_id = hmac.new(self._secret, _KEY_ID_LABEL, hashlib.sha256).digest()[:KEY_ID_SIZE]

    def mac(self, pieces: Iterable[Any]) -> bytes:
        """HMAC-SHA256 over the concatenation of ``pieces`` (bytes-like), without joining them."""
        h = hmac.new(self._secret, digestmod=hashlib.sha256)
        for piece in pieces:
            h.update(piece)
        return h.digest()

    def __repr__(self) -> str:  # never print the secret
        return f"SigningKey(key_id={self.key_id.hex()})"


class Keyring:
    """The key a sender signs with, plus every key a receiver accepts (looked up by key id).

    Passing the old key in ``accepted`` during a rotation lets frames signed with either verify.
    """

    __slots__ = ("_by_id", "signer")

    def __init__(self, signer: bytes | SigningKey, *accepted: bytes | SigningKey) -> None:
        self.signer = signer if isinstance(signer, SigningKey) else SigningKey(signer)
        self._by_id = {k.key_id: k for k in (self.signer, *(_key(a) for a in accepted))}

    def trailer(self, pieces: list[Any]) -> list[bytes]:
        """The two trailer pieces (key id, MAC) for a frame made of ``pieces`` (flag already set)."""
        key_id = self.signer.key_id
        return [key_id, self.signer.mac([*pieces, key_id])]

    def verify(self, view: memoryview) -> None:
        """Check the trailer of a whole signed frame; raise :class:`SignatureError` if it is wrong."""
        size = len(view)
        mac_at = size - MAC_SIZE
        key_id = bytes(view[mac_at - KEY_ID_SIZE : mac_at])
        key = self._by_id.get(key_id)
        if key is None:
            raise SignatureError(f"frame is signed with key id {key_id.hex()}, which this receiver does not hold")
        if not hmac.compare_digest(key.mac([view[:mac_at]]), bytes(view[mac_at:])):
            raise SignatureError(f"HMAC-SHA256 of the frame does not match its signature (key id {key_id.hex()})")

    def __repr__(self) -> str:
        return f"Keyring(signer={self.signer.key_id.hex()}, accepted={[k.hex() for k in self._by_id]})"


def _key(k: bytes | SigningKey) -> SigningKey:
    return k if isinstance(k, SigningKey) else SigningKey(k)


SigningKeyLike = bytes | SigningKey | Keyring


def as_keyring(key: SigningKeyLike | None) -> Keyring | None:
    """Normalise what callers pass as ``signing_key=`` (bytes, a key, a keyring or None)."""
    if key is None or isinstance(key, Keyring):
        return key
    return Keyring(key)


def key_from_hex(text: str) -> bytes:
    """Parse a hex-encoded key (as in ``AIFLOW_SIGNING_KEY``), with a clear error."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        hint = "python -c 'import os; print(os.urandom(32).hex())'"
        raise ValueError(f"{ENV_SIGNING_KEY} must be hex digits (make one with: {hint})") from None
    SigningKey(key)  # length check
    return key


def key_from_env(environ: Mapping[str, str] | None = None) -> bytes | None:
    """The key in ``$AIFLOW_SIGNING_KEY`` (hex), or None when it is unset or empty."""
    text = (os.environ if environ is None else environ).get(ENV_SIGNING_KEY, "")
    return key_from_hex(text) if text.strip() else None


__all__ = [
    "ENV_SIGNING_KEY",
    "FLAG_SIGNED",
    "KEY_ID_SIZE",
    "KNOWN_FLAGS",
    "MAC_SIZE",
    "MIN_KEY_BYTES",
    "TRAILER_SIZE",
    "Keyring",
    "SignatureError",
    "SigningKey",
    "SigningKeyLike",
    "UnsignedFrameError",
    "as_keyring",
    "key_from_env",
    "key_from_hex",
]

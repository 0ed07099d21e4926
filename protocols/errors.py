"""Typed decode/encode failures: the only exceptions the codec lets out."""

from __future__ import annotations

from typing import Any


class ProtocolError(Exception):
    """Base of every protocol failure; ``code`` is stable and travels in error envelopes."""

    code = "protocol_error"

    def __init__(self, message: str, *, header: dict[str, Any] | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # The parsed JSON header, when the failure came after it was readable: lets a node
        # still answer the requester (reply_to / correlation_id) about a broken frame.
        self.header = header
        # The header field at fault, when one is (e.g. ``reply_to`` that is no MQTT topic name):
        # a receiver must not use that field to answer.
        self.field = field


class FrameTooShortError(ProtocolError):
    code = "frame_too_short"


class BadMagicError(ProtocolError):
    code = "bad_magic"


class UnsupportedVersionError(ProtocolError):
    code = "unsupported_version"


class FrameTooLargeError(ProtocolError):
    code = "frame_too_large"


class HeaderTooLargeError(ProtocolError):
    code = "header_too_large"


class HeaderDecodeError(ProtocolError):
    """The header is not UTF-8 JSON object text."""

    code = "header_decode"


class HeaderValidationError(ProtocolError):
    """The header is JSON but does not match the v1 schema (unknown kind/role/dtype, bad field)."""

    code = "header_invalid"


class SegmentError(ProtocolError):
    """A tensor segment is misaligned, out of bounds, overlapping or of the wrong size."""

    code = "bad_segment"


class UnsupportedDTypeError(ProtocolError):
    code = "unsupported_dtype"


class EncodeError(ProtocolError):
    """The sender tried to encode something v1 cannot carry (or that exceeds its limits)."""

    code = "encode_error"

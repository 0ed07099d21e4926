"""The in-memory form of a latent message: an envelope of ordered text and tensor parts."""

from __future__ import annotations

import functools
import os
import re
import sys
import time
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    import torch

    Tensor = torch.Tensor
else:
    # torch loads only where a tensor is built or read (text-only messages, the CLI and the
    # protocol layer never need it); TensorPart checks the type itself, see _check_tensor.
    Tensor = Any

PROTOCOL_VERSION = 1

#: Agent ids become MQTT topic levels, so they may not hold ``/``, ``+``, ``#``, spaces or ``.`` (the NATS
#: MQTT listener closes a connection that publishes to a topic with a ``.``: SPEC §6.1, §11.1).
AGENT_ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,127}$"
_AGENT_ID_RE = re.compile(AGENT_ID_PATTERN)


def is_valid_agent_id(value: str) -> bool:
    return bool(_AGENT_ID_RE.match(value))


def new_id() -> str:
    """128 random bits as 32 hex digits (a uuid4's size, at a quarter of its cost)."""
    return os.urandom(16).hex()


class Kind(StrEnum):
    REQUEST = "request"
    REPLY = "reply"
    EVENT = "event"
    ERROR = "error"


class TensorRole(StrEnum):
    HIDDEN_STATE = "hidden_state"
    TOKEN_DISTRIBUTION = "token_distribution"
    EMBEDDING = "embedding"
    KV_CACHE = "kv_cache"
    OTHER = "other"


class DType(StrEnum):
    FLOAT64 = "float64"
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    INT64 = "int64"
    INT32 = "int32"
    INT16 = "int16"
    INT8 = "int8"
    UINT8 = "uint8"
    BOOL = "bool"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtypes()[self]

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self]

    @classmethod
    def from_torch(cls, dtype: torch.dtype) -> DType:
        try:
            return from_torch_dtypes()[dtype]
        except KeyError:
            from .errors import UnsupportedDTypeError

            raise UnsupportedDTypeError(
                f"torch dtype {dtype} has no v1 wire dtype (supported: {', '.join(d.value for d in cls)})"
            ) from None


_ITEMSIZE: dict[DType, int] = {
    DType.FLOAT64: 8,
    DType.FLOAT32: 4,
    DType.FLOAT16: 2,
    DType.BFLOAT16: 2,
    DType.INT64: 8,
    DType.INT32: 4,
    DType.INT16: 2,
    DType.INT8: 1,
    DType.UINT8: 1,
    DType.BOOL: 1,
}


@functools.cache
def torch_dtypes() -> dict[DType, torch.dtype]:
    """Wire dtype -> torch dtype; imports torch on first use (a tensor is about to be built)."""
    import torch

    return {d: getattr(torch, d.value) for d in DType}


@functools.cache
def from_torch_dtypes() -> dict[torch.dtype, DType]:
    return {v: k for k, v in torch_dtypes().items()}


Meta = dict[str, Any]


def vocab_signature(tokenizer: str) -> str:
    """The content part of a feature space's tokenizer id (vocabulary size and hash): the name in
    front is for people, so one vocabulary loaded from a GGUF file and from its converted folder,
    or under two names, still matches."""
    parts = tokenizer.rsplit("-", 2)
    if len(parts) == 3 and parts[1].isdigit() and len(parts[2]) == 12:
        return f"{parts[1]}-{parts[2]}"
    return tokenizer


class FeatureSpace(BaseModel):
    """Where a latent lives, so a receiver can tell whether it can consume it directly.

    Two latents are interchangeable only when family, hidden size and tokenizer agree;
    ``model`` and ``layer`` say which member and depth produced it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: str = Field(min_length=1, max_length=256)
    model: str | None = Field(default=None, max_length=256)
    layer: int | None = Field(default=None, ge=-1)
    hidden_size: int | None = Field(default=None, ge=1)
    tokenizer: str | None = Field(default=None, max_length=256)

    def compatible_with(self, other: FeatureSpace) -> bool:
        return (
            self.family == other.family and self.hidden_size == other.hidden_size and self.tokenizer == other.tokenizer
        )

    @classmethod
    def from_str(cls, value: str) -> FeatureSpace:
        """Parse ``family[/model][@layer][#hidden][~tokenizer]``: a compact form for CLIs and logs."""
        rest = value
        tokenizer = hidden = layer = model = None
        if "~" in rest:
            rest, tokenizer = rest.split("~", 1)
        if "#" in rest:
            rest, h = rest.split("#", 1)
            hidden = int(h)
        if "@" in rest:
            rest, lay = rest.split("@", 1)
            layer = int(lay)
        if "/" in rest:
            rest, model = rest.split("/", 1)
        return cls(family=rest, model=model, layer=layer, hidden_size=hidden, tokenizer=tokenizer)

    def __str__(self) -> str:
        out = self.family
        if self.model is not None:
            out += f"/{self.model}"
        if self.layer is not None:
            out += f"@{self.layer}"
        if self.hidden_size is not None:
            out += f"#{self.hidden_size}"
        if self.tokenizer is not None:
            out += f"~{self.tokenizer}"
        return out


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"] = "text"
    text: str
    meta: Meta = Field(default_factory=dict)


class TensorPart(BaseModel):
    """A tensor with what it means. Decoded tensors are read-only views over the frame:
    call :meth:`writable` before modifying one in place."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    type: Literal["tensor"] = "tensor"
    tensor: Tensor
    role: TensorRole = TensorRole.OTHER
    space: FeatureSpace | None = None
    meta: Meta = Field(default_factory=dict)

    @field_validator("tensor")
    @classmethod
    def _check_tensor(cls, t: Any) -> torch.Tensor:
        # A torch tensor exists only once torch is imported, so the check needs no import of its own.
        loaded = sys.modules.get("torch")
        if loaded is None or not isinstance(t, loaded.Tensor):
            raise ValueError(f"Input should be an instance of torch.Tensor, not {type(t).__name__}")
        DType.from_torch(t.dtype)
        return t

    @property
    def dtype(self) -> DType:
        return DType.from_torch(self.tensor.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def writable(self) -> torch.Tensor:
        return self.tensor.clone()


Part = Annotated[TextPart | TensorPart, Field(discriminator="type")]


class ErrorInfo(BaseModel):
    """Why a request failed; ``code`` is machine-readable and stable."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(min_length=1, max_length=128)
    message: str
    agent: str | None = None
    retryable: bool = False
    detail: Meta = Field(default_factory=dict)


class Envelope(BaseModel):
    """One message of the latent-message protocol (see ``protocols/SPEC.md``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    version: ClassVar[int] = PROTOCOL_VERSION

    id: str = Field(default_factory=new_id, min_length=1, max_length=128)
    kind: Kind = Kind.REQUEST
    sender: str = Field(default="anonymous", min_length=1, max_length=256)
    recipient: str | None = Field(default=None, max_length=256)
    correlation_id: str | None = Field(default=None, max_length=128)
    reply_to: str | None = Field(default=None, max_length=1024)
    trace_id: str = Field(default_factory=new_id, min_length=1, max_length=128)
    parent_id: str | None = Field(default=None, max_length=128)
    created_at: float = Field(default_factory=time.time)
    deadline: float | None = None
    route: list[str] = Field(default_factory=list)
    parts: list[Part] = Field(default_factory=list)
    error: ErrorInfo | None = None
    meta: Meta = Field(default_factory=dict)

    # -- construction helpers -------------------------------------------------------------
    @classmethod
    def request(
        cls,
        *parts: str | TextPart | TensorPart,
        sender: str = "anonymous",
        recipient: str | None = None,
        **fields: Any,
    ) -> Envelope:
        return cls(kind=Kind.REQUEST, sender=sender, recipient=recipient, parts=_parts(parts), **fields)

    def reply(self, *parts: str | TextPart | TensorPart, sender: str | None = None, **fields: Any) -> Envelope:
        """A reply addressed back to this request's sender, in the same trace."""
        return Envelope(
            kind=Kind.REPLY,
            sender=sender or self.recipient or "anonymous",
            recipient=self.sender,
            correlation_id=self.correlation_id or self.id,
            trace_id=self.trace_id,
            parent_id=self.id,
            deadline=self.deadline,
            parts=_parts(parts),
            **fields,
        )

    def error_reply(
        self, code: str, message: str, *, sender: str | None = None, retryable: bool = False, **detail: Any
    ) -> Envelope:
        agent = sender or self.recipient
        return Envelope(
            kind=Kind.ERROR,
            sender=agent or "anonymous",
            recipient=self.sender,
            correlation_id=self.correlation_id or self.id,
            trace_id=self.trace_id,
            parent_id=self.id,
            error=ErrorInfo(code=code, message=message, agent=agent, retryable=retryable, detail=detail),
        )

    # -- accessors ------------------------------------------------------------------------
    @property
    def text(self) -> str:
        """All text parts joined by newlines (the usual way to read a text answer)."""
        return "\n".join(p.text for p in self.parts if isinstance(p, TextPart))

    def tensors(self, role: TensorRole | str | None = None) -> list[TensorPart]:
        return [p for p in self.parts if isinstance(p, TensorPart) and (role is None or p.role == role)]

    def tensor(self, role: TensorRole | str | None = None) -> TensorPart | None:
        found = self.tensors(role)
        return found[0] if found else None

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now if now is not None else time.time()) >= self.deadline

    def remaining(self, now: float | None = None) -> float | None:
        if self.deadline is None:
            return None
        return self.deadline - (now if now is not None else time.time())


def _parts(parts: tuple[str | TextPart | TensorPart, ...]) -> list[TextPart | TensorPart]:
    return [TextPart(text=p) if isinstance(p, str) else p for p in parts]

"""Built-in agents for tests and demos; registered through the same entry-point group as plugins."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import torch

from protocols import Envelope, TensorPart, TensorRole, TextPart

from .agent import Accepts, Agent, AgentContext, Reply
from .errors import AgentError


class EchoAgent(Agent):
    """Answers with exactly what it was sent, latents included (useful for transport checks)."""

    type_name = "echo"
    accepts = Accepts(text=True, any_space=True)

    async def handle(self, request: Envelope, ctx: AgentContext) -> Reply:
        return request.reply(*request.parts, sender=self.agent_id, meta=dict(request.meta))


class ScriptedAgent(Agent):
    """A deterministic stand-in for a model, configured by keyword (or ``?key=value`` on the CLI).

    - ``answer``: reply text; ``{text}`` is replaced by the request text (default: ``"{text}"``)
    - ``answers``: dict mapping request text to reply text (overrides ``answer`` when it matches)
    - ``confidence``: reported in the reply's ``meta["confidence"]`` (default 1.0)
    - ``delay``: seconds to wait before answering; ``hang``: never answer
    - ``fail``: raise (code ``scripted_failure``); ``crash``: kill the whole node process (SIGKILL)
    - ``fail_on``: fail only when the request text contains this string
    """

    type_name = "scripted"

    async def handle(self, request: Envelope, ctx: AgentContext) -> Reply:
        cfg = self.config
        text = request.text
        if cfg.get("crash"):
            os.kill(os.getpid(), signal.SIGKILL)
        if cfg.get("hang"):
            await asyncio.Event().wait()
        delay = float(cfg.get("delay", 0) or 0)
        if delay > 0:
            await asyncio.sleep(delay)
        if cfg.get("fail") or (cfg.get("fail_on") and str(cfg["fail_on"]) in text):
            raise AgentError(f"{self.agent_id} was scripted to fail", code="scripted_failure")
        answers: dict[str, Any] = cfg.get("answers") or {}
        answer = str(answers[text]) if text in answers else str(cfg.get("answer", "{text}")).replace("{text}", text)
        meta = {"confidence": float(cfg.get("confidence", 1.0)), "agent": self.agent_id, "node": ctx.node_id}
        return request.reply(answer, sender=self.agent_id, meta=meta)


class TensorStatsAgent(Agent):
    """Consumes any latent and answers with its statistics: proof that tensors crossed intact."""

    type_name = "tensor-stats"
    accepts = Accepts(text=False, any_space=True)

    async def handle(self, request: Envelope, ctx: AgentContext) -> Reply:
        tensors = request.tensors()
        if not tensors:
            raise AgentError("send at least one tensor part", code="no_tensor")
        lines, rows = [], []
        for i, part in enumerate(tensors):
            t = part.tensor.to(torch.float64)
            mean = t.mean().item() if t.numel() else 0.0
            norm = t.norm().item() if t.numel() else 0.0
            lines.append(f"part {i}: {part.dtype} {list(part.shape)} {part.role} mean={mean:.6g} norm={norm:.6g}")
            rows.append([float(t.numel()), mean, norm])
        stats = TensorPart(
            tensor=torch.tensor(rows, dtype=torch.float64),
            role=TensorRole.OTHER,
            meta={"columns": ["numel", "mean", "norm"]},
        )
        return [TextPart(text="\n".join(lines)), stats]

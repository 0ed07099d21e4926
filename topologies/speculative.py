"""Speculative decoding across the network: a drafter near the user proposes tokens, a verifier
checks each draft in one forward pass, and the accepted prefix plus the verifier's own next token
is the output — greedy output equal to the verifier decoding alone.

Two flavours share the code: the drafter ships token ids (a small model drafting for a bigger one
with the same tokenizer), or it drafts from an early exit and ships that exit layer's hidden
states, so the verifier runs only the layers above it (self-speculative decoding across
machines). Accepted tokens are handed to ``on_tokens`` as they arrive, so a user sees text appear.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

from protocols import Envelope, TensorPart, new_id, ops

from .graph import AgentGraph, AgentRef, GraphError
from .pattern import Outcome, Pattern, Runtime, as_member

#: Called with (text of the newly accepted tokens, their ids) after every round.
TokenSink = Callable[[str, list[int]], Awaitable[None] | None]

#: Restarts of a session after an agent forgot it (``unknown_session``) before the run fails.
MAX_RESTARTS = 2


class Speculative(Pattern):
    kind = "speculative"
    forbids_cycles = False  # corrections flow back to the drafter every round

    def __init__(
        self,
        drafter: Any,
        verifier: Any,
        *,
        gamma: int = 4,
        max_new_tokens: int = 64,
        ship_hidden: bool = False,
        encoding: str = "float16",
        min_confidence: float = 0.0,
        on_tokens: TokenSink | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(name or "speculative")
        self.drafter = as_member(drafter)
        self.verifier = as_member(verifier)
        if not isinstance(self.drafter, AgentRef) or not isinstance(self.verifier, AgentRef):
            raise GraphError(f"speculative {self.name!r}: drafter and verifier must be agents (they keep KV caches)")
        if gamma < 1:
            raise GraphError(f"speculative {self.name!r}: gamma must be >= 1")
        if max_new_tokens < 1:
            raise GraphError(f"speculative {self.name!r}: max_new_tokens must be >= 1")
        self.gamma = gamma
        self.max_new_tokens = max_new_tokens
        self.ship_hidden = ship_hidden
        self.encoding = encoding
        self.min_confidence = min_confidence
        self.on_tokens = on_tokens

    def members(self) -> list[Any]:
        return [self.drafter, self.verifier]

    def graph(self) -> AgentGraph:
        g = AgentGraph(self.name)
        g.add_step("task", "task")
        g.add_step("answer", "answer")
        d, _ = self._entry_exit(g, self.drafter, f"{self.name}.draft")
        v, _ = self._entry_exit(g, self.verifier, f"{self.name}.verify")
        g.add_flow("task", d, "prompt")
        g.add_flow(d, v, f"{self.gamma} draft tokens" + (" + hidden states" if self.ship_hidden else ""))
        g.add_flow(v, d, "accepted + correction")
        g.add_flow(v, "answer", "tokens (streamed)")
        return g

    async def _emit(self, text: str, ids: list[int]) -> None:
        if self.on_tokens is None or not ids:
            return
        res = self.on_tokens(text, ids)
        if inspect.isawaitable(res):
            await res

    async def run(self, task: Envelope, rt: Runtime) -> Outcome:
        out = Outcome(source=self.name, kind=self.kind)
        session = new_id()
        bare = task.model_copy(update={"parts": []})  # rounds after the first carry no prompt text
        seq: list[int] = []  # prompt + generated token ids
        generated: list[int] = []
        texts: list[str] = []
        have_d = have_v = 0  # settled positions each agent holds
        prompt_len = 0
        started = time.time()
        first_token_at: float | None = None
        rounds: list[dict[str, Any]] = []
        restarts = 0
        done = False
        stopped_by = "max_new_tokens"
        while not done and len(generated) < self.max_new_tokens:
            r = len(rounds) + 1
            gamma = min(self.gamma, self.max_new_tokens - len(generated))
            meta: dict[str, Any] = {
                ops.OP: ops.Op.DRAFT.value,
                ops.SESSION: session,
                ops.START: have_d,
                ops.GAMMA: gamma,
                ops.SHIP_HIDDEN: self.ship_hidden,
                ops.ENCODING: self.encoding,
                ops.MIN_CONFIDENCE: self.min_confidence,
            }
            if seq:
                meta[ops.TOKENS] = seq[have_d:]
            t0 = time.time()
            d = await rt.ask(self.drafter, task if not seq else bare, meta=meta, label=f"{self.name} draft {r}")
            out.children.append(d)
            out.cost = out.cost.add(d.cost)
            if not d.ok or d.reply is None:
                if _unknown_session(d.error) and restarts < MAX_RESTARTS and seq:
                    restarts, have_d, have_v, session = restarts + 1, 0, 0, new_id()
                    continue
                out.error = f"drafter: {d.error or 'no reply'}"
                break
            dm = d.reply.meta
            if not seq:
                seq = [int(t) for t in dm.get(ops.PROMPT_TOKENS) or []]
                prompt_len = len(seq)
                if not seq:
                    out.error = "drafter: its first reply carried no prompt_tokens"
                    break
            drafts = [int(t) for t in dm.get(ops.DRAFT_TOKENS) or []]
            hidden = [p for p in d.reply.parts if isinstance(p, TensorPart)]
            if self.ship_hidden and hidden and have_v != have_d:
                # the states start where the drafter resumed; the verifier must resume there too
                out.error = f"drafter and verifier out of step ({have_d} vs {have_v} positions)"
                break
            vmeta = {
                ops.OP: ops.Op.VERIFY_TOKENS.value,
                ops.SESSION: session,
                ops.START: have_v,
                ops.TOKENS: seq[have_v:] + drafts,
                ops.DRAFT_TOKENS: len(drafts),
            }
            if hidden and dm.get(ops.LAYER) is not None:
                vmeta[ops.LAYER] = int(dm[ops.LAYER])
            t1 = time.time()
            v = await rt.ask(self.verifier, bare, meta=vmeta, extra_parts=hidden, label=f"{self.name} verify {r}")
            out.children.append(v)
            out.cost = out.cost.add(v.cost)
            if not v.ok or v.reply is None:
                if _unknown_session(v.error) and restarts < MAX_RESTARTS:
                    restarts, have_d, have_v, session = restarts + 1, 0, 0, new_id()
                    continue
                out.error = f"verifier: {v.error or 'no reply'}"
                break
            vm = v.reply.meta
            accept = int(vm.get(ops.ACCEPT, 0))
            nxt = vm.get(ops.NEXT_TOKEN)
            new = drafts[:accept] + ([int(nxt)] if nxt is not None else [])
            room = self.max_new_tokens - len(generated)
            if len(new) > room:
                new = new[:room]
            before = len(seq)
            seq += new
            generated += new
            have_v = int(vm.get(ops.PROCESSED, have_v))
            have_d = min(int(dm.get(ops.PROCESSED, have_d)), before + accept)
            if new and first_token_at is None:
                first_token_at = time.time()
            text = v.reply.text
            texts.append(text)
            await self._emit(text, new)
            if vm.get("eos"):
                done, stopped_by = True, "eos"
            rounds.append(
                {
                    "drafted": len(drafts),
                    "accepted": accept,
                    "tokens": len(new),
                    "draft_ms": round((t1 - t0) * 1e3, 2),
                    "verify_ms": round((time.time() - t1) * 1e3, 2),
                    "drafter_cost": d.cost.model_dump(),
                    "verifier_cost": v.cost.model_dump(),
                    "verifier_positions": int((v.reply.meta.get(ops.COST) or {}).get("positions", 0)),
                }
            )
            if not drafts and nxt is None:
                out.error = "no progress: empty draft and no verifier token"
                break
        elapsed = time.time() - started
        out.latency = elapsed
        drafted = sum(x["drafted"] for x in rounds)
        accepted = sum(x["accepted"] for x in rounds)
        out.details = {
            "session": session,
            "prompt_tokens": prompt_len,
            "token_ids": generated,
            "tokens": len(generated),
            "rounds": len(rounds),
            "gamma": self.gamma,
            "acceptance": accepted / drafted if drafted else None,
            "tokens_per_round": len(generated) / len(rounds) if rounds else None,
            "tokens_per_s": len(generated) / elapsed if elapsed > 0 else None,
            "first_token_s": (first_token_at - started) if first_token_at else None,
            "stopped_by": stopped_by if out.error is None else "error",
            "restarts": restarts,
            "ship_hidden": self.ship_hidden,
            "encoding": self.encoding if self.ship_hidden else None,
            "per_round": rounds,
        }
        if out.error is None:
            out.text = "".join(texts)
            out.answer = out.text.strip()
        return out


def _unknown_session(error: str | None) -> bool:
    return bool(error) and str(error).startswith("unknown_session")

"""An external agent plugin: answers with the request text reversed."""

from __future__ import annotations

from aiflow_agents import Agent, AgentContext, Reply
from protocols import Envelope


class ReverseAgent(Agent):
    type_name = "reverse"

    async def handle(self, request: Envelope, ctx: AgentContext) -> Reply:
        return request.text[::-1]

"""An agent backed by a Hugging Face causal LM (local safetensors folder, GGUF file, or catalog model).

It implements the model-agent ops of :mod:`protocols.ops` (``generate``, ``score``, ``next``) with a
hand-written greedy decoding loop, because collaboration needs what ``generate()`` hides: the
probability of every chosen token (confidence), per-step distributions (latent outputs) and a hook
to fuse another model's distributions or soft tokens into decoding (latent inputs).

Latents are tagged with the agent's :class:`~protocols.FeatureSpace`. A token distribution is
usable only by a receiver whose tokenizer id is identical (same vocabulary, same ids); anything
else is refused by ``latent_policy``: ``fallback`` (answer from the text, note it in
``meta.latent``) or ``error`` (``incompatible_latent``). A latent is never consumed on a guess.

Config keys (``aiflow node --agent 'hf:ID?model=smollm2-135m&max_new_tokens=32'``):

``model`` catalog name, or ``path`` (folder or ``.gguf`` file) with optional ``gguf_file``;
``device`` (``auto``/``cpu``/``cuda[:N]``); ``dtype`` (``auto``/``float32``/``float16``/``bfloat16``);
``max_new_tokens``; ``chat`` (use the chat template; default: the catalog's choice, else whether the
tokenizer has one); ``system``; ``answer_pattern`` (regex normalising ``meta.answer``);
``temperature`` (0 = greedy) and ``seed``; ``stop`` (strings ending an answer); ``latent_policy``;
``latent_weight`` (share of the sender's distribution when fusing, 0..1); ``latent_mode``
(``fuse``/``soft``/``both``); ``top_k`` (default size of returned distributions; 0 = full);
``family``/``name``/``tokenizer_name`` (override what the feature space says); ``fetch`` (fetch a
catalog model on first use); ``threads`` (torch CPU threads).

Per request, ``meta`` may override ``max_new_tokens``, ``system``, ``temperature``, ``seed``,
``top_k``, ``latent_weight`` and ``latent_mode``, and ask for latents with ``return``/``layers``.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from protocols import Envelope, FeatureSpace, TensorPart, TensorRole, TextPart, vocab_signature
from protocols import compression as C
from protocols import ops as O

from ..agent import Accepts, Agent, AgentContext, Reply
from ..errors import AgentConfigError, AgentError
from ..forwarding import accepts_confidence

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .speculative import Speculator

#: The token callback of a ``generate`` asked to stream (set by ``handle``; a context variable, so it
#: reaches the worker thread that ``asyncio.to_thread`` runs ``handle_sync`` in, and no other call).
_ON_TOKEN: ContextVar[Callable[[int, str], None] | None] = ContextVar("aiflow_hf_on_token", default=None)
#: Replaced by soft tokens when they go inside the user turn of a chat template.
_SOFT_SLOT = "\u2063AIFLOW_SOFT_SLOT\u2063"
RETURN_KINDS = ("distribution", "hidden", "embedding")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass(slots=True)
class HFConfig:
    """The agent's settings; unknown keys are an error so a typo never passes silently."""

    model: str | None = None
    path: str | None = None
    gguf_file: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_new_tokens: int = 64
    chat: bool | None = None
    system: str | None = None
    answer_pattern: str | None = None
    temperature: float = 0.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    latent_policy: Literal["fallback", "error"] = "fallback"
    latent_weight: float = 0.5
    latent_mode: Literal["fuse", "soft", "both"] = "fuse"
    top_k: int = 0
    family: str | None = None
    name: str | None = None
    tokenizer_name: str | None = None
    fetch: bool = True
    threads: int | None = None
    #: (prompt, option) scores kept, so a debate round or a cross-scoring pass over the same item is free
    score_cache: int = 4096
    #: speculative decoding: draft from the early exit after this layer (a device running layers below it)
    exit_layer: int | None = None
    #: the exits' safetensors (default: the exits shipped for ``model``)
    exits: str | None = None
    #: decoding sessions (KV caches) kept for ``draft`` / ``verify_tokens``
    sessions: int = 8

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> HFConfig:
        """The checked settings; an unknown key is :class:`AgentConfigError` (the one check every type uses)."""
        known = {f.name for f in fields(cls)}
        unknown = [k for k in config if k not in known]
        if unknown:
            raise AgentConfigError(TransformersAgent.type_name, unknown, known | Agent.BASE_KEYS)
        cfg = cls(**config)
        if isinstance(cfg.stop, str):
            cfg.stop = [cfg.stop]
        if cfg.model is None and cfg.path is None:
            raise ValueError("the hf agent needs model=CATALOG_NAME or path=FOLDER_OR_GGUF")
        if cfg.latent_policy not in ("fallback", "error"):
            raise ValueError(f"latent_policy must be 'fallback' or 'error', not {cfg.latent_policy!r}")
        if cfg.latent_mode not in ("fuse", "soft", "both"):
            raise ValueError(f"latent_mode must be 'fuse', 'soft' or 'both', not {cfg.latent_mode!r}")
        if int(cfg.max_new_tokens) < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if cfg.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"dtype must be auto or one of {', '.join(_DTYPES)}, not {cfg.dtype!r}")
        if cfg.answer_pattern:
            re.compile(cfg.answer_pattern)
        if cfg.exit_layer is not None:
            cfg.exit_layer = int(cfg.exit_layer)
        if int(cfg.sessions) < 1:
            raise ValueError("sessions must be >= 1")
        return cfg


@dataclass(slots=True)
class Decoded:
    """What one decoding run produced, with everything the reply needs."""

    token_ids: list[int]
    text: str
    chosen_probs: list[float]
    distributions: torch.Tensor | None  # [steps, vocab] of the agent's own model
    hidden: dict[int, torch.Tensor]  # layer -> [positions, hidden]
    prompt_tokens: int
    positions: int  # token positions run through the model (prompt + soft + fed back)
    forward_passes: int
    stopped_by: str

    @property
    def confidence(self) -> float:
        """Geometric mean of the chosen tokens' probabilities: 1 = the model never hesitated."""
        if not self.chosen_probs:
            return 1.0
        logs = [math.log(max(p, 1e-30)) for p in self.chosen_probs]
        return float(min(1.0, max(0.0, math.exp(sum(logs) / len(logs)))))


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def tokenizer_id(tokenizer: PreTrainedTokenizerBase, name: str) -> str:
    """A stable id of a vocabulary: two tokenizers share it only if every token has the same id,
    which is exactly when token distributions can be mixed."""
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256()
    for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        digest.update(f"{idx}\t{token}\n".encode("utf-8", "surrogatepass"))
    return f"{name}-{len(vocab)}-{digest.hexdigest()[:12]}"


def resolve_device(device: str) -> torch.device:
    if device in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available here")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPU kernels for half types are slow and lossy


class TransformersAgent(Agent):
    """A causal LM as an agent: text in, text out, plus confidence, cost and tagged latents."""

    type_name = "hf"
    config_keys = tuple(f.name for f in fields(HFConfig))

    def __init__(
        self,
        agent_id: str | None = None,
        *,
        tier: str | None = None,
        groups: tuple[str, ...] | list[str] = (),
        **config: Any,
    ) -> None:
        super().__init__(agent_id, tier=tier, groups=groups, **config)
        self.cfg = HFConfig.from_config(config)
        self.accepts = Accepts(text=True, roles=(TensorRole.TOKEN_DISTRIBUTION,))
        self.model: PreTrainedModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.space: FeatureSpace | None = None
        self.device = torch.device("cpu")
        self.chat = False
        self.num_layers = 0
        self.vocab_size = 0
        self.eos_ids: set[int] = set()
        self.load_seconds = 0.0
        self._speculator: Speculator | None = None
        self._exit_states: list[torch.Tensor] | None = None
        self._relayed_from: int | None = None
        self._lock = asyncio.Lock()
        self._cache_arg = "past_key_values"
        self._keep_logits = False
        self._last_positions = 0
        self._last_passes = 0
        self._last_token_logprobs: list[list[float]] = []
        self._scores: OrderedDict[tuple[tuple[int, ...], tuple[int, ...]], list[float]] = OrderedDict()
        self._score_cache_size = int(self.cfg.score_cache)

    # -- loading ----------------------------------------------------------------------------------
    async def setup(self) -> None:
        await asyncio.to_thread(self.load)

    async def teardown(self) -> None:
        self.model = None

    def load(self) -> TransformersAgent:
        """Load tokenizer and weights (fetching a catalog model first if needed); idempotent."""
        if self.model is not None:
            return self
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from . import catalog

        cfg = self.cfg
        t0 = time.perf_counter()
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        marker: dict[str, Any] = {}
        entry = None
        if cfg.model is not None:
            entry = catalog.get(cfg.model)
            if not entry.is_converted() and not cfg.fetch:
                raise AgentError(f"{entry.name} is not fetched (aiflow models fetch {entry.name})", code="no_model")
            folder = catalog.fetch(entry.name)
            gguf = None
        else:
            p = Path(str(cfg.path)).expanduser()
            if p.is_file():
                folder, gguf = p.parent, p.name
            else:
                folder, gguf = p, cfg.gguf_file
            if not folder.is_dir():
                raise ValueError(f"hf agent path {str(p)!r} does not exist")
        marker = catalog.read_marker(folder) or {}
        self.device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, self.device)
        kw: dict[str, Any] = {"local_files_only": True}
        if gguf:
            kw["gguf_file"] = gguf
        tok = AutoTokenizer.from_pretrained(str(folder), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **kw)
        model.to(self.device)
        model.eval()
        self.tokenizer, self.model = tok, model
        mcfg = model.config
        text_cfg = mcfg.get_text_config() if hasattr(mcfg, "get_text_config") else mcfg
        self.num_layers = int(getattr(text_cfg, "num_hidden_layers", 0) or getattr(text_cfg, "n_layer", 0))
        hidden_size = int(getattr(text_cfg, "hidden_size", 0) or getattr(text_cfg, "n_embd", 0))
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        family = cfg.family or (entry.family if entry else None) or marker.get("family") or mcfg.model_type
        name = cfg.name or (entry.name if entry else None) or marker.get("name") or Path(gguf or folder.name).stem
        tok_name = cfg.tokenizer_name or (entry.family if entry else None) or marker.get("family") or "tok"
        self.space = FeatureSpace(
            family=str(family), model=str(name), hidden_size=hidden_size, tokenizer=tokenizer_id(tok, tok_name)
        )
        has_template = bool(getattr(tok, "chat_template", None))
        default_chat = entry.chat if entry else marker.get("chat", has_template)
        self.chat = bool(cfg.chat if cfg.chat is not None else default_chat)
        if self.chat and not has_template:
            raise ValueError(f"chat=true but the tokenizer of {name} has no chat template")
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if eos is not None else tok.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        # transformers 5.2x renamed ``past_key_values`` to ``cache``; older releases know only the former.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_logits = "logits_to_keep" in params
        roles = [TensorRole.TOKEN_DISTRIBUTION]
        if getattr(text_cfg, "model_type", None) in ("llama", "qwen2", "mistral"):  # exits.SPLITTABLE
            roles.append(TensorRole.HIDDEN_STATE)  # verify_tokens continues from another tier's layer-k states
        self.accepts = Accepts(text=True, spaces=(self.space,), roles=tuple(roles))
        self.load_seconds = time.perf_counter() - t0
        return self

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if self.space is not None:
            out.update(space=str(self.space), chat=self.chat, device=str(self.device), layers=self.num_layers)
        return out

    def _ready(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, FeatureSpace]:
        if self.model is None or self.tokenizer is None or self.space is None:
            self.load()
        assert self.model is not None and self.tokenizer is not None and self.space is not None
        return self.model, self.tokenizer, self.space

    # -- prompts ----------------------------------------------------------------------------------
    def prompt_ids(
        self, text: str, *, system: str | None = None, soft_slot: bool = False
    ) -> tuple[list[int], list[int]]:
        """Token ids of a prompt, split where soft tokens go (the end of the user's text).

        With the chat template the prompt ends with the assistant's turn opening, so answers and
        scored candidates start exactly where the model's own answer would.
        """
        _, tok, _ = self._ready()
        system = self.cfg.system if system is None else system
        if not self.chat:
            before = list(tok(text).input_ids)
            if not before:  # a model needs at least one position to predict from
                if tok.bos_token_id is None:
                    raise AgentError("empty prompt and the tokenizer has no BOS token", code="bad_request")
                before = [int(tok.bos_token_id)]
            return before, []
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": f"{text}\n{_SOFT_SLOT}" if soft_slot else text})
        rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert isinstance(rendered, str)
        head, _, tail = rendered.partition(_SOFT_SLOT) if soft_slot else (rendered, "", "")
        before = list(tok(head, add_special_tokens=False).input_ids)
        after = list(tok(tail, add_special_tokens=False).input_ids) if tail else []
        return before, after

    # -- the decoding loop ------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(
        self,
        prompt: str,
        *,
        system: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        fuse: torch.Tensor | None = None,
        fuse_weight: float = 0.5,
        soft: torch.Tensor | None = None,
        want_distributions: bool = False,
        hidden_layers: tuple[int, ...] = (),
        on_token: Callable[[int, str], None] | None = None,
    ) -> Decoded:
        """Greedy (or seeded sampling) decoding; ``fuse`` mixes a sender's per-step distributions
        ``[steps, vocab]`` into ours, ``soft`` inserts expected embeddings ``[n, hidden]`` after the
        user's text (CIPHER-style soft tokens).

        ``on_token(id, piece)`` is called for every generated token (the end token too) with the
        text it adds to the answer, so the pieces concatenate to ``text``. Text that may still
        change (half a UTF-8 character, whitespace that ``text`` strips, the start of a ``stop``
        string) comes with a later token; only a tokenizer that rewrites text it already decoded
        makes the pieces fall short of ``text`` (they stop growing there)."""
        model, tok, _ = self._ready()
        cfg = self.cfg
        max_new = int(max_new_tokens or cfg.max_new_tokens)
        temp = float(cfg.temperature if temperature is None else temperature)
        gen = torch.Generator(device=self.device).manual_seed(int(cfg.seed if seed is None else seed))
        before, after = self.prompt_ids(prompt, system=system, soft_slot=soft is not None)
        dev = self.device
        want_hidden = bool(hidden_layers)
        if soft is not None:
            emb = model.get_input_embeddings()
            parts = [emb(torch.tensor([before], device=dev))[0], soft.to(dev, emb.weight.dtype)]
            if after:
                parts.append(emb(torch.tensor([after], device=dev))[0])
            inputs: dict[str, Any] = {"inputs_embeds": torch.cat(parts)[None]}
            positions = len(before) + soft.shape[0] + len(after)
        else:
            inputs = {"input_ids": torch.tensor([before + after], device=dev)}
            positions = len(before) + len(after)
        prompt_tokens = positions
        if self._keep_logits:  # only the last position's logits are read: skip the rest of lm_head
            inputs["logits_to_keep"] = 1
        out = model(**inputs, use_cache=True, output_hidden_states=want_hidden)
        passes = 1
        hidden: dict[int, list[torch.Tensor]] = {layer: [] for layer in hidden_layers}
        generated: list[int] = []
        chosen: list[float] = []
        dists: list[torch.Tensor] = []
        stopped_by = "max_new_tokens"
        streamed = ""  # the text passed to on_token so far: always a prefix of the answer
        for step in range(max_new):
            if want_hidden:
                for layer in hidden_layers:
                    hidden[layer].append(out.hidden_states[layer][0].float().cpu())
            own = torch.softmax(out.logits[0, -1].float(), dim=-1)
            probs = own
            if fuse is not None and step < fuse.shape[0]:
                probs = (1.0 - fuse_weight) * own + fuse_weight * fuse[step].to(own.device)
            if temp > 0:
                weights = probs.clamp_min(1e-30).log().div(temp).softmax(-1)
                token = int(torch.multinomial(weights, 1, generator=gen).item())
            else:
                token = int(torch.argmax(probs).item())
            chosen.append(float(probs[token].item()))
            if want_distributions:
                dists.append(own.cpu())
            generated.append(token)
            if token in self.eos_ids:
                stopped_by = "eos"
                break
            if cfg.stop and any(s in tok.decode(generated, skip_special_tokens=True) for s in cfg.stop):
                stopped_by = "stop"
                break
            if step == max_new - 1:
                break
            if on_token is not None:  # not the last token (that one gets the rest, below)
                shown = tok.decode([t for t in generated if t not in self.eos_ids], skip_special_tokens=True)
                held = max((k for s in cfg.stop for k in range(1, len(s)) if shown.endswith(s[:k])), default=0)
                shown = streamed if shown.endswith("\ufffd") else shown[: len(shown) - held].strip()
                piece = shown[len(streamed) :] if shown.startswith(streamed) else ""
                streamed += piece
                on_token(token, piece)
            out = model(
                input_ids=torch.tensor([[token]], device=dev),
                use_cache=True,
                output_hidden_states=want_hidden,
                **{self._cache_arg: _cache_of(out)},
            )
            passes += 1
            positions += 1
        text_ids = [t for t in generated if t not in self.eos_ids]
        text = tok.decode(text_ids, skip_special_tokens=True)
        if cfg.stop:
            cut = min((i for i in (text.find(s) for s in cfg.stop) if i >= 0), default=-1)
            text = text[:cut] if cut >= 0 else text
        if on_token is not None:
            rest = text.strip()
            on_token(generated[-1], rest[len(streamed) :] if rest.startswith(streamed) else "")
        return Decoded(
            token_ids=generated,
            text=text.strip(),
            chosen_probs=chosen,
            distributions=torch.stack(dists) if dists else None,
            hidden={layer: torch.cat(chunks) for layer, chunks in hidden.items()},
            prompt_tokens=prompt_tokens,
            positions=positions,
            forward_passes=passes,
            stopped_by=stopped_by,
        )

    # -- scoring answers: every option of an item in one batched pass over a shared prefix ---------
    def score(self, prompt: str, candidates: list[str], *, system: str | None = None) -> tuple[list[float], list[int]]:
        """Sum log-likelihood of each candidate as the answer to ``prompt`` (same prompt ids as
        ``generate``), so members can cross-score each other's answers in their own tokenizer."""
        _, tok, _ = self._ready()
        before, _ = self.prompt_ids(prompt, system=system)
        cand_ids = [list(tok(str(c), add_special_tokens=False).input_ids) for c in candidates]
        per_token = self.option_logprobs(before, cand_ids)
        return [float(sum(lp)) for lp in per_token], [len(c) for c in cand_ids]

    def mc_ids(self, question: str, options: list[str], meta: dict[str, Any]) -> tuple[list[int], list[list[int]]]:
        """Token ids of a multiple-choice prompt and of each option as its continuation.

        The prompt is plain text, never a chat template: ``[context]\nQuestion: q\n[lettered options]
        \n[other agents' answers]\nAnswer:``, each option scored as `` option``. ``options_order``
        lists the options, lettered, in that order (an option-order-permutation baseline changes
        only this); ``peers`` shows what other agents answered and how sure they were, so an agent
        in a debate or an aggregator in a mixture can revise on reading them.
        """
        _, tok, _ = self._ready()
        lines: list[str] = []
        context = str(meta.get(O.CONTEXT) or "").strip()
        if context:
            lines.append(context)
        lines.append(f"Question: {question.strip()}")
        order = meta.get(O.OPTIONS_ORDER)
        if order is not None:
            if sorted(int(i) for i in order) != list(range(len(options))):
                raise AgentError(f"options_order must permute 0..{len(options) - 1}", code="bad_request")
            lines += [f"{chr(65 + k)}. {options[int(i)]}" for k, i in enumerate(order)]
        peers = meta.get(O.PEERS)
        if isinstance(peers, list) and peers:
            said, mine = [], ""
            for p in peers:
                if not isinstance(p, dict) or p.get(O.ANSWER) is None:
                    continue
                conf = p.get(O.CONFIDENCE)
                sure = f" ({100 * float(conf):.0f}% sure)" if isinstance(conf, (int, float)) else ""
                reason = str(p.get("reason") or "").strip()
                text = f'"{p[O.ANSWER]}"{sure}' + (f" because {reason}" if reason else "")
                if p.get("agent") == self.agent_id:  # a debate round shows an agent its own last answer too
                    mine = text
                else:
                    said.append(text)
            if said:
                lines.append("Other answers: " + "; ".join(said) + ".")
            if mine:
                lines.append(f"Your previous answer: {mine}.")
        lines.append("Answer:")
        ids = list(tok("\n".join(lines)).input_ids)
        if not ids and tok.bos_token_id is not None:
            ids = [int(tok.bos_token_id)]
        return ids, [list(tok(" " + str(o).strip(), add_special_tokens=False).input_ids) for o in options]

    @torch.inference_mode()
    def option_logprobs(
        self, prefix: list[int], options: list[list[int]], *, batched: bool = True
    ) -> list[list[float]]:
        """Log-probability of every token of each option continuing ``prefix``.

        The prefix runs once; its key/value cache is repeated over the batch of options, which run
        together, right-padded (causal attention: padding after a token never changes it). Scores
        are kept per (prefix, option), so the same item asked again by a debate round, a
        cross-scoring pass or a baseline costs no forward pass. ``batched=False`` is the naive
        reference: one full forward per option.
        """
        model, tok, _ = self._ready()
        if not prefix:
            raise AgentError("cannot score after an empty prompt", code="bad_request")
        pkey = tuple(prefix)
        wanted = list(dict.fromkeys(tuple(o) for o in options if o))
        known: dict[tuple[int, ...], list[float]] = {}
        for o in wanted:  # hits first (and marked fresh), so inserting the misses cannot evict them
            hit = self._scores.get((pkey, o))
            if hit is not None:
                self._scores.move_to_end((pkey, o))
                known[o] = hit
        missing = [o for o in wanted if o not in known]
        self._last_positions = self._last_passes = 0
        if missing:
            found = self._forward_options(model, tok, prefix, missing) if batched else None
            if found is None:
                found = self._forward_each(model, prefix, missing)
            for o, lp in zip(missing, found, strict=True):
                known[o] = lp
                if self._score_cache_size > 0:
                    self._scores[(pkey, o)] = lp
                    while len(self._scores) > self._score_cache_size:
                        self._scores.popitem(last=False)
        return [list(known[tuple(o)]) if o else [] for o in options]

    def _forward_options(
        self, model: Any, tok: Any, prefix: list[int], options: list[tuple[int, ...]]
    ) -> list[list[float]] | None:
        dev = self.device
        keep = {"logits_to_keep": 1} if self._keep_logits else {}  # only the last position is read
        first = model(input_ids=torch.tensor([prefix], device=dev), use_cache=True, **keep)
        head = torch.log_softmax(first.logits[0, -1].float(), dim=-1)
        width = max(len(o) for o in options) - 1
        self._last_positions, self._last_passes = len(prefix), 1
        if width == 0:
            return [[float(head[o[0]])] for o in options]
        cache = _cache_of(first)
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):
            return None  # a model without a repeatable cache: score one option at a time
        if len(options) > 1:
            cache.batch_repeat_interleave(len(options))
        pad = tok.pad_token_id if tok.pad_token_id is not None else options[0][0]
        rest = torch.tensor([list(o[:-1]) + [pad] * (width - len(o) + 1) for o in options], device=dev)
        mask = torch.ones(len(options), len(prefix) + width, dtype=torch.long, device=dev)
        nxt = model(input_ids=rest, attention_mask=mask, use_cache=True, **{self._cache_arg: cache})
        logp = torch.log_softmax(nxt.logits.float(), dim=-1)
        self._last_positions += len(options) * width
        self._last_passes += 1
        found = []
        for j, o in enumerate(options):
            tail = [float(logp[j, t - 1, o[t]]) for t in range(1, len(o))]
            found.append([float(head[o[0]]), *tail])
        return found

    def _forward_each(self, model: Any, prefix: list[int], options: list[tuple[int, ...]]) -> list[list[float]]:
        found = []
        for o in options:
            ids = torch.tensor([prefix + list(o)], device=self.device)
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prefix) - 1 : -1].float(), dim=-1)
            found.append([float(logp[t, o[t]]) for t in range(len(o))])
            self._last_positions += ids.shape[1]
            self._last_passes += 1
        return found

    @torch.inference_mode()
    def next_distribution(
        self, prompt: str, prefix: str = "", *, system: str | None = None
    ) -> tuple[torch.Tensor, int]:
        """Probabilities of the next token after ``prompt`` + ``prefix`` (answer so far)."""
        model, tok, _ = self._ready()
        before, _ = self.prompt_ids(prompt, system=system)
        ids = before + (list(tok(prefix, add_special_tokens=False).input_ids) if prefix else [])
        keep = {"logits_to_keep": 1} if self._keep_logits else {}
        logits = model(input_ids=torch.tensor([ids], device=self.device), **keep).logits[0, -1].float()
        return torch.softmax(logits, dim=-1).cpu(), len(ids)

    # -- latents ----------------------------------------------------------------------------------
    def can_fuse(self, part: TensorPart) -> bool:
        """A distribution is mixable only when the sender's vocabulary is ours, id for id."""
        _, _, space = self._ready()
        return (
            part.role == TensorRole.TOKEN_DISTRIBUTION
            and part.space is not None
            and part.space.tokenizer is not None
            and space.tokenizer is not None
            and vocab_signature(part.space.tokenizer) == vocab_signature(space.tokenizer)
        )

    @torch.inference_mode()
    def dense_distribution(self, part: TensorPart) -> torch.Tensor:
        """A received (dense or :func:`protocols.compress.expand`-ed top-k) distribution as
        ``[steps, vocab]`` probabilities over our logits; rows are renormalised, since top-k drops mass."""
        t = part.tensor.float()
        dense = t.reshape(-1, t.shape[-1])
        if dense.shape[1] < self.vocab_size:
            dense = torch.nn.functional.pad(dense, (0, self.vocab_size - dense.shape[1]))
        dense = dense[:, : self.vocab_size]
        dense = dense.clamp_min(0)
        return dense / dense.sum(-1, keepdim=True).clamp_min(1e-12)

    @torch.inference_mode()
    def soft_tokens(self, dists: torch.Tensor) -> torch.Tensor:
        """CIPHER: each step's expected input embedding under the sender's distribution."""
        model, _, _ = self._ready()
        emb = model.get_input_embeddings()
        scale = getattr(emb, "embed_scale", 1.0)  # Gemma scales embeddings inside the module
        weight = emb.weight.float()
        out = dists.to(weight.device) @ weight[: dists.shape[1]]
        return out * (scale.float() if torch.is_tensor(scale) else float(scale))

    def _plan_latents(self, request: Envelope) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """Pick the latents we can consume and apply ``latent_policy`` to the rest."""
        _, _, space = self._ready()
        try:  # top-k and int8 groups restored; an unknown encoding is never used (SPEC §17.4)
            parts = [p for p in C.expand(request.tensors()) if isinstance(p, TensorPart)]
        except C.CompressionError as e:
            raise AgentError(str(e), code=e.code) from None
        if not parts:
            return None, {}
        usable: list[TensorPart] = []
        ignored: list[TensorPart] = []
        refused: list[TensorPart] = []
        for p in parts:  # sorted by identity: comparing parts would compare their tensors
            if self.can_fuse(p):
                usable.append(p)
            elif p.space is not None and p.space.compatible_with(space):
                ignored.append(p)
            else:
                refused.append(p)
        note: dict[str, Any] = {"used": len(usable), "space": str(space)}
        if refused:
            spaces = sorted({str(p.space) if p.space is not None else "<untagged>" for p in refused})
            reason = f"latent from {', '.join(spaces)} is not compatible with {space} (tokenizer differs or untagged)"
            if self.cfg.latent_policy == "error" or not request.text.strip():
                raise AgentError(reason, code="incompatible_latent")
            note.update(refused=len(refused), refused_spaces=spaces, reason=reason)
        if ignored:
            note["ignored"] = [f"{p.role} (not consumed by this agent)" for p in ignored]
        if not usable:
            note["status"] = "fallback" if refused else "ignored"
            return None, note
        try:
            dense = [self.dense_distribution(p) for p in usable]
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise AgentError(f"malformed token distribution: {e}", code="bad_latent") from None
        # several senders: average them step by step (a shorter one stops counting when it ends)
        steps = max(d.shape[0] for d in dense)
        total, count = torch.zeros(steps, self.vocab_size), torch.zeros(steps, 1)
        for d in dense:
            total[: d.shape[0]] += d
            count[: d.shape[0]] += 1
        note["senders"] = len(dense)
        return total / count, note

    # -- ops --------------------------------------------------------------------------------------
    async def handle(self, request: Envelope, ctx: AgentContext) -> Reply:
        try:
            op = O.op_of(request.meta)
        except ValueError:
            raise AgentError(f"unknown op {request.meta.get(O.OP)!r}", code="unsupported_op") from None
        if op != O.Op.GENERATE or request.meta.get("stream") is not True:
            async with self._lock:  # one model, one forward at a time
                return await asyncio.to_thread(self.handle_sync, request, op)
        # meta.stream: each token goes to the requester as a progress event while the rest is decoded
        seq = 0

        def on_token(token: int, piece: str) -> None:  # in the worker thread: never waits on the network
            nonlocal seq
            ctx.progress_threadsafe({"stream": {"seq": seq, "token": token, "text": piece}})
            seq += 1

        streaming = _ON_TOKEN.set(on_token)
        try:
            async with self._lock:
                return await asyncio.to_thread(self.handle_sync, request, op)
        finally:
            _ON_TOKEN.reset(streaming)

    def handle_sync(self, request: Envelope, op: O.Op = O.Op.GENERATE) -> Envelope:
        self._ready()
        t0 = time.perf_counter()
        if op == O.Op.SCORE:
            reply = self._op_score(request)
        elif op == O.Op.CHOOSE:
            reply = self._op_choose(request)
        elif op == O.Op.NEXT:
            reply = self._op_next(request)
        elif op == O.Op.DRAFT:
            reply = self.speculator().draft(request, self.agent_id)
        elif op == O.Op.VERIFY_TOKENS:
            reply = self.speculator().verify(request, self.agent_id)
        else:
            reply = self._op_generate(request)
        reply.meta[O.COST]["seconds"] = round(time.perf_counter() - t0, 4)
        reply.meta.setdefault("agent", self.agent_id)
        reply.meta.setdefault("model", self.space.model if self.space else None)
        return reply

    def speculator(self) -> Speculator:
        """Drafting and verifying (``draft``, ``verify_tokens``), built on first use.

        Splittable families (Llama, Qwen2) can continue from shipped hidden states; with
        ``exit_layer`` the agent drafts from that exit, running only the layers below it."""
        if self._speculator is None:
            from .exits import SPLITTABLE, ExitSet, FamilialLM, load_shipped_exits
            from .speculative import Speculator

            model, tok, space = self._ready()
            familial = None
            if model.config.get_text_config().model_type in SPLITTABLE:
                exits = None
                if self.cfg.exit_layer is not None:
                    exits = ExitSet.load(self.cfg.exits) if self.cfg.exits else load_shipped_exits(str(self.cfg.model))
                    if self.cfg.exit_layer not in exits.layers:
                        raise AgentError(f"no exit at layer {self.cfg.exit_layer} (exits: {list(exits.layers)})")
                familial = FamilialLM(model, exits)
            elif self.cfg.exit_layer is not None:
                raise AgentError(f"{space.model} cannot be split at a layer", code="unsupported_op")

            def ids(text: str) -> list[int]:
                before, after = self.prompt_ids(text)
                return before + after

            self._speculator = Speculator(
                model,
                tok,
                space=space,
                eos_ids=self.eos_ids,
                prompt_ids=ids,
                familial=familial,
                exit_layer=self.cfg.exit_layer,
                sessions=int(self.cfg.sessions),
            )
        return self._speculator

    def _cost(self, positions: int, passes: int, **extra: Any) -> dict[str, Any]:
        cost = O.Cost(model_calls=1, tokens=positions, layers=positions * self.num_layers)
        return {**cost.model_dump(), "forward_passes": passes, **extra}

    def normalise(self, text: str) -> str:
        """``meta.answer``: what votes compare (``answer_pattern``'s group 1 or match, else the text)."""
        pattern = self.cfg.answer_pattern
        if pattern:
            m = re.search(pattern, text, flags=re.S)
            if m:
                return (m.group(1) if m.groups() else m.group(0)).strip()
        return text.strip()

    def _op_generate(self, request: Envelope) -> Envelope:
        _, _, space = self._ready()
        meta = request.meta
        wanted = meta.get(O.RETURN) or []
        wanted = [wanted] if isinstance(wanted, str) else list(wanted)
        bad = [w for w in wanted if w not in RETURN_KINDS]
        if bad:
            raise AgentError(f"cannot return {bad}; choose from {list(RETURN_KINDS)}", code="bad_request")
        layers = self._layers(meta.get("layers"), wanted)
        dists, note = self._plan_latents(request)
        mode = str(meta.get("latent_mode", self.cfg.latent_mode))
        weight = min(1.0, max(0.0, float(meta.get("latent_weight", self.cfg.latent_weight))))
        fuse = dists if dists is not None and mode in ("fuse", "both") else None
        soft = self.soft_tokens(dists) if dists is not None and mode in ("soft", "both") else None
        if dists is not None:
            note.update(status={"fuse": "fused", "soft": "soft", "both": "fused+soft"}[mode], weight=weight)
            note["steps"] = int(dists.shape[0])
        d = self.decode(
            request.text,
            system=meta.get("system"),
            max_new_tokens=meta.get("max_new_tokens"),
            temperature=meta.get("temperature"),
            seed=meta.get("seed"),
            fuse=fuse,
            fuse_weight=weight,
            soft=soft,
            want_distributions="distribution" in wanted,
            hidden_layers=layers,
            on_token=_ON_TOKEN.get(),
        )
        parts: list[TextPart | TensorPart] = [TextPart(text=d.text)]
        if d.distributions is not None:
            parts += self._distribution_parts(d.distributions, meta)
        if "hidden" in wanted:
            for layer in sorted(set(self._layers(meta.get("layers"), ["hidden"]))):
                parts.append(
                    TensorPart(
                        tensor=d.hidden[layer],
                        role=TensorRole.HIDDEN_STATE,
                        space=space.model_copy(update={"layer": layer}),
                        meta={"positions": "prompt+answer", "prompt_tokens": d.prompt_tokens},
                    )
                )
        if "embedding" in wanted:
            pooled = d.hidden[self.num_layers].mean(0)
            parts.append(
                TensorPart(
                    tensor=pooled,
                    role=TensorRole.EMBEDDING,
                    space=space.model_copy(update={"layer": self.num_layers}),
                    meta={"pooling": "mean", "positions": "prompt+answer"},
                )
            )
        out_meta: dict[str, Any] = {
            O.ANSWER: self.normalise(d.text),
            O.CONFIDENCE: d.confidence,
            "min_token_prob": min(d.chosen_probs) if d.chosen_probs else 1.0,
            O.COST: self._cost(
                d.positions,
                d.forward_passes,
                prompt_tokens=d.prompt_tokens,
                new_tokens=len(d.token_ids),
            ),
            "stopped_by": d.stopped_by,
        }
        if note:
            out_meta["latent"] = note
        return request.reply(*parts, sender=self.agent_id, meta=out_meta)

    def _layers(self, requested: Any, wanted: list[str]) -> tuple[int, ...]:
        """Absolute hidden-state indices (0 = embeddings, num_layers = last), negatives from the end."""
        layers: set[int] = set()
        if "hidden" in wanted:
            req = requested if requested is not None else [-1]
            req = [req] if isinstance(req, int) else list(req)
            for layer in req:
                idx = int(layer) + self.num_layers + 1 if int(layer) < 0 else int(layer)
                if not 0 <= idx <= self.num_layers:
                    raise AgentError(f"layer {layer} outside 0..{self.num_layers}", code="bad_request")
                layers.add(idx)
        if "embedding" in wanted:
            layers.add(self.num_layers)
        return tuple(sorted(layers))

    def _distribution_parts(
        self, dists: torch.Tensor, meta: dict[str, Any], *, step: str = "answer"
    ) -> list[TensorPart]:
        """The distribution dense (float32), or with ``top_k`` as a ``topk`` group (SPEC §17)."""
        _, _, space = self._ready()
        k = int(meta.get("top_k", self.cfg.top_k) or 0)
        info: dict[str, Any] = {"steps": step, "vocab_size": int(dists.shape[-1])}
        role = TensorRole.TOKEN_DISTRIBUTION
        if 0 < k < dists.shape[-1]:
            info["mass"] = torch.topk(dists, k, dim=-1).values.sum(-1).tolist()
            return C.pack(dists, C.TOPK, role=role, space=space, meta=info, k=k, fill=0.0)
        return C.pack(dists.float(), "float32", role=role, space=space, meta=info)

    def _op_score(self, request: Envelope) -> Envelope:
        candidates = request.meta.get(O.CANDIDATES)
        if not isinstance(candidates, list) or not candidates:
            raise AgentError("score needs meta.candidates: a non-empty list of answers", code="bad_request")
        cands = [str(c) for c in candidates]
        if request.meta.get(O.MC):  # a multiple-choice item: its prompt, length-normalised scores
            scores, counts = self._mc_scores(request.text, cands, request.meta)
        else:
            scores, counts = self.score(request.text, cands, system=request.meta.get("system"))
        best = max(range(len(scores)), key=lambda i: scores[i])
        probs = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
        meta = {
            O.SCORES: scores,
            O.TOKEN_COUNTS: counts,
            O.ANSWER: self.normalise(cands[best]),
            O.CONFIDENCE: float(probs[best].item()),
            O.COST: self._cost(self._last_positions, self._last_passes, cached=not self._last_passes),
        }
        return request.reply(cands[best], sender=self.agent_id, meta=meta)

    def _mc_scores(
        self, question: str, options: list[str], meta: dict[str, Any], parts: Sequence[Any] = ()
    ) -> tuple[list[float], list[int]]:
        """Mean log-likelihood per token of each option: longer options are not penalised for length.

        The relay: with ``exit_layer`` the agent reads its exit (and keeps the layer's states to
        ship); given another tier's layer-k states of every option it runs only the layers above."""
        prefix, ids = self.mc_ids(question, options, meta)
        self._exit_states = None
        relayed = self._relayed_states(parts, len(options))
        if relayed is not None:
            layer, states = relayed
            fam = self.speculator().familial
            assert fam is not None
            try:
                per_token = fam.continued_option_logprobs(layer, prefix, ids, states)
            except ValueError as e:
                raise AgentError(f"relayed states: {e}", code="bad_request") from None
            self._last_positions = sum(len(prefix) + len(i) for i in ids)
            self._last_passes = len(ids)
            self._relayed_from = layer
        elif self.cfg.exit_layer is not None:
            fam = self.speculator().familial
            assert fam is not None
            per_token, self._exit_states = fam.exit_option_logprobs(self.cfg.exit_layer, prefix, ids)
            self._last_positions = sum(len(prefix) + len(i) for i in ids)
            self._last_passes = len(ids)
        else:
            per_token = self.option_logprobs(prefix, ids)
        self._last_token_logprobs = per_token
        scores = [sum(lp) / len(lp) if lp else -1e9 for lp in per_token]
        return scores, [len(i) for i in ids]

    def _op_choose(self, request: Envelope) -> Envelope:
        """Pick one option of a multiple-choice item (greedy, or sampled with ``temperature``)."""
        meta = request.meta
        options = meta.get(O.CANDIDATES)
        if not isinstance(options, list) or len(options) < 2:
            raise AgentError("choose needs meta.candidates: a list of at least two options", code="bad_request")
        opts = [str(o) for o in options]
        self._relayed_from = None
        scores, counts = self._mc_scores(request.text, opts, meta, request.tensors())
        probs = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
        temp = float(meta.get("temperature", self.cfg.temperature) or 0.0)
        if temp > 0:
            gen = torch.Generator().manual_seed(int(meta.get("seed", self.cfg.seed)))
            tempered = torch.softmax(torch.tensor(scores, dtype=torch.float64) / temp, 0)
            choice = int(torch.multinomial(tempered, 1, generator=gen).item())
        else:
            choice = int(torch.argmax(probs).item())
        out_meta = {
            O.ANSWER: opts[choice],
            O.CONFIDENCE: float(probs[choice]),
            O.CHOICE: choice,
            O.SCORES: scores,
            O.PROBS: [float(p) for p in probs],
            O.TOKEN_COUNTS: counts,
            # per token, so that members sharing this tokenizer can mix their distributions token by token
            O.TOKEN_LOGPROBS: [[round(x, 6) for x in lp] for lp in self._last_token_logprobs],
            O.TOKENIZER: self.space.tokenizer if self.space else None,
            O.COST: self._cost(self._last_positions, self._last_passes, cached=not self._last_passes),
        }
        parts: list[TensorPart] = []
        if self._relayed_from is not None:  # ran only the layers above the relayed ones
            out_meta["relayed_from_layer"] = self._relayed_from
            out_meta[O.COST]["layers"] = self._last_positions * (self.num_layers - self._relayed_from)
        elif self._exit_states is not None and self.cfg.exit_layer is not None:
            out_meta["exit_layer"] = self.cfg.exit_layer
            out_meta[O.COST]["layers"] = self._last_positions * self.cfg.exit_layer
            if not accepts_confidence(request, float(probs[choice])):
                parts = self._pack_states(self._exit_states, str(meta.get("encoding", "float16")))
        return request.reply(opts[choice], *parts, sender=self.agent_id, meta=out_meta)

    def _pack_states(self, states: list[torch.Tensor], encoding: str) -> list[TensorPart]:
        """Every option's layer-k states, for the next stage of a cascade to continue from."""
        assert self.space is not None and self.cfg.exit_layer is not None
        space = self.space.model_copy(update={"layer": self.cfg.exit_layer})
        out: list[TensorPart] = []
        for i, h in enumerate(states):
            part = TensorPart(
                tensor=h.float().contiguous(), role=TensorRole.HIDDEN_STATE, space=space, meta={"option": i}
            )
            packed = C.compress(part, encoding) if encoding != "float32" else [part]
            for q in packed:
                q.meta["option"] = i
            out += packed
        return out

    def _relayed_states(self, parts: Sequence[Any], n: int) -> tuple[int, list[torch.Tensor]] | None:
        """Another tier's layer-k states of every option (one hidden_state part each), or None."""
        if not parts or self.space is None:
            return None
        by_option: dict[int, list[TensorPart]] = {}
        for p in parts:
            if isinstance(p, TensorPart) and isinstance(p.meta.get("option"), int):
                by_option.setdefault(int(p.meta["option"]), []).append(p)
        if not by_option:
            return None
        if sorted(by_option) != list(range(n)):
            raise AgentError(f"relayed states cover options {sorted(by_option)}, not 0..{n - 1}", code="bad_request")
        layer: int | None = None
        states: list[torch.Tensor] = []
        for i in range(n):
            try:
                part = C.decompress(by_option[i])
            except C.CompressionError as e:
                raise AgentError(str(e), code=e.code) from None
            sp = part.space
            if part.role != TensorRole.HIDDEN_STATE or sp is None or sp.layer is None:
                raise AgentError("relayed states must be hidden_state parts with a layer", code="bad_request")
            if not self.space.compatible_with(sp) or sp.model != self.space.model:
                raise AgentError(f"states from {sp} cannot continue in {self.space}", code="incompatible_latent")
            if layer is not None and sp.layer != layer:
                raise AgentError("relayed states from different layers", code="bad_request")
            layer = int(sp.layer)
            states.append(part.tensor.float())
        assert layer is not None
        if not 1 <= layer < self.num_layers:
            raise AgentError(f"layer {layer} outside 1..{self.num_layers - 1}", code="bad_request")
        return layer, states

    def _op_next(self, request: Envelope) -> Envelope:
        _, tok, _ = self._ready()
        prefix = str(request.meta.get(O.PREFIX, "") or "")
        dist, positions = self.next_distribution(request.text, prefix, system=request.meta.get("system"))
        top = torch.topk(dist, min(5, dist.shape[0]))
        top_list = [[tok.decode([int(i)]), int(i), float(v)] for v, i in zip(top.values, top.indices, strict=True)]
        parts = self._distribution_parts(dist, request.meta, step="next")
        meta = {
            "top": top_list,
            O.ANSWER: top_list[0][0],
            O.CONFIDENCE: top_list[0][2],
            O.COST: self._cost(positions, 1, prompt_tokens=positions),
        }
        return request.reply(TextPart(text=top_list[0][0]), *parts, sender=self.agent_id, meta=meta)


__all__ = ["Decoded", "HFConfig", "TransformersAgent", "tokenizer_id"]

"""Early exits for a real decoder LM, and the layer ranges that let one tier continue another's work.

Ruyi's familial idea on a catalog model: the backbone stays frozen; an exit at layer ``k`` is a
residual linear adapter (zero-initialised, so an untrained exit is "final norm + head on layer k")
and its own RMS norm, feeding the model's own output head. Only the exit weights ship (about a
megabyte); the backbone comes from the catalog.

:class:`LayerStack` makes layers ``[lo, hi)`` a model of their own (built from the decoder's
config, weights copied through ``state_dict``, its own KV cache), so a device runs ``[0, k)`` and a
verifier ``[k, L)`` from the shipped layer-``k`` hidden states. In float32 the split is exact: the
same operations run on the same numbers as the whole model.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Decoder families whose base model accepts ``inputs_embeds`` unscaled (so a stack can start at any layer).
SPLITTABLE = ("llama", "qwen2", "mistral")

EXITS_DIR = Path(__file__).with_name("weights")
EXITS_FILE = "exits-{name}.safetensors"


class SplitError(ValueError):
    """The model cannot be split at the asked layers (family, range)."""


def _text_config(model: Any) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def num_layers(model: Any) -> int:
    return int(_text_config(model).num_hidden_layers)


class LayerStack(nn.Module):
    """Decoder layers ``[lo, hi)`` of ``source`` (a causal LM) as a base model of their own.

    Input: token ids when ``lo == 0``, else the hidden states after layer ``lo``. Output: hidden
    states after layer ``hi`` (after the final norm when ``hi`` is the last layer). The cache is
    the stack's own: a device's cache holds its layers, a verifier's the layers above.
    """

    def __init__(self, source: Any, lo: int, hi: int) -> None:
        super().__init__()
        from transformers import AutoModel

        cfg = copy.deepcopy(_text_config(source))
        total = int(cfg.num_hidden_layers)
        if cfg.model_type not in SPLITTABLE:
            raise SplitError(f"cannot split a {cfg.model_type!r} model (splittable: {', '.join(SPLITTABLE)})")
        if not 0 <= lo < hi <= total:
            raise SplitError(f"layer range [{lo}, {hi}) is not inside 0..{total}")
        self.lo, self.hi, self.total = lo, hi, total
        cfg.num_hidden_layers = hi - lo
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = list(cfg.layer_types)[lo:hi]
        if getattr(cfg, "max_window_layers", None) is not None:
            cfg.max_window_layers = max(0, int(cfg.max_window_layers) - lo)
        base = source.get_decoder() if hasattr(source, "get_decoder") else source.model
        dtype = next(base.parameters()).dtype
        self.base = AutoModel.from_config(cfg, dtype=dtype)
        state = {}
        for key, value in base.state_dict().items():
            if key.startswith("layers."):
                idx, rest = key[len("layers.") :].split(".", 1)
                if lo <= int(idx) < hi:
                    state[f"layers.{int(idx) - lo}.{rest}"] = value
            elif key.startswith("norm.") and hi == total:
                state[key] = value
        missing, unexpected = self.base.load_state_dict(state, strict=False)
        wanted = [k for k in missing if not k.startswith(("embed_tokens.", "norm."))]
        if wanted or unexpected:
            raise SplitError(f"layer weights did not match: missing {wanted[:3]}, unexpected {unexpected[:3]}")
        if lo == 0:
            self.base.set_input_embeddings(base.get_input_embeddings())
        else:  # inputs are hidden states: no embedding table to hold
            self.base.set_input_embeddings(nn.Embedding(1, cfg.hidden_size))
        if hi < total:
            self.base.norm = nn.Identity()
        self.base.to(next(base.parameters()).device).eval()
        self.base.requires_grad_(False)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, Any]:
        """Run the stack on new positions; ``cache`` (None for a fresh one) holds the earlier ones."""
        kw: dict[str, Any] = {"cache": cache, "use_cache": True}
        if self.lo == 0:
            out = self.base(input_ids=x, **kw)
        else:
            out = self.base(inputs_embeds=x, **kw)
        return out.last_hidden_state, out.past_key_values


class ExitHead(nn.Module):
    """An exit: ``norm(h + A h)``; ``A`` starts at zero, the norm from the model's final norm."""

    def __init__(self, hidden: int, eps: float = 1e-5, norm_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.adapter = nn.Linear(hidden, hidden, bias=False)
        nn.init.zeros_(self.adapter.weight)
        self.norm = nn.Parameter(
            norm_weight.detach().clone().float() if norm_weight is not None else torch.ones(hidden)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = (h + self.adapter(h)).float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.norm).to(h.dtype)


@dataclass
class ExitSet:
    """The exits of one catalog model: which layers, their heads, and what training measured."""

    model: str
    layers: tuple[int, ...]
    heads: nn.ModuleList
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fresh(cls, source: Any, model: str, layers: Sequence[int]) -> ExitSet:
        cfg = _text_config(source)
        total = int(cfg.num_hidden_layers)
        layers = tuple(sorted(int(k) for k in layers))
        if not layers or layers[0] < 1 or layers[-1] >= total:
            raise SplitError(f"exit layers must lie in 1..{total - 1}")
        base = source.get_decoder() if hasattr(source, "get_decoder") else source.model
        norm_w = getattr(getattr(base, "norm", None), "weight", None)
        eps = float(getattr(cfg, "rms_norm_eps", 1e-5))
        heads = nn.ModuleList(ExitHead(int(cfg.hidden_size), eps, norm_w) for _ in layers)
        return cls(model=model, layers=layers, heads=heads)

    def head(self, layer: int) -> ExitHead:
        if layer not in self.layers:
            raise SplitError(f"no exit at layer {layer} (exits: {list(self.layers)})")
        return self.heads[self.layers.index(layer)]  # type: ignore[return-value]

    def save(self, path: Path | str) -> Path:
        """Weights as float16 safetensors (the card's numbers go in its metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {}
        for k, h in zip(self.layers, self.heads, strict=True):
            tensors[f"exit{k}.adapter"] = h.adapter.weight.detach().to(torch.float16).contiguous()
            tensors[f"exit{k}.norm"] = h.norm.detach().to(torch.float16).contiguous()
        meta = {"model": self.model, "layers": json.dumps(list(self.layers)), "info": json.dumps(self.info)}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: Path | str, *, eps: float = 1e-5) -> ExitSet:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            layers = tuple(int(k) for k in json.loads(meta["layers"]))
            heads = nn.ModuleList()
            for k in layers:
                adapter = f.get_tensor(f"exit{k}.adapter").float()
                h = ExitHead(adapter.shape[0], eps, f.get_tensor(f"exit{k}.norm"))
                with torch.no_grad():
                    h.adapter.weight.copy_(adapter)
                heads.append(h)
        heads.requires_grad_(False)
        return cls(model=meta["model"], layers=layers, heads=heads, info=json.loads(meta.get("info", "{}")))


def shipped_exits_path(model: str) -> Path:
    return EXITS_DIR / EXITS_FILE.format(name=model)


def load_shipped_exits(model: str) -> ExitSet:
    path = shipped_exits_path(model)
    if not path.is_file():
        raise FileNotFoundError(f"no shipped exits for {model!r} (train them: aiflow train exits --model {model})")
    return ExitSet.load(path)


class FamilialLM:
    """A catalog LM with early exits: the parts each tier runs.

    ``lower(k)`` (device: ids → layer-k states), ``upper(k)`` (verifier: layer-k states → final
    states), ``exit_logits(k, h)`` and ``final_logits(h)``; stacks are built once per range.
    """

    def __init__(self, model: Any, exits: ExitSet | None) -> None:
        self.model = model
        self.exits = exits
        self.total = num_layers(model)
        self.head = model.get_output_embeddings()
        self._stacks: dict[tuple[int, int], LayerStack] = {}
        if exits is not None:
            exits.heads.to(next(model.parameters()).device)

    def stack(self, lo: int, hi: int) -> LayerStack:
        key = (lo, hi)
        if key not in self._stacks:
            self._stacks[key] = LayerStack(self.model, lo, hi)
        return self._stacks[key]

    def lower(self, k: int) -> LayerStack:
        return self.stack(0, k)

    def upper(self, k: int) -> LayerStack:
        return self.stack(k, self.total)

    @torch.inference_mode()
    def exit_logits(self, k: int, h: torch.Tensor) -> torch.Tensor:
        if k == self.total:
            return self.head(h).float()
        if self.exits is None:
            raise SplitError("this model has no exits loaded")
        return self.head(self.exits.head(k)(h)).float()

    @torch.inference_mode()
    def final_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h).float()

    @torch.inference_mode()
    def exit_option_logprobs(
        self, k: int, prefix: list[int], options: Sequence[list[int]]
    ) -> tuple[list[list[float]], list[torch.Tensor]]:
        """Per option, the log-probability of each of its tokens read from the exit after layer
        ``k``, and the layer-``k`` states of all its positions (what a relay ships)."""
        per: list[list[float]] = []
        states: list[torch.Tensor] = []
        for opt in options:
            ids = torch.tensor([prefix + list(opt)])
            h, _ = self.lower(k)(ids)
            states.append(h[0])
            per.append(self._span_logprobs(self.exit_logits(k, h[0, len(prefix) - 1 : -1]), opt) if opt else [])
        return per, states

    @torch.inference_mode()
    def continued_option_logprobs(
        self, k: int, prefix: list[int], options: Sequence[list[int]], states: Sequence[torch.Tensor]
    ) -> list[list[float]]:
        """The same numbers from the final layer, continuing from shipped layer-``k`` states."""
        per: list[list[float]] = []
        for opt, h in zip(options, states, strict=True):
            if h.ndim != 2 or h.shape[0] != len(prefix) + len(opt):
                raise SplitError(f"states of shape {tuple(h.shape)} for {len(prefix) + len(opt)} positions")
            f, _ = self.upper(k)(h[None].float())
            per.append(self._span_logprobs(self.final_logits(f[0, len(prefix) - 1 : -1]), opt) if opt else [])
        return per

    @staticmethod
    def _span_logprobs(logits: torch.Tensor, opt: Sequence[int]) -> list[float]:
        lp = torch.log_softmax(logits.float(), -1)
        return lp.gather(-1, torch.tensor(list(opt))[:, None])[:, 0].tolist()


# -- training by self-distillation ------------------------------------------------------------

#: Openers for the self-generated corpus: the model writes the rest (no external text is read).
OPENERS = (
    "Question:",
    "The",
    "In",
    "Explain why",
    "Here is a short story about",
    "def ",
    "Scientists have found that",
    "A recipe for",
    "The history of",
    "How does",
    "Once upon a time",
    "import ",
    "The main difference between",
    "Dear",
    "Step 1:",
    "Q: What is",
)
TOPICS = (
    "photosynthesis",
    "the water cycle",
    "volcanoes",
    "electric circuits",
    "the solar system",
    "gravity",
    "cells",
    "weather",
    "magnets",
    "plants",
    "animals",
    "rocks and minerals",
    "energy",
    "sound",
    "light",
    "the human body",
    "ecosystems",
    "chemistry",
    "fractions",
    "sorting a list",
    "a robot",
    "the ocean",
    "a small town",
    "friendship",
    "computers",
    "bridges",
    "rainforests",
)


def corpus_prompts(tokenizer: Any, n: int, seed: int) -> list[list[int]]:
    """Varied short prompts: plain openers and chat-template questions about everyday science."""
    g = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    for i in range(n):
        a = int(torch.randint(len(OPENERS), (1,), generator=g))
        b = int(torch.randint(len(TOPICS), (1,), generator=g))
        if has_chat and i % 2 == 1:
            msg = [{"role": "user", "content": f"{OPENERS[a].rstrip(':')} {TOPICS[b]}?"}]
            ids = tokenizer.apply_chat_template(msg, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = tokenizer(f"{OPENERS[a]} {TOPICS[b]}", add_special_tokens=True).input_ids
        out.append([int(t) for t in ids])
    return out


@torch.inference_mode()
def generate_corpus(
    model: Any,
    tokenizer: Any,
    *,
    sequences: int,
    length: int,
    seed: int,
    batch: int = 32,
    log: Callable[[str], None] = print,
) -> list[list[int]]:
    """Text the model itself writes (sampled, temperature 0.8), prompt included; left-padded batches."""
    prompts = corpus_prompts(tokenizer, sequences, seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    out: list[list[int]] = []
    t0 = time.perf_counter()
    for s in range(0, sequences, batch):
        chunk = prompts[s : s + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=0.8,
            top_p=0.95,
            max_new_tokens=length,
            min_new_tokens=length,
            pad_token_id=pad,
        )
        for row, p in zip(gen.tolist(), chunk, strict=True):
            out.append(p + row[width:])
        log(f"  generated {len(out)}/{sequences} sequences ({time.perf_counter() - t0:.0f} s)")
    return out


@dataclass
class Distilled:
    """Hidden states at the exit layers and the full model's top-k next-token distribution."""

    hidden: dict[int, torch.Tensor]  # layer -> [N, H]
    top_ids: torch.Tensor  # [N, K]
    top_logp: torch.Tensor  # [N, K], log-probs of the full model
    final_argmax: torch.Tensor  # [N]
    targets: torch.Tensor  # [N] the next token of the text (for perplexity)
    final_nll: torch.Tensor  # [N] the full model's negative log-likelihood of ``targets``


@torch.inference_mode()
def collect(
    model: Any, seqs: Sequence[list[int]], layers: Sequence[int], *, topk: int = 64, skip: int = 0
) -> Distilled:
    """One forward per sequence of the full model, keeping what training and evaluation need.

    ``skip`` drops the first positions (the prompt) from what is kept."""
    hidden: dict[int, list[torch.Tensor]] = {k: [] for k in layers}
    ids_l, logp_l, arg_l, tgt_l, nll_l = [], [], [], [], []
    for seq in seqs:
        x = torch.tensor([seq])
        out = model(input_ids=x, output_hidden_states=True)
        logp = torch.log_softmax(out.logits[0, :-1].float(), -1)
        keep = slice(skip, None)
        for k in layers:
            hidden[k].append(out.hidden_states[k][0, :-1][keep].float())
        v, i = logp.topk(topk, -1)
        ids_l.append(i[keep])
        logp_l.append(v[keep])
        arg_l.append(i[keep, 0])
        tgt_l.append(x[0, 1:][keep])
        nll_l.append(-logp.gather(-1, x[0, 1:, None])[keep, 0])
    return Distilled(
        hidden={k: torch.cat(v) for k, v in hidden.items()},
        top_ids=torch.cat(ids_l),
        top_logp=torch.cat(logp_l),
        final_argmax=torch.cat(arg_l),
        targets=torch.cat(tgt_l),
        final_nll=torch.cat(nll_l),
    )


def distill_loss(logits: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the exit against the full model's top-k distribution (renormalised)."""
    logp = torch.log_softmax(logits.float(), -1)
    teacher = torch.softmax(top_logp, -1)
    return -(teacher * logp.gather(-1, top_ids)).sum(-1).mean()


def train_exits(
    exits: ExitSet,
    head: nn.Module,
    data: Distilled,
    *,
    steps: int,
    batch: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """AdamW with cosine decay on the exits only; the backbone and the output head stay frozen."""
    g = torch.Generator().manual_seed(seed)
    params = [p for h in exits.heads for p in h.parameters()]
    for p in params:
        p.requires_grad_(True)
    head.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    n = data.top_ids.shape[0]
    t0 = time.perf_counter()
    losses: list[float] = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
        idx = torch.randint(n, (batch,), generator=g)
        loss = torch.zeros(())
        for k, h in zip(exits.layers, exits.heads, strict=True):
            loss = loss + distill_loss(head(h(data.hidden[k][idx])), data.top_ids[idx], data.top_logp[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()) / len(exits.layers))
        if step % 50 == 0 or step == steps - 1:
            log(f"  step {step + 1}/{steps}: loss {losses[-1]:.3f} ({time.perf_counter() - t0:.0f} s)")
    for p in params:
        p.requires_grad_(False)
    return {
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "seconds": round(time.perf_counter() - t0, 1),
        "final_loss": losses[-1],
    }


@torch.inference_mode()
def exit_quality(exits: ExitSet, head: nn.Module, data: Distilled) -> dict[str, Any]:
    """Per exit: top-1 agreement with the full model's next token, and perplexity of the text
    (the full model's own perplexity under ``"final"``)."""
    out: dict[str, Any] = {
        "final": {
            "agreement": 1.0,
            "perplexity": math.exp(float(data.final_nll.mean())),
            "tokens": int(data.final_nll.shape[0]),
        }
    }
    for k in exits.layers:
        h = data.hidden[k]
        agree, nll, count = 0, 0.0, 0
        for s in range(0, h.shape[0], 1024):
            x = h[s : s + 1024]
            z = head(exits.head(k)(x)).float()
            logp = torch.log_softmax(z, -1)
            agree += int((z.argmax(-1) == data.final_argmax[s : s + 1024]).sum())
            nll += float(-logp.gather(-1, data.targets[s : s + 1024, None]).sum())
            count += x.shape[0]
        out[str(k)] = {"agreement": agree / count, "perplexity": math.exp(nll / count), "tokens": count}
    return out


def crop_cache(cache: Any, keep: int) -> None:
    """Drop cached positions beyond ``keep`` (a negative count means "remove" in every release)."""
    have = int(cache.get_seq_length())
    if have > keep:
        cache.crop(keep - have)


# -- benchmark accuracy of each exit ------------------------------------------------------------


def mc_item_ids(tokenizer: Any, item: Any) -> tuple[list[int], list[list[int]]]:
    """A benchmark item's prompt ids and each option's ids, rendered as the ``choose`` op does
    closed book (``[context]\nQuestion: q\nAnswer:``, each option as `` option``)."""
    lines = [item.context.strip()] if getattr(item, "context", "") else []
    lines += [f"Question: {item.question.strip()}", "Answer:"]
    prefix = list(tokenizer("\n".join(lines)).input_ids)
    opts = [list(tokenizer(" " + str(o).strip(), add_special_tokens=False).input_ids) or [0] for o in item.options]
    return prefix, opts


@torch.inference_mode()
def exit_accuracy(
    model: Any, tokenizer: Any, exits: ExitSet, items: Sequence[Any], *, log: Callable[[str], None] = print
) -> dict[str, float]:
    """Multiple-choice accuracy of every exit and the full model, options scored as in the ``choose``
    op (mean log-likelihood per token of `` option`` after ``Question: …\\nAnswer:``). One forward
    per option serves every exit."""
    total = num_layers(model)
    head = model.get_output_embeddings()
    names = [*map(str, exits.layers), "final"]
    right = dict.fromkeys(names, 0)
    for n, item in enumerate(items):
        prefix, opts = mc_item_ids(tokenizer, item)
        scores: dict[str, list[float]] = {k: [] for k in names}
        for opt in opts:
            x = torch.tensor([prefix + opt])
            out = model(input_ids=x, output_hidden_states=True)
            span = slice(len(prefix) - 1, x.shape[1] - 1)
            target = x[0, len(prefix) :, None]
            for k, name in zip([*exits.layers, total], names, strict=True):
                if k == total:
                    z = out.logits[0, span].float()
                else:
                    z = head(exits.head(k)(out.hidden_states[k][0, span])).float()
                scores[name].append(float(torch.log_softmax(z, -1).gather(-1, target).mean()))
        for name in names:
            right[name] += int(max(range(len(item.options)), key=lambda i: scores[name][i]) == item.answer)
        if (n + 1) % 40 == 0:
            log(f"    {n + 1}/{len(items)} items")
    return {name: right[name] / max(1, len(items)) for name in names}


# -- the whole recipe ---------------------------------------------------------------------------


@dataclass
class ExitRecipe:
    """Everything that decides the shipped exits (``aiflow train exits`` defaults)."""

    model: str = "smollm2-135m"
    layers: tuple[int, ...] = (10, 20)
    sequences: int = 256
    heldout: int = 48
    length: int = 96
    steps: int = 400
    batch: int = 256
    lr: float = 2e-3
    seed: int = 0
    bench_items: int = 120
    benchmarks: tuple[str, ...] = ("arc-easy", "arc-challenge", "sciq")


def load_catalog_lm(name: str, *, threads: int | None = None) -> tuple[Any, Any]:
    """A catalog model and its tokenizer in float32 on the CPU (fetched once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import catalog

    if threads:
        torch.set_num_threads(threads)
    folder = catalog.fetch(name)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    model.eval()
    model.requires_grad_(False)
    return model, tok


def build_exits(recipe: ExitRecipe, *, log: Callable[[str], None] = print) -> tuple[ExitSet, dict[str, Any]]:
    """Generate text with the model, distil its final layer into the exits, measure them."""
    from . import benchmarks as B

    t_all = time.perf_counter()
    torch.manual_seed(recipe.seed)
    model, tok = load_catalog_lm(recipe.model)
    log(f"{recipe.model}: {num_layers(model)} layers; exits after layers {list(recipe.layers)}")
    t0 = time.perf_counter()
    log("writing the training text (the model's own samples)")
    train_seqs = generate_corpus(
        model, tok, sequences=recipe.sequences, length=recipe.length, seed=recipe.seed, log=log
    )
    held_seqs = generate_corpus(
        model, tok, sequences=recipe.heldout, length=recipe.length, seed=recipe.seed + 1000, log=log
    )
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    train = collect(model, train_seqs, recipe.layers)
    held = collect(model, held_seqs, recipe.layers)
    collect_s = time.perf_counter() - t0
    head = model.get_output_embeddings()
    exits = ExitSet.fresh(model, recipe.model, recipe.layers)
    before = exit_quality(exits, head, held)
    log(f"untrained exits (final norm + head): {json.dumps(before)}")
    fit = train_exits(
        exits, head, train, steps=recipe.steps, batch=recipe.batch, lr=recipe.lr, seed=recipe.seed, log=log
    )
    after = exit_quality(exits, head, held)
    log(f"trained exits: {json.dumps(after)}")
    bench: dict[str, Any] = {}
    for name in recipe.benchmarks:
        items = B.load_benchmark(name, fetch=True)
        items = items[len(B.tuning_slice(items)) :][: recipe.bench_items]
        log(f"  {name}: {len(items)} items")
        bench[name] = {"items": len(items), "accuracy": exit_accuracy(model, tok, exits, items, log=log)}
    info = {
        "recipe": {k: (list(v) if isinstance(v, tuple) else v) for k, v in recipe.__dict__.items()},
        "train_tokens": int(train.targets.shape[0]),
        "heldout_tokens": int(held.targets.shape[0]),
        "untrained": before,
        "trained": after,
        "benchmarks": bench,
        "cost_seconds": {
            "generate_text": round(gen_s, 1),
            "collect_states": round(collect_s, 1),
            "train": fit["seconds"],
            "total": round(time.perf_counter() - t_all, 1),
        },
        "fit": fit,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    exits.info = info
    return exits, info


def _relay_lines(relay: dict[str, Any] | None) -> list[str]:
    if not relay:
        return []
    lines = [
        f"## The relay ({relay['benchmark']}): answer from the exit, or ship the layer's states",
        "",
        "The device scores the options from its exit and answers when its top option's probability reaches",
        "the threshold; otherwise the cloud runs the layers above on the shipped hidden states of every",
        "position (prompt and option). Float32 states give the full model's answers exactly.",
        "",
        "| exit | encoding | bytes per token | cloud accuracy (all relayed) | threshold | on device "
        "| accuracy | bytes per item |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, r in relay.items():
        if k == "benchmark":
            continue
        for enc, bpt in r["bytes_per_token"].items():
            for pol in r["policies"]:
                lines.append(
                    f"| {k} | {enc} | {bpt:.0f} | {100 * r['cloud_accuracy'][enc]:.1f}% | {pol['threshold']} | "
                    f"{100 * pol['answered_on_device']:.0f}% | {100 * pol[f'accuracy_{enc}']:.1f}% | "
                    f"{pol[f'bytes_per_item_{enc}'] / 1e3:.1f} kB |"
                )
        agree = r.get("int8_agrees_with_float32")
        if agree is not None:
            lines.append("")
            lines.append(
                f"Exit {k}: the device alone scores {100 * r['device_accuracy']:.1f}%; int8 relays choose "
                f"the same option as float32 on {100 * agree:.1f}% of items."
            )
        lines.append("")
    return lines


def write_exit_card(path: Path, exits: ExitSet, weights: Path) -> Path:
    """The model card next to the weights: what the exits are, how good, what they cost."""
    info = exits.info
    r = info["recipe"]
    layers = [str(k) for k in exits.layers]
    total = info.get("total_layers", "?")
    lines = [
        f"# Early exits for {exits.model}",
        "",
        f"Exits after layers {', '.join(layers)} of {total}: each is a residual linear adapter (zero-initialised)",
        "and its own RMS norm, feeding the model's own (tied) output head. The backbone is the catalog model,",
        f"unchanged; only these weights ship (`{weights.name}`, {weights.stat().st_size / 1e6:.2f} MB, float16).",
        "",
        "## Training (self-distillation, no external text)",
        "",
        f"- Text: {r['sequences']} sequences of {r['length']} tokens the model sampled itself (temperature 0.8,",
        f"  top-p 0.95) after short openers or chat questions; {info['train_tokens']:,} training positions.",
        f"- Target: the full model's next-token distribution (top 64, renormalised); loss = cross-entropy, "
        f"{r['steps']} AdamW steps of {r['batch']} positions, lr {r['lr']} cosine, seed {r['seed']}.",
        f"- Cost on {info['threads']} CPU threads: text {info['cost_seconds']['generate_text']} s, states "
        f"{info['cost_seconds']['collect_states']} s, training {info['cost_seconds']['train']} s; "
        f"total {info['cost_seconds']['total']} s.",
        "",
        f"## Quality on held-out generated text ({info['heldout_tokens']:,} positions)",
        "",
        "| exit | agreement with the full model's next token | perplexity "
        "| untrained agreement | untrained perplexity |",
        "|---|---|---|---|---|",
    ]
    for k in layers:
        a, b = info["trained"][k], info["untrained"][k]
        lines.append(
            f"| layer {k} | {100 * a['agreement']:.1f}% | {a['perplexity']:.1f} | "
            f"{100 * b['agreement']:.1f}% | {b['perplexity']:.1f} |"
        )
    lines.append(f"| final (layer {total}) | 100% | {info['trained']['final']['perplexity']:.1f} | | |")
    lines += [
        "",
        "## Multiple-choice accuracy (options by mean log-likelihood per token, as the `choose` op)",
        "",
        "| benchmark | items | " + " | ".join(f"exit {k}" for k in layers) + " | final |",
        "|---|---|" + "---|" * (len(layers) + 1),
    ]
    for name, b in info["benchmarks"].items():
        acc = b["accuracy"]
        cells = " | ".join(f"{100 * acc[k]:.1f}%" for k in [*layers, "final"])
        lines.append(f"| {name} | {b['items']} | {cells} |")
    lines += [
        "",
        "Items follow the 50-item tuning slice of the real-LM evaluation, as there.",
        "",
    ]
    lines += _relay_lines(info.get("relay"))
    lines += [
        "## Reproduce",
        "",
        "```bash",
        f"aiflow train exits --model {exits.model} --layers {','.join(layers)} --steps {r['steps']} --seed {r['seed']}",
        "```",
        "",
        "Sampling on another machine or torch build can change the text and so the numbers slightly.",
        "",
    ]
    path.write_text("\n".join(lines))
    return path


# -- the relay: the device answers from its exit or ships its layer-k states ---------------------


def _wire(h: torch.Tensor, encoding: str) -> tuple[torch.Tensor, int]:
    """``h`` as the receiving tier sees it after ``encoding`` on the wire, and the bytes it took."""
    from protocols import TensorPart, TensorRole, compress, decompress

    part = TensorPart(tensor=h.float().contiguous(), role=TensorRole.HIDDEN_STATE)
    parts = [part] if encoding == "float32" else compress(part, encoding)
    return decompress(parts).tensor.float(), sum(p.nbytes for p in parts)


@torch.inference_mode()
def relay_quality(
    fam: FamilialLM,
    tokenizer: Any,
    items: Sequence[Any],
    *,
    layer: int,
    thresholds: Sequence[float],
    encodings: Sequence[str] = ("float32", "float16", "int8-rowwise"),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Multiple choice with the relay: the device scores the options from its exit after ``layer``
    and answers when its top option's probability reaches a threshold; otherwise the cloud runs
    the layers above ``layer`` on the shipped states of every position (per encoding)."""
    rows: list[dict[str, Any]] = []
    for n, item in enumerate(items):
        prefix, opts = mc_item_ids(tokenizer, item)
        per, states = fam.exit_option_logprobs(layer, prefix, opts)
        device = [sum(lp) / len(lp) for lp in per]
        cloud: dict[str, list[float]] = {}
        nbytes: dict[str, int] = {}
        for enc in encodings:
            wired = [_wire(h, enc) for h in states]
            nbytes[enc] = sum(size for _, size in wired)
            per_c = fam.continued_option_logprobs(layer, prefix, opts, [h for h, _ in wired])
            cloud[enc] = [sum(lp) / len(lp) for lp in per_c]
        positions = sum(h.shape[0] for h in states)
        probs = torch.softmax(torch.tensor(device), 0)
        rows.append(
            {
                "answer": item.answer,
                "device": int(probs.argmax()),
                "confidence": float(probs.max()),
                "cloud": {e: int(torch.tensor(s).argmax()) for e, s in cloud.items()},
                "bytes": nbytes,
                "positions": positions,
            }
        )
        if (n + 1) % 40 == 0:
            log(f"    relay {n + 1}/{len(items)} items")
    out: dict[str, Any] = {"items": len(rows), "layer": layer, "policies": []}
    total_pos = sum(r["positions"] for r in rows)
    out["bytes_per_token"] = {e: sum(r["bytes"][e] for r in rows) / total_pos for e in encodings}
    out["cloud_accuracy"] = {e: sum(r["cloud"][e] == r["answer"] for r in rows) / len(rows) for e in encodings}
    out["device_accuracy"] = sum(r["device"] == r["answer"] for r in rows) / len(rows)
    out["int8_agrees_with_float32"] = (
        sum(r["cloud"]["int8-rowwise"] == r["cloud"]["float32"] for r in rows) / len(rows)
        if "int8-rowwise" in encodings and "float32" in encodings
        else None
    )
    for t in thresholds:
        local = [r["confidence"] >= t for r in rows]
        pol: dict[str, Any] = {"threshold": t, "answered_on_device": sum(local) / len(rows)}
        for e in encodings:
            right = sum(
                (r["device"] if keep else r["cloud"][e]) == r["answer"] for r, keep in zip(rows, local, strict=True)
            )
            pol[f"accuracy_{e}"] = right / len(rows)
            pol[f"bytes_per_item_{e}"] = sum(
                r["bytes"][e] for r, keep in zip(rows, local, strict=True) if not keep
            ) / len(rows)
        out["policies"].append(pol)
    return out


def report_relay(
    weights: Path, *, bench_items: int = 120, benchmark: str = "arc-easy", log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Measure the relay with the exits in ``weights`` and add it to their card and JSON."""
    from . import benchmarks as B

    exits = ExitSet.load(weights)
    model, tok = load_catalog_lm(exits.model)
    fam = FamilialLM(model, exits)
    items = B.load_benchmark(benchmark, fetch=True)
    items = items[len(B.tuning_slice(items)) :][:bench_items]
    relay: dict[str, Any] = {"benchmark": benchmark}
    for k in exits.layers:
        log(f"relay from layer {k} on {benchmark} ({len(items)} items)")
        relay[str(k)] = relay_quality(fam, tok, items, layer=k, thresholds=(0.4, 0.5, 0.6, 0.8), log=log)
    exits.info["relay"] = relay
    exits.info.setdefault("total_layers", fam.total)
    exits.save(weights)
    write_exit_card(weights.with_suffix("").with_suffix(".md"), exits, weights)
    weights.with_suffix("").with_suffix(".json").write_text(json.dumps(exits.info, indent=1) + "\n")
    return relay

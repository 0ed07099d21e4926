"""The familial model: one early-exit transformer whose exits are a device, an edge and a cloud model.

Design (reference: TeleAI's Ruyi "familial" models): a shared trunk of pre-LN causal transformer
blocks; after trunk layer ``k`` of each exit sits that exit's branch (optionally one extra block),
a LayerNorm and an LM head. All exits are trained jointly (weighted sum of their losses), so the
trunk's features at every exit depth are aligned and a deeper exit can *continue* from a shallower
exit's trunk state: :meth:`FamilialModel.continue_from` runs trunk layers ``k+1..K`` on hidden
states received from elsewhere, which is what relays between device, edge and cloud agents.

Decoding is parallel over a fixed-width answer (see :mod:`aiflow_agents.models.tasks` for the layout):
the input is the padded prompt, ``=``, and ``ANSWER_WIDTH - 1`` slot tokens ``_``; the positions
from ``=`` on predict the answer digits (lowest first) in one forward pass. One pass over
prompt + slots yields the whole answer, so the layer-k hidden states of all positions are all a
deeper exit needs: relay is exact with no KV cache and no recomputation of the trunk.

Pure torch; weights ship as float16 safetensors under ``aiflow_agents/models/weights``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from protocols import compression as C

from .tasks import ANSWER_WIDTH, PROMPT_WIDTH, answer_from_target, model_input, model_target

#: Tokenizer id carried in every feature space: members with the same id share token ids.
TOKENIZER = "aiflow-arith-char-v1"
#: Family id of the shipped models (exits and peers share the tokenizer and output layout).
FAMILY = "aiflow-familial-arith"
PAD, SLOT = " ", "_"
ALPHABET = PAD + "0123456789+-*=" + SLOT
DIGITS = "0123456789"
#: Largest digit significance with its own embedding (units = 1); wider numbers share the last.
MAX_SIGNIFICANCE = 8
WEIGHTS_DIR = Path(__file__).parent / "weights"


class CharTokenizer:
    """One token per character of a fixed alphabet (so ids never depend on training data)."""

    def __init__(self, alphabet: str = ALPHABET, name: str = TOKENIZER) -> None:
        self.alphabet = alphabet
        self.name = name
        self.stoi = {c: i for i, c in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the tokenizer alphabet {self.alphabet!r}") from None

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        return "".join(self.alphabet[int(i)] for i in ids)

    @property
    def digit_ids(self) -> list[int]:
        return [self.stoi[c] for c in DIGITS]


TOKENIZER_OBJ = CharTokenizer()


@dataclass
class FamilialConfig:
    """Architecture and identity of one model (a family, or a peer with its own exits)."""

    name: str = "familial"
    family: str = FAMILY
    tokenizer: str = TOKENIZER
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 6
    #: Trunk depth (number of trunk layers run) at each exit, shallowest first.
    exits: tuple[int, ...] = (2, 4, 6)
    exit_names: tuple[str, ...] = ("device", "edge", "cloud")
    #: Extra transformer blocks in each exit's branch (between the trunk and its head).
    branch_layers: int = 0
    d_ff: int = 0  # 0: 4 * d_model
    prompt_width: int = PROMPT_WIDTH
    answer_width: int = ANSWER_WIDTH
    #: "parallel": answer slots are ``_`` tokens (one pass); "ar": teacher-forced previous digits.
    mode: str = "parallel"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.exits = tuple(int(e) for e in self.exits)
        self.exit_names = tuple(self.exit_names)
        if list(self.exits) != sorted(set(self.exits)) or not 1 <= self.exits[0] or self.exits[-1] > self.n_layers:
            raise ValueError(f"exits must be increasing depths in 1..{self.n_layers}: {self.exits}")
        if len(self.exit_names) != len(self.exits):
            raise ValueError("one name per exit")
        if self.d_model % self.n_heads:
            raise ValueError("d_model must be a multiple of n_heads")

    @property
    def seq_len(self) -> int:
        return self.prompt_width + self.answer_width  # prompt, "=", answer_width - 1 slots

    @property
    def ff(self) -> int:
        return self.d_ff or 4 * self.d_model

    def exit_index(self, exit: int | str) -> int:
        """Index of an exit given by index, name (``"edge"``) or depth-name (``"L4"``)."""
        if isinstance(exit, int):
            if not -len(self.exits) <= exit < len(self.exits):
                raise ValueError(f"exit index {exit} out of range for {len(self.exits)} exits")
            return exit % len(self.exits)
        if exit in self.exit_names:
            return self.exit_names.index(exit)
        if exit.lstrip("-").isdigit():
            return self.exit_index(int(exit))
        raise ValueError(f"unknown exit {exit!r}; exits are {list(self.exit_names)}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FamilialConfig:
        return cls(**json.loads(text))


class Block(nn.Module):
    """Pre-LN causal self-attention + GELU MLP."""

    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ff)
        self.fc2 = nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ExitHead(nn.Module):
    """An exit's own branch: optional blocks, a LayerNorm and an LM head."""

    def __init__(self, cfg: FamilialConfig, vocab: int) -> None:
        super().__init__()
        self.branch = nn.ModuleList(Block(cfg.d_model, cfg.n_heads, cfg.ff) for _ in range(cfg.branch_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for blk in self.branch:
            h = blk(h)
        return self.head(self.norm(h))


@dataclass
class Decoded:
    """Greedy answers of one exit for a batch, with what a cascade needs to decide."""

    answers: list[str]  # plain values ("2427")
    targets: list[str]  # model-order digits ("724200")
    confidence: torch.Tensor  # (B,) min over answer digits of the top probability
    probs: torch.Tensor  # (B, W, 10) digit distributions per answer position
    hidden: torch.Tensor  # (B, T, D) trunk state at the exit's depth (what a relay would ship)


class FamilialModel(nn.Module):
    def __init__(self, cfg: FamilialConfig, tokenizer: CharTokenizer = TOKENIZER_OBJ) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = tokenizer
        d = cfg.d_model
        self.tok_emb = nn.Embedding(tokenizer.vocab_size, d)
        self.pos_emb = nn.Parameter(torch.zeros(cfg.seq_len, d))
        self.sig_emb = nn.Embedding(MAX_SIGNIFICANCE + 1, d)
        self.trunk = nn.ModuleList(Block(d, cfg.n_heads, cfg.ff) for _ in range(cfg.n_layers))
        self.heads = nn.ModuleList(ExitHead(cfg, tokenizer.vocab_size) for _ in cfg.exits)
        self.apply(self._init)
        # Unit-scale token and significance embeddings, small positions: digit identity and
        # significance dominate the first attention scores, which shortens the initial plateau
        # (pilot: ~200 instead of ~450 steps on 3-digit addition).
        nn.init.normal_(self.tok_emb.weight, std=1.0)
        nn.init.normal_(self.sig_emb.weight, std=1.0)
        nn.init.normal_(self.pos_emb, std=0.02)
        for blk in self.modules():
            if isinstance(blk, Block):  # GPT-2 style: residual projections scaled by depth
                std = 0.02 / math.sqrt(2 * cfg.n_layers)
                nn.init.normal_(blk.proj.weight, std=std)
                nn.init.normal_(blk.fc2.weight, std=std)
        digits = torch.tensor(tokenizer.digit_ids)
        if digits.tolist() != list(range(digits[0], digits[0] + 10)):
            raise ValueError("the tokenizer must give the digits consecutive ids")
        self._digit_lo, self._digit_hi = int(digits[0]), int(digits[-1])
        self.register_buffer("digit_ids", digits, persistent=False)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    # -- identity ---------------------------------------------------------------------------
    @property
    def n_exits(self) -> int:
        return len(self.cfg.exits)

    def depth(self, exit: int | str) -> int:
        return self.cfg.exits[self.cfg.exit_index(exit)]

    def num_parameters(self, exit: int | str | None = None) -> int:
        """Parameters used to answer at ``exit`` (None: the whole model)."""
        if exit is None:
            return sum(p.numel() for p in self.parameters())
        i = self.cfg.exit_index(exit)
        n = self.tok_emb.weight.numel() + self.pos_emb.numel()
        n += sum(p.numel() for blk in self.trunk[: self.cfg.exits[i]] for p in blk.parameters())
        return n + sum(p.numel() for p in self.heads[i].parameters())

    # -- encoding ---------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], answers: list[str] | None = None) -> torch.Tensor:
        """Token ids (B, T): padded prompt, ``=``, then slots (parallel) or the teacher-forced
        answer digits (ar; needs ``answers``)."""
        w = self.cfg.answer_width
        rows = []
        for i, p in enumerate(prompts):
            text = model_input(p)
            if self.cfg.mode == "ar":
                if answers is None:
                    raise ValueError("ar mode needs answers (or prefixes) to build the input")
                text += model_target(answers[i])[: w - 1]
            else:
                text += SLOT * (w - 1)
            rows.append(self.tok.encode(text))
        return torch.tensor(rows, dtype=torch.long)

    def targets(self, answers: list[str]) -> torch.Tensor:
        """Target digit ids (B, W) in model order."""
        return torch.tensor([self.tok.encode(model_target(a)) for a in answers], dtype=torch.long)

    # -- forward pieces ---------------------------------------------------------------------
    def significance(self, ids: torch.Tensor) -> torch.Tensor:
        """Per position, which power of ten its digit stands for (1 = units; 0 = not a digit).

        Prompt digits count from the right end of their number; answer position ``j`` (from
        ``=`` on) predicts digit ``j``. Sharing this index between operands and answer makes
        "find the digits of the same significance" a trivial attention lookup (the idea of
        Abacus embeddings, McLeish et al. 2024): without it the model plateaus for a long time.
        """
        b, t = ids.shape
        p = self.cfg.prompt_width  # positions before "="
        is_digit = (ids >= self._digit_lo) & (ids <= self._digit_hi)
        sig = torch.zeros_like(ids)
        run = torch.zeros(b, dtype=ids.dtype, device=ids.device)
        for i in range(min(p, t) - 1, -1, -1):
            run = torch.where(is_digit[:, i], run + 1, torch.zeros_like(run))
            sig[:, i] = run
        if t > p:
            sig[:, p:] = torch.arange(1, t - p + 1, device=ids.device)
        return sig.clamp_(max=MAX_SIGNIFICANCE)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok_emb(ids) + self.pos_emb[: ids.shape[1]] + self.sig_emb(self.significance(ids))

    def run_trunk(self, h: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Trunk layers ``start+1..end`` applied to the state after layer ``start``."""
        if not 0 <= start <= end <= self.cfg.n_layers:
            raise ValueError(f"bad trunk range {start}..{end} (model has {self.cfg.n_layers} layers)")
        for blk in self.trunk[start:end]:
            h = blk(h)
        return h

    def hidden_at(self, ids: torch.Tensor, layer: int) -> torch.Tensor:
        """Trunk state after ``layer`` layers (0: embeddings), all positions: what a relay ships."""
        return self.run_trunk(self.embed(ids), 0, layer)

    def exit_logits(self, hidden: torch.Tensor, exit: int | str) -> torch.Tensor:
        """Answer-position logits (B, W, V) of ``exit`` from the trunk state at its depth."""
        i = self.cfg.exit_index(exit)
        w = self.cfg.answer_width
        return self.heads[i](hidden)[:, -w:, :]

    def continue_from(self, hidden: torch.Tensor, layer: int, exit: int | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Run trunk layers ``layer+1..depth(exit)`` on received hidden states (no trunk
        recomputation) and return ``(logits at the answer positions, trunk state at the exit)``."""
        depth = self.depth(exit)
        if layer > depth:
            raise ValueError(f"hidden states from layer {layer} are deeper than exit {exit!r} (depth {depth})")
        h = self.run_trunk(hidden.to(self.pos_emb.dtype), layer, depth)
        return self.exit_logits(h, exit), h

    def forward(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Answer-position logits of every exit, trunk computed once (training and evaluation)."""
        h = self.embed(ids)
        out, layer = [], 0
        for i, depth in enumerate(self.cfg.exits):
            h = self.run_trunk(h, layer, depth)
            layer = depth
            out.append(self.exit_logits(h, i))
        return out

    # -- answers ----------------------------------------------------------------------------
    def digit_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Distribution over the ten digits at each answer position (B, W, 10)."""
        return torch.softmax(logits.float().index_select(-1, self.digit_ids), dim=-1)

    def decode_logits(self, logits: torch.Tensor, hidden: torch.Tensor) -> Decoded:
        probs = self.digit_probs(logits)
        top, idx = probs.max(dim=-1)
        targets = ["".join(DIGITS[int(j)] for j in row) for row in idx]
        return Decoded(
            answers=[answer_from_target(t) for t in targets],
            targets=targets,
            confidence=top.min(dim=-1).values,
            probs=probs,
            hidden=hidden,
        )

    @torch.no_grad()
    def generate(self, prompts: list[str], exit: int | str = -1) -> Decoded:
        """Greedy answers at ``exit`` (one forward pass in parallel mode; ``W`` in ar mode)."""
        depth = self.depth(exit)
        if self.cfg.mode == "parallel":
            h = self.hidden_at(self.encode_prompts(prompts), depth)
            return self.decode_logits(self.exit_logits(h, exit), h)
        prefixes = [""] * len(prompts)
        for j in range(self.cfg.answer_width):
            ids = self._ar_ids(prompts, prefixes)
            h = self.hidden_at(ids, depth)
            logits = self.exit_logits(h, exit)
            nxt = self.digit_probs(logits)[:, j].argmax(-1)
            prefixes = [p + DIGITS[int(d)] for p, d in zip(prefixes, nxt, strict=True)]
        return self.decode_logits(self._ar_logits(prompts, prefixes, exit)[0], h)

    def _ar_ids(self, prompts: list[str], prefixes: list[str]) -> torch.Tensor:
        w = self.cfg.answer_width
        rows = [
            self.tok.encode(model_input(p) + (pre + "0" * w)[: w - 1]) for p, pre in zip(prompts, prefixes, strict=True)
        ]
        return torch.tensor(rows, dtype=torch.long)

    def _ar_logits(self, prompts: list[str], targets: list[str], exit: int | str) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hidden_at(self._ar_ids(prompts, targets), self.depth(exit))
        return self.exit_logits(h, exit), h

    @torch.no_grad()
    def score(self, prompt: str, candidates: list[str], exit: int | str = -1) -> list[float]:
        """Log-likelihood of each candidate answer (sum over its fixed-width digits; -inf when
        the candidate is not a value this model can write)."""
        ok = [_fits(c, self.cfg.answer_width) for c in candidates]
        valid = [str(int(c.strip())) for c, good in zip(candidates, ok, strict=True) if good]
        if not valid:
            return [float("-inf")] * len(candidates)
        if self.cfg.mode == "parallel":
            h = self.hidden_at(self.encode_prompts([prompt]), self.depth(exit))
            logp = torch.log(self.digit_probs(self.exit_logits(h, exit))[0].clamp_min(1e-30))  # (W, 10)
            per = [float(sum(logp[j, int(ch)] for j, ch in enumerate(model_target(v)))) for v in valid]
        else:
            targets = [model_target(v) for v in valid]
            logits, _ = self._ar_logits([prompt] * len(valid), targets, exit)
            logp = torch.log(self.digit_probs(logits).clamp_min(1e-30))
            per = [float(sum(logp[i, j, int(ch)] for j, ch in enumerate(t))) for i, t in enumerate(targets)]
        it = iter(per)
        return [next(it) if good else float("-inf") for good in ok]

    @torch.no_grad()
    def next_distribution(self, prompt: str, prefix: str = "", exit: int | str = -1) -> torch.Tensor:
        """Distribution over the whole vocabulary for the answer token after ``prefix`` (model
        order, lowest digit first). Non-digit tokens get probability 0. In parallel mode the
        digits are predicted independently given the prompt, so the prefix only picks the position
        (its length); step-by-step averaging across members still works position by position."""
        w = self.cfg.answer_width
        if len(prefix) >= w or any(c not in DIGITS for c in prefix):
            raise ValueError(f"prefix must be at most {w - 1} digits (lowest first): {prefix!r}")
        if self.cfg.mode == "parallel":
            h = self.hidden_at(self.encode_prompts([prompt]), self.depth(exit))
            probs = self.digit_probs(self.exit_logits(h, exit))[0, len(prefix)]
        else:
            logits, _ = self._ar_logits([prompt], [prefix], exit)
            probs = self.digit_probs(logits)[0, len(prefix)]
        out = torch.zeros(self.tok.vocab_size)
        out[self.digit_ids] = probs
        return out


def _fits(candidate: str, width: int) -> bool:
    c = candidate.strip()
    return c.isdigit() and int(c) < 10**width


# -- wire encodings (protocols.compress, SPEC §17) -------------------------------------------
def latent_nbytes(hidden: torch.Tensor, encoding: str) -> int:
    """Bytes of tensor data one hop carries for ``hidden`` in ``encoding``."""
    return C.wire_bytes(C.pack(hidden, encoding))


@dataclass
class RelayOutcome:
    """In-process simulation of a device -> edge -> cloud relay for a batch (what the agents do
    over the bus, item by item)."""

    answers: list[str]
    confidence: list[float]
    answered_by: list[int]  # exit index that answered each item
    latent_bytes: list[list[int]]  # bytes sent per hop, per item
    exit_answers: list[list[str]]  # answers of every exit that ran, per item
    exit_confidence: list[list[float]]  # confidence of every exit that ran, per item


@torch.no_grad()
def relay(
    model: FamilialModel,
    prompts: list[str],
    thresholds: list[float] | tuple[float, ...],
    encoding: str = "float16",
    exits: list[int] | None = None,
) -> RelayOutcome:
    """Each exit answers when its confidence reaches its threshold, else ships its trunk state
    (encoded as on the wire) to the next exit, which continues from that layer. The last exit
    always answers; ``thresholds`` has one value per exit but the last."""
    chain = exits if exits is not None else list(range(model.n_exits))
    if len(thresholds) < len(chain) - 1:
        raise ValueError(f"one threshold per exit but the last: got {len(thresholds)} for {len(chain)} exits")
    n = len(prompts)
    answers, conf, by = [""] * n, [0.0] * n, [chain[-1]] * n
    sent: list[list[int]] = [[] for _ in range(n)]
    seen: list[list[str]] = [[] for _ in range(n)]
    seen_conf: list[list[float]] = [[] for _ in range(n)]
    pending = list(range(n))
    h = model.embed(model.encode_prompts(prompts))
    layer = 0
    for step, ex in enumerate(chain):
        if not pending:
            break
        logits, h_ex = model.continue_from(h[pending] if step else h, layer, ex)
        dec = model.decode_logits(logits, h_ex)
        last = step == len(chain) - 1
        keep, fwd = [], []
        for j, i in enumerate(pending):
            seen[i].append(dec.answers[j])
            c = float(dec.confidence[j])
            seen_conf[i].append(c)
            if last or c >= thresholds[step]:
                answers[i], conf[i], by[i] = dec.answers[j], c, ex
            else:
                keep.append(j)
                fwd.append(i)
        if fwd:
            wire = h_ex[keep]
            per_item = latent_nbytes(wire[:1], encoding)
            for i in fwd:
                sent[i].append(per_item)
            h_next = torch.zeros(n, *wire.shape[1:])
            h_next[fwd] = C.decompress(C.pack(wire, encoding)).tensor.float()
            h = h_next
        pending, layer = fwd, model.depth(ex)
    return RelayOutcome(
        answers=answers,
        confidence=conf,
        answered_by=by,
        latent_bytes=sent,
        exit_answers=seen,
        exit_confidence=seen_conf,
    )


# -- persistence ----------------------------------------------------------------------------
def save_model(model: FamilialModel, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """float16 safetensors with the config (and anything in ``metadata``) in the header."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"config": model.cfg.to_json(), **(metadata or {})})
    path.chmod(0o644)  # shipped as package data: readable by everyone
    return path


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> FamilialModel:
    """A model saved by :func:`save_model`, in eval mode (float32 by default: float16 weights
    widen exactly, so every machine computes the same function)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path} has no familial config in its metadata")
    model = FamilialModel(FamilialConfig.from_json(meta["config"]))
    state = {k: v.to(dtype) for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    return model.to(dtype).eval()


_SHIPPED: dict[str, FamilialModel] = {}


def shipped_thresholds() -> dict[str, float]:
    """Relay thresholds per exit name tuned for the shipped family (weights/metrics.json); empty
    when no metrics ship."""
    path = WEIGHTS_DIR / "metrics.json"
    if not path.exists():
        return {}
    metrics = json.loads(path.read_text())
    names = metrics["models"]["familial"]["config"]["exit_names"]
    return dict(zip(names, metrics["tuned"]["thresholds"], strict=False))


def shipped_names() -> list[str]:
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.safetensors"))


def load_shipped(name: str = "familial") -> FamilialModel:
    """A shipped model by name (``familial``, ``peer-a``, ...), loaded once per process."""
    if name not in _SHIPPED:
        path = WEIGHTS_DIR / f"{name}.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"no shipped model {name!r}; shipped: {shipped_names() or 'none'}")
        _SHIPPED[name] = load_model(path)
    return _SHIPPED[name]

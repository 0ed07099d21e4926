"""Multiple-choice scoring: one batched pass over a shared prefix vs one full forward per option.

For each catalog model and ARC-Easy item (options scored after ``Question: …\\nAnswer:``, as
``aiflow eval --bench`` does) it times both ways, alternating which goes first, with the agent's
score cache cleared each time, and checks that both give the same log-likelihoods. It reports
the median seconds per item of each and their same-run ratio.

    python bench/bench_mc_scoring.py [--models smollm2-135m,qwen2.5-coder-0.5b] [--items 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch

from aiflow_agents.models.benchmarks import load_benchmark
from aiflow_agents.models.hf import TransformersAgent


def run(model: str, items: int, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    agent = TransformersAgent(model.replace(".", "_"), model=model, chat=False).load()
    data = load_benchmark("arc-easy")[:items]
    batched: list[float] = []
    naive: list[float] = []
    worst = 0.0
    tokens = []
    for j, it in enumerate(data):
        prefix, options = agent.mc_ids(it.question, list(it.options), {})
        tokens.append(len(prefix) + sum(len(o) for o in options))
        results = {}
        for way in ("batched", "naive") if j % 2 == 0 else ("naive", "batched"):
            agent._scores.clear()
            t0 = time.perf_counter()
            results[way] = agent.option_logprobs(prefix, options, batched=way == "batched")
            (batched if way == "batched" else naive).append(time.perf_counter() - t0)
        for a, b in zip(results["batched"], results["naive"], strict=True):
            worst = max(worst, max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0))
    med_b, med_n = statistics.median(batched), statistics.median(naive)
    return {
        "model": model,
        "items": len(data),
        "threads": threads,
        "tokens_per_item_mean": statistics.fmean(tokens),
        "batched_s_median": med_b,
        "naive_s_median": med_n,
        "speedup_median": med_n / med_b,
        "speedup_total": sum(naive) / sum(batched),
        "max_abs_logprob_diff": worst,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    ap.add_argument("--items", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = [run(m, args.items, args.threads) for m in args.models.split(",") if m]
    for r in rows:
        print(
            f"{r['model']:>22}: batched {1e3 * r['batched_s_median']:.0f} ms/item, one forward per option "
            f"{1e3 * r['naive_s_median']:.0f} ms/item -> {r['speedup_median']:.2f}x (median), "
            f"{r['speedup_total']:.2f}x (total); max |Δ log p| {r['max_abs_logprob_diff']:.2g}",
            file=sys.stderr,
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"results": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

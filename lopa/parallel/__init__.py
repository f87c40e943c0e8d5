"""LoPA-Dist: branch parallelism across processes on torch.distributed (docs/algorithm.md §4, docs/dist.md).

The only package that imports ``torch.distributed``. Modules: ``process_group`` (process group from torchrun's
environment), ``monitor`` (heartbeats, naming a dead or stuck rank), ``comm`` (collectives with a deadline),
``runner`` (:class:`BranchParallelRunner`, the single-device runner's interface), ``replicated_llm``
(:func:`join_mesh`, the one way into a mesh, and rank 0's facade), ``replay`` (the request channel and the
workers' loop), ``launch`` (``lopa generate --bp N`` / ``--branch-parallel`` and
:class:`BranchParallelGroup`), ``rank`` (entry point of a launched rank), ``faults`` (failure injection).
"""

from __future__ import annotations

from lopa.parallel.launch import BranchParallelGroup, generate_bp
from lopa.parallel.replicated_llm import BranchParallelLLM, join_mesh
from lopa.parallel.runner import BranchParallelRunner

__all__ = ["BranchParallelGroup", "BranchParallelLLM", "BranchParallelRunner", "generate_bp", "join_mesh"]

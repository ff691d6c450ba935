"""How much memory a study's workers need, and which memory tier they use.

Torch-free on purpose: the API plans a study from file headers before anything is
loaded (``import service`` must not import torch), and each worker re-plans with its own
resources at start. The merge engine (``workers.tensor_merge``) reads its chunk size
from here, so the plan and the engine agree on the workspace.
"""

from __future__ import annotations

# Elements per chunk when a method merges a tensor piece by piece in float32
# (workers.tensor_merge): each float32 scratch buffer of a chunked merge is this big.
CHUNK_ELEMENTS = 1 << 18

# Methods whose output at each entry depends only on the inputs at that entry and on
# per-tensor statistics (a trimming threshold, an L1 norm): merged in chunks, so their
# workspace is a few chunks, not a few copies of the largest tensor.
CHUNKED_METHODS = frozenset({
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "passthrough",
})

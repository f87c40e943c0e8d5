"""Dream's vanilla diffusion sampling: the whole answer is masked from the start, every step is a full-sequence
forward without cache, and exactly one position is filled: the most confident by the chosen order
(``maskgit_plus`` = p(chosen), ``topk_margin`` = top1 − top2, ``entropy`` = negative entropy).
"""

from __future__ import annotations

from torch import Tensor

from lopa.decoding.confidence import Prediction, rank


def select_one(pred: Prediction) -> Tensor:
    """Index (scalar tensor) of the position to fill; ties go to the lower position."""
    return rank(pred.conf)[0]

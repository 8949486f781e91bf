"""What DeepSpeed ZeRO-3 leaves of a parameter, read in one place.

Under ZeRO-3 a parameter's own tensor is empty between gathers: its full shape and size are `ds_shape` and
`ds_numel`, and this rank's flat partition is `ds_tensor`. Every other parameter is its own tensor; these helpers
give the same answers for both.
"""

from __future__ import annotations

import torch


def full_shape(p: torch.Tensor) -> torch.Size:
    """The parameter's shape, partitioned or not."""
    return getattr(p, "ds_shape", p.shape)


def full_numel(p: torch.Tensor) -> int:
    """The parameter's number of elements, partitioned or not."""
    return getattr(p, "ds_numel", None) or p.numel()


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """What this process holds of the parameter: its ZeRO-3 partition, or the tensor itself."""
    return getattr(p, "ds_tensor", p)

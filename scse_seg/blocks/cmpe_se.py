"""CMPE-SE, competitive inner-imaging squeeze and excitation (Hu, Zhang, Wang, Wang; arXiv
1807.08920, 2018), the three variants of the paper and the authors' code.

Inside a residual block both the residual branch ``r`` and the identity ``x`` are squeezed by
global average pooling; the two channel vectors compete for the channel weights ``s`` that
rescale the residual branch: ``out = r * s + x``. They differ in how the two vectors meet:

* ``cmpe_se1`` (double FC): FC-reduce each vector (C -> C/r, ReLU, no bias), concatenate, FC back
  to C, sigmoid.
* ``cmpe_se2`` (pair view, "inner imaging"): stack the vectors into a 1 x C x 2 image; C/r convs
  of size 1x2 (``pair_kernel=2``, default) or 1x1 (``pair_kernel=1``) with BN, averaged over the
  maps, flattened, then the SE excitation (FC C/r, ReLU, FC C, sigmoid; no biases).
* ``cmpe_se3`` (folded inner imaging): the 1 x C x 2 image is folded into a 2k x C/k image (k
  groups of C/k channels, each followed by its identity partner), C/r 3x3 convs with BN, averaged,
  flattened, excitation as in 2. ``fold`` = k defaults to the divisor of C that makes the image
  most square. We pad the 3x3 conv by 1 (the authors' code does not), so that any C works.

The paper's reduction is 16; models pass their ``reduction`` setting. These are registered as
attentions with ``inside_residual = True``: use them through ``create_block("residual", ...,
recalibration="cmpe_se1")`` (``--block residual --attn cmpe_se1``).
"""
from __future__ import annotations

import torch
from torch import nn

from .nd import check_dim, spatial_dims
from .registry import register_attention
from .se import _hidden


class _CompetitiveSE(nn.Module):
    inside_residual = True
    accepted_kwargs = ("reduction",)

    def __init__(self, channels: int, dim: int = 2, reduction: float = 16):
        super().__init__()
        self.channels, self.dim = channels, check_dim(dim)
        self.dims = spatial_dims(dim)
        self.hidden = _hidden(channels, reduction)

    def gate(self, z_res: torch.Tensor, z_id: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, residual: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        """The recalibrated residual branch ``residual * s`` (the block adds the identity)."""
        s = self.gate(residual.mean(dim=self.dims), identity.mean(dim=self.dims))
        return residual * s.view(*s.shape, *([1] * self.dim))


def _excitation(in_features: int, hidden: int, channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden, bias=False), nn.ReLU(inplace=True),
                         nn.Linear(hidden, channels, bias=False), nn.Sigmoid())


@register_attention("cmpe_se1")
class CompetitiveSEDoubleFC(_CompetitiveSE):
    def __init__(self, channels: int, dim: int = 2, reduction: float = 16):
        super().__init__(channels, dim, reduction)
        self.fc_res = nn.Linear(channels, self.hidden, bias=False)
        self.fc_id = nn.Linear(channels, self.hidden, bias=False)
        self.fc = nn.Linear(2 * self.hidden, channels, bias=False)

    def gate(self, z_res, z_id):
        both = torch.cat([torch.relu(self.fc_res(z_res)), torch.relu(self.fc_id(z_id))], dim=1)
        return torch.sigmoid(self.fc(both))


@register_attention("cmpe_se2")
class CompetitiveSEPairView(_CompetitiveSE):
    accepted_kwargs = ("reduction", "pair_kernel")

    def __init__(self, channels: int, dim: int = 2, reduction: float = 16, pair_kernel: int = 2):
        super().__init__(channels, dim, reduction)
        if pair_kernel not in (1, 2):
            raise ValueError(f"pair_kernel must be 2 (1x2 pair convs) or 1 (1x1), got {pair_kernel}")
        self.maps = nn.Sequential(nn.Conv2d(1, self.hidden, (1, pair_kernel), bias=False),
                                  nn.BatchNorm2d(self.hidden))
        self.excite = _excitation(channels * (3 - pair_kernel), self.hidden, channels)

    def gate(self, z_res, z_id):
        image = torch.stack([z_res, z_id], dim=-1).unsqueeze(1)  # N x 1 x C x 2
        return self.excite(self.maps(image).mean(dim=1).flatten(1))


def _most_square_fold(channels: int) -> int:
    return min((k for k in range(1, channels + 1) if channels % k == 0),
               key=lambda k: (abs(2 * k - channels // k), k))


@register_attention("cmpe_se3")
class CompetitiveSEFolded(_CompetitiveSE):
    accepted_kwargs = ("reduction", "fold")

    def __init__(self, channels: int, dim: int = 2, reduction: float = 16, fold: int | None = None):
        super().__init__(channels, dim, reduction)
        self.fold = _most_square_fold(channels) if fold is None else fold
        if channels % self.fold:
            raise ValueError(f"fold must divide the channels ({channels}), got {self.fold}")
        self.maps = nn.Sequential(nn.Conv2d(1, self.hidden, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(self.hidden))
        self.excite = _excitation(2 * channels, self.hidden, channels)

    def inner_image(self, z_res, z_id):
        """N x C x 2 pairs -> N x 1 x 2k x C/k: row 2g holds residual channels g*C/k..(g+1)*C/k-1,
        row 2g+1 their identity partners (the authors' WRNFoldReimageLayer)."""
        n, k = z_res.shape[0], self.fold
        pairs = torch.stack([z_res, z_id], dim=-1)  # N x C x 2
        return pairs.view(n, k, self.channels // k, 2).transpose(2, 3).reshape(n, 1, 2 * k, -1)

    def gate(self, z_res, z_id):
        return self.excite(self.maps(self.inner_image(z_res, z_id)).mean(dim=1).flatten(1))

    def extra_repr(self) -> str:
        return f"fold={self.fold}"

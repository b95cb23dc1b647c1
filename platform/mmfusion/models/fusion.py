"""Fusion operators: `dict[modality, (B, D_m)]` embeddings + a `(B, M)` bool presence mask -> `(B, out_dim)`.

    ConcatFusion     concatenate -> Linear -> ReLU (the classifier MLP head follows)
    AttentionFusion  a fusion token attends over one token per modality (a Transformer block)
    GatedFusion      gated multimodal unit (GMU, Arevalo et al. 2017), generalized to M modalities
    TensorFusion     outer product of [z_m; 1] over modalities (TFN, Zadeh et al. 2017)
    LowRankFusion    low-rank factorized tensor fusion (LMF, Liu et al. 2018)
    LateFusion       one classifier per modality, logits averaged over the present modalities

Missing modalities. Mask columns follow `in_dims`' order (InputSpec.modalities). Every operator makes a
missing modality's embedding irrelevant, exactly: concat, tensor and low-rank fusion substitute a learned
placeholder vector for it; gated fusion gives it zero gate weight; attention fusion masks its token out;
late fusion leaves its logits out of the average. A row with no modality at all is not valid
input (modality dropout never produces one); it still yields finite output.

Each operator exposes `out_dim`; `emits_logits` is True only for late fusion, whose output is the logits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mmfusion.errors import ConfigError
from mmfusion.models.encoders.text import TransformerBlock


class MlpHead(nn.Module):
    """Linear -> ReLU -> Dropout -> Linear: `(B, in_dim) -> (B, num_classes)`."""

    def __init__(self, in_dim: int, hidden: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(hidden, num_classes))
        self.out_dim = num_classes

    def forward(self, x: Tensor) -> Tensor:  # (B, in_dim) -> (B, num_classes)
        return self.net(x)


class Fusion(nn.Module):
    """Base class: remembers the modality order (= mask columns) and offers placeholder substitution."""

    emits_logits = False

    def __init__(self, in_dims: dict[str, int], out_dim: int) -> None:
        super().__init__()
        if not in_dims:
            raise ConfigError("fusion needs at least one modality")
        self.modalities = tuple(in_dims)
        self.in_dims = dict(in_dims)
        self.out_dim = out_dim
        self.placeholders: nn.ParameterDict | None = None

    def add_placeholders(self) -> None:
        """Learned stand-ins for missing modalities (none when there is only one modality: it is never
        missing)."""
        if len(self.modalities) > 1:
            self.placeholders = nn.ParameterDict(
                {m: nn.Parameter(torch.randn(d) * 0.02) for m, d in self.in_dims.items()})

    def filled(self, feats: dict[str, Tensor], present: Tensor) -> list[Tensor]:
        """Per modality (in order) its embedding where present, else its placeholder: list of (B, D_m)."""
        out = []
        for i, m in enumerate(self.modalities):
            x = feats[m]
            if self.placeholders is not None:
                x = torch.where(present[:, i : i + 1], x, self.placeholders[m].to(x.dtype))
            out.append(x)
        return out

    def forward(self, feats: dict[str, Tensor], present: Tensor) -> Tensor:  # -> (B, out_dim)
        raise NotImplementedError  # each operator defines it


def _valid_rows(present: Tensor) -> Tensor:
    """(B, M) mask with rows that have no modality at all treated as all-present (keeps softmaxes defined)."""
    return present | ~present.any(dim=1, keepdim=True)


class ConcatFusion(Fusion):
    """`[x_1; ...; x_M]` (placeholders for missing) -> Linear -> ReLU -> Dropout: `(B, out_dim)`."""

    def __init__(self, in_dims: dict[str, int], out_dim: int = 128, dropout: float = 0.1) -> None:
        super().__init__(in_dims, out_dim)
        self.add_placeholders()
        self.proj = nn.Sequential(nn.Linear(sum(in_dims.values()), out_dim), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout))

    def forward(self, feats: dict[str, Tensor], present: Tensor) -> Tensor:
        return self.proj(torch.cat(self.filled(feats, present), dim=1))  # (B, sum D_m) -> (B, out_dim)


class AttentionFusion(Fusion):
    """A learned fusion token plus one token per modality (Linear to `out_dim` + a modality-type embedding),
    `layers` pre-norm Transformer blocks with missing modalities masked out of the keys, and the fusion
    token's final state (LayerNorm) as the output `(B, out_dim)`.
    """

    def __init__(self, in_dims: dict[str, int], out_dim: int = 128, heads: int = 4, layers: int = 1,
                 ffn_mult: int = 2, dropout: float = 0.1) -> None:
        super().__init__(in_dims, out_dim)
        if out_dim % heads:
            raise ConfigError(f"attention fusion: model.fusion.dim={out_dim} is not divisible by "
                              f"model.fusion.heads={heads}")
        self.proj = nn.ModuleDict({m: nn.Linear(d, out_dim) for m, d in in_dims.items()})
        self.type_embed = nn.Parameter(torch.randn(len(in_dims), out_dim) * 0.02)  # (M, out_dim)
        self.cls = nn.Parameter(torch.randn(out_dim) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(out_dim, heads, ffn_mult, dropout)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, feats: dict[str, Tensor], present: Tensor) -> Tensor:
        p = _valid_rows(present)
        tokens = [self.proj[m](feats[m]) + self.type_embed[i] for i, m in enumerate(self.modalities)]
        x = torch.stack(tokens, dim=1)  # (B, M, out_dim)
        x = torch.where(p.unsqueeze(-1), x, torch.zeros_like(x))  # masked keys carry nothing, not even NaN
        x = torch.cat([self.cls.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)  # (B, 1 + M, out_dim)
        keys = torch.cat([torch.ones_like(p[:, :1]), p], dim=1)  # the fusion token is always attended
        for block in self.blocks:
            x = block(x, keys)
        return self.norm(x[:, 0])


class GatedFusion(Fusion):
    """GMU: `h_m = tanh(W_m x_m)`, gates `z = softmax_m(W_z [x_1; ...; x_M; present])` per feature, output
    `sum_m z_m * h_m`: `(B, out_dim)`. A missing modality gets zero gate weight and enters the gate input as
    zeros, with the presence flags telling the gate what is missing. With two modalities the softmax is the
    original GMU's sigmoid gate.
    """

    def __init__(self, in_dims: dict[str, int], out_dim: int = 128, dropout: float = 0.1) -> None:
        super().__init__(in_dims, out_dim)
        self.hidden = nn.ModuleDict({m: nn.Linear(d, out_dim) for m, d in in_dims.items()})
        m = len(in_dims)
        self.gate = nn.Linear(sum(in_dims.values()) + m, m * out_dim) if m > 1 else None
        self.drop = nn.Dropout(dropout)

    def forward(self, feats: dict[str, Tensor], present: Tensor) -> Tensor:
        xs = [torch.where(present[:, i : i + 1], feats[m], torch.zeros_like(feats[m]))
              for i, m in enumerate(self.modalities)]
        h = torch.stack([torch.tanh(self.hidden[m](x)) for m, x in zip(self.modalities, xs, strict=True)],
                        dim=1)  # (B, M, out_dim)
        if self.gate is None:
            return self.drop(h[:, 0])
        logits = self.gate(torch.cat([*xs, present.to(h.dtype)], dim=1)).view(h.shape)  # (B, M, out_dim)
        logits = logits.masked_fill(~_valid_rows(present).unsqueeze(-1), float("-inf"))
        return self.drop((torch.softmax(logits, dim=1) * h).sum(dim=1))


class TensorFusion(Fusion):
    """TFN: each modality -> Linear(`tensor_dim`) -> append 1, outer product over the modalities,
    flatten (`prod_m (tensor_dim + 1)` features: unimodal, bimodal and trimodal terms), Linear -> ReLU:
    `(B, out_dim)`. `tensor_dim` keeps the product small (16 -> 17^3 = 4913 features for three modalities).
    """

    def __init__(self, in_dims: dict[str, int], out_dim: int = 128, tensor_dim: int = 16,
                 dropout: float = 0.1) -> None:
        super().__init__(in_dims, out_dim)
        self.add_placeholders()
        # linear sub-projections: the outer product already supplies the multiplicative interactions
        self.sub = nn.ModuleDict({m: nn.Linear(d, tensor_dim) for m, d in in_dims.items()})
        n = (tensor_dim + 1) ** len(in_dims)
        self.proj = nn.Sequential(nn.Dropout(dropout), nn.Linear(n, out_dim), nn.ReLU(inplace=True))

    def forward(self, feats: dict[str, Tensor], present: Tensor) -> Tensor:
        t: Tensor | None = None
        for m, x in zip(self.modalities, self.filled(feats, present), strict=True):
            z = self.sub[m](x)
            z = torch.cat([z, torch.ones_like(z[:, :1])], dim=1)  # (B, p + 1)
            t = z if t is None else (t.unsqueeze(2) * z.unsqueeze(1)).flatten(1)  # (B, prod (p + 1))
        assert t is not None
        return self.proj(t)


class LowRankFusion(Fusion):
    """LMF: the TFN weight tensor factorized into `rank` modality-specific factors, so
    `h = sum_r w_r prod_m ([x_m; 1] W_m^(r)) + b` costs `rank * sum_m (D_m + 1) * out_dim`: `(B, out_dim)`.
    """

    def __init__(self, in_dims: dict[str, int], out_dim: int = 128, rank: int = 4,
                 dropout: float = 0.1) -> None:
        super().__init__(in_dims, out_dim)
        self.add_placeholders()
        self.factors = nn.ParameterDict()
        for m, d in in_dims.items():
            w = torch.empty(rank, d + 1, out_dim)
            nn.init.xavier_normal_(w)
            self.factors[m] = nn.Parameter(w)  # (rank, D_m + 1, out_dim)
        self.rank_weights = nn.Parameter(torch.full((rank,), 1.0 / math.sqrt(rank)))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, feats: dict[str, Tensor], present: Tensor) -> Tensor:
        prod: Tensor | None = None
        for m, x in zip(self.modalities, self.filled(feats, present), strict=True):
            z = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # (B, D_m + 1)
            f = torch.matmul(z, self.factors[m])  # (rank, B, out_dim)
            prod = f if prod is None else prod * f
        assert prod is not None
        h = torch.einsum("r,rbd->bd", self.rank_weights, prod) + self.bias
        return self.drop(h)


class LateFusion(Fusion):
    """One MLP classifier per modality; the logits are averaged over the present modalities: `(B, C)`."""

    emits_logits = True

    def __init__(self, in_dims: dict[str, int], num_classes: int, hidden: int = 256,
                 dropout: float = 0.1) -> None:
        super().__init__(in_dims, num_classes)
        self.heads = nn.ModuleDict({m: MlpHead(d, hidden, num_classes, dropout) for m, d in in_dims.items()})

    def forward(self, feats: dict[str, Tensor], present: Tensor) -> Tensor:
        total: Tensor | None = None
        for i, m in enumerate(self.modalities):
            logits = self.heads[m](feats[m])  # (B, C)
            logits = torch.where(present[:, i : i + 1], logits, torch.zeros_like(logits))
            total = logits if total is None else total + logits
        assert total is not None
        count = present.sum(dim=1, keepdim=True).clamp_min(1).to(total.dtype)  # (B, 1)
        return total / count

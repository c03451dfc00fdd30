"""A labelled image set, decoded: what training, the probes and the cache hold."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LabelledImages:
    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor  # int64 [N]
    classes: list[str]
    # How each image was made, where the data set knows (`shapes`): name -> [N] int64 (discrete)
    # or [N, k] float (continuous); the factor probes read them (soda.eval.factor_probes).
    factors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def subset(self, limit: int | None) -> LabelledImages:
        """`limit` images drawn by a fixed permutation (the same for every run, whatever its
        seed), so a limited run sees every class and runs of one study see the same images."""
        if limit is None or limit >= len(self):
            return self
        chosen = torch.randperm(len(self), generator=torch.Generator().manual_seed(0))[:limit].sort().values
        factors = {name: values[chosen] for name, values in self.factors.items()}
        return LabelledImages(self.images[chosen], self.labels[chosen], self.classes, factors)

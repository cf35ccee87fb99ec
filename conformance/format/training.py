"""Settings of a training run, shared by both backends (they select and parametrize; they compute nothing).

Defaults follow the report (section 4.2, 2.1.2, 2.2): AdamW with beta1 0.9, beta2 0.95, weight decay 0.1,
gradient clipping at norm 1.0, a linear warm-up then cosine decay of the learning rate, the MTP loss
weight lambda 0.3, the sequence-wise balance loss alpha 1e-4, and the bias update speed gamma 0.001.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dsv3_conformance.format.errors import BadInput

Balancing = Literal["none", "sequence-loss", "bias", "bias+sequence-loss"]
BALANCING = ("none", "sequence-loss", "bias", "bias+sequence-loss")


@dataclass(frozen=True)
class TrainSettings:
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    total_steps: int = 100
    final_lr_ratio: float = 0.1  # the cosine ends at this fraction of the peak
    beta1: float = 0.9
    beta2: float = 0.95
    epsilon: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    mtp_weight: float = 0.3  # lambda: the MTP loss is lambda / D * sum of the depth losses
    balance_alpha: float = 1e-4  # the complementary sequence-wise balance loss
    bias_gamma: float = 1e-3  # the aux-loss-free bias update speed
    balancing: Balancing = "bias+sequence-loss"
    fp8: bool = False  # Fprop, Dgrad and Wgrad GEMMs of the linear layers in fp8

    def __post_init__(self) -> None:
        if self.balancing not in BALANCING:
            raise BadInput(f"unknown balancing {self.balancing!r}: expected one of {', '.join(BALANCING)}")
        for name in ("learning_rate", "clip_norm"):
            if not getattr(self, name) > 0:
                raise BadInput(f"training setting {name} must be > 0, found {getattr(self, name)!r}")
        if self.total_steps < 1 or self.warmup_steps < 0:
            raise BadInput(f"total_steps must be >= 1 and warmup_steps >= 0, found {self.total_steps}, "
                           f"{self.warmup_steps}")

    @property
    def uses_sequence_loss(self) -> bool:
        return "sequence-loss" in self.balancing

    @property
    def uses_bias(self) -> bool:
        return "bias" in self.balancing

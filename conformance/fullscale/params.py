"""Parameter accounting from any config: total, activated per token, the MTP module's own, and stored.

Counts come from the one table of tensors a checkpoint holds (`conformance.format.weights.expected_tensors`),
so they cannot drift from what is loaded. fp8 block scales are counted apart (they are storage, not
parameters). Definitions:
- main: every parameter of the main model (embedding, blocks, final norm, output head);
- MTP unique: the MTP modules' own parameters, without their copies of the embedding and the output head
  (the release shares them with the main model and stores copies);
- stored: main plus every MTP tensor as the checkpoint stores it (copies included);
- activated per token: what one token's forward pass multiplies by, in the main model: every parameter but
  the routed experts, plus k routed experts per MoE layer; the input embedding is a lookup, not a product,
  and is listed apart.
The published numbers stand beside the counts only for the released config.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsv3_conformance.format.config import ModelConfig, deepseek_v3_671b
from dsv3_conformance.format.weights import expected_tensors

# Published for the released model (DeepSeek-V3 README_WEIGHTS.md and technical report, billions).
PUBLISHED = {"main": 671.0, "mtp_unique": 11.5, "mtp_block": 11.5, "stored": 685.0, "activated": 36.7}


@dataclass(frozen=True)
class ParameterCount:
    main: int
    mtp_unique: int
    mtp_stored: int
    stored: int
    scales: int
    activated: int  # per token, embedding lookup excluded
    embedding: int
    mtp_input_projection: int  # eh_proj, part of mtp_unique
    mtp_norms: int  # enorm, hnorm and shared_head.norm, part of mtp_unique
    layers: int
    released: bool  # the config is the released model's, so the published numbers apply

    def rows(self) -> list[dict]:
        def billions(value: int) -> str:
            return f"{value / 1e9:.3f}B" if value >= 1e8 else f"{value / 1e6:.3f}M" if value >= 1e5 else f"{value:,}"

        rows = []
        for key, value, note in (
                ("main", self.main, f"embedding, {self.layers} blocks, final norm, output head"),
                ("mtp_unique", self.mtp_unique, f"MTP modules without their embedding and head copies; "
                                                f"eh_proj is {billions(self.mtp_input_projection)} of it"),
                ("mtp_block", self.mtp_unique - self.mtp_input_projection - self.mtp_norms,
                 "the MTP decoder blocks alone (without eh_proj, enorm, hnorm, shared_head.norm)"
                 + (": the published 11.5B is this count" if self.released else "")),
                ("stored", self.stored, "main + MTP as stored (copies of embedding and head included)"),
                ("activated", self.activated, f"per token, without the embedding lookup ({billions(self.embedding)})"
                                              "; with it " + billions(self.activated + self.embedding))):
            published = PUBLISHED.get(key) if self.released else None
            row = {"count": key, "measured": billions(value), "note": note}
            if published is not None:
                row["published"] = f"{published}B"
                row["difference"] = f"{(value / 1e9 - published) / published:+.2%}"
            rows.append(row)
        rows.append({"count": "fp8 block scales", "measured": billions(self.scales), "note": "storage, not parameters"})
        return rows


def count_parameters(config: ModelConfig) -> ParameterCount:
    specs = expected_tensors(config)
    mtp_prefixes = tuple(f"model.layers.{config.n_layers + depth}." for depth in range(config.n_mtp_layers))

    def size(spec) -> int:
        return int(np.prod(spec.shape))

    main = mtp = mtp_copies = scales = routed = eh_proj = mtp_norms = 0
    for name, spec in specs.items():
        if spec.role == "scale":
            scales += size(spec)
            continue
        if name.startswith(mtp_prefixes):
            mtp += size(spec)
            if name.endswith(("embed_tokens.weight", "shared_head.head.weight")):
                mtp_copies += size(spec)
            if ".eh_proj." in name:
                eh_proj += size(spec)
            if name.endswith(("enorm.weight", "hnorm.weight", "shared_head.norm.weight")):
                mtp_norms += size(spec)
            continue
        main += size(spec)
        if ".mlp.experts." in name:
            routed += size(spec)
    moe_layers = config.n_layers - config.n_dense_layers
    expert = 3 * config.dim * config.moe_inter_dim
    embedding = config.vocab_size * config.dim
    activated = main - routed + moe_layers * config.n_activated_experts * expert - embedding
    return ParameterCount(main=main, mtp_unique=mtp - mtp_copies, mtp_stored=mtp, stored=main + mtp, scales=scales,
                          activated=activated, embedding=embedding, mtp_input_projection=eh_proj,
                          mtp_norms=mtp_norms, layers=config.n_layers,
                          released=config.replace(name="") == deepseek_v3_671b().replace(name=""))

"""KV cache of the released 671B config, measured from the TensorFlow cache tensors (SEMANTICS.md section 6).

MLA caches the normalized kv latent and the rotated rope key: (kv_lora_rank + qk_rope_head_dim) values
per token per layer. Multi-head attention with the same heads would cache keys and values of every
head. Run: python -m dsv3_conformance.benchmarks.kv_cache
"""

from __future__ import annotations

import tensorflow as tf

from dsv3_conformance.format.config import deepseek_v3_671b
from dsv3_conformance.impl.attention import LatentCache

from .timing import gate, publish


def main() -> None:
    config = deepseek_v3_671b().replace(max_seq_len=8)  # the cache layout, not its length, is measured
    rows = []
    for dtype in (tf.bfloat16, tf.float32):
        mla = LatentCache.allocate(config, 1, dtype, capacity=1).bytes_per_token()
        mha = 2 * config.n_heads * config.v_head_dim * dtype.size
        rows.append({"dtype": dtype.name, "MLA bytes/token/layer": mla, "MHA bytes/token/layer": mha,
                     "MLA / MHA": f"{100 * mla / mha:.2f}%", f"MLA, {config.n_layers} layers (KB/token)":
                     round(config.n_layers * mla / 1000, 1),
                     f"MHA, {config.n_layers} layers (MB/token)": round(config.n_layers * mha / 1e6, 2)})
    bf16 = rows[0]
    expected = (config.kv_lora_rank + config.qk_rope_head_dim) * 2
    gates = [
        gate("MLA cache = (kv_lora_rank + qk_rope_head_dim) x 2 bytes in bf16 = 1152",
             bf16["MLA bytes/token/layer"], bf16["MLA bytes/token/layer"] == expected),
        gate("1.76% of an MHA cache with the same heads (SEMANTICS.md section 6)", bf16["MLA / MHA"],
             bf16["MLA / MHA"] == "1.76%"),
    ]
    notes = ("Bytes measured from the allocated tf.Variables of one layer's LatentCache for the released config "
             "(kv_lora_rank 512, rope 64, 128 heads of 128). The often-quoted 93.3% is DeepSeek-V2 against 67B.")
    raise SystemExit(publish("kv_cache", "KV cache: MLA latent cache vs MHA, 671B config", rows, gates, notes))


if __name__ == "__main__":
    main()

"""A small DeepSeek-V3 saved by transformers 5 itself, as a user's checkpoint would be: theta and YaRN under
`rope_parameters`, its default `num_key_value_heads` (128), no MTP tensors."""

from __future__ import annotations

from pathlib import Path

THETA = 500.0


def save_tiny_hf(folder: Path):
    """Save the model into `folder`; returns it (a torch module in eval mode)."""
    import torch
    import transformers

    config = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8, max_position_embeddings=64, initializer_range=0.2,  # sharp attention: positions matter
        rope_parameters={"rope_type": "yarn", "rope_theta": THETA, "factor": 4.0,
                         "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                         "mscale_all_dim": 1.0})
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():  # correction biases away from zero, so that routing depends on them
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    model.save_pretrained(folder)
    return model

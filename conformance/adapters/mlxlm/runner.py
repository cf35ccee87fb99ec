"""mlx-lm's `deepseek_v3.Model` behind the Runner interface.

The model is built from the Hugging Face config fields of the harness's config (`to_hf_dict`, as mlx-lm reads a
checkpoint's config.json) and loaded as a user loads a checkpoint: tensors under the checkpoint's names (experts one
by one, `kv_b_proj` whole, fp8 weights as e4m3 bytes with their `weight_scale_inv`) go through the model's own
`sanitize()`, which stacks the experts, splits `kv_b_proj` into its absorbed halves and dequantizes fp8 blocks. A
batch shares one mlx-lm prompt cache (every sequence has the same length). mlx-lm gives no block outputs (`hidden`
is None) and no chosen experts, takes no forced routing, and drops the MTP module when it loads.
"""

from __future__ import annotations

import numpy as np

from dsv3_conformance.backends import Runner, StepOutput, Unsupported
from dsv3_conformance.format.config import ModelConfig, to_hf_dict
from dsv3_conformance.format.weights import ModelWeights, named_tensors

# Recorded divergences that stop mlx-lm from building a model at all: declared, so such a model is not compared.
UNLOADABLE = ("mlxlm-noaux-tc-only", "mlxlm-shared-experts-required")


def checkpoint_tensors(weights: ModelWeights, config: ModelConfig) -> dict[str, np.ndarray]:
    """The main model's weights under a Hugging Face checkpoint's names, fp8 weights as e4m3 bytes (mlx-lm drops
    the MTP module when it loads: its tensors are left out)."""
    main = ModelWeights(weights.embed, weights.layers, weights.norm, weights.head)
    return {name: array.view(np.uint8) if str(array.dtype).startswith("float8") else array
            for name, array in named_tensors(main, config).items()}


class MLXRunner(Runner):
    def __init__(self, config: ModelConfig, weights: ModelWeights, dtype: str = "float32", refuse_known: bool = True):
        import mlx.core as mx
        from mlx_lm.models import deepseek_v3

        from dsv3_conformance.golden.divergences import DIVERGENCES, MLX_LM

        unloadable = [d.key for d in DIVERGENCES if d.key in UNLOADABLE and d.source == MLX_LM and d.applies(config)]
        if unloadable and refuse_known:
            raise Unsupported(f"mlx-lm cannot build this model ({', '.join(unloadable)}: "
                              "conformance/golden/divergences.py)", "config")
        self.config, self._mx = config, mx
        self.model = deepseek_v3.Model(deepseek_v3.ModelArgs.from_dict(to_hf_dict(config)))
        tensors = {name: mx.array(np.ascontiguousarray(array))
                   for name, array in checkpoint_tensors(weights, config).items()}
        self.model.load_weights(list(self.model.sanitize(tensors).items()))
        # Every parameter in the run's dtype, the correction bias excepted (mlx-lm's own cast predicate).
        from mlx.utils import tree_map_with_path

        wanted, keep = mx.bfloat16 if dtype == "bfloat16" else mx.float32, self.model.cast_predicate
        self.model.update(tree_map_with_path(lambda key, value: value.astype(wanted) if keep(key) else value,
                                             self.model.parameters()))
        mx.eval(self.model.parameters())
        self._cache = None

    def _run(self, tokens: np.ndarray) -> StepOutput:
        mx = self._mx
        logits = self.model(mx.array(np.asarray(tokens, np.int32)), cache=self._cache)
        return StepOutput(np.array(logits.astype(mx.float32)), None, ())

    def prefill(self, tokens, forced_experts=None, capacity=None) -> StepOutput:
        if forced_experts is not None:
            raise Unsupported("mlx-lm takes no forced routing", "forced-routing")
        from mlx_lm.models.cache import make_prompt_cache

        self._cache = make_prompt_cache(self.model)
        return self._run(np.asarray(tokens))

    def decode(self, tokens, forced_experts=None) -> StepOutput:
        if forced_experts is not None:
            raise Unsupported("mlx-lm takes no forced routing", "forced-routing")
        tokens = np.asarray(tokens)
        return self._run(tokens.reshape(tokens.shape[0], -1))

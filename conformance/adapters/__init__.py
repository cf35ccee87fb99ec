"""Adapters: implementations this project did not write, each behind the `Backend` interface (optional extras).

`llamacpp`: llama.cpp through llama-cpp-python (`pip install -e ".[llamacpp]"`), the model written as a GGUF file.
`mlxlm`: mlx-lm's deepseek_v3 on MLX's CPU build. `torchtitan`: torchtitan's DeepSeekV3Model on torch.
`weights.py`: what they share, the checkpoint's weights as float32 arrays.
"""

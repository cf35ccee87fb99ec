"""The optimized TensorFlow implementation of DeepSeek-V3 (XLA-compiled, batched MoE, latent cache, fp8)."""

import os

# TensorFlow's C++ start-up notices (CPU features, oneDNN) are not for our users; an explicit setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

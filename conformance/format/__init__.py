"""The format layer: what both backends (and any backend a user brings) share, and nothing else.

Config, weight containers and their tensor names, safetensors and checkpoint I/O, input validation,
the numerics settings, and format constants (the e4m3 range, the block size). No math of the model
lives here: RoPE, routing, attention, fp8 quantization and the GEMM are written once per backend, so
that a bug in one is visible against the other (`tests/harness/test_independence.py` enforces it).
"""

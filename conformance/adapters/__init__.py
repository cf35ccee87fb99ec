"""Adapters: implementations this project did not write, each behind the `Backend` interface (optional extras).

`llamacpp`: llama.cpp through llama-cpp-python (`pip install -e ".[llamacpp]"`), the model written as a GGUF file.
"""

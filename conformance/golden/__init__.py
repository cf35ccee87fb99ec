"""Golden cases: the case format and checking a backend against one (cases.py), the manifest of hashes,
the known divergences of the oracle and of the official code, the transformers oracle, and generating cases."""

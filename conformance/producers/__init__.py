"""Producers of golden data that run elsewhere: the official code on the CPU or an H100, and H100 probes of
fp8 GEMMs and accumulation."""

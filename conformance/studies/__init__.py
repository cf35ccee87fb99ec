"""Studies behind claims of the technical report: fp8 accumulation and granularity, and the training
experiments."""

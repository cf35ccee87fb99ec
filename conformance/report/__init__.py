"""The conformance report (build.py) and its sections, one module each (section.py registers them)."""

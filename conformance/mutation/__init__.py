"""The mutation catalogue and its runner: known bug classes planted in each backend, and the checks
that must catch them (catalogue.py), how they are planted and undone (planting.py), how a mutant is
shown to change the backend at all (probe.py), and the honest verdicts (runner.py)."""

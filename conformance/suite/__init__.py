"""The suite users run (`pytest conformance/`): the pytest adapters of the registered checks and the
tests of the shipped data and recorded divergences."""

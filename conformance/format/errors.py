"""The error every bad input raises: the command line turns it into exit status 2.

A message names the file, tensor or field as the user wrote it, what was expected and what was found.
"""


class BadInput(ValueError):
    """Input the harness refuses: a config, checkpoint, golden case, manifest, token batch or option."""

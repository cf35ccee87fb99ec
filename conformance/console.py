"""A quiet console: TensorFlow's start-up lines dropped from standard error.

TensorFlow 2.21 prints a dozen lines when it starts, in every process that imports it (CPU features it was not
built for, CUDA drivers it did not find, oneDNN's notice, XLA's service): through absl before absl's logging is
initialized, so TF_CPP_MIN_LOG_LEVEL does not reach them. A passing run printed them once per worker and once per
mutant task and looked like a failing one. `quiet` sends this process's file descriptor 2, and so that of every
process it starts, through a filter that drops exactly those lines and passes everything else at once (tracebacks,
warnings, progress bars, TensorFlow's real errors). `-v` on the command line keeps them.
"""

from __future__ import annotations

import atexit
import os
import re
import threading

# The lines TensorFlow prints on start: absl's notice, and C++ log lines from the sources that report the
# machine rather than a problem of the run.
NOISE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|To enable the following instructions: .*in other operations, rebuild TensorFlow with the appropriate "
    rb"compiler flags\."
    rb"|[IWE]\d{4} [\d:. ]+\d+ (port\.cc|cudart_stub\.cc|cuda_platform\.cc|cuda_executor\.cc|cpu_feature_guard\.cc"
    rb"|service\.cc|dump_mlir_util\.cc|device_compiler\.h|mlir_graph_optimization_pass\.cc|cuda_dnn\.cc"
    rb"|cuda_fft\.cc|cuda_blas\.cc)(:\d+)?\] .*)$")
# A partial line that may still become noise is held until its end; anything else passes at once.
_MAYBE = re.compile(rb"^(W(A(R(N(I(N(G(:.*)?)?)?)?)?)?)?|T(o( .*)?)?|[IWE]\d{0,4}( .*)?)$")


def _relay(source: int, target: int) -> None:
    pending = b""
    while chunk := os.read(source, 65536):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if not NOISE.match(line.rstrip(b"\r")):
                os.write(target, line + b"\n")
        if pending and not _MAYBE.match(pending):
            os.write(target, pending)
            pending = b""
    if pending and not NOISE.match(pending):
        os.write(target, pending)


_STARTED: list[threading.Thread] = []


def quiet() -> None:
    """Filter this process's standard error (and its children's) from now on; once per process."""
    if _STARTED:
        return
    original = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)
    relay = threading.Thread(target=_relay, args=(read, original), name="dsv3-stderr-filter", daemon=True)
    relay.start()
    _STARTED.append(relay)

    def drain() -> None:  # at exit: stop writing into the pipe, let the relay pass what is left
        import sys

        sys.stderr.flush()
        os.dup2(original, 2)
        relay.join(timeout=5)

    atexit.register(drain)

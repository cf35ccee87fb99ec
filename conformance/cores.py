"""The machine's cores shared between the processes the harness runs at once.

TensorFlow sizes its thread pools to every core in each process, so N processes at once (pytest's workers,
the mutation runner's tasks) ask for N times the cores and slow each other down. Each gets its share instead,
through TensorFlow's environment variables, set before its first operation. A value the user set is kept.
"""

from __future__ import annotations

import os

THREAD_VARIABLES = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")


def available() -> int:
    """The cores this process may use: TensorFlow's thread count where set, else those the scheduler allows."""
    given = os.environ.get("TF_NUM_INTRAOP_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def share(processes: int) -> int:
    """Threads for each of `processes` processes running at once on this process's cores."""
    return max(1, available() // max(processes, 1))


def give_tensorflow(threads: int) -> None:
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)


def share_with_pytest_workers() -> None:
    """In a pytest-xdist worker, TensorFlow gets the worker's share of the cores, unless the user chose."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if workers.isdigit() and int(workers) > 1 and not any(name in os.environ for name in THREAD_VARIABLES):
        give_tensorflow(share(int(workers)))

"""The decode steps' work as a kernel of our own inside XLA (impl/native/matvec.cc), split over every core, every
weight read where it lies: y = x W^T for a few rows x against a float32 weight (`matvec`; the absorbed attention's
per-head blocks of wkv_b both ways, `per_head`), a SwiGLU FFN over token copies with the experts read in their
stacks (`experts`: a MoE block's routed copies, its shared experts, a dense FFN), and the absorbed attention's core
over a layer's latent cache (`latent_attention`).

XLA's CPU dot runs a matrix-vector product of at most 2 MB of weights as one task on one core, which leaves the
memory bandwidth of the other cores unused; decode reads weights, so it splits them. The kernel is compiled
once per machine with the system's C++ compiler (`CXX`, default g++) into a cache directory and registered as an
XLA custom call; without a compiler, or with DSV3_MATVEC_KERNEL=0, the steps keep XLA's own products (same
results within float32 rounding: the kernel sums in another order). Loading a library runs its code, so the cache
is private: created 0700, refused when another user owns it or its group or others may write it; a library is
loaded only when its sha256 equals the one recorded when it was built, and its name holds the compiler's version
and the CPU's identity, so a library built elsewhere, or by another compiler, is never taken.

The kernel is used only while a compiled inference step is traced (`kernel_scope`): XLA cannot differentiate a
custom call, and outside XLA (the prefill's graph) there is no kernel to call.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import stat
import subprocess
import sys
import tempfile

import tensorflow as tf
from tensorflow.compiler.tf2xla.ops import gen_xla_ops

SOURCE = pathlib.Path(__file__).with_name("native") / "matvec.cc"
TARGET = "dsv3_matvec"
HEADS_TARGET = "dsv3_heads"
EXPERTS_TARGET = "dsv3_experts"
ATTENTION_TARGET = "dsv3_latent_attention"
FLAGS = ("-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-pthread")

# Smallest weight (floats) the kernel takes: below it a product is a few microseconds in XLA, where the custom call
# and waking the other cores cost about as much (the tiny configs' weights are below it).
MIN_WEIGHT = 1 << 16

_in_scope = contextvars.ContextVar("matvec_kernel", default=False)


class KernelCacheError(OSError):
    """A kernel cache or library this process will not load from: another user could have written it."""


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("DSV3_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dsv3-conformance")
    return pathlib.Path(root)


def _owned_privately(path: pathlib.Path) -> None:
    """Refuse `path` unless this user owns it and neither its group nor others may write it."""
    info = path.lstat()
    if info.st_uid != os.getuid():
        raise KernelCacheError(f"{path} is owned by user {info.st_uid}, not by this user ({os.getuid()}): refused")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise KernelCacheError(f"{path} is writable by its group or by others (mode {stat.filemode(info.st_mode)}): "
                               "refused")


def private_cache() -> pathlib.Path:
    """The kernel cache directory, created 0700 when missing; one another user owns or may write is refused."""
    directory = _cache_dir()
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
    _owned_privately(directory)
    return directory


def _machine() -> bytes:
    """What -march=native compiles for: the architecture and the CPU's identity (x86: model and flags; Arm:
    implementer, architecture, variant, part and features)."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    fields = ("model name", "flags", "CPU implementer", "CPU architecture", "CPU variant", "CPU part", "Features")
    identity = sorted(set(line for line in lines if line.startswith(fields)))
    return "\n".join([platform.machine(), platform.processor(), *identity])[:8192].encode()


def cache_key(compiler: str) -> str:
    """The library's name in the cache: the sources, the flags, the compiler's version and the CPU."""
    sources = b"".join(path.read_bytes() for path in sorted(SOURCE.parent.glob("*.[ch]*")))  # matvec.cc and headers
    version = subprocess.run([compiler, "--version"], capture_output=True, timeout=60, check=True).stdout
    return hashlib.sha256(sources + " ".join((compiler, *FLAGS)).encode() + version + _machine()).hexdigest()[:16]


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verified(library: pathlib.Path) -> pathlib.Path:
    """`library` if it is this user's, written by no one else, and its bytes have the sha256 recorded when it was
    built (the record beside it); KernelCacheError otherwise."""
    record = library.with_name(library.name + ".sha256")
    for path in (library, record):
        if not path.is_file():
            raise KernelCacheError(f"{path} is missing: refused")
        _owned_privately(path)
    if _sha256(library) != record.read_text().strip():
        raise KernelCacheError(f"{library}: its sha256 differs from the one recorded when it was built: refused")
    return library


def _build() -> pathlib.Path:
    """The kernel library, compiled into the private cache once per (sources, compiler, CPU), then verified."""
    compiler = os.environ.get("CXX", "g++")
    directory = private_cache()
    library = directory / f"matvec-{cache_key(compiler)}.so"
    if not library.exists():
        with tempfile.TemporaryDirectory(dir=directory) as scratch:
            built = pathlib.Path(scratch) / library.name
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], check=True, capture_output=True,
                           timeout=300)
            os.chmod(built, 0o700)
            record = pathlib.Path(scratch) / (library.name + ".sha256")
            record.write_text(_sha256(built) + "\n")
            os.chmod(record, 0o600)
            # The record lands first: a library never sits in the cache without it. Each is replaced atomically, so
            # concurrent builders (test workers) land whole files.
            os.replace(record, library.with_name(record.name))
            os.replace(built, library)
    return verified(library)


@functools.cache
def available() -> bool:
    """Whether the kernel is built, loaded and registered (once per process); False, with a note on stderr, when it
    cannot be (no compiler, a cache or library refused, a TensorFlow without the registry's symbols), or when
    DSV3_MATVEC_KERNEL=0."""
    if os.environ.get("DSV3_MATVEC_KERNEL", "1") == "0":
        return False
    tf_library = os.path.join(tf.sysconfig.get_lib(), "libtensorflow_cc.so.2")
    try:
        library = ctypes.CDLL(str(_build()))
        library.dsv3_register_matvec.argtypes = [ctypes.c_char_p]
        if library.dsv3_register_matvec(tf_library.encode()) != 0:
            raise OSError(f"XLA's custom-call registry was not found in {tf_library}")
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        print(f"dsv3-conformance: the matvec kernel is not available ({error} {detail.decode()[-500:]}); decode steps "
              "use XLA's products", file=sys.stderr)
        return False
    return True


@contextlib.contextmanager
def kernel_scope():
    """While a compiled inference step is traced: its few-row float32 products call the kernel (when available)."""
    token = _in_scope.set(available())
    try:
        yield
    finally:
        _in_scope.reset(token)


def applies(x: tf.Tensor, weight_shape) -> bool:
    """Whether a few-row product of x against a stored float32 weight of `weight_shape` ([out, in]) is the kernel's
    here."""
    return _in_scope.get() and x.dtype == tf.float32 and weight_shape.num_elements() >= MIN_WEIGHT


def _call(target: str, operands: list, config: str, shape: list[int]) -> tf.Tensor:
    return gen_xla_ops.xla_custom_call_v2(operands=operands, call_target_name=target, backend_config=config,
                                          has_side_effect=False, result_dtypes=[tf.float32], result_shapes=[shape])[0]


def matvec(x: tf.Tensor, stack: tf.Tensor, index) -> tf.Tensor:
    """x [rows, in] @ stack[index]^T for a float32 stack [S, out, in] -> [rows, out] (index clamped into [0, S))."""
    rows, width = x.shape
    count, out, stack_width = stack.shape
    if width != stack_width:
        raise ValueError(f"matvec: x has {width} columns, the weights {stack_width}")
    return _call(TARGET, [x, stack, tf.cast(index, tf.int32)], f"{rows},{out},{width},{count}", [rows, out])


def per_head(x: tf.Tensor, blocks: tf.Tensor, first_row: int, count: int, transposed: bool = False) -> tf.Tensor:
    """Each head's rows of x against rows first_row..first_row+count of its block of blocks [H, R, C] (a stored
    weight seen per head, read in place): x [H, rows, C] -> x B^T [H, rows, count], or, `transposed`,
    x [H, rows, count] -> x B [H, rows, C]."""
    heads, rows, width = x.shape
    block_heads, block_rows, block_width = blocks.shape
    inner, out = (count, block_width) if transposed else (block_width, count)
    if heads != block_heads or width != inner or first_row + count > block_rows:
        raise ValueError(f"per_head: x {x.shape} against rows {first_row}..{first_row + count} of blocks {blocks.shape}")
    config = f"{rows},{out},{inner},{heads},{first_row * block_width},{block_rows * block_width},{int(transposed)}"
    return _call(HEADS_TARGET, [x, blocks], config, [heads, rows, out])


def experts(x: tf.Tensor, gate: tf.Tensor, up: tf.Tensor, down: tf.Tensor, expert: tf.Tensor, token: tf.Tensor,
            weight: tf.Tensor) -> tf.Tensor:
    """SwiGLU experts on token copies, in one call: for copies sorted by expert, sum over c of weight[c] *
    down[e](silu(gate[e] x[t]) * up[e] x[t]) into row t = token[c], e = expert[c], for x [T, dim] and float32 stacks
    gate, up [S, inter, dim], down [S, dim, inter] read in place -> [T, dim]."""
    tokens, dim = x.shape
    count, inter, _ = gate.shape
    if up.shape != gate.shape or down.shape != (count, dim, inter) or gate.shape[2] != dim:
        raise ValueError(f"experts: x {x.shape}, stacks {gate.shape}, {up.shape}, {down.shape}")
    copies = expert.shape[0]
    operands = [x, gate, up, down, tf.cast(expert, tf.int32), tf.cast(token, tf.int32), tf.cast(weight, tf.float32)]
    return _call(EXPERTS_TARGET, operands, f"{tokens},{dim},{inter},{count},{copies}", [tokens, dim])


def latent_attention(q_latent: tf.Tensor, q_rope: tf.Tensor, kv_latent: tf.Tensor, rope_key: tf.Tensor,
                     visible: tf.Tensor, scale: float) -> tf.Tensor:
    """The absorbed attention's core over a latent cache read in place: for each head h and query q = b * S + s, the
    softmax over positions t of scale * (q_latent[h, q] . kv_latent[b, t] + q_rope[q, h] . rope_key[b, t]) where
    visible[s, t] (else excluded), then sum over t of it times kv_latent[b, t]. q_latent [H, Q, c], q_rope [Q, H, r],
    caches [B, capacity, c] and [B, capacity, r] of which the first `window` = visible.shape[1] positions are looked
    at, visible [S, window] bool -> [H, Q, c]. Every query must see a position (else the softmax has none)."""
    heads, queries, latent = q_latent.shape
    batch, capacity, _ = kv_latent.shape
    length, window = visible.shape
    rope = q_rope.shape[-1]
    if (queries != batch * length or q_rope.shape != (queries, heads, rope) or kv_latent.shape[2] != latent
            or rope_key.shape != (batch, capacity, rope) or window > capacity):
        raise ValueError(f"latent_attention: queries {q_latent.shape}, {q_rope.shape}, caches {kv_latent.shape}, "
                         f"{rope_key.shape}, visible {visible.shape}")
    config = f"{batch},{length},{heads},{latent},{rope},{capacity},{window},{float(scale)!r}"
    # The caches go in flat, as the layer's cache variables hold them: as [B, capacity, .] XLA fused that reshape into
    # the cache's update, which then no longer ran in place (a copy of every layer's cache, every step).
    caches = [tf.reshape(kv_latent, [batch * capacity, latent]), tf.reshape(rope_key, [batch * capacity, rope])]
    return _call(ATTENTION_TARGET, [q_latent, q_rope, *caches, tf.cast(visible, tf.uint8)], config,
                 [heads, queries, latent])

"""Design requirements and units of the TensorFlow implementation (impl/): compiled steps that never retrace
per position, a cache of latents and rope keys only, fp8 weights kept in fp8, the stated cast rule,
and MoE work that grows with tokens x k."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dsv3_conformance.checks.strategies import build_weights
from dsv3_conformance.format.config import deepseek_v3_671b, tiny, tiny_fp8
from dsv3_conformance.format.numerics import Numerics
from dsv3_conformance.reference.fp8 import E4M3_MAX


def _model(config, dtype="float32"):
    from dsv3_conformance.impl.model import Transformer

    return Transformer(config, build_weights(config, seed=5), dtype=dtype)


def test_decode_never_retraces_over_a_generation():
    model = _model(tiny(vocab_size=301))  # a config no other test compiles
    prompt = np.arange(10).reshape(2, 5)
    model.prefill(prompt)
    for step in range(20):
        model.decode(np.array([step, step + 1]))
    model.prefill(prompt + 1)
    assert model.program.decode.experimental_get_tracing_count() == 1
    assert model.program.prefill.experimental_get_tracing_count() == 1


def test_models_of_one_structure_share_their_compilations():
    """Weights are arguments of the compiled steps: a second model of the same config traces nothing."""
    config = tiny(vocab_size=302)
    first, second = _model(config), _model(config)
    assert first.program is second.program
    prompt = np.arange(6).reshape(2, 3)
    first.prefill(prompt)
    second.prefill(prompt + 1)
    assert first.program.prefill.experimental_get_tracing_count() == 1


def test_a_bound_step_takes_new_per_call_tensors_and_keeps_the_rest():
    """impl.bound: the flat call gives what the structured call gives for new tokens, with the weights bound;
    a per-call tensor that is not among the step's inputs is refused, not silently ignored."""
    import tensorflow as tf

    from dsv3_conformance.impl.bound import BoundStep

    step = tf.function(lambda weights, x, scale: (weights[0] * x + weights[1]) * scale, autograph=False)
    weights = [tf.Variable([2.0, 3.0]), tf.Variable([1.0, -1.0])]
    first, second = tf.constant([1.0, 1.0]), tf.constant([5.0, -4.0])
    bound = BoundStep(step, (weights, first, 3), (first,))
    np.testing.assert_array_equal(bound((second,)).numpy(), step(weights, second, 3).numpy())
    weights[1].assign([0.0, 0.0])  # variables are bound by reference: their current values are read
    np.testing.assert_array_equal(bound((second,)).numpy(), [30.0, -36.0])
    with pytest.raises(RuntimeError, match="per-call tensors"):
        BoundStep(step, (weights, first, 3), (tf.constant([0.0, 0.0]),))


def test_prefill_in_the_naive_form_then_absorbed_decode_matches_the_reference():
    """`prefill_form` (what the benchmark runs: a naive prefill in causal query blocks, absorbed decode steps)
    changes no logit; 7 prompt tokens make the blocks uneven (2, 2, 2, 1)."""
    from dsv3_conformance.verdict import expect_close
    from dsv3_conformance.impl.model import Transformer
    from dsv3_conformance.reference.model import Transformer as Reference

    config = tiny(vocab_size=303)
    weights = build_weights(config, seed=5)
    model, reference = Transformer(config, weights, prefill_form="naive"), Reference(config, weights)
    assert (model.program.prefill_form, model.program.attention_form) == ("naive", "absorbed")
    prompt = np.arange(14).reshape(2, 7) * 7 % config.vocab_size
    expect_close("prefill logits", model.prefill(prompt)[0], reference.prefill(prompt).logits, "cross.float32")
    for step in ([3, 4], [5, 6]):
        expect_close("decode logits", model.decode(np.array(step))[0], reference.decode(np.array(step)).logits,
                     "cross.float32")


def test_a_trimmed_prefill_keeps_the_last_logits_and_whole_caches():
    """trim_last_block (the benchmark's prefill for generation): the last block's queries, output and FFN run at
    the last position only, yet the last logits and the decode steps over the caches it filled keep the
    reference's values; the last block's output and experts cover the last position only."""
    from dsv3_conformance.verdict import expect_close
    from dsv3_conformance.impl.model import Transformer
    from dsv3_conformance.reference.model import Transformer as Reference

    config = tiny(vocab_size=306, n_mtp_layers=0)
    weights = build_weights(config, seed=5)
    model = Transformer(config, weights, logits="last", prefill_form="naive", trim_last_block=True)
    reference = Reference(config, weights)
    prompt = np.arange(14).reshape(2, 7) * 5 % config.vocab_size
    logits, hidden, experts = model.prefill(prompt)
    expect_close("last prefill logits", logits[:, -1], reference.prefill(prompt).logits[:, -1], "cross.float32")
    assert [h.shape[1] for h in hidden] == [7] * (config.n_layers - 1) + [1]
    assert experts[-1].shape == (2, config.n_activated_experts)
    for step in ([3, 4], [5, 6]):
        expect_close("decode logits", model.decode(np.array(step))[0], reference.decode(np.array(step)).logits,
                     "cross.float32")


@pytest.mark.parametrize("logits, mtp_layers", [("all", 0), ("last", 1)])
def test_trimming_is_refused_where_a_position_would_be_missing(logits, mtp_layers):
    """All positions' logits, or MTP modules reading every position's final state, need the whole last block."""
    from dsv3_conformance.impl.model import Transformer

    config = tiny(vocab_size=307, n_mtp_layers=mtp_layers)
    with pytest.raises(ValueError, match="trim_last_block"):
        Transformer(config, build_weights(config, seed=5), logits=logits, trim_last_block=True)


@pytest.mark.parametrize("queries, keys", [(7, 7), (5, 9)])
def test_naive_attention_in_query_blocks_sees_every_visible_key(queries, keys):
    """Blocks of queries scored only against the keys up to their last query give the one-block result, for a
    prompt (queries = keys) and for queries that are the last of more keys (a step after a cached prefix)."""
    import tensorflow as tf

    from dsv3_conformance.verdict import expect_close
    from dsv3_conformance.impl import attention
    from dsv3_conformance.impl.model import to_tf

    config = tiny()
    weights = to_tf(build_weights(config, seed=5).layers[0].attn, tf.float32)
    rng = np.random.default_rng(0)

    def tensor(*shape):
        return tf.constant(rng.standard_normal(shape), tf.float32)
    inputs = (tensor(2, queries, config.n_heads, config.qk_nope_head_dim),
              tensor(2, queries, config.n_heads, config.qk_rope_head_dim), tensor(2, keys, config.kv_lora_rank),
              tensor(2, keys, config.qk_rope_head_dim))
    mask = attention.causal_mask(keys - queries, queries, keys)
    one, blocked = (attention.naive_attention(*inputs, weights, config, Numerics(), mask, 0.3, blocks)
                    for blocks in (1, 3))
    expect_close("blocked attention", blocked, one, "cross.float32")


def test_attention_window_covers_the_filled_positions_with_little_more():
    """The window holds every filled position, stays within the capacity, reads at most half again what is filled
    (above the smallest window) and takes at most two sizes per doubling of the sequence."""
    from dsv3_conformance.impl.model import WINDOW_QUANTUM, attention_window

    capacity = 5000
    windows = [attention_window(needed, capacity) for needed in range(1, capacity + 1)]
    for needed, window in enumerate(windows, start=1):
        assert needed <= window <= capacity
        assert window <= max(WINDOW_QUANTUM, 1.5 * needed)
    for octave in range(12):
        assert len(set(windows[2 ** octave: 2 ** (octave + 1)])) <= 2  # needed in (2^octave, 2^(octave + 1)]


def test_decode_across_a_window_boundary_matches_the_reference():
    """Steps attending over a window of a larger cache, the window growing between them, keep the reference's
    logits (the reference attends over exactly the filled positions)."""
    from dsv3_conformance.verdict import expect_close
    from dsv3_conformance.impl.model import Transformer, attention_window
    from dsv3_conformance.reference.model import Transformer as Reference

    config = tiny(vocab_size=304, max_seq_len=512)
    weights = build_weights(config, seed=5)
    model, reference = Transformer(config, weights), Reference(config, weights)
    prompt = np.arange(2 * 254).reshape(2, 254) * 7 % config.vocab_size
    model.prefill(prompt, capacity=512)
    reference.prefill(prompt)
    assert attention_window(255, 512) < attention_window(258, 512) < 512
    for step in range(4):
        tokens = np.array([step, step + 2])
        expect_close(f"decode logits at position {254 + step}", model.decode(tokens)[0],
                     reference.decode(tokens).logits, "cross.float32")


def test_steps_are_xla_compiled():
    """Only jit_compile functions can be lowered to HLO by experimental_get_compiler_ir."""
    import tensorflow as tf

    model = _model(tiny())
    model.prefill(np.zeros((1, 3), np.int64))
    hlo = model.program.decode.experimental_get_compiler_ir(model.leaves, tf.constant([[1]], tf.int32),
                                                             tf.constant(3, tf.int32), model.capacity,
                                                             model.caches, model.history)(stage="hlo")
    assert "HloModule" in hlo


@pytest.mark.parametrize("dtype, size", [("float32", 4), ("bfloat16", 2)])
def test_cache_holds_only_the_latent_and_the_rope_key(dtype, size):
    config = tiny()
    model = _model(config, dtype)
    model.prefill(np.zeros((3, 4), np.int64))
    assert len(model.caches) == config.n_layers
    for cache in model.caches:
        # one row per (sequence, position), nothing per head
        assert [v.shape.as_list() for v in cache] == [[3 * config.max_seq_len, config.kv_lora_rank],
                                                    [3 * config.max_seq_len, config.qk_rope_head_dim]]
    assert model.cache_bytes_per_token_per_layer() == (config.kv_lora_rank + config.qk_rope_head_dim) * size


def test_671b_cache_against_mha_is_1_76_percent():
    """576 values per token per layer vs 2 x 128 x 128 for MHA: 1.76%; 61 layers in BF16: 70.3 KB vs 4.0 MB."""
    import tensorflow as tf

    from dsv3_conformance.impl.attention import LatentCache

    config = deepseek_v3_671b().replace(max_seq_len=4)
    per_layer = LatentCache.allocate(config, 1, tf.bfloat16, capacity=4).bytes_per_token()
    mha = 2 * config.n_heads * config.v_head_dim * 2  # keys and values of every head, bf16
    assert per_layer == 576 * 2 and mha == 32768 * 2
    assert round(100 * per_layer / mha, 2) == 1.76
    assert round(config.n_layers * per_layer / 1000, 1) == 70.3 and round(config.n_layers * mha / 1e6, 1) == 4.0


def test_fp8_weights_stay_fp8_in_memory():
    """One byte per weight: e4m3 tensors, the routed expert stacks as their bytes, equal to the checkpoint's."""
    from dsv3_conformance.impl.model import Transformer

    config = tiny_fp8()
    weights = build_weights(config, seed=1)
    model = Transformer(config, weights)
    moe = model.weights.layers[1].ffn
    for linear in (model.weights.layers[0].attn.q_b_proj, model.weights.layers[0].ffn.down_proj, moe.shared.up_proj):
        assert linear.weight.dtype.name == "float8_e4m3fn" and linear.scale_inv.dtype.name == "float32"
    stack = moe.experts.gate_proj
    assert stack.weight.dtype.name == "uint8" and stack.scale_inv.dtype.name == "float32"
    assert stack.weight.shape[0] == config.n_routed_experts
    np.testing.assert_array_equal(stack.weight.numpy()[3], weights.layers[1].ffn.experts[3].gate_proj.weight.view(np.uint8))


def test_e4m3_bytes_decode_to_every_value():
    """All 256 bit patterns: the bytes decode to what a cast of the e4m3 value gives (NaN for both NaNs)."""
    import tensorflow as tf

    from dsv3_conformance.impl.fp8 import E4M3, e4m3_values

    patterns = np.arange(256, dtype=np.uint8)
    decoded = e4m3_values(tf.constant(patterns)).numpy()
    cast = tf.cast(tf.constant(patterns.view(E4M3.as_numpy_dtype)), tf.float32).numpy()
    np.testing.assert_array_equal(decoded, cast)
    assert np.isnan(decoded[[0x7F, 0xFF]]).all() and np.isfinite(np.delete(decoded, [0x7F, 0xFF])).all()


def test_e4m3_rounding_is_nearest_even_in_and_out_of_xla():
    """Every finite e4m3 value, every midpoint between neighbours (a tie: to the even one), the floats just beside
    each midpoint, random values over the range and beyond it: to_e4m3 gives what ml_dtypes' nearest-even cast
    gives after the clip, eagerly and fused by XLA between other operations (impl.fp8.round_to_e4m3_grid says
    where XLA's own convert had rounded one step off)."""
    import ml_dtypes
    import tensorflow as tf

    from dsv3_conformance.impl.fp8 import to_e4m3

    values = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    values = np.unique(values[np.isfinite(values)])
    midpoints = ((values[:-1].astype(np.float64) + values[1:]) / 2).astype(np.float32)
    rng = np.random.default_rng(3)
    x = np.concatenate([values, midpoints, np.nextafter(midpoints, -np.inf), np.nextafter(midpoints, np.inf),
                        rng.standard_normal(20000).astype(np.float32) * np.float32(30.0),
                        rng.standard_normal(20000).astype(np.float32) * np.float32(0.01), [600.0, -1e30]])
    x = x.astype(np.float32)
    expected = np.clip(x, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)

    def fused(v):  # the cast between two elementwise ops: one XLA fusion
        return tf.cast(to_e4m3(v * 2.0 - v), tf.float32) * 4.0

    np.testing.assert_array_equal(tf.cast(to_e4m3(tf.constant(x)), tf.float32).numpy(), expected)
    np.testing.assert_array_equal(tf.function(fused, jit_compile=True)(tf.constant(x)).numpy(), expected * 4)


def test_cast_rule_is_needed_in_tensorflow():
    """TensorFlow's own cast gives NaN beyond 448 where torch saturates; impl.fp8.to_e4m3 saturates."""
    import tensorflow as tf

    from dsv3_conformance.impl.fp8 import E4M3, to_e4m3

    raw = tf.cast(tf.cast(tf.constant([500.0, -500.0]), E4M3), tf.float32).numpy()
    assert np.isnan(raw).all()
    np.testing.assert_array_equal(tf.cast(to_e4m3(tf.constant([500.0, -500.0])), tf.float32).numpy(),
                                  [E4M3_MAX, -E4M3_MAX])


@pytest.mark.parametrize("tokens, k, experts", [(1, 8, 256), (4, 8, 256), (64, 8, 256), (4096, 8, 256), (80, 4, 16)])
def test_moe_rows_grow_with_tokens_times_k(tokens, k, experts):
    """Expert rows computed = tiles x rows <= tokens*k + one partial tile per used expert, never tokens*experts."""
    from dsv3_conformance.impl.moe import tile_count, tile_rows

    copies = tokens * k
    rows = tile_rows(copies, experts)
    computed = tile_count(copies, experts, rows) * rows
    assert copies <= computed <= copies + min(experts, copies) * (rows - 1)
    assert computed < tokens * experts


def _kernel_or_skip():
    import os
    import shutil

    from dsv3_conformance.impl import matvec

    if shutil.which(os.environ.get("CXX", "g++")) is None or os.environ.get("DSV3_MATVEC_KERNEL") == "0":
        pytest.skip("no C++ compiler here (or the kernel is switched off): decode steps use XLA's products")
    assert matvec.available(), "a compiler is here but the matvec kernel did not build or register (see stderr)"
    return matvec


@pytest.mark.parametrize("rows, out, width", [(1, 256, 1024), (3, 37, 50), (8, 64, 16), (11, 21, 33)])
def test_matvec_kernel_matches_float64_products_in_place_in_a_stack(rows, out, width):
    """Every row count (the kernel takes 8 rows at a time), output counts off its blocks of 4 and 16 rows, widths
    off its 16-float vectors; each matrix of the stack read where it lies, an index past the stack clamped as
    XLA's gather clamps."""
    import tensorflow as tf

    matvec = _kernel_or_skip()
    rng = np.random.default_rng(rows * out)
    x = rng.standard_normal((rows, width)).astype(np.float32)
    stack = rng.standard_normal((5, out, width)).astype(np.float32)
    products = tf.function(lambda x, stack: [matvec.matvec(x, stack, index) for index in range(6)], jit_compile=True)
    for index, got in enumerate(products(tf.constant(x), tf.constant(stack))):
        expected = x.astype(np.float64) @ stack[min(index, 4)].astype(np.float64).T
        # float32 sums of `width` products, in another order than float64's: a few ulps of the terms' magnitude
        bound = 8 * width * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(stack[min(index, 4)]).T)
        assert np.all(np.abs(got.numpy() - expected) <= bound), (index, np.abs(got.numpy() - expected).max())


@pytest.mark.parametrize("rows, first, count, width", [(1, 0, 16, 24), (3, 16, 16, 24), (9, 5, 7, 24), (2, 3, 20, 533)])
def test_per_head_kernel_products_match_float64_both_ways(rows, first, count, width):
    """The absorbed attention's per-head products: each head's rows of x against rows first..first+count of its
    block, as x B^T and as x B (transposed), read inside the blocks; a width of 533 takes the transposed product's
    blocks of 256 outputs twice and the rest after them."""
    import tensorflow as tf

    matvec = _kernel_or_skip()
    rng = np.random.default_rng(rows + first)
    blocks = rng.standard_normal((4, 32, width)).astype(np.float32)
    x = rng.standard_normal((4, rows, width)).astype(np.float32)
    x_t = rng.standard_normal((4, rows, count)).astype(np.float32)
    products = tf.function(lambda x, x_t, blocks: (matvec.per_head(x, blocks, first, count),
                                                   matvec.per_head(x_t, blocks, first, count, transposed=True)),
                           jit_compile=True)
    got, got_t = products(tf.constant(x), tf.constant(x_t), tf.constant(blocks))
    used = blocks[:, first:first + count].astype(np.float64)
    for value, expected, terms in ((got, x @ used.transpose(0, 2, 1), np.abs(x) @ np.abs(used).transpose(0, 2, 1)),
                                   (got_t, x_t @ used, np.abs(x_t) @ np.abs(used))):
        bound = 8 * max(width, count) * np.finfo(np.float32).eps * terms
        assert value.shape == expected.shape
        assert np.all(np.abs(value.numpy() - expected) <= bound), np.abs(value.numpy() - expected).max()


@pytest.mark.parametrize("tokens, copies", [(1, 6), (5, 13), (3, 30)])
def test_experts_kernel_matches_float64_swiglu_experts(tokens, copies):
    """Token copies sorted by expert (runs of one expert longer than the kernel's groups of 8 at 30 copies), an
    expert index past the stack clamped; widths off the 16-float vectors and 16-row blocks."""
    import tensorflow as tf

    matvec = _kernel_or_skip()
    rng = np.random.default_rng(copies)
    dim, inter, stack = 40, 24, 4
    x = rng.standard_normal((tokens, dim)).astype(np.float32)
    gate, up = (rng.standard_normal((stack, inter, dim)).astype(np.float32) for _ in range(2))
    down = rng.standard_normal((stack, dim, inter)).astype(np.float32)
    expert = np.sort(rng.integers(0, stack + 1, copies)).astype(np.int32)
    token = rng.integers(0, tokens, copies).astype(np.int32)
    weight = rng.standard_normal(copies).astype(np.float32)
    got = tf.function(matvec.experts, jit_compile=True)(x, gate, up, down, expert, token, weight).numpy()
    expected, magnitude = np.zeros((tokens, dim)), np.zeros((tokens, dim))
    for e, t, w in zip(np.minimum(expert, stack - 1), token, weight.astype(np.float64)):
        g, u = gate[e] @ x[t].astype(np.float64), up[e] @ x[t].astype(np.float64)
        hidden = g / (1 + np.exp(-g)) * u
        expected[t] += w * (down[e] @ hidden)
        magnitude[t] += abs(w) * (np.abs(down[e]) @ np.abs(hidden))
    # float32 sums of dim then inter products, in another order than float64's: a few ulps of the terms' magnitude
    bound = 8 * (dim + inter) * np.finfo(np.float32).eps * magnitude
    assert np.all(np.abs(got - expected) <= bound), np.abs(got - expected).max()


@pytest.mark.parametrize("batch, length, heads, latent, window", [(1, 1, 16, 256, 40), (2, 3, 3, 20, 37),
                                                                  (3, 1, 17, 33, 16)])
def test_latent_attention_kernel_matches_float64_softmax_attention(batch, length, heads, latent, window):
    """The absorbed attention's core in the kernel: causal visibility (each query sees the positions up to its own,
    none past the window, the cache longer than the window), latent widths off its 16-column blocks, more heads than
    its 16 accumulators, several sequences and queries."""
    import tensorflow as tf

    matvec = _kernel_or_skip()
    rng = np.random.default_rng(batch * 100 + window)
    capacity, rope, scale, start = window + 9, 8, 0.3, window - length - 2
    q_latent = rng.standard_normal((heads, batch * length, latent)).astype(np.float32)
    q_rope = rng.standard_normal((batch * length, heads, rope)).astype(np.float32)
    kv = rng.standard_normal((batch, capacity, latent)).astype(np.float32)
    rope_key = rng.standard_normal((batch, capacity, rope)).astype(np.float32)
    visible = np.arange(window)[None, :] <= start + np.arange(length)[:, None]
    got = tf.function(lambda *a: matvec.latent_attention(*a, scale), jit_compile=True)(
        q_latent, q_rope, kv, rope_key, visible).numpy()
    assert got.shape == (heads, batch * length, latent)
    for b in range(batch):
        for s in range(length):
            q = b * length + s
            keys = visible[s].nonzero()[0]
            scores = scale * (kv[b, keys].astype(np.float64) @ q_latent[:, q].T.astype(np.float64)
                              + rope_key[b, keys].astype(np.float64) @ q_rope[q].T.astype(np.float64))  # [t, h]
            weights = np.exp(scores - scores.max(axis=0))
            weights /= weights.sum(axis=0)
            expected = weights.T @ kv[b, keys].astype(np.float64)  # [h, c]
            # float32 scores of latent + rope terms, a softmax and a weighted sum: ulps of the terms' magnitudes
            magnitude = np.abs(weights.T) @ np.abs(kv[b, keys]) + np.abs(expected)
            score_error = 8 * (latent + rope) * np.finfo(np.float32).eps * scale * (
                np.abs(kv[b, keys]) @ np.abs(q_latent[:, q]).T + np.abs(rope_key[b, keys]) @ np.abs(q_rope[q]).T).max()
            bound = (16 * len(keys) * np.finfo(np.float32).eps + 2 * score_error) * magnitude
            assert np.all(np.abs(got[:, q] - expected) <= bound), (b, s, np.abs(got[:, q] - expected).max())


def test_decode_steps_take_the_matvec_kernel_and_agree_with_xla_products():
    """Where the kernel builds, a compiled decode step calls it (the dense products, the head, the dense FFN and
    the routed experts read in their stacks); its logits agree with the same step through XLA's products."""
    import tensorflow as tf

    from dsv3_conformance.impl import matvec

    _kernel_or_skip()
    # wide enough that the dense FFN, the head, each expert's projections and wkv_b reach matvec.MIN_WEIGHT
    config = tiny(dim=256, inter_dim=384, moe_inter_dim=256, vocab_size=512, qk_nope_head_dim=64, v_head_dim=64,
                  kv_lora_rank=128)
    prompt, following = np.arange(12).reshape(2, 6) % config.vocab_size, np.array([3, 7])
    model = _model(config)
    model.prefill(prompt)
    hlo = model.program.decode.experimental_get_compiler_ir(model.leaves, tf.constant(following[:, None], tf.int32),
                                                             tf.constant(6, tf.int32), model.capacity,
                                                             model.caches, model.history)(stage="hlo")
    calls = [line for line in hlo.splitlines() if f'custom_call_target="{matvec.TARGET}"' in line]
    assert any(f"f32[1,{config.vocab_size},{config.dim}]" in line for line in calls)
    ffns = [line for line in hlo.splitlines() if f'custom_call_target="{matvec.EXPERTS_TARGET}"' in line]
    assert any(f"f32[{config.n_routed_experts},{config.moe_inter_dim},{config.dim}]" in line for line in ffns)
    assert any(f"f32[1,{config.inter_dim},{config.dim}]" in line for line in ffns)  # the dense layers' FFN
    assert hlo.count(f'custom_call_target="{matvec.HEADS_TARGET}"') == 2 * config.n_layers  # both wkv_b products
    assert hlo.count(f'custom_call_target="{matvec.ATTENTION_TARGET}"') == config.n_layers
    with_kernel = model.decode(following)[0]
    several = np.array([[5, 9, 2], [4, 1, 8]])  # three queries per sequence: the kernel's causal visibility
    with_kernel_several = model.decode(several)[0]

    original = matvec.available
    matvec.available = lambda: False
    try:
        from dsv3_conformance.impl.model import program
        program.cache_clear()
        plain = _model(config)
        plain.prefill(prompt)
        plain_hlo = plain.program.decode.experimental_get_compiler_ir(
            plain.leaves, tf.constant(following[:, None], tf.int32), tf.constant(6, tf.int32), plain.capacity,
            plain.caches, plain.history)(stage="hlo")
        assert not any(f'"{target}"' in plain_hlo for target in (matvec.TARGET, matvec.HEADS_TARGET,
                                                                     matvec.EXPERTS_TARGET, matvec.ATTENTION_TARGET))
        without = plain.decode(following)[0]
        without_several = plain.decode(several)[0]
    finally:
        matvec.available = original
        program.cache_clear()
    np.testing.assert_allclose(with_kernel, without, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(with_kernel_several, without_several, rtol=1e-4, atol=1e-5)


def test_without_a_compiler_the_steps_keep_xla_products_and_say_so(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), DSV3_KERNEL_CACHE=str(tmp_path),
               DSV3_MATVEC_KERNEL="1")
    code = "from dsv3_conformance.impl import matvec; print(matvec.available())"
    result = subprocess.run([sys.executable, "-c", code], env=env,
                            capture_output=True, text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"
    assert "matvec kernel is not available" in result.stderr and "XLA's products" in result.stderr


def test_next_logits_are_decode_logits_and_refuse_an_expert_not_loaded():
    """Transformer.next_logits (generation: the logits only) gives decode's logits step after step; with a MoE
    block missing one routed expert that the prompt does not use and the next step does, the prefill runs and the
    step is refused, as decode refuses it."""
    from dsv3_conformance.format.weights import ExpertNotResident
    from dsv3_conformance.impl.model import Transformer

    config = tiny(vocab_size=305)
    weights = build_weights(config, seed=8)
    full, generating = Transformer(config, weights), Transformer(config, weights)
    prompt = np.arange(8).reshape(2, 4) * 11 % config.vocab_size
    full.prefill(prompt)
    generating.prefill(prompt)
    for step in range(3):
        token = np.array([step + 3, 2 * step + 1])
        logits, _, _ = full.decode(token)
        np.testing.assert_array_equal(generating.next_logits(token), logits)
    prompt = prompt[:, :1]  # one token a sequence: few experts chosen, so some next token needs another
    _, _, prompt_experts = full.prefill(prompt)
    moe_layers = [index for index, layer in enumerate(weights.layers) if hasattr(layer.ffn, "experts")]

    def unused_expert(token):
        full.truncate(prompt.shape[1])
        _, _, step_experts = full.decode(token)
        return next(((block, int(e)) for block in range(len(moe_layers)) for e in np.unique(step_experts[block])
                     if e not in prompt_experts[block]), None)

    token, (block, missing) = next((token, found) for token in (np.array([t, t + 1]) for t in range(0, 60, 2))
                                   if (found := unused_expert(token)) is not None)
    ffn = weights.layers[moe_layers[block]].ffn
    without = dataclasses.replace(ffn, experts=tuple(None if e == missing else expert
                                                     for e, expert in enumerate(ffn.experts)))
    layers = list(weights.layers)
    layers[moe_layers[block]] = dataclasses.replace(layers[moe_layers[block]], ffn=without)
    partial = dataclasses.replace(weights, layers=tuple(layers))
    for step_name in ("next_logits", "decode"):
        model = Transformer(config, partial)
        model.prefill(prompt)
        with pytest.raises(ExpertNotResident):
            getattr(model, step_name)(token)

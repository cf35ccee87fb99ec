// The absorbed attention's core over a latent cache (dsv3_latent_attention), in three passes over the pool.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>
#include "products.h"

namespace dsv3 {

typedef int32_t v16i __attribute__((vector_size(64)));

// e^x for 16 floats: x = n ln2 + r with |r| <= ln2/2, e^r by the degree-6 polynomial of Cephes' expf (about one ulp
// off the rounded value), times 2^n put into the exponent bits; exactly 0 below -87.3 (a masked score's -inf among
// them), where 2^n would leave the normal range; NaN stays NaN.

v16 exp16(v16 x) {
  const v16 zero = {}, low = zero - 87.3f, high = zero + 88.3f;
  const v16 clamped = x < high ? x : high;
  const v16 t = clamped * 1.44269504088896341f;
  const v16i n = __builtin_convertvector(t + (t >= 0.0f ? zero + 0.5f : zero - 0.5f), v16i);
  const v16 nf = __builtin_convertvector(n, v16);
  const v16 r = clamped - nf * 0.693359375f + nf * 2.12194440e-4f;
  v16 poly = zero + 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const v16 value = poly * r * r + r + 1.0f;
  const v16 scaled = std::bit_cast<v16>(std::bit_cast<v16i>(value) + (n << 23));
  return x < low ? zero : (x != x ? x : scaled);  // NaN stays NaN
}

// The absorbed attention's core for a decode step's few queries, over a latent cache read where it lies: for query
// q = b * S + s and head h, softmax over the visible positions t of scale * (q_latent[h, q] . kv[b, t] + q_rope[q, h] .
// rope[b, t]), then the latents weighted by it. Three passes over the pool: the scores (units of 16 positions of one
// sequence), each (head, query) row's softmax, the weighted latents (units of 4 heads by 64 latent columns of one
// query, their accumulators in registers).
struct LatentAttention {
  long batch = 0, length = 0, heads = 0, latent = 0, rope = 0, capacity = 0, window = 0;
  float scale = 1.0f;
  const float *q_latent = nullptr, *q_rope = nullptr, *kv = nullptr, *rope_key = nullptr;  // see dsv3_latent_attention
  const uint8_t* visible = nullptr;  // [length, window]
  long keys = 0, padded = 0;         // positions up to the last visible one; rounded up to 16
  std::vector<float> scores;         // [heads, queries, padded], then the probabilities
  std::vector<float> lanes;          // the queries transposed: [queries, groups of 16 heads, latent + rope, 16]
  float* out = nullptr;              // [heads, queries, latent]
  long queries() const { return batch * length; }
  long groups() const { return (heads + 15) / 16; }
  float* row(long h, long q) { return &scores[(h * queries() + q) * padded]; }
  float* lane(long q, long g) { return &lanes[(q * groups() + g) * (latent + rope) * 16]; }
};

struct ScoresJob : Job {  // a unit: 16 positions of one sequence, every query and head
  LatentAttention& a;
  explicit ScoresJob(LatentAttention& attention) : a(attention) {}
  long units() const override { return a.batch * blocks(a.keys); }
  // Eight positions at a time against 16 heads held in a vector's lanes (the queries transposed, a.lanes), so that
  // nothing is summed across lanes: per latent (or rope) column, each position's value times the heads' vector.
  void run(long u0, long u1) const override {
    constexpr int kPositions = 8;
    constexpr long kAhead = 16;  // positions (a layer's 545 cold rows: 67 us without, 48 with, alone)
    for (long u = u0; u < u1; ++u) {
      const long b = u / blocks(a.keys), t0 = u % blocks(a.keys) * kBlock, t1 = std::min(t0 + kBlock, a.keys);
      for (long s = 0; s < a.length; ++s) {
        const long q = b * a.length + s;
        for (long g = 0; g < a.groups(); ++g) {
          const float* lanes = a.lane(q, g);
          for (long t = t0; t < t1; t += kPositions) {
            const float* kv[kPositions];
            const float* rope[kPositions];
            for (int i = 0; i < kPositions; ++i) {  // past t1: the last position again, its result dropped
              const long row = b * a.capacity + std::min(t + i, t1 - 1);
              kv[i] = a.kv + row * a.latent;
              rope[i] = a.rope_key + row * a.rope;
            }
            // The next positions' rows on their way from memory while these are multiplied (a layer's cache is
            // cold: the step streamed every weight since it was last read).
            for (long ahead = t + kAhead; ahead < std::min(t + kAhead + kPositions, a.keys); ++ahead) {
              const long row = b * a.capacity + ahead;
              for (long c = 0; c < a.latent; c += 16) __builtin_prefetch(a.kv + row * a.latent + c);
              for (long c = 0; c < a.rope; c += 16) __builtin_prefetch(a.rope_key + row * a.rope + c);
            }
            v16 acc[kPositions] = {};
            for (long c = 0; c < a.latent; ++c) {
              const v16 heads = *reinterpret_cast<const v16u*>(lanes + c * 16);
              for (int i = 0; i < kPositions; ++i) acc[i] += kv[i][c] * heads;
            }
            for (long c = 0; c < a.rope; ++c) {
              const v16 heads = *reinterpret_cast<const v16u*>(lanes + (a.latent + c) * 16);
              for (int i = 0; i < kPositions; ++i) acc[i] += rope[i][c] * heads;
            }
            for (int i = 0; i < kPositions && t + i < t1; ++i) {
              const bool seen = a.visible[s * a.window + t + i] != 0;
              for (long h = g * 16; h < std::min(a.heads, g * 16 + 16); ++h) {
                a.row(h, q)[t + i] = seen ? acc[i][h - g * 16] * a.scale : -INFINITY;
              }
            }
          }
        }
      }
    }
  }
};

struct SoftmaxJob : Job {  // a unit: one (head, query) row
  LatentAttention& a;
  explicit SoftmaxJob(LatentAttention& attention) : a(attention) {}
  long units() const override { return a.heads * a.queries(); }
  void run(long u0, long u1) const override {
    for (long u = u0; u < u1; ++u) {
      float* row = a.row(u / a.queries(), u % a.queries());
      for (long t = a.keys; t < a.padded; ++t) row[t] = -INFINITY;
      v16 top = {};
      top -= INFINITY;
      for (long t = 0; t < a.padded; t += 16) {
        const v16 x = *reinterpret_cast<const v16u*>(row + t);
        top = x > top ? x : top;
      }
      float most = top[0];
      for (int j = 1; j < 16; ++j) most = std::max(most, top[j]);
      v16 total = {};
      for (long t = 0; t < a.padded; t += 16) {
        const v16 e = exp16(*reinterpret_cast<const v16u*>(row + t) - most);
        *reinterpret_cast<v16u*>(row + t) = e;
        total += e;
      }
      float sum = 0.0f;
      for (int j = 0; j < 16; ++j) sum += total[j];
      for (long t = 0; t < a.keys; ++t) row[t] /= sum;
    }
  }
};

struct WeightedJob : Job {  // a unit: 4 heads by 64 latent columns of one query, 16 accumulators in registers
  LatentAttention& a;
  static constexpr long kHeads = 4, kVectors = 4, kColumns = kVectors * 16;
  explicit WeightedJob(LatentAttention& attention) : a(attention) {}
  long head_blocks() const { return (a.heads + kHeads - 1) / kHeads; }
  long column_blocks() const { return (a.latent + kColumns - 1) / kColumns; }
  long units() const override { return a.queries() * head_blocks() * column_blocks(); }
  void run(long u0, long u1) const override {
    for (long u = u0; u < u1; ++u) {
      const long q = u / (head_blocks() * column_blocks()), h0 = u / column_blocks() % head_blocks() * kHeads;
      const long c0 = u % column_blocks() * kColumns, b = q / a.length;
      const long heads = std::min(kHeads, a.heads - h0), width = std::min(kColumns, a.latent - c0);
      const float* p[kHeads];
      for (long j = 0; j < kHeads; ++j) p[j] = a.row(std::min(h0 + j, a.heads - 1), q);
      v16 acc[kHeads][kVectors] = {};
      v16 kv[kVectors] = {};
      for (long t = 0; t < a.keys; ++t) {
        const float* source = a.kv + (b * a.capacity + t) * a.latent + c0;
        if (width == kColumns) {
          for (long v = 0; v < kVectors; ++v) kv[v] = *reinterpret_cast<const v16u*>(source + v * 16);
        } else {
          for (long c = 0; c < width; ++c) kv[c / 16][c % 16] = source[c];
        }
        for (long j = 0; j < kHeads; ++j) {
          for (long v = 0; v < kVectors; ++v) acc[j][v] += p[j][t] * kv[v];
        }
      }
      for (long j = 0; j < heads; ++j) {
        float* target = a.out + ((h0 + j) * a.queries() + q) * a.latent + c0;
        for (long c = 0; c < width; ++c) target[c] = acc[j][c / 16][c % 16];
      }
    }
  }
};

}  // namespace dsv3

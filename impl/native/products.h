// Products of a few rows x against a weight read where it lies (dsv3_matvec, dsv3_heads), as the pool's units.
#pragma once

#include <algorithm>
#include <cstdint>
#include "pool.h"

namespace dsv3 {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  // the same, loadable from any float address

struct Product {
  const float* x;
  const float* w;
  float* y;
  long rows, out, in;       // per matrix: x [rows, in], y [rows, out]
  long mats = 1;            // matrices (attention heads), each with its own rows of x and y, laid out one after another
  long w_stride = 0;        // floats from one matrix's first weight row used to the next one's
  bool transposed = false;  // y = x W with W's rows [in, out] (rows `out` floats apart), not x W^T
};

// Output rows [n0, n1) of one product, R rows of x against W weight rows at a time: each weight row is read once
// for all R, W rows are read side by side and the next W rows are prefetched (several streams keep a core's memory
// reads in flight).
template <int R, int W>
void product_rows(const Product& p, long n0, long n1) {
  const long in = p.in, vec_end = in - in % 16;
  for (long n = n0; n < n1; n += W) {
    const float* w = p.w + n * in;
    v16 acc[W][R] = {};
    for (long k = 0; k < vec_end; k += 16) {
      for (int i = 0; i < W; ++i) __builtin_prefetch(w + (W + i) * in + k);
      for (int i = 0; i < W; ++i) {
        const v16 wv = *reinterpret_cast<const v16u*>(w + i * in + k);
        for (int r = 0; r < R; ++r) acc[i][r] += wv * *reinterpret_cast<const v16u*>(p.x + r * in + k);
      }
    }
    for (int i = 0; i < W; ++i) {
      for (int r = 0; r < R; ++r) {
        float sum = 0.0f;
        for (int j = 0; j < 16; ++j) sum += acc[i][r][j];
        for (long k = vec_end; k < in; ++k) sum += w[i * in + k] * p.x[r * in + k];
        p.y[r * p.out + n + i] = sum;
      }
    }
  }
}

// One row of x (a decode step at one sequence): each weight row alone, summed into four accumulators along it, the
// cache lines kAhead floats (8 KB) further along the weights prefetched as it goes (past a row's end that is the next
// rows, which the same thread reads next): one long sequential stream per thread, which the hardware prefetcher and
// the explicit one keep full (the distances measured are in docs/performance-log.md).
constexpr long kAhead = 2048;

void single_row(const Product& p, long n0, long n1) {
  const long in = p.in, wide_end = in - in % 64, vec_end = in - in % 16;
  const float* x = p.x;
  for (long n = n0; n < n1; ++n) {
    const float* w = p.w + n * in;
    v16 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    long k = 0;
    for (; k < wide_end; k += 64) {
      for (long line = 0; line < 64; line += 16) __builtin_prefetch(w + k + kAhead + line);
      a0 += *reinterpret_cast<const v16u*>(w + k) * *reinterpret_cast<const v16u*>(x + k);
      a1 += *reinterpret_cast<const v16u*>(w + k + 16) * *reinterpret_cast<const v16u*>(x + k + 16);
      a2 += *reinterpret_cast<const v16u*>(w + k + 32) * *reinterpret_cast<const v16u*>(x + k + 32);
      a3 += *reinterpret_cast<const v16u*>(w + k + 48) * *reinterpret_cast<const v16u*>(x + k + 48);
    }
    for (; k < vec_end; k += 16) a0 += *reinterpret_cast<const v16u*>(w + k) * *reinterpret_cast<const v16u*>(x + k);
    const v16 acc = (a0 + a1) + (a2 + a3);
    float sum = 0.0f;
    for (int j = 0; j < 16; ++j) sum += acc[j];
    for (; k < in; ++k) sum += w[k] * x[k];
    p.y[n] = sum;
  }
}

// Several rows of x: four weight rows at a time up to 4 rows of x, two above (at most 16 accumulators of 16 floats), single weight
// rows for the last out % W.
template <int R>
void product_rows(const Product& p, long n0, long n1) {
  constexpr int W = R <= 4 ? 4 : 2;
  const long blocked = n0 + (n1 - n0) / W * W;
  product_rows<R, W>(p, n0, blocked);
  product_rows<R, 1>(p, blocked, n1);
}

// Rows of x taken at a time: a product of more reads its weights once per kMaxRows.
constexpr long kMaxRows = 8;

void product_rows_any(const Product& p, long n0, long n1) {
  for (long r0 = 0; r0 < p.rows; r0 += kMaxRows) {
    Product part = p;
    part.x = p.x + r0 * p.in;
    part.y = p.y + r0 * p.out;
    switch (std::min(p.rows - r0, kMaxRows)) {
      case 1: single_row(part, n0, n1); break;
      case 2: product_rows<2>(part, n0, n1); break;
      case 3: product_rows<3>(part, n0, n1); break;
      case 4: product_rows<4>(part, n0, n1); break;
      case 5: product_rows<5>(part, n0, n1); break;
      case 6: product_rows<6>(part, n0, n1); break;
      case 7: product_rows<7>(part, n0, n1); break;
      default: product_rows<8>(part, n0, n1); break;
    }
  }
}

// y = x W for one matrix `m` of a transposed product: 256 outputs at a time held in 16 vector registers while every
// weight row adds its part, scaled by its element of x (the rows lie one after another, prefetched kAhead floats
// ahead); the last out % 256 outputs added up in place in the output row (in L1).
void transposed_rows(const Product& p, long m) {
  constexpr long kVectors = 16, kWidth = kVectors * 16;
  const float* w = p.w + m * p.w_stride;
  for (long r = 0; r < p.rows; ++r) {
    const float* x = p.x + (m * p.rows + r) * p.in;
    float* y = p.y + (m * p.rows + r) * p.out;
    long c0 = 0;
    for (; c0 + kWidth <= p.out; c0 += kWidth) {
      v16 acc[kVectors] = {};
      for (long j = 0; j < p.in; ++j) {
        const float* row = w + j * p.out + c0;
        for (long line = 0; line < kWidth; line += 16) __builtin_prefetch(row + kAhead + line);
        for (long v = 0; v < kVectors; ++v) acc[v] += x[j] * *reinterpret_cast<const v16u*>(row + v * 16);
      }
      for (long v = 0; v < kVectors; ++v) *reinterpret_cast<v16u*>(y + c0 + v * 16) = acc[v];
    }
    for (long c = c0; c < p.out; ++c) y[c] = 0.0f;
    for (long j = 0; j < p.in && c0 < p.out; ++j) {
      const float scale = x[j];
      const float* row = w + j * p.out;
      for (long c = c0; c < p.out; ++c) y[c] += scale * row[c];
    }
  }
}

// A product's units: 16 output rows of one matrix, or a whole matrix of a transposed product.
constexpr long kBlock = 16;
long blocks(long rows) { return (rows + kBlock - 1) / kBlock; }

struct ProductJob : Job {
  Product p;
  explicit ProductJob(const Product& product) : p(product) {}
  long units() const override { return p.transposed ? p.mats : p.mats * blocks(p.out); }
  void run(long u0, long u1) const override {
    if (p.transposed) {
      for (long m = u0; m < u1; ++m) transposed_rows(p, m);
      return;
    }
    const long per = blocks(p.out);
    for (long m = u0 / per; m * per < u1; ++m) {
      Product one = p;
      one.x += m * p.rows * p.in;
      one.w += m * p.w_stride;
      one.y += m * p.rows * p.out;
      const long n0 = std::max(u0 - m * per, 0L) * kBlock, n1 = std::min(std::min(u1 - m * per, per) * kBlock, p.out);
      if (n0 < n1) product_rows_any(one, n0, n1);
    }
  }
};

}  // namespace dsv3

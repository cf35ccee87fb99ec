// SwiGLU experts over token copies (dsv3_experts), in two passes of product units.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>
#include "products.h"

namespace dsv3 {

// SwiGLU experts on token copies sorted by expert: each copy c of token t_c routed to expert e_c with gate weight
// g_c adds g_c * down_e(silu(gate_e x) * up_e x) to its token's output row. The copies are taken in groups of up to 8
// consecutive copies of one expert (an expert's rows read once per group) in two passes over the pool: every group's
// hidden rows (gate and up rows of a unit read side by side, silu applied as they are made), then their down
// products; the weighted sum back per token runs in the calling thread.
struct Copies {
  long dim = 0, inter = 0;
  const float *gate = nullptr, *up = nullptr, *down = nullptr;  // stacks [S, inter, dim], [S, inter, dim], [S, dim, inter]
  std::vector<long> first, expert;     // per group: its first copy (one more entry: the end), its expert
  std::vector<float> xs, gated, hidden, ys;  // [C, dim] the copies' rows; [C, inter] twice; [C, dim] their outputs
  long groups() const { return static_cast<long>(expert.size()); }
  long rows(long g) const { return first[g + 1] - first[g]; }
};

struct HiddenJob : Job {  // a unit: 16 hidden rows of one group
  Copies& c;
  explicit HiddenJob(Copies& copies) : c(copies) {}
  long units() const override { return c.groups() * blocks(c.inter); }
  void run(long u0, long u1) const override {
    for (long u = u0; u < u1; ++u) {
      const long g = u / blocks(c.inter), n0 = u % blocks(c.inter) * kBlock, n1 = std::min(n0 + kBlock, c.inter);
      const long at = c.first[g], rows = c.rows(g), weights = c.expert[g] * c.inter * c.dim;
      product_rows_any(Product{&c.xs[at * c.dim], c.gate + weights, &c.gated[at * c.inter], rows, c.inter, c.dim},
                       n0, n1);
      product_rows_any(Product{&c.xs[at * c.dim], c.up + weights, &c.hidden[at * c.inter], rows, c.inter, c.dim},
                       n0, n1);
      for (long r = at; r < at + rows; ++r) {
        for (long n = n0; n < n1; ++n) {
          const float gate = c.gated[r * c.inter + n];
          c.hidden[r * c.inter + n] *= gate / (1.0f + std::exp(-gate));
        }
      }
    }
  }
};

struct DownJob : Job {  // a unit: 16 output columns of one group
  Copies& c;
  explicit DownJob(Copies& copies) : c(copies) {}
  long units() const override { return c.groups() * blocks(c.dim); }
  void run(long u0, long u1) const override {
    for (long u = u0; u < u1; ++u) {
      const long g = u / blocks(c.dim), n0 = u % blocks(c.dim) * kBlock, n1 = std::min(n0 + kBlock, c.dim);
      const long at = c.first[g];
      product_rows_any(Product{&c.hidden[at * c.inter], c.down + c.expert[g] * c.dim * c.inter, &c.ys[at * c.dim],
                               c.rows(g), c.dim, c.inter}, n0, n1);
    }
  }
};

}  // namespace dsv3

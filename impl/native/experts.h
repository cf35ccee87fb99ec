// SwiGLU experts over token copies (dsv3_experts), in two passes of product units.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>
#include "products.h"

namespace dsv3 {

// SwiGLU experts on token copies sorted by expert: each copy c of token t_c routed to expert e_c with gate weight
// g_c adds g_c * down_e(silu(gate_e x) * up_e x) to its token's output row. The copies are taken in groups of up to
// kMaxRows consecutive copies of one expert (an expert's rows read once per group) in two passes over the pool: every group's
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

// A pass over every group of copies, a unit being 16 of the `width` outputs of one group.
struct GroupPass : Job {
  Copies& c;
  const long width;
  GroupPass(Copies& copies, long outputs) : c(copies), width(outputs) {}
  long units() const override { return c.groups() * blocks(width); }
  void run(long u0, long u1) const override {
    for (long u = u0; u < u1; ++u) {
      const long g = u / blocks(width), n0 = u % blocks(width) * kBlock;
      outputs(g, c.first[g], n0, std::min(n0 + kBlock, width));
    }
  }
  // Outputs [n0, n1) of group g, whose copies start at copy `at`.
  virtual void outputs(long g, long at, long n0, long n1) const = 0;
};

struct HiddenJob : GroupPass {  // the hidden rows: gate and up products, silu(gate) * up
  explicit HiddenJob(Copies& copies) : GroupPass(copies, copies.inter) {}
  void outputs(long g, long at, long n0, long n1) const override {
    const long rows = c.rows(g), weights = c.expert[g] * c.inter * c.dim;
    product_rows_any(Product{&c.xs[at * c.dim], c.gate + weights, &c.gated[at * c.inter], rows, c.inter, c.dim}, n0,
                     n1);
    product_rows_any(Product{&c.xs[at * c.dim], c.up + weights, &c.hidden[at * c.inter], rows, c.inter, c.dim}, n0,
                     n1);
    for (long r = at; r < at + rows; ++r) {
      for (long n = n0; n < n1; ++n) {
        const float gate = c.gated[r * c.inter + n];
        c.hidden[r * c.inter + n] *= gate / (1.0f + std::exp(-gate));
      }
    }
  }
};

struct DownJob : GroupPass {  // the down products of the hidden rows
  explicit DownJob(Copies& copies) : GroupPass(copies, copies.dim) {}
  void outputs(long g, long at, long n0, long n1) const override {
    product_rows_any(Product{&c.hidden[at * c.inter], c.down + c.expert[g] * c.dim * c.inter, &c.ys[at * c.dim],
                             c.rows(g), c.dim, c.inter}, n0, n1);
  }
};

}  // namespace dsv3

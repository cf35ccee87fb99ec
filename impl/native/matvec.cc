// y = x W^T for a few rows x [rows, in] against one matrix W [out, in] of a stack [S, out, in], read where it
// lies, on every core: an XLA custom call (legacy "status returning" form) for the decode steps' products.
//
// Why it exists: XLA's CPU dot emitter runs a matrix-vector product of at most 2 MB of weights as one task on one
// core, and this machine class reads about 12 GB/s from one core against 24 GB/s from two (README, Performance).
// Here every product is split by output rows over a small pool of threads that spin briefly between calls (a
// decode step issues a product every few tens of microseconds) and then sleep on a futex.
//
// dsv3_matvec's operands (impl/matvec.py builds the call): x [rows, in] f32, stack [S, out, in] f32, index s32
// (clamped into [0, S) as XLA's gather clamps); result [rows, out] f32. The opaque string is "rows,out,in,S".
// dsv3_heads (below) multiplies each attention head's rows by its own block of a weight, either way round.

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <dlfcn.h>
#include <unistd.h>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

struct XlaCustomCallStatus;

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  // the same, loadable from any float address

// A pause inside a spin-wait: lets the core's other hardware thread run and saves power.
inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

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
// for all R, W rows are read side by side and the next W rows are prefetched (on a 2-core Intel Xeon one core read
// 8.5 GB/s a row at a time, 12 GB/s four rows at a time with the prefetch; two cores 25.7 GB/s, measured alone).
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

// One row of x (a decode step at one sequence): each weight row alone, summed into four accumulators along it. On a
// 2-core AMD EPYC, a chain of a bench-small step's 149 products read 1.07x to 1.13x faster this way than four weight
// rows side by side with the prefetch (medians of 40 interleaved chains each, three times; one 411 MB product 1.17x),
// and bench-small's decode step at one sequence took 1.14x to 1.20x less time (8 paired rounds in one process).
void single_row(const Product& p, long n0, long n1) {
  const long in = p.in, wide_end = in - in % 64, vec_end = in - in % 16;
  const float* x = p.x;
  for (long n = n0; n < n1; ++n) {
    const float* w = p.w + n * in;
    v16 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    long k = 0;
    for (; k < wide_end; k += 64) {
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

void product_rows_any(const Product& p, long n0, long n1) {
  for (long r0 = 0; r0 < p.rows; r0 += 8) {
    Product part = p;
    part.x = p.x + r0 * p.in;
    part.y = p.y + r0 * p.out;
    switch (std::min(p.rows - r0, 8L)) {
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

// y = x W for one matrix `m` of a transposed product: each weight row read once per row of x, scaled and added to
// the output row (which stays in L1).
void transposed_rows(const Product& p, long m) {
  const float* w = p.w + m * p.w_stride;
  for (long r = 0; r < p.rows; ++r) {
    const float* x = p.x + (m * p.rows + r) * p.in;
    float* y = p.y + (m * p.rows + r) * p.out;
    for (long c = 0; c < p.out; ++c) y[c] = 0.0f;
    for (long j = 0; j < p.in; ++j) {
      const float scale = x[j];
      const float* row = w + j * p.out;
      for (long c = 0; c < p.out; ++c) y[c] += scale * row[c];
    }
  }
}

// Work the pool shares: `units` pieces, any range of which any thread may run.
struct Job {
  virtual long units() const = 0;
  virtual void run(long u0, long u1) const = 0;
};

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

// e^x for 16 floats: x = n ln2 + r with |r| <= ln2/2, e^r by the degree-6 polynomial of Cephes' expf (about one ulp
// off the rounded value), times 2^n put into the exponent bits; exactly 0 below -87.3 (a masked score's -inf among
// them), where 2^n would leave the normal range; NaN stays NaN.
typedef int32_t v16i __attribute__((vector_size(64)));

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
// sequence), each (head, query) row's softmax, the weighted latents (units of 16 latent columns of one sequence, every
// head's accumulators in registers).
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

// A pool of `helpers` threads sharing each product with the calling thread in chunks: every thread claims chunks
// until none is left, so a helper the OS has not scheduled (test workers sharing the cores) delays nothing: the
// caller runs its chunks. A chunk is claimed by advancing a ticket that also names the product (a sequence number)
// and its chunk count, so a helper waking late cannot claim a chunk of a product already finished.
class Pool {
 public:
  explicit Pool(int helpers) : helpers_(helpers) {
    for (int part = 1; part <= helpers_; ++part) std::thread([this] { serve(); }).detach();
  }

  void run(const Job& job) {
    std::unique_lock<std::mutex> lock(busy_, std::try_to_lock);
    const long total = job.units();
    // Alone when another product is running, or in a process forked from this one (it has no helpers).
    if (!lock.owns_lock() || helpers_ == 0 || getpid() != owner_ || total < 2) {
      job.run(0, total);
      return;
    }
    job_ = &job;
    chunk_ = std::max(1L, total / ((helpers_ + 1) * kChunksPerThread));
    const uint64_t chunks = (total + chunk_ - 1) / chunk_;
    done_.store(0, std::memory_order_relaxed);
    sequence_ = (sequence_ + 1) & kSequenceMask;
    ticket_.store(sequence_ << 40 | chunks << 20, std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) generation_.notify_all();
    claim_all();
    for (int spins = 0; done_.load(std::memory_order_acquire) != chunks; ++spins) {
      if (spins < 4096) relax(); else std::this_thread::yield();  // a helper mid-chunk was descheduled
    }
  }

 private:
  // Claims and runs chunks of the product the ticket names until none is left.
  void claim_all() {
    uint64_t ticket = ticket_.load(std::memory_order_acquire);
    const uint64_t sequence = ticket >> 40;
    for (;;) {
      const uint64_t chunks = (ticket >> 20) & kFieldMask, next = ticket & kFieldMask;
      if ((ticket >> 40) != sequence || next >= chunks) return;
      if (!ticket_.compare_exchange_weak(ticket, ticket + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        continue;  // another thread claimed it (ticket now holds the new value)
      }
      const long u0 = static_cast<long>(next) * chunk_;
      job_->run(u0, std::min(u0 + chunk_, job_->units()));
      done_.fetch_add(1, std::memory_order_release);
      ticket = ticket_.load(std::memory_order_acquire);
    }
  }

  void serve() {
    unsigned seen = 0;  // the generation before the first product, whenever this thread starts
    for (;;) {
      auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
      unsigned now;
      for (int spins = 0; (now = generation_.load(std::memory_order_acquire)) == seen; ++spins) {
        relax();
        if (spins % 256 == 255 && std::chrono::steady_clock::now() > spin_until) {
          sleepers_.fetch_add(1, std::memory_order_seq_cst);
          generation_.wait(seen, std::memory_order_seq_cst);
          sleepers_.fetch_sub(1, std::memory_order_seq_cst);
        }
      }
      seen = now;
      claim_all();
    }
  }

  static constexpr int kSpinMicros = 100;
  static constexpr long kChunksPerThread = 4;
  static constexpr uint64_t kSequenceMask = (1u << 24) - 1, kFieldMask = (1u << 20) - 1;
  const int helpers_;
  const pid_t owner_ = getpid();
  std::mutex busy_;
  const Job* job_ = nullptr;
  long chunk_ = 1;
  uint64_t sequence_ = 0;
  std::atomic<uint64_t> ticket_{0};
  std::atomic<uint64_t> done_{0};
  std::atomic<unsigned> generation_{0};
  std::atomic<int> sleepers_{0};
};

Pool& pool() {
  static Pool* instance = [] {
    long threads = std::thread::hardware_concurrency();
    if (const char* asked = std::getenv("DSV3_MATVEC_THREADS")) threads = std::atol(asked);
    return new Pool(static_cast<int>(std::clamp(threads, 1L, 8L) - 1));
  }();
  return *instance;
}

}  // namespace

extern "C" void dsv3_matvec(void* out, const void** in, const char* opaque, size_t opaque_len,
                            XlaCustomCallStatus*) {
  long rows = 0, n_out = 0, n_in = 0, stack = 0;
  std::string dims(opaque, opaque_len);
  std::sscanf(dims.c_str(), "%ld,%ld,%ld,%ld", &rows, &n_out, &n_in, &stack);
  const long index = std::clamp<long>(*static_cast<const int32_t*>(in[2]), 0, stack - 1);
  Product p{static_cast<const float*>(in[0]), static_cast<const float*>(in[1]) + index * n_out * n_in,
            static_cast<float*>(out), rows, n_out, n_in};
  pool().run(ProductJob(p));
}

// Per-head products (the absorbed attention's, against wkv_b's per-head blocks): x [mats, rows, in], result
// [mats, rows, out]; the opaque string is "rows,out,in,mats,first,stride,transposed": matrix m's first weight row
// used starts `first + m * stride` floats into the weight operand; transposed 1 multiplies x W (W's rows `out` wide).
extern "C" void dsv3_heads(void* out, const void** in, const char* opaque, size_t opaque_len, XlaCustomCallStatus*) {
  long rows = 0, n_out = 0, n_in = 0, mats = 0, first = 0, stride = 0, transposed = 0;
  std::string dims(opaque, opaque_len);
  std::sscanf(dims.c_str(), "%ld,%ld,%ld,%ld,%ld,%ld,%ld", &rows, &n_out, &n_in, &mats, &first, &stride, &transposed);
  Product p{static_cast<const float*>(in[0]), static_cast<const float*>(in[1]) + first, static_cast<float*>(out),
            rows, n_out, n_in, mats, stride, transposed != 0};
  pool().run(ProductJob(p));
}

// The routed (or shared) experts of a few tokens: operands x [T, dim], gate and up stacks [S, inter, dim], down stack
// [S, dim, inter], and per copy (sorted by expert) its expert (clamped into [0, S)), token (clamped into [0, T)) and
// gate weight: s32 [C], s32 [C], f32 [C]; result [T, dim]. The opaque string is "tokens,dim,inter,S,C".
extern "C" void dsv3_experts(void* out, const void** in, const char* opaque, size_t opaque_len, XlaCustomCallStatus*) {
  long tokens = 0, stack = 0, count = 0;
  Copies c;
  std::string dims(opaque, opaque_len);
  std::sscanf(dims.c_str(), "%ld,%ld,%ld,%ld,%ld", &tokens, &c.dim, &c.inter, &stack, &count);
  const float* x = static_cast<const float*>(in[0]);
  c.gate = static_cast<const float*>(in[1]);
  c.up = static_cast<const float*>(in[2]);
  c.down = static_cast<const float*>(in[3]);
  const int32_t* expert = static_cast<const int32_t*>(in[4]);
  const int32_t* token = static_cast<const int32_t*>(in[5]);
  const float* weight = static_cast<const float*>(in[6]);
  auto token_of = [&](long i) { return std::clamp<long>(token[i], 0, tokens - 1); };
  c.xs.resize(count * c.dim);
  c.gated.resize(count * c.inter);
  c.hidden.resize(count * c.inter);
  c.ys.resize(count * c.dim);
  for (long i = 0; i < count; ++i) {
    std::copy_n(x + token_of(i) * c.dim, c.dim, &c.xs[i * c.dim]);
    const long e = std::clamp<long>(expert[i], 0, stack - 1);
    if (i == 0 || e != c.expert.back() || i - c.first.back() == 8) {
      c.first.push_back(i);
      c.expert.push_back(e);
    }
  }
  c.first.push_back(count);
  pool().run(HiddenJob(c));
  pool().run(DownJob(c));
  float* y = static_cast<float*>(out);
  std::fill_n(y, tokens * c.dim, 0.0f);
  for (long i = 0; i < count; ++i) {
    float* row = y + token_of(i) * c.dim;
    for (long j = 0; j < c.dim; ++j) row[j] += weight[i] * c.ys[i * c.dim + j];
  }
}

// The absorbed attention's core (LatentAttention): operands q_latent [H, Q, c] and q_rope [Q, H, r] for Q = B * S
// queries, the latent cache [B, capacity, c] and rope keys [B, capacity, r] (updated, read in place), visible u8
// [S, window] (1 where query s may see position t); result [H, Q, c]. The opaque string is
// "B,S,H,c,r,capacity,window,scale".
extern "C" void dsv3_latent_attention(void* out, const void** in, const char* opaque, size_t opaque_len,
                                      XlaCustomCallStatus*) {
  LatentAttention a;
  double scale = 1.0;
  std::string dims(opaque, opaque_len);
  std::sscanf(dims.c_str(), "%ld,%ld,%ld,%ld,%ld,%ld,%ld,%lf", &a.batch, &a.length, &a.heads, &a.latent, &a.rope,
              &a.capacity, &a.window, &scale);
  a.scale = static_cast<float>(scale);
  a.q_latent = static_cast<const float*>(in[0]);
  a.q_rope = static_cast<const float*>(in[1]);
  a.kv = static_cast<const float*>(in[2]);
  a.rope_key = static_cast<const float*>(in[3]);
  a.visible = static_cast<const uint8_t*>(in[4]);
  a.out = static_cast<float*>(out);
  for (long t = 0; t < a.window; ++t) {  // no position past the last visible one is read
    for (long s = 0; s < a.length; ++s) {
      if (a.visible[s * a.window + t] != 0) a.keys = t + 1;
    }
  }
  a.padded = (a.keys + 15) / 16 * 16;
  a.scores.resize(a.heads * a.queries() * std::max(a.padded, 16L));
  a.lanes.assign(a.queries() * a.groups() * (a.latent + a.rope) * 16, 0.0f);
  for (long q = 0; q < a.queries(); ++q) {
    for (long h = 0; h < a.heads; ++h) {
      float* lanes = a.lane(q, h / 16) + h % 16;
      for (long c = 0; c < a.latent; ++c) lanes[c * 16] = a.q_latent[(h * a.queries() + q) * a.latent + c];
      for (long c = 0; c < a.rope; ++c) lanes[(a.latent + c) * 16] = a.q_rope[(q * a.heads + h) * a.rope + c];
    }
  }
  pool().run(ScoresJob(a));
  pool().run(SoftmaxJob(a));
  pool().run(WeightedJob(a));
}

// Registers dsv3_matvec, dsv3_heads, dsv3_experts and dsv3_latent_attention with XLA's custom-call registry for the host platform, found in TensorFlow's already loaded
// libtensorflow_cc (`library`: its path) by its exported symbols, so that building this file needs no TensorFlow
// headers and no link against that library (which took 10 s). Returns 0, or 1 when a symbol is missing.
extern "C" int dsv3_register_matvec(const char* library) {
  void* handle = dlopen(library, RTLD_NOW | RTLD_NOLOAD);
  if (handle == nullptr) return 1;
  using Global = void* (*)();
  using Register = void (*)(void* registry, const std::string& symbol, void* address, const std::string& platform);
  auto global = reinterpret_cast<Global>(dlsym(handle, "_ZN3xla24CustomCallTargetRegistry6GlobalEv"));
  auto add = reinterpret_cast<Register>(dlsym(
      handle, "_ZN3xla24CustomCallTargetRegistry8RegisterERKNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEEEPvS8_"));
  if (global == nullptr || add == nullptr) return 1;
  add(global(), "dsv3_matvec", reinterpret_cast<void*>(&dsv3_matvec), "Host");
  add(global(), "dsv3_heads", reinterpret_cast<void*>(&dsv3_heads), "Host");
  add(global(), "dsv3_experts", reinterpret_cast<void*>(&dsv3_experts), "Host");
  add(global(), "dsv3_latent_attention", reinterpret_cast<void*>(&dsv3_latent_attention), "Host");
  return 0;
}

// A decode step's work on every core, as XLA custom calls (legacy "status returning" form), every weight read where
// it lies: y = x W^T for a few rows x [rows, in] against one matrix W [out, in] of a stack [S, out, in]
// (dsv3_matvec), per attention head either way round (dsv3_heads), SwiGLU experts over token copies (dsv3_experts)
// and the absorbed attention's core over a latent cache (dsv3_latent_attention); each entry says its operands.
//
// Why it exists: XLA's CPU dot emitter runs a matrix-vector product of at most 2 MB of weights as one task on one
// core, and the 2-core machines measured read about half as fast from one core as from two (docs/performance-log.md).
// Here every pass is split into units over a small pool of threads that spin briefly between calls (a decode step
// issues a call every few tens of microseconds) and then sleep on a futex.
//
// dsv3_matvec's operands (impl/matvec.py builds the call): x [rows, in] f32, stack [S, out, in] f32, index s32
// (clamped into [0, S) as XLA's gather clamps); result [rows, out] f32. The opaque string is "rows,out,in,S".

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <dlfcn.h>
#include <string>

#include "attention.h"
#include "experts.h"
#include "pool.h"
#include "products.h"

struct XlaCustomCallStatus;

using namespace dsv3;

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
    if (i == 0 || e != c.expert.back() || i - c.first.back() == kMaxRows) {
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

// Registers dsv3_matvec, dsv3_heads, dsv3_experts and dsv3_latent_attention with XLA's custom-call registry for the
// host platform, found in TensorFlow's already loaded libtensorflow_cc (`library`: its path) by its exported symbols,
// so that building this file needs no TensorFlow headers and no link against that library (which took 10 s).
// Returns 0, or 1 when a symbol is missing.
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

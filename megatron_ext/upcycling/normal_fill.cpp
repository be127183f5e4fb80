// torch's CPU Tensor.normal_ for a contiguous fp32 tensor, to the bit, from a CPU generator's
// state blob (Generator.get_state()), which it advances in place. See fast_normal.py.
//
// torch draws one mt19937 word per sample through a per-call engine, then applies Box-Muller to
// blocks of 16 (ATen/native/cpu/DistributionTemplates.h, normal_fill and NormalFill16). The
// engine is ~90% of its time. Here the state is twisted a whole block at a time (loops the
// compiler vectorizes) and each block is tempered, turned into uniforms and transformed while it
// is in L1, with the same transform as the kernel torch runs on this CPU:
//   FAST_NORMAL_AVX2: NormalFill16<float> for CPU_CAPABILITY_AVX2, through torch's own
//                     avx_mathfun.h (log256_ps, sincos256_ps), so the same instructions;
//   otherwise:        the generic NormalFill16 (libm's logf, cosf, sinf), which torch runs when
//                     its capability is DEFAULT or AVX512.
// The caller checks the result against torch's own normal_ before trusting a build of this file.

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(FAST_NORMAL_AVX2)
#include <ATen/native/cpu/avx_mathfun.h>
#endif

namespace {

constexpr int kN = 624, kM = 397;

inline uint32_t twist(uint32_t u, uint32_t v) {
  return (((u & 0x80000000u) | (v & 0x7fffffffu)) >> 1) ^ ((v & 1u) ? 0x9908b0dfu : 0u);
}

// The standard mt19937 regeneration, split where its reads switch from old words to new ones
// (i + M wraps past N at i = N - M), so that each loop has no dependence shorter than 8 words.
void regenerate(uint32_t* __restrict s) {
  for (int i = 0; i < kN - kM; ++i) s[i] = s[i + kM] ^ twist(s[i], s[i + 1]);
  for (int i = kN - kM; i < kN - 1; ++i) s[i] = s[i + kM - kN] ^ twist(s[i], s[i + 1]);
  s[kN - 1] = s[kM - 1] ^ twist(s[kN - 1], s[0]);
}

// Tempering, then at::uniform_real_distribution<float>(0, 1): the low 24 bits times 2^-24.
inline float to_uniform(uint32_t y) {
  y ^= y >> 11;
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  y ^= y >> 18;
  return static_cast<float>(y & 0xffffffu) * (1.0f / 16777216.0f);
}

// at::mt19937's words and position. Its operator() decrements ``left`` and regenerates at 0, then
// returns word ``next++``: ``left - 1`` words remain before the next regeneration.
struct Engine {
  uint32_t s[kN];
  int32_t left;
  uint32_t next;

  void uniforms(float* __restrict out, int64_t n) {
    int64_t i = 0;
    while (i < n) {
      if (left == 1) {
        regenerate(s);
        left = kN + 1;
        next = 0;
      }
      int64_t take = left - 1;
      if (take > n - i) take = n - i;
      const uint32_t* src = s + next;
      for (int64_t j = 0; j < take; ++j) out[i + j] = to_uniform(src[j]);
      left -= static_cast<int32_t>(take);
      next += static_cast<uint32_t>(take);
      i += take;
    }
  }
};

#if defined(FAST_NORMAL_AVX2)
struct BoxMuller16 {
  __m256 mean, std;
  BoxMuller16(float m, float s) : mean(_mm256_set1_ps(m)), std(_mm256_set1_ps(s)) {}
  void operator()(float* d) const {
    const __m256 u1 = _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_loadu_ps(d));
    const __m256 u2 = _mm256_loadu_ps(d + 8);
    const __m256 radius = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), log256_ps(u1)));
    const __m256 theta = _mm256_mul_ps(_mm256_set1_ps(static_cast<float>(2.0 * M_PI)), u2);
    __m256 sin_t, cos_t;
    sincos256_ps(theta, &sin_t, &cos_t);
    _mm256_storeu_ps(d, _mm256_fmadd_ps(_mm256_mul_ps(radius, cos_t), std, mean));
    _mm256_storeu_ps(d + 8, _mm256_fmadd_ps(_mm256_mul_ps(radius, sin_t), std, mean));
  }
};
#else
struct BoxMuller16 {
  float mean, std;
  BoxMuller16(float m, float s) : mean(m), std(s) {}
  void operator()(float* d) const {
    for (int j = 0; j < 8; ++j) {
      const float u1 = 1 - d[j];
      const float u2 = d[j + 8];
      const float radius = std::sqrt(-2 * std::log(u1));
      // torch: 2.0f * c10::pi<double> * u2, a double product rounded to float
      const float theta = static_cast<float>(2.0 * M_PI * static_cast<double>(u2));
      d[j] = std::fma(radius * std::cos(theta), std, mean);
      d[j + 8] = std::fma(radius * std::sin(theta), std, mean);
    }
  }
};
#endif

// torch's CPUGeneratorImplStateLegacy, the blob get_state() returns: uint64 seed, int32 left,
// int32 seeded, uint64 next, uint64 words[624], then fields normal_ on fp32 does not touch.
constexpr size_t kLeft = 8, kNext = 16, kWords = 24;

}  // namespace

extern "C" void normal_fill_fp32(uint8_t* blob, float* out, int64_t n, double mean, double std) {
  Engine e;
  uint64_t word, next;
  for (int i = 0; i < kN; ++i) {
    std::memcpy(&word, blob + kWords + 8 * i, 8);
    e.s[i] = static_cast<uint32_t>(word);
  }
  std::memcpy(&e.left, blob + kLeft, 4);
  std::memcpy(&next, blob + kNext, 8);
  e.next = static_cast<uint32_t>(next);

  // torch fills all n uniforms, transforms each whole block of 16, and if n is not a multiple of
  // 16 draws 16 more uniforms over the last 16 values and transforms them. Blocks depend only
  // on their own uniforms, so doing this a chunk at a time gives the same values.
  const BoxMuller16 transform(static_cast<float>(mean), static_cast<float>(std));
  constexpr int64_t kChunk = 4096;  // 16 KiB of fp32: stays in L1 between the two steps
  const int64_t whole = n - n % 16;
  for (int64_t i = 0; i < whole; i += kChunk) {
    const int64_t len = (whole - i < kChunk) ? whole - i : kChunk;
    e.uniforms(out + i, len);
    for (int64_t j = 0; j < len; j += 16) transform(out + i + j);
  }
  if (n % 16) {
    e.uniforms(out + whole, n - whole);
    e.uniforms(out + n - 16, 16);
    transform(out + n - 16);
  }

  for (int i = 0; i < kN; ++i) {
    word = e.s[i];
    std::memcpy(blob + kWords + 8 * i, &word, 8);
  }
  std::memcpy(blob + kLeft, &e.left, 4);
  next = e.next;
  std::memcpy(blob + kNext, &next, 8);
}

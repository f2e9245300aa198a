// AVX2 + FMA + F16C code path (8 fp32 lanes).  Compiled with a target pragma,
// selected at run time only when the CPU (and OS) support it.
#include "aladin_kernel.h"

#if defined(__x86_64__) || defined(__i386__)

#include <cstdint>

#include <immintrin.h>

// Everything below (up to the matching pop) is compiled for avx2,fma,f16c, whatever the
// build machine or the global -m flags are.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace aladin_fast {
namespace isa_avx2 {
namespace {

struct V {
    static constexpr int W = 8;
    static constexpr int kDefaultWordChunk = 3;
    using f = __m256;
    using m = __m256;
    using i = __m256i;
    struct dacc {
        __m256d lo, hi;
    };

    // region block per word-vector count: NV x NR accumulators (<= 12 of 16 ymm)
    template <int NV>
    static constexpr int block_regions() {
        return NV == 1 ? 12 : NV == 2 ? 6 : NV == 3 ? 4 : 3;
    }
    // DOT layout block: 2 words x 6 regions = 12 accumulators + 2 word vectors + 1 region vector
    static constexpr int kDotWords = 2;
    static constexpr int kDotRegions = 6;
    // bf16 rows read directly (dot_step_bf16): two query vectors per word, two widened row vectors
    static constexpr int kDotBf16Words = 4;
    static constexpr int kDotBf16Regions = 3;

    static inline f zero() { return _mm256_setzero_ps(); }
    static inline f set1(float x) { return _mm256_set1_ps(x); }
    static inline f load(const float* p) { return _mm256_loadu_ps(p); }
    // first n (< W) lanes of p, the rest 0 (masked: nothing past p + n is touched)
    static inline f loadn(const float* p, int n) {
        const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), iota));
    }
    static inline void store(float* p, f x) { _mm256_storeu_ps(p, x); }
    static inline f bcast(const float* p) { return _mm256_broadcast_ss(p); }
    // an empty asm that pins x in a register: stops the compiler from re-loading it per use
    static inline void in_register(f& x) { __asm__("" : "+x"(x)); }
    static inline f fma(f a, f b, f c) { return _mm256_fmadd_ps(a, b, c); }
    static inline f max(f a, f b) { return _mm256_max_ps(a, b); }
    static inline void prefetch(const float* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }

    static inline m gt(f a, f b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
    static inline m eq(f a, f b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
    static inline unsigned bits(m a) { return static_cast<unsigned>(_mm256_movemask_ps(a)); }
    static inline m unord(f a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
    static inline m mor(m a, m b) { return _mm256_or_ps(a, b); }
    static inline m mand(m a, m b) { return _mm256_and_ps(a, b); }
    static inline bool any(m a) { return _mm256_movemask_ps(a) != 0; }
    static inline m first_n(int n) {
        const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), iota));
    }
    // k ? b : a
    static inline f sel(m k, f a, f b) { return _mm256_blendv_ps(a, b, k); }
    static inline i seli(m k, i a, i b) {
        return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b), k));
    }
    static inline i seti(int32_t x) { return _mm256_set1_epi32(x); }
    static inline void storei(int32_t* p, i x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x); }

    static inline float hmax(f x) {
        __m128 a = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        a = _mm_max_ps(a, _mm_movehl_ps(a, a));
        a = _mm_max_ss(a, _mm_shuffle_ps(a, a, 1));
        return _mm_cvtss_f32(a);
    }
    // o[0..3] = horizontal sums of a, b, c, d
    static inline void hsum4(f a, f b, f c, f d, float* o) {
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
        _mm_storeu_ps(o, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
    }
    static inline dacc dzero() { return dacc{_mm256_setzero_pd(), _mm256_setzero_pd()}; }
    static inline void dadd(dacc& a, f x) {
        a.lo = _mm256_add_pd(a.lo, _mm256_cvtps_pd(_mm256_castps256_ps128(x)));
        a.hi = _mm256_add_pd(a.hi, _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
    }
    static inline double dsum(const dacc& a) {
        alignas(32) double t[4];
        _mm256_store_pd(t, _mm256_add_pd(a.lo, a.hi));
        return (t[0] + t[1]) + (t[2] + t[3]);
    }

#include "transpose8x8_avx.inc"

    static inline f load_f16(const uint16_t* p) {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
    static inline f load_bf16(const uint16_t* p) {
        const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
    }
    // 2W bf16 at p widened exactly: even = p[0], p[2], ...; odd = p[1], p[3], ...
    static inline void bf16_pairs(const uint16_t* p, f& even, f& odd) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        even = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
        odd = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
    }
    static inline void cvt_f16(const uint16_t* src, float* dst, int64_t n);
    static inline void cvt_bf16(const uint16_t* src, float* dst, int64_t n);
};

#include "kernel_impl.inc"

inline void V::cvt_f16(const uint16_t* src, float* dst, int64_t n) {
    int64_t d = 0;
    for (; d + 8 <= n; d += 8)
        _mm256_storeu_ps(dst + d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d))));
    for (; d < n; ++d) dst[d] = half_bits_to_float(src[d]);
}

inline void V::cvt_bf16(const uint16_t* src, float* dst, int64_t n) {
    int64_t d = 0;
    for (; d + 8 <= n; d += 8) {
        const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d)));
        _mm256_storeu_ps(dst + d, _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)));
    }
    for (; d < n; ++d) dst[d] = bf16_bits_to_float(src[d]);
}

const IsaKernels kKernels = {"avx2", V::W, &prepare_query, &score_pair, &fma_loop, &axpy, &convert, &axpy_many};

}  // namespace
}  // namespace isa_avx2
}  // namespace aladin_fast

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace aladin_fast {
const IsaKernels* avx2_kernels() { return &isa_avx2::kKernels; }
}  // namespace aladin_fast

#endif  // x86

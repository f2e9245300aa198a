// AVX-512F code path (16 fp32 lanes, 32 zmm registers).  Structurally identical
// to the AVX2 path (same kernel_impl.inc, only the traits differ); compiled with
// a target pragma and selected at run time only when the CPU and the OS (XCR0
// opmask / ZMM state) support AVX-512F.  bf16 input is widened to fp32 with an
// exact shift (vdpbf16ps is not used: it flushes denormals, see build_info()).
#include "aladin_kernel.h"

#if defined(__x86_64__) || defined(__i386__)

#include <cstdint>

#include <immintrin.h>

// Everything below (up to the matching pop) is compiled for avx512f,avx2,fma,f16c, whatever the
// build machine or the global -m flags are.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
#endif
// GCC 12 reports false positives inside avx512fintrin.h (_mm512_undefined_*)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace aladin_fast {
namespace isa_avx512 {
namespace {

struct V {
    static constexpr int W = 16;
    static constexpr int kDefaultWordChunk = 2;
    using f = __m512;
    using m = __mmask16;
    using i = __m512i;
    struct dacc {
        __m512d lo, hi;
    };

    // region block per word-vector count: NV x NR accumulators (<= 24 of 32 zmm)
    template <int NV>
    static constexpr int block_regions() {
        return NV == 1 ? 24 : NV == 2 ? 12 : NV == 3 ? 8 : 6;
    }
    // DOT layout block: 4 words x 6 regions = 24 accumulators of 32 zmm
    static constexpr int kDotWords = 4;
    static constexpr int kDotRegions = 6;
    // bf16 rows read directly (dot_step_bf16): two query vectors per word, two widened row vectors
    static constexpr int kDotBf16Words = 4;
    static constexpr int kDotBf16Regions = 4;

    static inline f zero() { return _mm512_setzero_ps(); }
    static inline f set1(float x) { return _mm512_set1_ps(x); }
    static inline f load(const float* p) { return _mm512_loadu_ps(p); }
    // first n (< W) lanes of p, the rest 0 (masked: nothing past p + n is touched)
    static inline f loadn(const float* p, int n) { return _mm512_maskz_loadu_ps(first_n(n), p); }
    static inline void store(float* p, f x) { _mm512_storeu_ps(p, x); }
    static inline f bcast(const float* p) { return _mm512_set1_ps(*p); }
    // an empty asm that pins x in a register: stops the compiler from re-loading it per use
    static inline void in_register(f& x) { __asm__("" : "+v"(x)); }
    static inline f fma(f a, f b, f c) { return _mm512_fmadd_ps(a, b, c); }
    static inline f max(f a, f b) { return _mm512_max_ps(a, b); }
    static inline void prefetch(const float* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }

    static inline m gt(f a, f b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
    static inline m eq(f a, f b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
    static inline unsigned bits(m a) { return static_cast<unsigned>(a); }
    static inline m unord(f a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
    static inline m mor(m a, m b) { return static_cast<m>(a | b); }
    static inline m mand(m a, m b) { return static_cast<m>(a & b); }
    static inline bool any(m a) { return a != 0; }
    static inline m first_n(int n) {
        return n >= 16 ? static_cast<m>(0xffff) : static_cast<m>((1u << (n < 0 ? 0 : n)) - 1u);
    }
    // k ? b : a
    static inline f sel(m k, f a, f b) { return _mm512_mask_blend_ps(k, a, b); }
    static inline i seli(m k, i a, i b) { return _mm512_mask_blend_epi32(k, a, b); }
    static inline i seti(int32_t x) { return _mm512_set1_epi32(x); }
    static inline void storei(int32_t* p, i x) { _mm512_storeu_si512(reinterpret_cast<void*>(p), x); }

    static inline float hmax(f x) { return _mm512_reduce_max_ps(x); }
    static inline __m256 half(f x) {  // lower + upper 256 bits
        return _mm256_add_ps(_mm512_castps512_ps256(x),
                             _mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(x), 1)));
    }
    // o[0..3] = horizontal sums of a, b, c, d
    static inline void hsum4(f a, f b, f c, f d, float* o) {
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(half(a), half(b)), _mm256_hadd_ps(half(c), half(d)));
        _mm_storeu_ps(o, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
    }
    static inline dacc dzero() { return dacc{_mm512_setzero_pd(), _mm512_setzero_pd()}; }
    static inline void dadd(dacc& a, f x) {
        const __m256 lo = _mm512_castps512_ps256(x);
        const __m256 hi = _mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(x), 1));
        a.lo = _mm512_add_pd(a.lo, _mm512_cvtps_pd(lo));
        a.hi = _mm512_add_pd(a.hi, _mm512_cvtps_pd(hi));
    }
    static inline double dsum(const dacc& a) {
        alignas(64) double t[8];
        _mm512_store_pd(t, _mm512_add_pd(a.lo, a.hi));
        return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
    }

#include "transpose8x8_avx.inc"

    static inline f load_f16(const uint16_t* p) {
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
    static inline f load_bf16(const uint16_t* p) {
        const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
        return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    }
    // 2W bf16 at p widened exactly: even = p[0], p[2], ...; odd = p[1], p[3], ...
    static inline void bf16_pairs(const uint16_t* p, f& even, f& odd) {
        const __m512i x = _mm512_loadu_si512(p);
        even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
        odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
    }
    static inline void cvt_f16(const uint16_t* src, float* dst, int64_t n);
    static inline void cvt_bf16(const uint16_t* src, float* dst, int64_t n);
};

#include "kernel_impl.inc"

inline void V::cvt_f16(const uint16_t* src, float* dst, int64_t n) {
    int64_t d = 0;
    for (; d + 16 <= n; d += 16)
        _mm512_storeu_ps(dst + d, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + d))));
    for (; d < n; ++d) dst[d] = half_bits_to_float(src[d]);
}

inline void V::cvt_bf16(const uint16_t* src, float* dst, int64_t n) {
    int64_t d = 0;
    for (; d + 16 <= n; d += 16) {
        const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + d)));
        _mm512_storeu_ps(dst + d, _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)));
    }
    for (; d < n; ++d) dst[d] = bf16_bits_to_float(src[d]);
}

const IsaKernels kKernels = {"avx512", V::W, &prepare_query, &score_pair, &fma_loop, &axpy, &convert, &axpy_many};

}  // namespace
}  // namespace isa_avx512
}  // namespace aladin_fast

#pragma GCC diagnostic pop
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace aladin_fast {
const IsaKernels* avx512_kernels() { return &isa_avx512::kKernels; }
}  // namespace aladin_fast

#endif  // x86

// Portable scalar code path: the correctness backstop (same kernel_impl.inc,
// "vectors" of one lane).  Compiled with the default target of the build.
#include "aladin_kernel.h"

#include <cstdint>

namespace aladin_fast {
namespace isa_scalar {
namespace {

struct V {
    static constexpr int W = 1;
    static constexpr int kDefaultWordChunk = 4;
    using f = float;
    using m = bool;
    using i = int32_t;
    using dacc = double;

    template <int NV>
    static constexpr int block_regions() {
        return NV == 1 ? 4 : NV == 2 ? 4 : NV == 3 ? 4 : 3;
    }
    static constexpr int kDotWords = 3;
    static constexpr int kDotRegions = 4;
    // bf16 rows read directly (dot_step_bf16): two query vectors per word, two widened row vectors
    static constexpr int kDotBf16Words = 3;
    static constexpr int kDotBf16Regions = 4;

    static inline f zero() { return 0.0f; }
    static inline f set1(float x) { return x; }
    static inline f load(const float* p) { return *p; }
    static inline f loadn(const float* p, int n) { return n > 0 ? *p : 0.0f; }
    static inline void store(float* p, f x) { *p = x; }
    static inline f bcast(const float* p) { return *p; }
    // fp32 multiply-add (the compiler may contract it into an FMA where the target has one)
    static inline void in_register(f&) {}
    static inline f fma(f a, f b, f c) { return c + a * b; }
    static inline f max(f a, f b) { return a > b ? a : b; }
    static inline void prefetch(const float*) {}

    static inline m gt(f a, f b) { return a > b; }
    static inline m eq(f a, f b) { return a == b; }
    static inline unsigned bits(m a) { return a ? 1u : 0u; }
    static inline m unord(f a) { return a != a; }
    static inline m mor(m a, m b) { return a || b; }
    static inline m mand(m a, m b) { return a && b; }
    static inline bool any(m a) { return a; }
    static inline m first_n(int n) { return n >= 1; }
    static inline f sel(m k, f a, f b) { return k ? b : a; }
    static inline i seli(m k, i a, i b) { return k ? b : a; }
    static inline i seti(int32_t x) { return x; }
    static inline void storei(int32_t* p, i x) { *p = x; }
    static inline float hmax(f x) { return x; }
    static inline void hsum4(f a, f b, f c, f d, float* o) {
        o[0] = a;
        o[1] = b;
        o[2] = c;
        o[3] = d;
    }
    static inline dacc dzero() { return 0.0; }
    static inline void dadd(dacc& a, f x) { a += static_cast<double>(x); }
    static inline double dsum(const dacc& a) { return a; }

    // dst[k * ds + w] = fp32(src[w * ss + k]) for w, k < 8 (KIND: 0 fp32, 1 fp16, 2 bf16)
    template <int KIND, class T>
    static inline void transpose8x8(const T* src, int64_t ss, float* dst, int64_t ds);

    static inline f load_f16(const uint16_t* p);
    static inline f load_bf16(const uint16_t* p);
    static inline void bf16_pairs(const uint16_t* p, f& even, f& odd);  // p[0], p[1]
    static inline void cvt_f16(const uint16_t* src, float* dst, int64_t n);
    static inline void cvt_bf16(const uint16_t* src, float* dst, int64_t n);
};

#include "kernel_impl.inc"

inline float V::load_f16(const uint16_t* p) { return half_bits_to_float(*p); }
inline float V::load_bf16(const uint16_t* p) { return bf16_bits_to_float(*p); }
inline void V::bf16_pairs(const uint16_t* p, f& even, f& odd) {
    even = bf16_bits_to_float(p[0]);
    odd = bf16_bits_to_float(p[1]);
}

inline void V::cvt_f16(const uint16_t* src, float* dst, int64_t n) {
    for (int64_t d = 0; d < n; ++d) dst[d] = half_bits_to_float(src[d]);
}
inline void V::cvt_bf16(const uint16_t* src, float* dst, int64_t n) {
    for (int64_t d = 0; d < n; ++d) dst[d] = bf16_bits_to_float(src[d]);
}

template <int KIND, class T>
inline void V::transpose8x8(const T* src, int64_t ss, float* dst, int64_t ds) {
    for (int w = 0; w < 8; ++w)
        for (int k = 0; k < 8; ++k) {
            float x;
            if constexpr (KIND == 0)
                x = static_cast<float>(src[w * ss + k]);
            else if constexpr (KIND == 1)
                x = half_bits_to_float(static_cast<uint16_t>(src[w * ss + k]));
            else
                x = bf16_bits_to_float(static_cast<uint16_t>(src[w * ss + k]));
            dst[k * ds + w] = x;
        }
}

const IsaKernels kKernels = {"scalar", V::W, &prepare_query, &score_pair, &fma_loop, &axpy, &convert, &axpy_many};

}  // namespace
}  // namespace isa_scalar

const IsaKernels* scalar_kernels() { return &isa_scalar::kKernels; }

}  // namespace aladin_fast

// Machine peak probes for the benchmarks' rooflines: streaming-read memory bandwidth.
//
// The fp32 FMA peak probe lives with the ISA kernels (IsaKernels::fma_loop and
// measure_fma_peak in kernel_driver.cpp) because it must run the same code path as
// the kernel.  This file only measures how fast the threads can stream a buffer
// that is much larger than the last-level cache: the bandwidth roof of the
// roofline, min(FMA peak, arithmetic intensity x bandwidth).
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define ALADIN_PROBE_X86 1
#else
#define ALADIN_PROBE_X86 0
#endif

#include "aladin_kernel.h"

namespace aladin_fast {
namespace {

constexpr int64_t kBlockBytes = 256;  // bytes per unrolled step: 8 ymm loads = 4 cache lines

// XOR-folds n bytes (a multiple of kBlockBytes, 32-byte aligned) into one word: eight
// independent accumulators so the loads, not a dependency chain, set the pace; the result
// is returned (and consumed by the caller) so the loads cannot be optimised away.
uint64_t fold_portable(const char* p, int64_t n) {
    const uint64_t* w = reinterpret_cast<const uint64_t*>(p);
    const int64_t words = n / 8;
    uint64_t a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < words; i += 8)
        for (int c = 0; c < 8; ++c) a[c] ^= w[i + c];
    return a[0] ^ a[1] ^ a[2] ^ a[3] ^ a[4] ^ a[5] ^ a[6] ^ a[7];
}

#if ALADIN_PROBE_X86
__attribute__((target("avx2"))) uint64_t fold_avx2(const char* p, int64_t n) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t i = 0; i < n; i += kBlockBytes) {
        const __m256i* v = reinterpret_cast<const __m256i*>(p + i);
        a0 = _mm256_xor_si256(a0, _mm256_load_si256(v + 0));
        a1 = _mm256_xor_si256(a1, _mm256_load_si256(v + 1));
        a2 = _mm256_xor_si256(a2, _mm256_load_si256(v + 2));
        a3 = _mm256_xor_si256(a3, _mm256_load_si256(v + 3));
        a4 = _mm256_xor_si256(a4, _mm256_load_si256(v + 4));
        a5 = _mm256_xor_si256(a5, _mm256_load_si256(v + 5));
        a6 = _mm256_xor_si256(a6, _mm256_load_si256(v + 6));
        a7 = _mm256_xor_si256(a7, _mm256_load_si256(v + 7));
    }
    a0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3)),
                          _mm256_xor_si256(_mm256_xor_si256(a4, a5), _mm256_xor_si256(a6, a7)));
    alignas(32) uint64_t lanes[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), a0);
    return lanes[0] ^ lanes[1] ^ lanes[2] ^ lanes[3];
}

bool has_avx2() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
}
#endif

using Fold = uint64_t (*)(const char*, int64_t);

double now_seconds() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

double measure_read_bandwidth(int64_t bytes, int num_threads, double seconds) {
    int threads = num_threads;
#ifdef _OPENMP
    if (threads <= 0) threads = omp_get_max_threads();
#else
    threads = 1;
#endif
    if (threads < 1) threads = 1;
    // each thread streams its own contiguous, block-aligned slice (the same slice it
    // first-touched, so its pages sit on its NUMA node)
    const int64_t per_thread = bytes / threads / kBlockBytes * kBlockBytes;
    if (per_thread <= 0) return 0.0;
    const int64_t total = per_thread * threads;
    void* raw = nullptr;
    if (posix_memalign(&raw, 4096, static_cast<size_t>(total)) != 0) return -1.0;
    char* buffer = static_cast<char*>(raw);
    Fold fold = fold_portable;
#if ALADIN_PROBE_X86
    if (has_avx2()) fold = fold_avx2;
#endif

#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num();
        std::memset(buffer + t * per_thread, 0x5a + t, static_cast<size_t>(per_thread));
    }
#else
    std::memset(buffer, 0x5a, static_cast<size_t>(total));
#endif

    // one pass, timed from before the fork to after the join; the best pass is the peak
    // (a shared machine only ever slows a pass down)
    auto pass = [&](uint64_t& sink) {
        uint64_t folded = 0;
        const double t0 = now_seconds();
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(^ : folded)
        { folded ^= fold(buffer + omp_get_thread_num() * per_thread, per_thread); }
#else
        folded = fold(buffer, per_thread);
#endif
        const double dt = now_seconds() - t0;
        sink ^= folded;
        return dt;
    };

    uint64_t sink = 0;
    pass(sink);  // warm-up: page-table walks, TLB, frequency ramp
    double best = 0.0, spent = 0.0;
    int passes = 0;
    const double budget = seconds > 0 ? seconds : 0.2;
    while (passes < 3 || spent < budget) {
        const double dt = pass(sink);
        spent += dt;
        ++passes;
        if (dt > 0.0 && static_cast<double>(total) / dt > best) best = static_cast<double>(total) / dt;
        if (passes >= 100000) break;
    }
    volatile uint64_t keep = sink;
    (void)keep;
    std::free(raw);
    return best / 1e9;
}

}  // namespace aladin_fast

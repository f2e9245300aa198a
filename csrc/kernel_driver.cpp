// ISA-independent OpenMP driver: splits the flattened (caption, candidate) pair
// range statically over the threads (each pair is computed by exactly one
// thread, in a fixed order, so results do not depend on the thread count) and
// calls the selected ISA's kernels.  A thread re-transposes its query caption
// only when the caption changes inside its contiguous range.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "aladin_kernel.h"

namespace aladin_fast {
namespace {

inline int64_t round_up(int64_t x, int64_t m) { return ((x + m - 1) / m) * m; }

// 64-byte aligned, zero-filled unless `zero` is false (a buffer the caller overwrites whole)
void* alloc_aligned(int64_t count, int64_t elem, bool zero = true) {
    size_t bytes = static_cast<size_t>(round_up(count * elem + 64, 64));
    void* p = nullptr;
    if (posix_memalign(&p, 64, bytes) != 0) return nullptr;
    if (zero) std::memset(p, 0, bytes);
    return p;
}

// Candidate images arrive in arbitrary order, so the hardware prefetchers cannot
// anticipate them: touch the first lines of every region row of the next pair's
// image while the current pair is computed.
inline void prefetch_image(const Job& job, int64_t p) {
    const int64_t kk = p % job.k;
    const int64_t j = job.candidates ? job.candidates[p] : kk;
    if (j < 0 || j >= job.ni) return;
    const int64_t nr = job.image_lengths[j];
    const int64_t elem = job.dtype == DType::F32 ? 4 : 2;
    const int64_t row_bytes = job.dim * elem;
    const int64_t lines = (row_bytes + 63) / 64 < job.tuning.prefetch_next ? (row_bytes + 63) / 64 : job.tuning.prefetch_next;
    const char* base = static_cast<const char*>(job.images) + job.image_offsets[j] * row_bytes;
    for (int64_t r = 0; r < nr; ++r)
        for (int64_t l = 0; l < lines; ++l) __builtin_prefetch(base + r * row_bytes + l * 64, 0, 3);
}

// The DOT layout prefetches the next pair's first region block itself, spread over its last block:
// the rows it will read (fp32 images, the pre-converted fp32 rows, or bf16 rows read directly).
inline void next_image_rows(const Job& job, int64_t p, Workspace& ws) {
    const int64_t kk = p % job.k;
    const int64_t j = job.candidates ? job.candidates[p] : kk;
    if (j < 0 || j >= job.ni || job.image_lengths[j] == 0) return;
    const int64_t row = job.image_offsets[j] * job.dim;
    if (job.dtype == DType::F32)
        ws.next_rows = reinterpret_cast<const char*>(static_cast<const float*>(job.images) + row);
    else if (ws.dot_bf16_direct)
        ws.next_rows = reinterpret_cast<const char*>(static_cast<const uint16_t*>(job.images) + row);
    else if (job.preconverted)
        ws.next_rows = reinterpret_cast<const char*>(job.preconverted + row);
    else
        return;
    ws.next_nr = job.image_lengths[j];
}

// fp16 / bf16 all pairs: each image is met by every caption, so its rows are converted to fp32 once
// (in parallel, before the pairs) instead of once per pair; the kernels then read the same fp32
// values the per-pair scratch would hold, so the bits do not change.  Up to this many bytes of fp32.
constexpr int64_t kPreconvertMaxBytes = int64_t(256) << 20;

// The converted copy of every image row (nullptr when not worth it or too large: the caller converts
// per pair as before).  Free with std::free.
float* preconvert_images(const Job& job, const IsaKernels* isa, int threads) {
    if (job.dtype == DType::F32 || job.candidates != nullptr || job.nt < 2 || !job.tuning.preconvert ||
        job.dim <= 0)
        return nullptr;
    int64_t rows = 0;
    for (int64_t j = 0; j < job.ni; ++j) {
        const int64_t end = job.image_offsets[j] + job.image_lengths[j];
        if (job.image_lengths[j] > 0 && end > rows) rows = end;
    }
    if (rows == 0 || rows > kPreconvertMaxBytes / 4 / job.dim) return nullptr;
    float* out = static_cast<float*>(alloc_aligned(rows * job.dim, sizeof(float), false));  // all rows written below
    if (!out) return nullptr;  // no memory for the copy: convert per pair
    const uint16_t* src = static_cast<const uint16_t*>(job.images);
    constexpr int64_t kRowsPerBlock = 64;
    const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t b = 0; b < blocks; ++b) {
        const SubnormalsHonoured subnormals;
        const int64_t r0 = b * kRowsPerBlock;
        const int64_t n = (rows - r0 < kRowsPerBlock ? rows - r0 : kRowsPerBlock) * job.dim;
        isa->convert(src + r0 * job.dim, out + r0 * job.dim, job.dtype, n);
    }
    return out;
}

// Work model for the thread count, in FMA-equivalents per pair: W * R * (D + 8) + 1500.  Fitted
// to single-thread avx2 fp32 timings (2-core machine): ~0.064 ns per FMA, ~0.57 ns per tile
// element (max / argmax / pooling, ~9 FMAs) and ~100 ns fixed per pair (~1500 FMAs).
constexpr int64_t kTileElementCost = 8;
constexpr int64_t kPairCost = 1500;
// A thread is only woken for at least ~2M FMA-equivalents (4 MFLOP, ~130 us of one core).
// Below that a second thread saves at most ~65 us on an idle machine, while on a loaded one
// the join waits for a descheduled worker (measured: 8-12 ms per call on the shared 2-core box).
constexpr int64_t kWorkPerThread = int64_t(1) << 21;
// bf16_direct(): captions of at most this many words read bf16 rows directly (tuned below)
constexpr int64_t kBf16DirectWords = 12;

}  // namespace

int choose_layout(const Job& job, const IsaKernels* isa, int64_t n_words) {
    if (job.layout == LAYOUT_WORDS || job.layout == LAYOUT_DOT) return job.layout;
    const int64_t lanes = isa->lanes;
    if (lanes <= 1) return LAYOUT_WORDS;  // scalar: a "vector" of one word wastes nothing
    // Words-in-lanes fills n_w of round_up(n_w, lanes) lanes; DOT fills every lane but pays one
    // horizontal sum per dot product (~2-4% at D = 768-1024).  Same-process A/B on the 2-thread
    // AVX2 machine (benchmarks/results/cpu-amd-epyc-2threads.json for the full rows), fp32:
    //   W = 20 (20 of 24 lanes): DOT +19-26% (rerank 1 x 5000, D 768), +22% (all pairs 100 x 1000);
    //   W = 32 (full lanes): DOT +3-6% (rerank 1 x 1000 and 64 x 100, D 1024; Lq 32 x Ld 300,
    //     D 128), +3% (all pairs 128 x 128), a tie (-1%) on a cache-resident 200 x 4 images;
    // bf16 / fp16 rows (converted to an fp32 scratch first): W = 20 DOT +9-13%, W = 32 words +1-2%.
    if (job.dtype == DType::F32) return LAYOUT_DOT;
    const int64_t w = n_words > 0 ? n_words : 1;
    const int64_t filled = round_up(w, lanes);
    return w * 10 < filled * 9 ? LAYOUT_DOT : LAYOUT_WORDS;  // words-in-lanes would waste > 10% of lanes
}

// DOT layout with bf16 images: read the rows directly (2W values per load, widened in registers)
// instead of converting each image to an fp32 scratch first.  Direct costs two widening ops per
// 2W values per region block of words; the scratch one conversion per value for all words, plus
// its store and reload.  So direct wins for short captions and needs D to be a multiple of 2W.
static bool bf16_direct(const Job& job, const IsaKernels* isa, int64_t n_words) {
    if (job.dtype != DType::BF16 || job.dim % (2 * isa->lanes) != 0) return false;
    const int64_t limit = job.tuning.bf16_direct_words >= 0 ? job.tuning.bf16_direct_words : kBf16DirectWords;
    return n_words <= limit;
}

int run_job(const Job& job_in, const IsaKernels* isa, int num_threads) {
    const int64_t pairs = job_in.nt * job_in.k;
    if (pairs <= 0) return 0;
    Job job = job_in;  // a copy: the pre-converted images are attached below

    const int64_t D = job.dim;
    const int64_t wp_max = round_up(job.max_text_len > 0 ? job.max_text_len : 1, 16);
    const int64_t rt_max = round_up(job.max_image_len > 0 ? job.max_image_len : 1, kTileRowMultiple);
    const int64_t rmax = job.max_image_len > 0 ? job.max_image_len : 1;
    const int64_t wmax = job.max_text_len > 0 ? job.max_text_len : 1;
    const bool lowp = job.dtype != DType::F32;
    int64_t dc_lowp = job.tuning.dc_lowp;
    if (dc_lowp <= 0) {  // auto: whole rows unless the converted rows of one image exceed ~256 KB
        const int64_t budget = (int64_t(256) << 10) / (4 * rmax);
        dc_lowp = D <= budget ? D : (budget < 256 ? 256 : (budget / 64) * 64);
    }
    if (dc_lowp > D) dc_lowp = D;
    if (dc_lowp <= 0) dc_lowp = 1;
    dc_lowp = round_up(dc_lowp, 16);  // keep converted rows 64-byte aligned
    // DOT converts whole rows (unless ALADIN_FAST_DC_LOWP is set): its per-chunk horizontal sums
    // would otherwise make the bits depend on the batch's longest image through dc_lowp
    const int64_t D16 = round_up(D > 0 ? D : 1, 16);

    // Any thread count gives the same bits: each pair is scored by one thread, in a fixed order.
    // (in double: W * R * D of absurd shapes could overflow int64; saturated at 2^62)
    const double work_d = static_cast<double>(pairs) *
                          (static_cast<double>(wmax) * static_cast<double>(rmax) *
                               static_cast<double>((D > 0 ? D : 0) + kTileElementCost) +
                           static_cast<double>(kPairCost));
    const int64_t work = work_d < 4.6e18 ? static_cast<int64_t>(work_d) : (int64_t(1) << 62);
    const int threads = threads_for_work(num_threads, work, kWorkPerThread, pairs);
    float* preconverted = preconvert_images(job, isa, threads);
    job.preconverted = preconverted;

    int error = 0;
    // Scores the pairs of `range` with this thread's own workspace.
    const auto run_range = [&](Span range) {
        const SubnormalsHonoured subnormals;
        Workspace ws;
        ws.query = static_cast<float*>(alloc_aligned(((D > 0 ? D : 1) + 16) * wp_max, sizeof(float)));
        ws.tile = static_cast<float*>(alloc_aligned(rt_max * wp_max, sizeof(float)));
        ws.scratch = lowp ? static_cast<float*>(alloc_aligned(rmax * (dc_lowp > D16 ? dc_lowp : D16), sizeof(float))) : nullptr;
        ws.scratch_dc = dc_lowp;
        ws.scratch_dc_dot = job.tuning.dc_lowp > 0 ? dc_lowp : D16;
        ws.rowmax = static_cast<float*>(alloc_aligned(wp_max, sizeof(float)));
        ws.rowarg = static_cast<int32_t*>(alloc_aligned(wp_max, sizeof(int32_t)));
        ws.colmax = static_cast<float*>(alloc_aligned(rt_max, sizeof(float)));
        ws.colarg = job.region_argmax ? static_cast<int32_t*>(alloc_aligned(rt_max, sizeof(int32_t))) : nullptr;
        ws.rowptr = static_cast<const float**>(alloc_aligned(rmax, sizeof(const float*)));
        ws.rowptr16 = static_cast<const uint16_t**>(alloc_aligned(rmax, sizeof(const uint16_t*)));
        const bool ok = ws.query && ws.tile && (!lowp || ws.scratch) && ws.rowmax && ws.rowarg && ws.colmax && ws.rowptr && ws.rowptr16 &&
                        (!job.region_argmax || ws.colarg);
        if (!ok) {
#pragma omp atomic write
            error = -2;
        } else {
            int64_t current = -1;
            for (int64_t p = range.begin; p < range.end; ++p) {
                const int64_t i = p / job.k;
                const int64_t kk = p - i * job.k;
                const int64_t j = job.candidates ? job.candidates[p] : kk;
                if (j < 0 || j >= job.ni) {
#pragma omp atomic write
                    error = -1;
                    continue;
                }
                if (i != current) {
                    ws.layout = choose_layout(job, isa, job.text_lengths[i]);
                    ws.dot_bf16_direct = ws.layout == LAYOUT_DOT && bf16_direct(job, isa, job.text_lengths[i]);
                    isa->prepare_query(job, i, ws);
                    current = i;
                }
                ws.next_rows = nullptr;
                if (job.tuning.prefetch_next > 0 && p + 1 < range.end) {
                    prefetch_image(job, p + 1);
                    if (ws.layout == LAYOUT_DOT) next_image_rows(job, p + 1, ws);
                }
                isa->score_pair(job, i, j, p, ws);
            }
        }
        std::free(ws.query);
        std::free(ws.tile);
        std::free(ws.scratch);
        std::free(ws.rowmax);
        std::free(ws.rowarg);
        std::free(ws.colmax);
        std::free(ws.colarg);
        std::free(const_cast<float**>(ws.rowptr));
        std::free(const_cast<uint16_t**>(ws.rowptr16));
    };

    if (threads == 1) {  // no parallel region at all: nothing to wake or join
        run_range(static_part(pairs, 0, 1));
    } else {
#pragma omp parallel num_threads(threads)
        {
#ifdef _OPENMP
            run_range(static_part(pairs, omp_get_thread_num(), omp_get_num_threads()));
#else
            run_range(static_part(pairs, 0, 1));
#endif
        }
    }
    std::free(preconverted);
    return error;
}

double measure_fma_peak(const IsaKernels* isa, int num_threads, double seconds) {
    const int threads = resolve_threads(num_threads);
#ifdef _OPENMP
    // calibrate on one thread, then run all threads for ~seconds
    int64_t iters = 1 << 16;
    double dt = 0.0;
    for (;;) {
        const double t0 = omp_get_wtime();
        volatile float sink = isa->fma_loop(iters);
        (void)sink;
        dt = omp_get_wtime() - t0;
        if (dt > 0.02 || iters > (int64_t(1) << 40)) break;
        iters *= 4;
    }
    iters = static_cast<int64_t>(static_cast<double>(iters) * (seconds > 0 ? seconds : 0.2) / dt) + 1;
    float total = 0.0f;
    const double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads) reduction(+ : total)
    { total += isa->fma_loop(iters); }
    const double elapsed = omp_get_wtime() - t0;
    volatile float sink = total;
    (void)sink;
    return 2.0 * 12.0 * isa->lanes * static_cast<double>(iters) * threads / elapsed / 1e9;
#else
    (void)threads;
    return 0.0;
#endif
}

}  // namespace aladin_fast

// aladin-fast CPU kernel: shared declarations.
//
// The kernel contract is docs/kernel_contract.md.  This header is included by
// the pybind11 bindings, the (ISA-independent) OpenMP driver and the per-ISA
// translation units (kernel_scalar.cpp, kernel_avx2.cpp, kernel_avx512.cpp).
// It must stay free of anything that is compiled with ISA-specific target
// options: only plain declarations, POD structs and a few integer helpers live here.
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <xmmintrin.h>  // _mm_getcsr / _mm_setcsr (SSE: the baseline of every x86-64 target)
#endif

namespace aladin_fast {

// Subnormals honoured for the lifetime of the guard, on the thread that creates it: clears the
// flush-to-zero (FTZ) and denormals-are-zero (DAZ) bits of MXCSR and restores the caller's MXCSR on
// exit.  Every kernel thread (OpenMP workers included, which do not share the caller's MXCSR) opens
// one, so torch.set_flush_denormal(True) or a library that sets FTZ / DAZ changes neither the exact
// conversion of subnormal inputs nor the fp32 sums (docs/kernel_contract.md), and a worker's leftover
// mode can never make the scores depend on the thread count.
struct SubnormalsHonoured {
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
    static constexpr unsigned kFtzDaz = 0x8040u;  // bit 15 FTZ, bit 6 DAZ
    unsigned saved;
    SubnormalsHonoured() : saved(_mm_getcsr()) {
        if (saved & kFtzDaz) _mm_setcsr(saved & ~kFtzDaz);
    }
    ~SubnormalsHonoured() {
        if (saved & kFtzDaz) _mm_setcsr(saved);
    }
#endif
    SubnormalsHonoured(const SubnormalsHonoured&) = delete;
    SubnormalsHonoured& operator=(const SubnormalsHonoured&) = delete;
};

// ---- helpers shared by the drivers.  Plain integer code: the ISA translation units include
// this header before their target pragma, so these compile for the build's default target.

// Threads for a parallel region: `requested`, or the OpenMP default when 0; 1 without OpenMP.
inline int resolve_threads(int requested) {
#ifdef _OPENMP
    const int threads = requested > 0 ? requested : omp_get_max_threads();
    return threads > 0 ? threads : 1;
#else
    (void)requested;
    return 1;
#endif
}

// Threads worth waking for `work` units: one per `min_work_per_thread` units (at least 1), at
// most resolve_threads(requested) and at most `max_parts` (the number of independent items).
// Waking a team costs far more than a tiny job on a loaded machine (a descheduled worker
// delays the join by a whole time slice), so small jobs run on fewer threads, 1 when tiny.
inline int threads_for_work(int requested, int64_t work, int64_t min_work_per_thread, int64_t max_parts) {
    int64_t t = resolve_threads(requested);
    const int64_t by_work = min_work_per_thread > 0 ? work / min_work_per_thread : t;
    if (by_work < t) t = by_work;
    if (max_parts < t) t = max_parts;
    return t > 1 ? static_cast<int>(t) : 1;
}

// Part `part` of `parts` contiguous, near-equal pieces of [0, n): the static split of every
// driver.  The pieces depend only on (n, parts), never on scheduling.
struct Span {
    int64_t begin, end;
};
inline Span static_part(int64_t n, int64_t part, int64_t parts) {
    return {n * part / parts, n * (part + 1) / parts};
}

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

enum Aggregation : int { MRSW = 0, MRAVGW = 1, MWSR = 2, SYMM = 3, SUM = 4, MEAN = 5 };

// Forward micro-kernel layouts (both compute the same tile S[r][w]; docs/kernel_contract.md):
//   WORDS: words in SIMD lanes, query transposed once to [D][lanes], region values broadcast;
//          wastes lanes when W is not a multiple of the vector width (W = 20: 20 of 24).
//   DOT:   D in SIMD lanes, word and region rows read in their natural [.][D] layout, one
//          horizontal sum per (word, region) dot product; no lane is wasted for any W or R.
// LAYOUT_AUTO is resolved by choose_layout() (kernel_driver.cpp), the one place that decides.
enum Layout : int { LAYOUT_AUTO = 0, LAYOUT_WORDS = 1, LAYOUT_DOT = 2 };

// Tunables shared by all ISAs (set once per call by the driver).
struct Tuning {
    int64_t dc_f32 = 0;   // D chunk for fp32 input (0 = whole D)
    int64_t dc_lowp = 0;  // D chunk for fp16 / bf16 input (rows converted per chunk)
    int64_t prefetch = 0; // software prefetch distance in floats for fp32 region rows
    int word_chunk = 0;   // max word vectors per micro-kernel pass (0 = ISA default)
    int64_t prefetch_next = 4;  // cache lines prefetched at the start of every row of the next pair's image
    bool preconvert = true;  // fp16 / bf16 all pairs: convert every image row once, up front (kernel_driver.cpp)
    int64_t dot_prefetch_blocks = 1;  // DOT layout: prefetch the region block this many blocks ahead
    // DOT layout, bf16 images: read the bf16 rows directly (no fp32 scratch) for captions of at most this
    // many words (the scratch converts each value once for all words: better for long captions)
    int64_t bf16_direct_words = -1;  // -1: the ISA default (kernel_driver.cpp)
};

// Everything one `score` call needs, already validated by the bindings.
struct Job {
    const void* text = nullptr;  // [T_text, D] (fp32 / fp16 bits / bf16 bits)
    const int64_t* text_offsets = nullptr;
    const int32_t* text_lengths = nullptr;
    int64_t nt = 0;  // number of captions

    const void* images = nullptr;  // [T_img, D]
    const int64_t* image_offsets = nullptr;
    const int32_t* image_lengths = nullptr;
    int64_t ni = 0;  // number of images

    const int64_t* candidates = nullptr;  // [nt, k] or nullptr (all pairs)
    int64_t k = 0;

    int64_t dim = 0;
    DType dtype = DType::F32;
    int aggregation = 0;
    bool zero_padding = false;
    int64_t text_pad = 0;
    int64_t image_pad = 0;

    float* out = nullptr;        // [nt, k]
    int32_t* argmax = nullptr;   // [nt, k, text_pad] or nullptr (word -> winning region)
    int32_t* region_argmax = nullptr;  // [nt, k, image_pad] or nullptr (region -> winning word)

    int layout = LAYOUT_AUTO;  // requested by the caller; resolved per caption by choose_layout()
    // fp16 / bf16 all pairs: every image row converted to fp32 once, up front, by the driver (row r of the
    // images at preconverted + r * dim), read instead of converting each image once per caption; or nullptr
    const float* preconverted = nullptr;

    // derived
    int64_t max_text_len = 0;
    int64_t max_image_len = 0;
    Tuning tuning;
};

// Per-thread scratch memory handed to the ISA kernels (allocated by the driver).
struct Workspace {
    float* query = nullptr;    // [dim + 16][wp_max]  transposed query caption (DOT: [nw][dim + 16] fp32 rows)
    const float* qrows = nullptr;  // DOT layout: the query's fp32 word rows (row stride qstride)
    int64_t qstride = 0;
    int layout = LAYOUT_WORDS;     // layout of the current caption (set by the driver before prepare_query)
    const char* next_rows = nullptr;  // the next pair's image rows (DOT prefetch target; row stride D elements) or nullptr
    int64_t next_nr = 0;
    float* tile = nullptr;     // [rt_max][wp_max] score tile s[r][w]
    float* scratch = nullptr;  // [max_image_len][dc] converted region rows (fp16/bf16)
    float* rowmax = nullptr;   // [wp_max]
    int32_t* rowarg = nullptr; // [wp_max]
    float* colmax = nullptr;   // [rt_max]
    int32_t* colarg = nullptr; // [rt_max] (only when region_argmax is requested)
    const float** rowptr = nullptr;  // [max_image_len] region row pointers for the current D chunk
    const uint16_t** rowptr16 = nullptr;  // [max_image_len] bf16 region rows (DOT layout, dot_bf16_direct)
    bool dot_bf16_direct = false;  // DOT layout, bf16: rows read directly (set by the driver per caption)
    int64_t scratch_dc = 0;    // row stride of `scratch` (floats), words layout
    int64_t scratch_dc_dot = 0;  // row stride of `scratch` for the DOT layout (whole rows unless tuned)
    int64_t wp = 0;            // padded word count (lanes) of the current query
    int64_t nw = 0;            // valid words of the current query
};

// Everything one `score_backward` call needs, already validated by the bindings.
// The gradient of out[p] = score(caption i, image j) w.r.t. the valid tokens, for
// every aggregation, contracted with grad[p]:
//   word term (MrSw / MrAVGw / symm): d t_w += c v_{argmax(w)}, d v_{argmax(w)} += c t_w
//   region term (MwSr / symm):        d v_r += g t_{region_argmax(r)}, d t_{region_argmax(r)} += g v_r
//   sum / mean:                       d t_w += c sum_r v_r, d v_r += c sum_w t_w
// (winners that are padded positions, -1 or >= the valid length, carry no gradient).
struct BackwardJob {
    Job fwd;                              // inputs, shapes, aggregation (out / argmax fields unused)
    const float* grad = nullptr;          // [nt, k] upstream gradient
    const int32_t* argmax = nullptr;      // [nt, k, text_pad]  (word terms)
    const int32_t* region_argmax = nullptr;  // [nt, k, image_pad] (region terms)
    float* grad_text = nullptr;           // [text_rows, dim] written (rows of no valid token: 0)
    float* grad_images = nullptr;         // [image_rows, dim] written
    int64_t text_rows = 0;
    int64_t image_rows = 0;
    int64_t block = 0;    // captions (images) processed together; 0 = auto (~2 MB of accumulated rows)
    int64_t d_chunk = 0;  // feature columns per pass; 0 = whole rows
    int64_t window = 0;   // pair rounds whose terms a row gathers per add_many; 0 = auto (8)
};

// Function table exported by each ISA translation unit.
struct IsaKernels {
    const char* name;
    int lanes;            // fp32 SIMD lanes (words per vector); 1 for scalar
    // Transpose caption `i` into ws.query ([dim][wp], zero-filled lanes) and set ws.wp / ws.nw.
    void (*prepare_query)(const Job& job, int64_t i, Workspace& ws);
    // Score pair (caption i, image j) and write out[p] (+ argmax row p) where p = i * k + kk.
    void (*score_pair)(const Job& job, int64_t i, int64_t j, int64_t p, Workspace& ws);
    // Raw FMA throughput probe: 12 independent FMA chains x `iters`; returns a value to defeat DCE.
    float (*fma_loop)(int64_t iters);
    // y[0:n] += c * x[0:n], x of `dtype` (fp32 / fp16 bits / bf16 bits), accumulated in fp32.
    void (*axpy)(float* y, float c, const void* x, DType dtype, int64_t n);
    // dst[0:n] = fp32(src[0:n]), src fp16 or bf16 bits (exact)
    void (*convert)(const uint16_t* src, float* dst, DType dtype, int64_t n);
    // y[0:n] += c[0] * x[0][0:n] + ... + c[m-1] * x[m-1][0:n], the terms added in this order with
    // the same rounding as m successive axpy calls (same bits), y held in registers across the terms
    void (*axpy_many)(float* y, const float* c, const void* const* x, DType dtype, int64_t m, int64_t n);
};

constexpr int64_t kTileRowMultiple = 24;  // every micro-kernel region block divides this

const IsaKernels* scalar_kernels();
#if defined(__x86_64__) || defined(__i386__)
const IsaKernels* avx2_kernels();
const IsaKernels* avx512_kernels();
#endif

// Driver (kernel_driver.cpp): runs `job` with `isa` on at most `num_threads` threads (0 = OpenMP
// default), fewer for small jobs (threads_for_work); the results do not depend on the count.
// Returns 0 on success, otherwise a negative error code:
//   -1 candidate id out of range.
int run_job(const Job& job, const IsaKernels* isa, int num_threads);

// The shape-aware layout choice (LAYOUT_WORDS or LAYOUT_DOT) for a caption of `n_words` valid
// words in `job` on `isa`: the single place where the forward layout is decided.  It depends only
// on the caption's own length, the dtype, the ISA and the request (`job.layout` other than
// LAYOUT_AUTO is returned as is), never on the rest of the batch, so a pair's score has the same
// bits whatever batch, chunking or candidate list it is computed in.
int choose_layout(const Job& job, const IsaKernels* isa, int64_t n_words);

// Backward driver (kernel_backward.cpp).  Deterministic whatever the thread count: every
// grad_text row is accumulated by the thread owning its caption, every grad_images row by
// the thread owning its image, each in a fixed order (candidates, then words / regions).
// `overlapping_rows`: some valid rows are shared by two sequences (run on one thread).
// Returns 0 on success, -1 candidate id out of range, -2 allocation failure.
int run_backward(const BackwardJob& job, const IsaKernels* isa, int num_threads, bool overlapping_rows);

// Raw FMA peak of `isa` on `num_threads` threads (0 = OpenMP default), in GFLOP/s
// (fp32, 2 FLOP per lane per FMA), measured over roughly `seconds`.
double measure_fma_peak(const IsaKernels* isa, int num_threads, double seconds);

// Streaming-read bandwidth (probes.cpp), in GB/s: `num_threads` threads (0 = OpenMP default)
// each read their own slice of a `bytes` buffer (AVX2 loads when available) for roughly
// `seconds`; the best pass counts.  Use a buffer far larger than the last-level cache.
// Returns 0 if `bytes` is too small to split, -1 if the buffer cannot be allocated.
double measure_read_bandwidth(int64_t bytes, int num_threads, double seconds);

}  // namespace aladin_fast

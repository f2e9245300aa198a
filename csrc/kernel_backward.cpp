// Backward of the fused alignment scores: ISA-independent OpenMP driver; the vector
// work is the selected ISA's axpy (y += c * x over D, x converted to fp32 on the fly).
// The math is documented at BackwardJob (aladin_kernel.h).
//
// Two ownership passes, no atomics and no per-thread copies of the gradients:
//   * text pass: captions are split statically over the threads; the thread that owns
//     caption i accumulates every contribution to i's rows (its candidates in order);
//   * image pass: images are split into contiguous ranges balanced by their number of
//     pairs; the thread that owns image j walks j's pairs in increasing pair order (an
//     inverse index built by a counting sort when candidates are given).
// Every output row is therefore reduced by one thread in a fixed order: the gradients
// are bitwise identical for any thread count.  Pairs whose upstream gradient is exactly
// 0 are skipped (hinge losses with hardest negatives leave most pairs at 0).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "aladin_kernel.h"

namespace aladin_fast {
namespace {

// element `col` of token `row` in a [rows, dim] matrix of `dtype`
inline const void* row_ptr(const void* base, int64_t row, int64_t dim, int64_t col, DType dtype) {
    const int64_t elem = dtype == DType::F32 ? 4 : 2;
    return static_cast<const char*>(base) + (row * dim + col) * elem;
}

// coefficient of the word term of pair (i, j): MrAVGw divides by the valid words
inline float word_coefficient(const Job& f, float g, int64_t nw) {
    return f.aggregation == MRAVGW ? g / static_cast<float>(nw) : g;
}

// coefficient of the sum term: sum -> g; mean -> g / (n_w n_r) or g / (W_pad R_pad) in zero mode
inline float sum_coefficient(const Job& f, float g, int64_t nw, int64_t nr) {
    if (f.aggregation == SUM) return g;
    const double den = f.zero_padding ? static_cast<double>(f.text_pad) * static_cast<double>(f.image_pad)
                                      : static_cast<double>(nw) * static_cast<double>(nr);
    return den > 0.0 ? static_cast<float>(static_cast<double>(g) / den) : 0.0f;
}

// Sum of the valid rows of each sequence, fp32, into sums[n * dim] (rows of one sequence in order).
void sequence_sums(const IsaKernels* isa, const void* tokens, DType dtype, const int64_t* offsets,
                   const int32_t* lengths, int64_t begin, int64_t end, int64_t dim, float* sums) {
    for (int64_t s = begin; s < end; ++s) {
        float* out = sums + s * dim;
        std::memset(out, 0, static_cast<size_t>(dim) * sizeof(float));
        for (int64_t t = 0; t < lengths[s]; ++t)
            isa->axpy(out, 1.0f, row_ptr(tokens, offsets[s] + t, dim, 0, dtype), dtype, dim);
    }
}

}  // namespace

int run_backward(const BackwardJob& job, const IsaKernels* isa, int num_threads, bool overlapping_rows) {
    const Job& f = job.fwd;
    const int64_t D = f.dim, K = f.k, nt = f.nt, ni = f.ni;
    const int64_t pairs = nt * K;
    const DType dt = f.dtype;
    const int agg = f.aggregation;
    const bool word_term = agg == MRSW || agg == MRAVGW || agg == SYMM;
    const bool region_term = agg == MWSR || agg == SYMM;
    const bool sum_term = agg == SUM || agg == MEAN;
    if ((word_term && !job.argmax) || (region_term && !job.region_argmax)) return -3;

    int threads = num_threads;
#ifdef _OPENMP
    if (threads <= 0) threads = omp_get_max_threads();
#else
    threads = 1;
#endif
    if (threads < 1 || overlapping_rows) threads = 1;  // shared rows: a single owner keeps it race-free

    // inverse index: the pairs of image j are order[start[j] .. start[j + 1]), increasing
    std::vector<int64_t> start, order;
    if (f.candidates) {
        start.assign(static_cast<size_t>(ni + 1), 0);
        for (int64_t p = 0; p < pairs; ++p) {
            const int64_t j = f.candidates[p];
            if (j < 0 || j >= ni) return -1;
            ++start[static_cast<size_t>(j + 1)];
        }
        for (int64_t j = 0; j < ni; ++j) start[j + 1] += start[j];
        order.resize(static_cast<size_t>(pairs));
        std::vector<int64_t> fill(start.begin(), start.end() - 1);
        for (int64_t p = 0; p < pairs; ++p) order[static_cast<size_t>(fill[f.candidates[p]]++)] = p;
    }
    // cache blocking (see the parallel region).  Measured on the 128 x 128, W 32, R 36, D 1024
    // training batch (2 threads, 8 MB L3): whole rows and blocks of ~2 MB of accumulated rows
    // (16 captions / 14 images) beat both no blocking (2x slower) and D chunks of 256-512.
    int64_t dc = job.d_chunk > 0 ? job.d_chunk : D;
    dc = std::max<int64_t>(1, std::min<int64_t>(dc, D));
    const int64_t longest = std::max<int64_t>(std::max(f.max_text_len, f.max_image_len), 1);
    int64_t block = job.block > 0 ? job.block : (int64_t(2) << 20) / (longest * dc * 4);
    block = std::max<int64_t>(1, std::min<int64_t>(block, 16));
    std::vector<float> text_sums, image_sums;
    if (sum_term) {
        text_sums.resize(static_cast<size_t>(nt * D));
        image_sums.resize(static_cast<size_t>(ni * D));
    }

    int error = 0;
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        const int64_t tid = omp_get_thread_num();
        const int64_t nth = omp_get_num_threads();
#else
        const int64_t tid = 0, nth = 1;
#endif
        // zero both outputs (rows that hold no valid token stay 0), and the per-sequence sums
        {
            const int64_t t0 = job.text_rows * tid / nth, t1 = job.text_rows * (tid + 1) / nth;
            std::memset(job.grad_text + t0 * D, 0, static_cast<size_t>((t1 - t0) * D) * sizeof(float));
            const int64_t i0 = job.image_rows * tid / nth, i1 = job.image_rows * (tid + 1) / nth;
            std::memset(job.grad_images + i0 * D, 0, static_cast<size_t>((i1 - i0) * D) * sizeof(float));
        }
        if (sum_term) {
            sequence_sums(isa, f.text, dt, f.text_offsets, f.text_lengths, nt * tid / nth, nt * (tid + 1) / nth, D,
                          text_sums.data());
            sequence_sums(isa, f.images, dt, f.image_offsets, f.image_lengths, ni * tid / nth, ni * (tid + 1) / nth,
                          D, image_sums.data());
        }
        // Cache blocking: D is processed in chunks of `dc` columns and `block` captions (images)
        // together, candidate by candidate (pair by pair), so that in all-pairs mode a block
        // reuses each image's (caption's) row chunks from L1/L2 and the chunk of the whole
        // batch stays in the last-level cache.  A row's accumulation order (candidates, then
        // words / regions) does not depend on the blocking or on the thread count.
        float* acc = sum_term ? static_cast<float*>(std::malloc(static_cast<size_t>(block * dc) * sizeof(float)))
                              : nullptr;
        if (sum_term && !acc) {
#pragma omp atomic write
            error = -2;
        }
#pragma omp barrier
        if (error == 0) {
            int64_t j_begin, j_end;  // images owned by this thread
            if (f.candidates) {      // balanced by pair count
                const auto bound = [&](int64_t t) {
                    if (t >= nth) return ni;
                    const int64_t target = pairs * t / nth;
                    return static_cast<int64_t>(std::lower_bound(start.begin(), start.end(), target) - start.begin());
                };
                j_begin = std::min(bound(tid), ni);
                j_end = std::min(bound(tid + 1), ni);
            } else {
                j_begin = ni * tid / nth;
                j_end = ni * (tid + 1) / nth;
            }
            const int64_t i_begin = nt * tid / nth, i_end = nt * (tid + 1) / nth;
            for (int64_t d0 = 0; d0 < D; d0 += dc) {
                const int64_t dl = std::min(dc, D - d0);
                // ---- text pass: the rows of caption i
                for (int64_t ib = i_begin; ib < i_end; ib += block) {
                    const int64_t ie = std::min(ib + block, i_end);
                    if (sum_term) std::memset(acc, 0, static_cast<size_t>((ie - ib) * dl) * sizeof(float));
                    for (int64_t kk = 0; kk < K; ++kk) {
                        for (int64_t i = ib; i < ie; ++i) {
                            const int64_t nw = f.text_lengths[i];
                            const int64_t p = i * K + kk;
                            const float g = job.grad[p];
                            if (nw == 0 || g == 0.0f) continue;
                            const int64_t j = f.candidates ? f.candidates[p] : kk;
                            const int64_t nr = f.image_lengths[j];
                            if (nr == 0) continue;
                            float* gt = job.grad_text + f.text_offsets[i] * D + d0;
                            const int64_t row0 = f.image_offsets[j];
                            if (word_term) {
                                const float c = word_coefficient(f, g, nw);
                                const int32_t* a = job.argmax + p * f.text_pad;
                                for (int64_t w = 0; w < nw; ++w) {
                                    const int64_t r = a[w];
                                    if (r >= 0 && r < nr)
                                        isa->axpy(gt + w * D, c, row_ptr(f.images, row0 + r, D, d0, dt), dt, dl);
                                }
                            }
                            if (region_term) {
                                const int32_t* b = job.region_argmax + p * f.image_pad;
                                for (int64_t r = 0; r < nr; ++r) {
                                    const int64_t w = b[r];
                                    if (w >= 0 && w < nw)
                                        isa->axpy(gt + w * D, g, row_ptr(f.images, row0 + r, D, d0, dt), dt, dl);
                                }
                            }
                            if (sum_term) {
                                const float c = sum_coefficient(f, g, nw, nr);
                                if (c != 0.0f)
                                    isa->axpy(acc + (i - ib) * dl, c, image_sums.data() + j * D + d0, DType::F32, dl);
                            }
                        }
                    }
                    if (sum_term)
                        for (int64_t i = ib; i < ie; ++i)
                            for (int64_t w = 0; w < f.text_lengths[i]; ++w)
                                isa->axpy(job.grad_text + (f.text_offsets[i] + w) * D + d0, 1.0f, acc + (i - ib) * dl,
                                          DType::F32, dl);
                }
                // ---- image pass: the rows of image j
                for (int64_t jb = j_begin; jb < j_end; jb += block) {
                    const int64_t je = std::min(jb + block, j_end);
                    if (sum_term) std::memset(acc, 0, static_cast<size_t>((je - jb) * dl) * sizeof(float));
                    int64_t rounds = 0;  // pairs of the busiest image of the block
                    for (int64_t j = jb; j < je; ++j)
                        rounds = std::max(rounds, f.candidates ? start[j + 1] - start[j] : nt);
                    for (int64_t e = 0; e < rounds; ++e) {
                        for (int64_t j = jb; j < je; ++j) {
                            const int64_t nr = f.image_lengths[j];
                            if (nr == 0) continue;
                            if (f.candidates && e >= start[j + 1] - start[j]) continue;
                            const int64_t p = f.candidates ? order[static_cast<size_t>(start[j] + e)] : e * K + j;
                            const float g = job.grad[p];
                            if (g == 0.0f) continue;
                            const int64_t i = p / K;
                            const int64_t nw = f.text_lengths[i];
                            if (nw == 0) continue;
                            float* gi = job.grad_images + f.image_offsets[j] * D + d0;
                            const int64_t row0 = f.text_offsets[i];
                            if (word_term) {
                                const float c = word_coefficient(f, g, nw);
                                const int32_t* a = job.argmax + p * f.text_pad;
                                for (int64_t w = 0; w < nw; ++w) {
                                    const int64_t r = a[w];
                                    if (r >= 0 && r < nr)
                                        isa->axpy(gi + r * D, c, row_ptr(f.text, row0 + w, D, d0, dt), dt, dl);
                                }
                            }
                            if (region_term) {
                                const int32_t* b = job.region_argmax + p * f.image_pad;
                                for (int64_t r = 0; r < nr; ++r) {
                                    const int64_t w = b[r];
                                    if (w >= 0 && w < nw)
                                        isa->axpy(gi + r * D, g, row_ptr(f.text, row0 + w, D, d0, dt), dt, dl);
                                }
                            }
                            if (sum_term) {
                                const float c = sum_coefficient(f, g, nw, nr);
                                if (c != 0.0f)
                                    isa->axpy(acc + (j - jb) * dl, c, text_sums.data() + i * D + d0, DType::F32, dl);
                            }
                        }
                    }
                    if (sum_term)
                        for (int64_t j = jb; j < je; ++j)
                            for (int64_t r = 0; r < f.image_lengths[j]; ++r)
                                isa->axpy(job.grad_images + (f.image_offsets[j] + r) * D + d0, 1.0f,
                                          acc + (j - jb) * dl, DType::F32, dl);
                }
            }
        }
        std::free(acc);
    }
    return error;
}

}  // namespace aladin_fast

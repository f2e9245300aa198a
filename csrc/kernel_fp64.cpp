// float64 forward of the fused alignment scores (see kernel_fp64.h): the pair range is split
// statically over the threads like run_job, each pair is scored by one thread into a
// [n_w, n_r] tile of doubles and pooled by the rules of docs/kernel_contract.md, mirroring
// finalize() in kernel_impl.inc with double in place of float.
#include "kernel_fp64.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <new>
#include <vector>

namespace aladin_fast {
namespace {

inline double dot(const double* a, const double* b, int64_t n) {
    double s = 0.0;
    for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
    return s;
}

// Scores pair p = (caption i, image j): writes out[p] and, when requested, the argmax rows of p.
// `tile` holds at least n_w * n_r doubles.
void score_pair(const Job& job, int64_t i, int64_t j, int64_t p, double* out, double* tile) {
    const int64_t D = job.dim;
    const int64_t nw = job.text_lengths[i], nr = job.image_lengths[j];
    const double* text = static_cast<const double*>(job.text) + job.text_offsets[i] * D;
    const double* image = static_cast<const double*>(job.images) + job.image_offsets[j] * D;
    const int agg = job.aggregation;
    int32_t* am = job.argmax ? job.argmax + p * job.text_pad : nullptr;
    int32_t* ram = job.region_argmax ? job.region_argmax + p * job.image_pad : nullptr;
    const bool need_row = agg == MRSW || agg == MRAVGW || agg == SYMM || am != nullptr;
    const bool need_col = agg == MWSR || agg == SYMM || ram != nullptr;
    const bool pad_r = job.zero_padding && nr < job.image_pad;  // 0 takes part in the row maxes
    const bool pad_w = job.zero_padding && nw < job.text_pad;   // 0 takes part in the column maxes

    bool nan = false;
    double sum = 0.0;
    for (int64_t w = 0; w < nw; ++w)
        for (int64_t r = 0; r < nr; ++r) {
            const double s = dot(text + w * D, image + r * D, D);
            tile[w * nr + r] = s;
            nan |= std::isnan(s);
            sum += s;
        }

    double mrsw = 0.0;
    if (need_row) {
        for (int64_t w = 0; w < nw; ++w) {
            double m = 0.0;
            int32_t a = pad_r ? 0 : -1;  // nr == 0: an empty max contributes 0
            if (nr > 0) {
                m = tile[w * nr];
                a = 0;
                for (int64_t r = 1; r < nr; ++r)
                    if (tile[w * nr + r] > m) {  // strict: the first index wins ties
                        m = tile[w * nr + r];
                        a = static_cast<int32_t>(r);
                    }
                if (pad_r && 0.0 > m) {
                    m = 0.0;
                    a = static_cast<int32_t>(nr);
                }
            }
            mrsw += m;
            if (am) am[w] = a;
        }
        if (am)
            for (int64_t w = nw; w < job.text_pad; ++w) am[w] = -1;
    }
    double mwsr = 0.0;
    if (need_col) {
        for (int64_t r = 0; r < nr; ++r) {
            int32_t a = pad_w ? 0 : -1;  // nw == 0
            if (nw > 0) {
                double c = tile[r];
                a = 0;
                for (int64_t w = 1; w < nw; ++w)
                    if (tile[w * nr + r] > c) {
                        c = tile[w * nr + r];
                        a = static_cast<int32_t>(w);
                    }
                if (pad_w && 0.0 > c) {
                    c = 0.0;
                    a = static_cast<int32_t>(nw);
                }
                mwsr += c;
            }
            if (ram) ram[r] = a;
        }
        if (ram)
            for (int64_t r = nr; r < job.image_pad; ++r) ram[r] = -1;
    }
    double score = 0.0;
    switch (agg) {
        case MRSW: score = mrsw; break;
        case MRAVGW: score = nw > 0 ? mrsw / static_cast<double>(nw) : 0.0; break;
        case MWSR: score = mwsr; break;
        case SYMM: score = mrsw + mwsr; break;
        case SUM: score = sum; break;
        case MEAN: {
            const double den = job.zero_padding ? static_cast<double>(job.text_pad) * static_cast<double>(job.image_pad)
                                                : static_cast<double>(nw) * static_cast<double>(nr);
            score = den > 0.0 ? sum / den : 0.0;
            break;
        }
        default: break;
    }
    out[p] = nan ? std::numeric_limits<double>::quiet_NaN() : score;
}

}  // namespace

int run_job_f64(const Job& job, double* out, int num_threads) {
    const int64_t pairs = job.nt * job.k;
    if (pairs <= 0) return 0;
    // Small jobs (gradcheck's) use fewer threads: waking a team costs more than scoring a few
    // pairs, far more on a loaded machine.  Any split gives the same bits (one thread per pair).
    constexpr int64_t kWorkPerThread = int64_t(1) << 16;  // multiply-adds, ~50 us of scalar work
    const int64_t work = pairs * std::max<int64_t>(job.max_text_len, 1) * std::max<int64_t>(job.max_image_len, 1) *
                         std::max<int64_t>(job.dim, 1);
    const int threads = static_cast<int>(std::min<int64_t>(resolve_threads(num_threads), 1 + work / kWorkPerThread));
    const size_t words = static_cast<size_t>(job.max_text_len), regions = static_cast<size_t>(job.max_image_len);

    int error = 0;
#pragma omp parallel num_threads(threads)
    {
        const SubnormalsHonoured subnormals;
#ifdef _OPENMP
        const Span range = static_part(pairs, omp_get_thread_num(), omp_get_num_threads());
#else
        const Span range = static_part(pairs, 0, 1);
#endif
        std::vector<double> tile;  // [n_w][n_r] similarities of the current pair
        bool ok = true;
        try {
            tile.resize(words * regions);
        } catch (const std::bad_alloc&) {
            ok = false;
        }
        if (!ok) {
#pragma omp atomic write
            error = -2;
        } else {
            for (int64_t p = range.begin; p < range.end; ++p) {
                const int64_t i = p / job.k;
                const int64_t j = job.candidates ? job.candidates[p] : p - i * job.k;
                if (j < 0 || j >= job.ni) {
#pragma omp atomic write
                    error = -1;
                    continue;
                }
                score_pair(job, i, j, p, out, tile.data());
            }
        }
    }
    return error;
}

}  // namespace aladin_fast

// Backward of the fused alignment scores: ISA-independent OpenMP driver.  The math is
// documented at BackwardJob (aladin_kernel.h).  Two row types share one driver:
//   * fp32 / fp16 / bf16 inputs: fp32 gradients, the vector work is the selected ISA's axpy
//     (y += c * x over D, x converted to fp32 on the fly);
//   * float64 inputs (kernel_fp64.h): double gradients, plain scalar loops.
//
// Two ownership passes, no atomics and no per-thread copies of the gradients:
//   * text pass: captions are split statically over the threads; the thread that owns
//     caption i accumulates every contribution to i's rows (its candidates in order);
//   * image pass: images are split into contiguous ranges balanced by their number of
//     pairs; the thread that owns image j walks j's pairs in increasing pair order (an
//     inverse index built by a counting sort when candidates are given).
// Both passes are the same loop (`owner_pass`) seen from either side of the pairs.
// Every output row is therefore reduced by one thread in a fixed order: the gradients
// are bitwise identical for any thread count.  Pairs whose upstream gradient is exactly
// 0 are skipped (hinge losses with hardest negatives leave most pairs at 0).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "aladin_kernel.h"
#include "kernel_fp64.h"

namespace aladin_fast {
namespace {

// Row arithmetic of the fp32 path: the ISA's axpy, tokens of `dtype` converted to fp32.
struct Fp32Rows {
    using Acc = float;
    const IsaKernels* isa;
    DType dtype;

    // y[0:n] += c * tokens[row][col : col + n]
    void add_token(float* y, float c, const void* tokens, int64_t row, int64_t dim, int64_t col, int64_t n) const {
        const int64_t elem = dtype == DType::F32 ? 4 : 2;
        isa->axpy(y, c, static_cast<const char*>(tokens) + (row * dim + col) * elem, dtype, n);
    }
    // y[0:n] += c * x[0:n]
    void add(float* y, float c, const float* x, int64_t n) const { isa->axpy(y, c, x, DType::F32, n); }
    // tokens[row][col:]
    const void* token(const void* tokens, int64_t row, int64_t dim, int64_t col) const {
        return static_cast<const char*>(tokens) + (row * dim + col) * (dtype == DType::F32 ? 4 : 2);
    }
    // y[0:n] += c[0] * x[0][0:n] + ... (in order; the bits of m successive add_token calls)
    void add_many(float* y, const float* c, const void* const* x, int64_t m, int64_t n) const {
        isa->axpy_many(y, c, x, dtype, m, n);
    }
};

// Row arithmetic of the float64 path: plain loops (the gradcheck path, not a speed path).
struct Fp64Rows {
    using Acc = double;

    void add_token(double* y, double c, const void* tokens, int64_t row, int64_t dim, int64_t col, int64_t n) const {
        add(y, c, static_cast<const double*>(tokens) + row * dim + col, n);
    }
    void add(double* y, double c, const double* x, int64_t n) const {
        for (int64_t d = 0; d < n; ++d) y[d] += c * x[d];
    }
    const void* token(const void* tokens, int64_t row, int64_t dim, int64_t col) const {
        return static_cast<const double*>(tokens) + row * dim + col;
    }
    void add_many(double* y, const double* c, const void* const* x, int64_t m, int64_t n) const {
        for (int64_t e = 0; e < m; ++e) add(y, c[e], static_cast<const double*>(x[e]), n);
    }
};

// One side of the pairs (the captions or the images) and its gradient.
template <class Acc>
struct Side {
    const void* tokens;
    const int64_t* offsets;
    const int32_t* lengths;
    int64_t count;  // sequences
    int64_t rows;   // rows of `tokens` and of `grad`
    Acc* grad;      // [rows, D]
    Acc* sums;      // [count, D] sum of each sequence's valid rows (sum / mean only), else nullptr
};

template <class Ops>
class Backward {
  public:
    using Acc = typename Ops::Acc;

    Backward(const BackwardJob& job, const Ops& ops, const Acc* grad, Side<Acc> text, Side<Acc> images)
        : f_(job.fwd), job_(job), ops_(ops), grad_(grad), text_(text), images_(images) {
        const int agg = f_.aggregation;
        word_term_ = agg == MRSW || agg == MRAVGW || agg == SYMM;
        region_term_ = agg == MWSR || agg == SYMM;
        sum_term_ = agg == SUM || agg == MEAN;
    }

    int run(int num_threads, bool overlapping_rows);

  private:
    // pairs of sequence s of the owning side, and the e-th of them (increasing pair order)
    int64_t pair_count(bool owns_text, int64_t s) const {
        if (owns_text) return f_.k;
        return f_.candidates ? start_[s + 1] - start_[s] : f_.nt;
    }
    int64_t pair(bool owns_text, int64_t s, int64_t e) const {
        if (owns_text) return s * f_.k + e;
        return f_.candidates ? order_[static_cast<size_t>(start_[s] + e)] : e * f_.k + s;
    }
    // coefficient of the word term of a pair: MrAVGw divides by the valid words
    Acc word_coefficient(Acc g, int64_t nw) const {
        return f_.aggregation == MRAVGW ? g / static_cast<Acc>(nw) : g;
    }
    // coefficient of the sum term: sum -> g; mean -> g / (n_w n_r) or g / (W_pad R_pad) in zero mode
    Acc sum_coefficient(Acc g, int64_t nw, int64_t nr) const {
        if (f_.aggregation == SUM) return g;
        const double den = f_.zero_padding ? static_cast<double>(f_.text_pad) * static_cast<double>(f_.image_pad)
                                           : static_cast<double>(nw) * static_cast<double>(nr);
        return den > 0.0 ? static_cast<Acc>(static_cast<double>(g) / den) : Acc(0);
    }

    void sequence_sums(const Side<Acc>& side, Span range) const;
    // the terms one sequence's rows receive from a window of its pairs, grouped by row (CSR), each row's
    // terms in the order the pairs and positions are visited
    struct Terms {
        std::vector<int64_t> start;      // [rows + 1]
        std::vector<Acc> coefficient;    // [terms]
        std::vector<const void*> source;  // [terms] the other side's row, at column d0
    };
    template <class Emit>
    void matched_terms(const Side<Acc>& other, int64_t other_row0, const int32_t* match, int64_t n_from,
                       int64_t n_to, bool owner_is_from, Acc c, int64_t d0, Emit&& emit) const;
    template <class Visit>
    void window_pairs(bool owns_text, int64_t s, int64_t e0, int64_t e1, Visit&& visit) const;
    template <class Emit>
    void window_terms(bool owns_text, int64_t s, int64_t e0, int64_t e1, int64_t d0, Emit&& emit) const;
    void owner_pass(bool owns_text, Span owned, int64_t d0, int64_t dl, int64_t block, Acc* acc, Terms& terms) const;
    Span balanced_images(int64_t tid, int64_t nth) const;

    const Job& f_;
    const BackwardJob& job_;
    Ops ops_;
    const Acc* grad_;
    Side<Acc> text_, images_;
    bool word_term_ = false, region_term_ = false, sum_term_ = false;
    std::vector<int64_t> start_, order_;  // pairs of image j: order_[start_[j] .. start_[j + 1])
};

// Sum of the valid rows of each sequence in `range` into side.sums (rows of one sequence in order).
template <class Ops>
void Backward<Ops>::sequence_sums(const Side<Acc>& side, Span range) const {
    const int64_t D = f_.dim;
    for (int64_t s = range.begin; s < range.end; ++s) {
        Acc* out = side.sums + s * D;
        std::memset(out, 0, static_cast<size_t>(D) * sizeof(Acc));
        for (int64_t t = 0; t < side.lengths[s]; ++t) ops_.add_token(out, Acc(1), side.tokens, side.offsets[s] + t, D, 0, D);
    }
}

// Terms of the gradient of c * sum_a <from_a, to_{match[a]}> for the owning end of the match,
// columns from d0: every position a < n_from won by position match[a] < n_to (a winner that is -1
// or a padded position carries no gradient).  The owner is either the "from" sequence (row a
// receives c * to_{match[a]}) or the "to" sequence (row match[a] receives c * from_a); either way
// positions a are visited in increasing order.  emit(own row, coefficient, other side's row).
template <class Ops>
template <class Emit>
void Backward<Ops>::matched_terms(const Side<Acc>& other, int64_t other_row0, const int32_t* match, int64_t n_from,
                                  int64_t n_to, bool owner_is_from, Acc c, int64_t d0, Emit&& emit) const {
    for (int64_t a = 0; a < n_from; ++a) {
        const int64_t m = match[a];
        if (m < 0 || m >= n_to) continue;
        const int64_t own = owner_is_from ? a : m, theirs = owner_is_from ? m : a;
        emit(own, c, ops_.token(other.tokens, other_row0 + theirs, f_.dim, d0));
    }
}

// The pairs e0 <= e < e1 of sequence s of the owning side that carry a gradient (a nonzero upstream
// gradient and a non-empty partner), in increasing order: visit(pair, grad, partner, n_words, n_regions).
template <class Ops>
template <class Visit>
void Backward<Ops>::window_pairs(bool owns_text, int64_t s, int64_t e0, int64_t e1, Visit&& visit) const {
    const int64_t n_own = (owns_text ? text_ : images_).lengths[s];
    const Side<Acc>& other = owns_text ? images_ : text_;
    e1 = std::min(e1, pair_count(owns_text, s));
    for (int64_t e = e0; e < e1; ++e) {
        const int64_t p = pair(owns_text, s, e);
        const Acc g = grad_[p];
        if (g == Acc(0)) continue;
        const int64_t o = owns_text ? (f_.candidates ? f_.candidates[p] : e) : p / f_.k;
        const int64_t n_other = other.lengths[o];
        if (n_other == 0) continue;
        visit(p, g, o, owns_text ? n_own : n_other, owns_text ? n_other : n_own);
    }
}

// The argmax terms sequence s of the owning side receives from its pairs e0 <= e < e1 (pairs in
// increasing order; per pair the word terms, then the region terms).
template <class Ops>
template <class Emit>
void Backward<Ops>::window_terms(bool owns_text, int64_t s, int64_t e0, int64_t e1, int64_t d0, Emit&& emit) const {
    const Side<Acc>& other = owns_text ? images_ : text_;
    window_pairs(owns_text, s, e0, e1, [&](int64_t p, Acc g, int64_t o, int64_t nw, int64_t nr) {
        if (word_term_)  // words -> regions (argmax): the text owns the "from" end
            matched_terms(other, other.offsets[o], job_.argmax + p * f_.text_pad, nw, nr, owns_text,
                          word_coefficient(g, nw), d0, emit);
        if (region_term_)  // regions -> words (region_argmax): the image owns the "from" end
            matched_terms(other, other.offsets[o], job_.region_argmax + p * f_.image_pad, nr, nw, !owns_text, g, d0,
                          emit);
    });
}

// Accumulates columns [d0, d0 + dl) of the gradient rows of the owned sequences (captions
// when owns_text, else images): `block` sequences at a time, a window of pair rounds at a
// time, so that in all-pairs mode a block reuses the other side's row chunks of the window
// from L2 and the chunk of the whole batch stays in the last-level cache.  Within a window each
// row's terms are gathered first (row by row, in order) and added with y kept in registers
// (add_many: one load per multiply-add).  A row's accumulation order (its pairs in increasing
// order, then words / regions) depends neither on the blocking, the window nor on the thread
// count, and add_many gives the bits of adding the terms one by one.  `acc` holds block * dl
// values (sum / mean only).
template <class Ops>
void Backward<Ops>::owner_pass(bool owns_text, Span owned, int64_t d0, int64_t dl, int64_t block, Acc* acc,
                               Terms& terms) const {
    // pair rounds per gather: y is loaded and stored once per window.  Measured on the 128 x 128, W 32,
    // R 36, D 1024 training batch (2 threads): 8 best (MrSw 1.5x, symm 1.5x faster than one axpy per
    // term); 16-32 let the window's rows of the other side fall out of L2
    const int64_t kWindow = job_.window > 0 ? job_.window : 8;
    const Side<Acc>& own = owns_text ? text_ : images_;
    const Side<Acc>& other = owns_text ? images_ : text_;
    const int64_t D = f_.dim;
    for (int64_t sb = owned.begin; sb < owned.end; sb += block) {
        const int64_t se = std::min(sb + block, owned.end);
        if (sum_term_) std::memset(acc, 0, static_cast<size_t>((se - sb) * dl) * sizeof(Acc));
        int64_t rounds = 0;  // pairs of the busiest sequence of the block
        for (int64_t s = sb; s < se; ++s) rounds = std::max(rounds, pair_count(owns_text, s));
        for (int64_t e0 = 0; e0 < rounds; e0 += kWindow) {
            const int64_t e1 = std::min(rounds, e0 + kWindow);
            for (int64_t s = sb; s < se; ++s) {
                const int64_t n_own = own.lengths[s];
                if (n_own == 0 || e0 >= pair_count(owns_text, s)) continue;
                if (sum_term_)
                    window_pairs(owns_text, s, e0, e1, [&](int64_t, Acc g, int64_t o, int64_t nw, int64_t nr) {
                        const Acc c = sum_coefficient(g, nw, nr);
                        if (c != Acc(0)) ops_.add(acc + (s - sb) * dl, c, other.sums + o * D + d0, dl);
                    });
                if (!word_term_ && !region_term_) continue;
                // counting sort of the window's terms by own row, stable: count, offsets, fill
                terms.start.assign(static_cast<size_t>(n_own + 1), 0);
                window_terms(owns_text, s, e0, e1, d0, [&](int64_t row, Acc, const void*) { ++terms.start[row + 1]; });
                for (int64_t r = 0; r < n_own; ++r) terms.start[r + 1] += terms.start[r];
                const size_t count = static_cast<size_t>(terms.start[n_own]);
                if (count == 0) continue;
                if (terms.coefficient.size() < count) {
                    terms.coefficient.resize(count);
                    terms.source.resize(count);
                }
                std::vector<int64_t>& next = terms.start;  // fill cursor: start[r] advances to start[r + 1]
                window_terms(owns_text, s, e0, e1, d0, [&](int64_t row, Acc c, const void* source) {
                    const int64_t at = next[row]++;
                    terms.coefficient[at] = c;
                    terms.source[at] = source;
                });
                // after the fill start[r] holds row r's end: row r's terms are [start[r - 1], start[r])
                Acc* rows = own.grad + own.offsets[s] * D + d0;
                for (int64_t r = 0, begin = 0; r < n_own; ++r) {
                    const int64_t end = terms.start[r];
                    if (end > begin)
                        ops_.add_many(rows + r * D, terms.coefficient.data() + begin, terms.source.data() + begin,
                                      end - begin, dl);
                    begin = end;
                }
            }
        }
        if (sum_term_)
            for (int64_t s = sb; s < se; ++s)
                for (int64_t t = 0; t < own.lengths[s]; ++t)
                    ops_.add(own.grad + (own.offsets[s] + t) * D + d0, Acc(1), acc + (s - sb) * dl, dl);
    }
}

// Images owned by thread tid: an equal split in all-pairs mode, else contiguous ranges
// balanced by pair count (the candidates may concentrate on a few images).
template <class Ops>
Span Backward<Ops>::balanced_images(int64_t tid, int64_t nth) const {
    const int64_t ni = f_.ni;
    if (!f_.candidates) return static_part(ni, tid, nth);
    const int64_t pairs = f_.nt * f_.k;
    const auto bound = [&](int64_t t) {
        if (t >= nth) return ni;
        const int64_t target = static_part(pairs, t, nth).begin;
        return std::min(ni, static_cast<int64_t>(std::lower_bound(start_.begin(), start_.end(), target) -
                                                 start_.begin()));
    };
    return {bound(tid), bound(tid + 1)};
}

template <class Ops>
int Backward<Ops>::run(int num_threads, bool overlapping_rows) {
    const int64_t D = f_.dim, nt = f_.nt, ni = f_.ni;
    const int64_t pairs = nt * f_.k;
    if ((word_term_ && !job_.argmax) || (region_term_ && !job_.region_argmax)) return -3;
    // Shared rows: a single owner keeps it race-free.  Small jobs (gradcheck's) use fewer threads:
    // waking a team costs more than the work, far more on a loaded machine.  Any thread count
    // gives the same bits.
    constexpr int64_t kWorkPerThread = int64_t(1) << 16;  // multiply-adds
    const int64_t work = pairs * (f_.max_text_len + f_.max_image_len + 1) * std::max<int64_t>(D, 1);
    const int threads = overlapping_rows ? 1 : static_cast<int>(std::min<int64_t>(resolve_threads(num_threads),
                                                                                   1 + work / kWorkPerThread));

    if (f_.candidates) {  // inverse index by a counting sort: the pairs of each image, increasing
        start_.assign(static_cast<size_t>(ni + 1), 0);
        for (int64_t p = 0; p < pairs; ++p) {
            const int64_t j = f_.candidates[p];
            if (j < 0 || j >= ni) return -1;
            ++start_[static_cast<size_t>(j + 1)];
        }
        for (int64_t j = 0; j < ni; ++j) start_[j + 1] += start_[j];
        order_.resize(static_cast<size_t>(pairs));
        std::vector<int64_t> fill(start_.begin(), start_.end() - 1);
        for (int64_t p = 0; p < pairs; ++p) order_[static_cast<size_t>(fill[f_.candidates[p]]++)] = p;
    }
    // cache blocking (see owner_pass).  Measured on the 128 x 128, W 32, R 36, D 1024 fp32
    // training batch (2 threads, 8 MB L3): whole rows and blocks of ~2 MB of accumulated rows
    // (16 captions / 14 images) beat both no blocking (2x slower) and D chunks of 256-512.
    int64_t dc = job_.d_chunk > 0 ? job_.d_chunk : D;
    dc = std::max<int64_t>(1, std::min<int64_t>(dc, D));
    const int64_t longest = std::max<int64_t>(std::max(f_.max_text_len, f_.max_image_len), 1);
    int64_t block = job_.block > 0 ? job_.block : (int64_t(2) << 20) / (longest * dc * int64_t(sizeof(Acc)));
    block = std::max<int64_t>(1, std::min<int64_t>(block, 16));
    std::vector<Acc> text_sums, image_sums;
    if (sum_term_) {
        text_sums.resize(static_cast<size_t>(nt * D));
        image_sums.resize(static_cast<size_t>(ni * D));
        text_.sums = text_sums.data();
        images_.sums = image_sums.data();
    }

    int error = 0;
#pragma omp parallel num_threads(threads)
    {
        const SubnormalsHonoured subnormals;
#ifdef _OPENMP
        const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
        const int64_t tid = 0, nth = 1;
#endif
        // zero both outputs (rows that hold no valid token stay 0), and the per-sequence sums
        for (const Side<Acc>* side : {&text_, &images_}) {
            const Span rows = static_part(side->rows, tid, nth);
            std::memset(side->grad + rows.begin * D, 0, static_cast<size_t>((rows.end - rows.begin) * D) * sizeof(Acc));
            if (sum_term_) sequence_sums(*side, static_part(side->count, tid, nth));
        }
        Acc* acc = sum_term_ ? static_cast<Acc*>(std::malloc(static_cast<size_t>(block * dc) * sizeof(Acc))) : nullptr;
        if (sum_term_ && !acc) {
#pragma omp atomic write
            error = -2;
        }
#pragma omp barrier
        if (error == 0) {
            const Span captions = static_part(nt, tid, nth), images = balanced_images(tid, nth);
            try {  // (an exception must not leave the parallel region)
                Terms terms;
                for (int64_t d0 = 0; d0 < D; d0 += dc) {
                    const int64_t dl = std::min(dc, D - d0);
                    owner_pass(true, captions, d0, dl, block, acc, terms);
                    owner_pass(false, images, d0, dl, block, acc, terms);
                }
            } catch (const std::bad_alloc&) {
#pragma omp atomic write
                error = -2;
            }
        }
        std::free(acc);
    }
    return error;
}

template <class Acc>
Side<Acc> side_of(const void* tokens, const int64_t* offsets, const int32_t* lengths, int64_t count, int64_t rows,
                  Acc* grad) {
    return Side<Acc>{tokens, offsets, lengths, count, rows, grad, nullptr};
}

template <class Ops>
int run_with(const BackwardJob& job, const Ops& ops, const typename Ops::Acc* grad, typename Ops::Acc* grad_text,
        typename Ops::Acc* grad_images, int num_threads, bool overlapping_rows) {
    const Job& f = job.fwd;
    try {
        Backward<Ops> backward(job, ops, grad,
                               side_of(f.text, f.text_offsets, f.text_lengths, f.nt, job.text_rows, grad_text),
                               side_of(f.images, f.image_offsets, f.image_lengths, f.ni, job.image_rows, grad_images));
        return backward.run(num_threads, overlapping_rows);
    } catch (const std::bad_alloc&) {  // the inverse index or the sums
        return -2;
    }
}

}  // namespace

int run_backward(const BackwardJob& job, const IsaKernels* isa, int num_threads, bool overlapping_rows) {
    return run_with(job, Fp32Rows{isa, job.fwd.dtype}, job.grad, job.grad_text, job.grad_images, num_threads,
               overlapping_rows);
}

int run_backward_f64(const BackwardJob& job, const double* grad, double* grad_text, double* grad_images,
                     int num_threads, bool overlapping_rows) {
    return run_with(job, Fp64Rows{}, grad, grad_text, grad_images, num_threads, overlapping_rows);
}

}  // namespace aladin_fast

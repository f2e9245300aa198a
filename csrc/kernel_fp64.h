// aladin-fast CPU kernel: the float64 path (forward in kernel_fp64.cpp, backward in
// kernel_backward.cpp).  Scalar code that accumulates in double: the path that
// torch.autograd.gradcheck runs on, not a speed path.
//
// It takes the same Job / BackwardJob as the fp32 path, with these differences:
//   * job.text and job.images point to double [rows, D] matrices; job.dtype is ignored;
//   * scores are written to `out` (double [nt, k]); job.out is unused;
//   * the upstream gradient and both gradients are double; BackwardJob::grad,
//     grad_text and grad_images (float) are unused.
// Semantics (max rules, zero padding, argmax, NaN) are those of docs/kernel_contract.md
// with every s_wr, max and sum computed in double.
#pragma once

#include <cstdint>

#include "aladin_kernel.h"

namespace aladin_fast {

// Scores (and job.argmax / job.region_argmax when set).  0 on success, -1 candidate id out of
// range, -2 allocation failure.
int run_job_f64(const Job& job, double* out, int num_threads);

// Gradients, same ownership and accumulation order as run_backward (deterministic for any
// thread count).  0 on success, -1 candidate id out of range, -2 allocation failure.
int run_backward_f64(const BackwardJob& job, const double* grad, double* grad_text, double* grad_images,
                     int num_threads, bool overlapping_rows);

}  // namespace aladin_fast

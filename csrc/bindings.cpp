// pybind11 bindings of the aladin-fast CPU kernel: module `aladin_fast._C`.
//
//   score(text, text_offsets, text_lengths, images, image_offsets, image_lengths,
//         candidates, dtype, aggregation, zero_padding, text_pad, image_pad,
//         out, argmax, isa="auto", num_threads=0, region_argmax=None) -> None
//   (dtype "float32" / "float16" / "bfloat16": float32 scores; "float64": the scalar float64
//   path of kernel_fp64.h, float64 scores and gradients, `isa` ignored)
//   score_backward(grad, text, text_offsets, text_lengths, images, image_offsets, image_lengths,
//                  candidates, dtype, aggregation, zero_padding, text_pad, image_pad,
//                  argmax, region_argmax, grad_text, grad_images, isa="auto", num_threads=0) -> None
//   available_isas() -> list[str]   (best first)
//   best_isa() -> str
//   build_info() -> dict
//
// Arrays are used in place (no copies); see docs/kernel_contract.md.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define ALADIN_X86 1
#else
#define ALADIN_X86 0
#endif

#include "aladin_kernel.h"
#include "kernel_fp64.h"

namespace py = pybind11;
using namespace aladin_fast;

namespace {

// ------------------------------------------------------------------ CPU features
struct CpuFeatures {
    bool avx = false, avx2 = false, fma = false, f16c = false;
    bool avx512f = false, avx512bf16 = false;
    bool os_avx = false, os_avx512 = false;
};

#if ALADIN_X86
uint64_t read_xcr0() {
    uint32_t eax = 0, edx = 0;
    __asm__ volatile(".byte 0x0f, 0x01, 0xd0" : "=a"(eax), "=d"(edx) : "c"(0));  // xgetbv
    return (static_cast<uint64_t>(edx) << 32) | eax;
}
#endif

CpuFeatures detect_cpu() {
    CpuFeatures f;
#if ALADIN_X86
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
    const bool osxsave = (c >> 27) & 1u;
    f.avx = (c >> 28) & 1u;
    f.fma = (c >> 12) & 1u;
    f.f16c = (c >> 29) & 1u;
    if (osxsave) {
        const uint64_t xcr0 = read_xcr0();
        f.os_avx = (xcr0 & 0x6u) == 0x6u;               // XMM | YMM state
        f.os_avx512 = (xcr0 & 0xe6u) == 0xe6u;          // + opmask | ZMM_Hi256 | Hi16_ZMM
    }
    unsigned max_leaf = __get_cpuid_max(0, nullptr);
    if (max_leaf >= 7) {
        __cpuid_count(7, 0, a, b, c, d);
        f.avx2 = (b >> 5) & 1u;
        f.avx512f = (b >> 16) & 1u;
        const unsigned sub_max = a;
        if (sub_max >= 1) {
            __cpuid_count(7, 1, a, b, c, d);
            f.avx512bf16 = (a >> 5) & 1u;
        }
    }
    __builtin_cpu_init();
    f.avx2 = f.avx2 && __builtin_cpu_supports("avx2");
    f.fma = f.fma && __builtin_cpu_supports("fma");
    f.avx512f = f.avx512f && __builtin_cpu_supports("avx512f");
#endif
    return f;
}

const CpuFeatures& cpu() {
    static const CpuFeatures f = detect_cpu();
    return f;
}

bool isa_supported(const std::string& isa) {
    if (isa == "scalar") return true;
#if ALADIN_X86
    const CpuFeatures& f = cpu();
    const bool avx2_ok = f.avx && f.avx2 && f.fma && f.f16c && f.os_avx;
    if (isa == "avx2") return avx2_ok;
    if (isa == "avx512") return avx2_ok && f.avx512f && f.os_avx512;
#endif
    return false;
}

std::vector<std::string> available_isas() {
    std::vector<std::string> out;
    for (const char* name : {"avx512", "avx2", "scalar"})
        if (isa_supported(name)) out.emplace_back(name);
    return out;
}

std::string best_isa() { return available_isas().front(); }

const IsaKernels* kernels_for(const std::string& isa) {
#if ALADIN_X86
    if (isa == "avx512") return avx512_kernels();
    if (isa == "avx2") return avx2_kernels();
#endif
    return scalar_kernels();
}

std::string lower(std::string s) {
    for (char& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    return s;
}

std::string resolve_isa(const std::string& requested) {
    std::string isa = lower(requested);
    if (isa.empty()) isa = "auto";
    std::string source = "isa";  // named in the errors: the argument or the environment variable
    if (isa == "auto") {
        const char* env = std::getenv("ALADIN_FAST_ISA");
        if (env && *env) isa = lower(env), source = "ALADIN_FAST_ISA";
    }
    if (isa == "auto") return best_isa();
    if (isa != "avx512" && isa != "avx2" && isa != "scalar")
        throw py::value_error(source + " must be 'auto', 'avx512', 'avx2' or 'scalar', got '" + isa + "'" +
                              (source == "isa" ? "" : " (unset it to use the best ISA of this CPU)"));
    if (!isa_supported(isa))
        throw std::runtime_error(source + " = '" + isa + "' is not supported by this CPU (best: " + best_isa() + ")");
    return isa;
}

// Forward layout: `requested` ('auto', 'words', 'dot'); 'auto' defers to ALADIN_FAST_CPU_LAYOUT,
// then to choose_layout() (kernel_driver.cpp) at run time.
int resolve_layout(const std::string& requested) {
    std::string layout = lower(requested);
    if (layout.empty()) layout = "auto";
    if (layout == "auto") {
        const char* env = std::getenv("ALADIN_FAST_CPU_LAYOUT");
        if (env && *env) {
            layout = lower(env);
            if (layout != "auto" && layout != "words" && layout != "dot")
                throw py::value_error("ALADIN_FAST_CPU_LAYOUT must be 'auto', 'words' or 'dot', got '" + layout + "'");
        }
    }
    if (layout == "auto") return LAYOUT_AUTO;
    if (layout == "words") return LAYOUT_WORDS;
    if (layout == "dot") return LAYOUT_DOT;
    throw py::value_error("layout must be 'auto', 'words' or 'dot', got '" + layout + "'");
}

int64_t env_int(const char* name, int64_t dflt) {
    const char* v = std::getenv(name);
    if (!v || !*v) return dflt;
    char* end = nullptr;
    long long x = std::strtoll(v, &end, 10);
    return (end && *end == '\0') ? static_cast<int64_t>(x) : dflt;
}

// ------------------------------------------------------------------ array checks
py::array as_array(const py::object& obj, const char* name) {
    if (!py::isinstance<py::array>(obj))
        throw py::value_error(std::string(name) + " must be a numpy array, got " +
                              std::string(py::str(py::type::of(obj))));
    return py::reinterpret_borrow<py::array>(obj);
}

// numpy byte order: '=' native, '|' not applicable (1-byte / void), '<' little, '>' big endian
bool native_byte_order(const py::array& a) {
    const char order = a.dtype().byteorder();
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return order == '=' || order == '|' || order == '>';
#else
    return order == '=' || order == '|' || order == '<';
#endif
}

void check_array(const py::array& a, const char* name, py::ssize_t ndim, bool writable) {
    // a byte-swapped array would be read (or written) as native values: garbage, and offsets past the check
    if (!native_byte_order(a))
        throw py::value_error(std::string(name) + " must be in native byte order, got dtype " +
                              std::string(py::str(a.dtype())) + " (use a.astype(a.dtype.newbyteorder('=')))");
    if (a.ndim() != ndim)
        throw py::value_error(std::string(name) + " must be " + std::to_string(ndim) + "-D, got " +
                              std::to_string(a.ndim()) + "-D");
    if (!(a.flags() & py::array::c_style))
        throw py::value_error(std::string(name) + " must be C-contiguous");
    if (writable && !a.writeable()) throw py::value_error(std::string(name) + " must be writable");
}

void check_dtype(const py::array& a, const char* name, char kind, py::ssize_t itemsize, const char* expect) {
    const py::dtype dt = a.dtype();
    if (dt.kind() != kind || dt.itemsize() != itemsize)
        throw py::value_error(std::string(name) + " must have dtype " + expect + ", got " +
                              std::string(py::str(dt)));
}

void check_feature_dtype(const py::array& a, const char* name, DType dtype, bool float64) {
    const py::dtype dt = a.dtype();
    const char k = dt.kind();
    const py::ssize_t s = dt.itemsize();
    if (float64) {
        if (k != 'f' || s != 8)
            throw py::value_error(std::string(name) + " must have dtype float64 for dtype='float64', got " +
                                  std::string(py::str(dt)));
        return;
    }
    bool ok = false;
    switch (dtype) {
        case DType::F32: ok = (k == 'f' && s == 4); break;
        case DType::F16: ok = (s == 2 && (k == 'f' || k == 'u' || k == 'i')); break;
        case DType::BF16: ok = (s == 2 && (k == 'u' || k == 'i' || k == 'V')); break;
    }
    if (!ok) {
        const char* expect = dtype == DType::F32   ? "float32"
                             : dtype == DType::F16 ? "float16 (or uint16 holding fp16 bits)"
                                                   : "uint16 holding bfloat16 bits";
        throw py::value_error(std::string(name) + " must have dtype " + expect + " for dtype='" +
                              (dtype == DType::F32 ? "float32" : dtype == DType::F16 ? "float16" : "bfloat16") +
                              "', got " + std::string(py::str(dt)));
    }
}

// scores and gradients: float32, or float64 for the float64 path
void check_score_dtype(const py::array& a, const char* name, bool float64) {
    if (float64)
        check_dtype(a, name, 'f', 8, "float64 (dtype='float64')");
    else
        check_dtype(a, name, 'f', 4, "float32");
}

// ------------------------------------------------------------------ shared inputs
// Validates the inputs common to `score` and `score_backward` and fills a Job (without
// outputs).  Also returns the row counts of both token matrices.
struct ParsedInputs {
    Job job;
    bool float64 = false;  // dtype "float64": job.text / job.images hold doubles (kernel_fp64.h)
    int64_t text_rows = 0, image_rows = 0;
};

// The kernel's dtype names: returns true for "float64" (the scalar float64 kernel, kernel_fp64.h), else sets
// *out; anything else is refused with the list of names.
bool parse_dtype(const std::string& dtype, DType* out) {
    if (dtype == "float32")
        *out = DType::F32;
    else if (dtype == "float16")
        *out = DType::F16;
    else if (dtype == "bfloat16")
        *out = DType::BF16;
    else if (dtype == "float64")
        return true;
    else
        throw py::value_error("dtype must be 'float32', 'float16', 'bfloat16' or 'float64', got '" + dtype + "'");
    return false;
}

ParsedInputs parse_inputs(const py::object& text_o, const py::object& text_offsets_o,
                          const py::object& text_lengths_o, const py::object& images_o,
                          const py::object& image_offsets_o, const py::object& image_lengths_o,
                          const py::object& candidates_o, const std::string& dtype, int aggregation,
                          bool zero_padding, int64_t text_pad, int64_t image_pad, int num_threads) {
    ParsedInputs parsed;
    Job& job = parsed.job;
    parsed.float64 = parse_dtype(dtype, &job.dtype);
    if (aggregation < 0 || aggregation > 5)
        throw py::value_error("aggregation must be in [0, 5], got " + std::to_string(aggregation));
    if (text_pad < 0 || image_pad < 0) throw py::value_error("text_pad and image_pad must be >= 0");
    if (num_threads < 0) throw py::value_error("num_threads must be >= 0");

    py::array text = as_array(text_o, "text");
    py::array images = as_array(images_o, "images");
    py::array toff = as_array(text_offsets_o, "text_offsets");
    py::array tlen = as_array(text_lengths_o, "text_lengths");
    py::array ioff = as_array(image_offsets_o, "image_offsets");
    py::array ilen = as_array(image_lengths_o, "image_lengths");

    check_array(text, "text", 2, false);
    check_array(images, "images", 2, false);
    check_feature_dtype(text, "text", job.dtype, parsed.float64);
    check_feature_dtype(images, "images", job.dtype, parsed.float64);
    if (text.shape(1) != images.shape(1))
        throw py::value_error("text and images must have the same feature dimension D, got " +
                              std::to_string(text.shape(1)) + " and " + std::to_string(images.shape(1)));
    check_array(toff, "text_offsets", 1, false);
    check_array(tlen, "text_lengths", 1, false);
    check_array(ioff, "image_offsets", 1, false);
    check_array(ilen, "image_lengths", 1, false);
    check_dtype(toff, "text_offsets", 'i', 8, "int64");
    check_dtype(ioff, "image_offsets", 'i', 8, "int64");
    check_dtype(tlen, "text_lengths", 'i', 4, "int32");
    check_dtype(ilen, "image_lengths", 'i', 4, "int32");
    const int64_t nt = toff.shape(0), ni = ioff.shape(0);
    if (tlen.shape(0) != nt) throw py::value_error("text_lengths must have the same length as text_offsets");
    if (ilen.shape(0) != ni) throw py::value_error("image_lengths must have the same length as image_offsets");

    int64_t k = ni;
    const int64_t* cand = nullptr;
    if (!candidates_o.is_none()) {
        py::array candidates = as_array(candidates_o, "candidates");
        check_array(candidates, "candidates", 2, false);
        check_dtype(candidates, "candidates", 'i', 8, "int64");
        if (candidates.shape(0) != nt)
            throw py::value_error("candidates must have shape [Nt, K] with Nt = " + std::to_string(nt));
        k = candidates.shape(1);
        cand = static_cast<const int64_t*>(candidates.data());  // borrowed from the caller's array
    }

    // metadata sanity (O(Nt + Ni), never the feature data)
    const int64_t* to = static_cast<const int64_t*>(toff.data());
    const int32_t* tl = static_cast<const int32_t*>(tlen.data());
    const int64_t* io = static_cast<const int64_t*>(ioff.data());
    const int32_t* il = static_cast<const int32_t*>(ilen.data());
    const int64_t t_rows = text.shape(0), i_rows = images.shape(0);
    int64_t max_tl = 0, max_il = 0;
    for (int64_t i = 0; i < nt; ++i) {
        if (tl[i] < 0 || tl[i] > text_pad)
            throw py::value_error("text_lengths[" + std::to_string(i) + "] = " + std::to_string(tl[i]) +
                                  " out of range [0, text_pad=" + std::to_string(text_pad) + "]");
        // to[i] > rows - length, not to[i] + length > rows: the sum overflows for offsets near 2^63
        if (tl[i] > 0 && (to[i] < 0 || to[i] > t_rows - tl[i]))
            throw py::value_error("text_offsets[" + std::to_string(i) + "] + length exceeds the text rows");
        if (tl[i] > max_tl) max_tl = tl[i];
    }
    for (int64_t j = 0; j < ni; ++j) {
        if (il[j] < 0 || il[j] > image_pad)
            throw py::value_error("image_lengths[" + std::to_string(j) + "] = " + std::to_string(il[j]) +
                                  " out of range [0, image_pad=" + std::to_string(image_pad) + "]");
        if (il[j] > 0 && (io[j] < 0 || io[j] > i_rows - il[j]))
            throw py::value_error("image_offsets[" + std::to_string(j) + "] + length exceeds the image rows");
        if (il[j] > max_il) max_il = il[j];
    }

    job.text = text.data();
    job.text_offsets = to;
    job.text_lengths = tl;
    job.nt = nt;
    job.images = images.data();
    job.image_offsets = io;
    job.image_lengths = il;
    job.ni = ni;
    job.candidates = cand;
    job.k = k;
    job.dim = text.shape(1);
    job.aggregation = aggregation;
    job.zero_padding = zero_padding;
    job.text_pad = text_pad;
    job.image_pad = image_pad;
    job.max_text_len = max_tl;
    job.max_image_len = max_il;
    parsed.text_rows = t_rows;
    parsed.image_rows = i_rows;
    return parsed;
}

// int32 [nt, k, width] writable array (or None -> nullptr)
int32_t* optional_index_output(const py::object& obj, const char* name, int64_t nt, int64_t k, int64_t width) {
    if (obj.is_none()) return nullptr;
    py::array a = as_array(obj, name);
    check_array(a, name, 3, true);
    check_dtype(a, name, 'i', 4, "int32");
    if (a.shape(0) != nt || a.shape(1) != k || a.shape(2) != width)
        throw py::value_error(std::string(name) + " must have shape [" + std::to_string(nt) + ", " +
                              std::to_string(k) + ", " + std::to_string(width) + "]");
    return static_cast<int32_t*>(a.mutable_data());
}

// ------------------------------------------------------------------ score
void score(const py::object& text_o, const py::object& text_offsets_o, const py::object& text_lengths_o,
           const py::object& images_o, const py::object& image_offsets_o, const py::object& image_lengths_o,
           const py::object& candidates_o, const std::string& dtype, int aggregation, bool zero_padding,
           int64_t text_pad, int64_t image_pad, const py::object& out_o, const py::object& argmax_o,
           const std::string& isa, int num_threads, const py::object& region_argmax_o, const std::string& layout) {
    ParsedInputs parsed = parse_inputs(text_o, text_offsets_o, text_lengths_o, images_o, image_offsets_o,
                                       image_lengths_o, candidates_o, dtype, aggregation, zero_padding, text_pad,
                                       image_pad, num_threads);
    Job& job = parsed.job;
    const int64_t nt = job.nt, k = job.k;
    py::array out = as_array(out_o, "out");
    check_array(out, "out", 2, true);
    check_score_dtype(out, "out", parsed.float64);
    if (out.shape(0) != nt || out.shape(1) != k)
        throw py::value_error("out must have shape [" + std::to_string(nt) + ", " + std::to_string(k) + "]");
    job.argmax = optional_index_output(argmax_o, "argmax", nt, k, text_pad);
    job.region_argmax = optional_index_output(region_argmax_o, "region_argmax", nt, k, image_pad);
    const IsaKernels* kern = kernels_for(resolve_isa(isa));
    job.layout = resolve_layout(layout);
    if (nt * k == 0) return;
    int err = 0;
    if (parsed.float64) {
        double* scores = static_cast<double*>(out.mutable_data());
        py::gil_scoped_release release;
        err = run_job_f64(job, scores, num_threads);
    } else {
        job.out = static_cast<float*>(out.mutable_data());
        // D chunking: measured best with whole rows (fp32 rows are streamed in place; fp16/bf16 rows are
        // converted once per pair into an fp32 scratch, chunked only when that scratch would outgrow ~256 KB)
        job.tuning.dc_f32 = env_int("ALADIN_FAST_DC_F32", 0);
        job.tuning.dc_lowp = env_int("ALADIN_FAST_DC_LOWP", 0);
        job.tuning.prefetch = env_int("ALADIN_FAST_PREFETCH", 64);
        job.tuning.word_chunk = static_cast<int>(env_int("ALADIN_FAST_WORD_CHUNK", 0));
        job.tuning.prefetch_next = env_int("ALADIN_FAST_PREFETCH_NEXT", 4);
        job.tuning.dot_prefetch_blocks = env_int("ALADIN_FAST_DOT_PREFETCH_BLOCKS", 1);
        job.tuning.preconvert = env_int("ALADIN_FAST_PRECONVERT", 1) != 0;
        job.tuning.bf16_direct_words = env_int("ALADIN_FAST_BF16_DIRECT_WORDS", -1);
        py::gil_scoped_release release;
        err = run_job(job, kern, num_threads);
    }
    if (err == -1) throw py::value_error("candidates contain an image id out of range [0, Ni)");
    if (err == -2) throw std::bad_alloc();
}

// ------------------------------------------------------------------ score_backward
// True when two sequences share a valid row (offsets may overlap in the kernel contract).
bool rows_overlap(const int64_t* offsets, const int32_t* lengths, int64_t n) {
    std::vector<std::pair<int64_t, int64_t>> spans;
    spans.reserve(static_cast<size_t>(n));
    for (int64_t s = 0; s < n; ++s)
        if (lengths[s] > 0) spans.emplace_back(offsets[s], offsets[s] + lengths[s]);
    std::sort(spans.begin(), spans.end());
    for (size_t s = 1; s < spans.size(); ++s)
        if (spans[s].first < spans[s - 1].second) return true;
    return false;
}

py::array checked_gradient(const py::object& obj, const char* name, int64_t rows, int64_t dim, bool float64) {
    py::array a = as_array(obj, name);
    check_array(a, name, 2, true);
    check_score_dtype(a, name, float64);
    if (a.shape(0) != rows || a.shape(1) != dim)
        throw py::value_error(std::string(name) + " must have shape [" + std::to_string(rows) + ", " +
                              std::to_string(dim) + "]");
    return a;
}

void score_backward(const py::object& grad_o, const py::object& text_o, const py::object& text_offsets_o,
                    const py::object& text_lengths_o, const py::object& images_o,
                    const py::object& image_offsets_o, const py::object& image_lengths_o,
                    const py::object& candidates_o, const std::string& dtype, int aggregation, bool zero_padding,
                    int64_t text_pad, int64_t image_pad, const py::object& argmax_o,
                    const py::object& region_argmax_o, const py::object& grad_text_o,
                    const py::object& grad_images_o, const std::string& isa, int num_threads) {
    ParsedInputs parsed = parse_inputs(text_o, text_offsets_o, text_lengths_o, images_o, image_offsets_o,
                                       image_lengths_o, candidates_o, dtype, aggregation, zero_padding, text_pad,
                                       image_pad, num_threads);
    BackwardJob job;
    job.fwd = parsed.job;
    const Job& f = job.fwd;
    py::array grad = as_array(grad_o, "grad");
    check_array(grad, "grad", 2, false);
    check_score_dtype(grad, "grad", parsed.float64);
    if (grad.shape(0) != f.nt || grad.shape(1) != f.k)
        throw py::value_error("grad must have shape [" + std::to_string(f.nt) + ", " + std::to_string(f.k) + "]");
    job.argmax = optional_index_output(argmax_o, "argmax", f.nt, f.k, text_pad);
    job.region_argmax = optional_index_output(region_argmax_o, "region_argmax", f.nt, f.k, image_pad);
    if ((aggregation == MRSW || aggregation == MRAVGW || aggregation == SYMM) && !job.argmax)
        throw py::value_error("argmax [Nt, K, text_pad] is required for aggregation " + std::to_string(aggregation));
    if ((aggregation == MWSR || aggregation == SYMM) && !job.region_argmax)
        throw py::value_error("region_argmax [Nt, K, image_pad] is required for aggregation " +
                              std::to_string(aggregation));
    py::array grad_text = checked_gradient(grad_text_o, "grad_text", parsed.text_rows, f.dim, parsed.float64);
    py::array grad_images = checked_gradient(grad_images_o, "grad_images", parsed.image_rows, f.dim, parsed.float64);
    const IsaKernels* kern = kernels_for(resolve_isa(isa));
    job.text_rows = parsed.text_rows;
    job.image_rows = parsed.image_rows;
    job.block = env_int("ALADIN_FAST_BWD_BLOCK", 0);
    job.d_chunk = env_int("ALADIN_FAST_BWD_DC", 0);
    job.window = env_int("ALADIN_FAST_BWD_WINDOW", 0);
    const bool overlap = rows_overlap(f.text_offsets, f.text_lengths, f.nt) ||
                         rows_overlap(f.image_offsets, f.image_lengths, f.ni);
    int err = 0;
    if (parsed.float64) {
        const double* g = static_cast<const double*>(grad.data());
        double* gt = static_cast<double*>(grad_text.mutable_data());
        double* gi = static_cast<double*>(grad_images.mutable_data());
        py::gil_scoped_release release;
        err = run_backward_f64(job, g, gt, gi, num_threads, overlap);
    } else {
        job.grad = static_cast<const float*>(grad.data());
        job.grad_text = static_cast<float*>(grad_text.mutable_data());
        job.grad_images = static_cast<float*>(grad_images.mutable_data());
        py::gil_scoped_release release;
        err = run_backward(job, kern, num_threads, overlap);
    }
    if (err == -1) throw py::value_error("candidates contain an image id out of range [0, Ni)");
    if (err == -2) throw std::bad_alloc();
    if (err != 0) throw std::runtime_error("score_backward failed with code " + std::to_string(err));
}

py::dict build_info() {
    py::dict d;
#ifdef __VERSION__
    d["compiler"] = std::string("GCC-compatible ") + __VERSION__;
#else
    d["compiler"] = "unknown";
#endif
#ifdef _OPENMP
    d["openmp"] = true;
    d["openmp_version"] = static_cast<int>(_OPENMP);
    d["omp_max_threads"] = omp_get_max_threads();
#else
    d["openmp"] = false;
    d["openmp_version"] = 0;
    d["omp_max_threads"] = 1;
#endif
    std::vector<std::string> compiled = {"scalar"};
#if ALADIN_X86
    compiled.insert(compiled.begin(), {"avx512", "avx2"});
#endif
    d["compiled_isas"] = compiled;
    d["avx512_compiled"] = static_cast<bool>(ALADIN_X86);
    d["avx512bf16_compiled"] = false;  // bf16 is widened exactly to fp32 (vdpbf16ps flushes denormals)
    const CpuFeatures& f = cpu();
    py::dict c;
    c["avx"] = f.avx;
    c["avx2"] = f.avx2;
    c["fma"] = f.fma;
    c["f16c"] = f.f16c;
    c["avx512f"] = f.avx512f;
    c["avx512bf16"] = f.avx512bf16;
    c["os_avx"] = f.os_avx;
    c["os_avx512"] = f.os_avx512;
    d["cpu_features"] = c;
    d["available_isas"] = available_isas();
    d["best_isa"] = best_isa();
    return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "aladin-fast CPU kernels (fused word-region alignment scores)";
    m.def("score", &score, py::arg("text"), py::arg("text_offsets"), py::arg("text_lengths"), py::arg("images"),
          py::arg("image_offsets"), py::arg("image_lengths"), py::arg("candidates"), py::arg("dtype"),
          py::arg("aggregation"), py::arg("zero_padding"), py::arg("text_pad"), py::arg("image_pad"),
          py::arg("out"), py::arg("argmax"), py::arg("isa") = "auto", py::arg("num_threads") = 0,
          py::arg("region_argmax") = py::none(), py::arg("layout") = "auto",
          "Fused alignment scores (see docs/kernel_contract.md); writes `out` (and `argmax`, "
          "`region_argmax` [Nt, K, image_pad]: region -> winning word) in place. `layout`: 'words' "
          "(words in SIMD lanes), 'dot' (D in lanes) or 'auto' (ALADIN_FAST_CPU_LAYOUT, else the "
          "shape-aware choice of layout_for).");
    m.def("score_backward", &score_backward, py::arg("grad"), py::arg("text"), py::arg("text_offsets"),
          py::arg("text_lengths"), py::arg("images"), py::arg("image_offsets"), py::arg("image_lengths"),
          py::arg("candidates"), py::arg("dtype"), py::arg("aggregation"), py::arg("zero_padding"),
          py::arg("text_pad"), py::arg("image_pad"), py::arg("argmax"), py::arg("region_argmax"),
          py::arg("grad_text"), py::arg("grad_images"), py::arg("isa") = "auto", py::arg("num_threads") = 0,
          "Gradients of the fused scores w.r.t. text [T_text, D] and images [T_img, D] (float32, float64 for "
          "dtype='float64'; written in place) from grad [Nt, K] (same dtype) and the forward's argmax (MrSw / MrAVGw / symm) and region_argmax "
          "(MwSr / symm).");
    m.def(
        "fma_peak",
        [](const std::string& isa, int num_threads, double seconds) {
            const IsaKernels* k = kernels_for(resolve_isa(isa));
            py::gil_scoped_release release;
            return measure_fma_peak(k, num_threads, seconds);
        },
        py::arg("isa") = "auto", py::arg("num_threads") = 0, py::arg("seconds") = 0.2,
        "Measured raw fp32 FMA throughput (GFLOP/s) of a code path: the roofline for benchmarks.");
    m.def(
        "read_bandwidth",
        [](int64_t bytes, int num_threads, double seconds) {
            if (bytes < 4096) throw py::value_error("bytes must be >= 4096, got " + std::to_string(bytes));
            if (num_threads < 0) throw py::value_error("num_threads must be >= 0");
            double gbps = 0.0;
            {
                py::gil_scoped_release release;
                gbps = measure_read_bandwidth(bytes, num_threads, seconds);
            }
            if (gbps < 0) throw std::bad_alloc();
            return gbps;
        },
        py::arg("bytes") = int64_t(256) << 20, py::arg("num_threads") = 0, py::arg("seconds") = 0.2,
        "Measured streaming-read memory bandwidth (GB/s, best pass) of `num_threads` threads over a "
        "`bytes` buffer: the bandwidth roof for benchmarks (use a buffer far larger than the LLC).");
    m.def(
        "layout_for",
        [](int64_t words, int64_t regions, int64_t dim, const std::string& dtype, const std::string& isa,
           const std::string& layout) {
            if (words < 0 || regions < 0 || dim < 0)
                throw py::value_error("words, regions and dim must be >= 0, got " + std::to_string(words) + ", " +
                                      std::to_string(regions) + ", " + std::to_string(dim));
            Job job;
            job.max_text_len = words;
            job.max_image_len = regions;
            job.dim = dim;
            if (parse_dtype(dtype, &job.dtype))
                throw py::value_error("dtype 'float64' runs the scalar float64 kernel (kernel_fp64.cpp), which has one "
                                      "layout: there is no layout choice to report; ask for float32, float16 or bfloat16");
            job.layout = resolve_layout(layout);
            return std::string(choose_layout(job, kernels_for(resolve_isa(isa)), words) == LAYOUT_DOT ? "dot" : "words");
        },
        py::arg("words"), py::arg("regions"), py::arg("dim"), py::arg("dtype") = "float32", py::arg("isa") = "auto",
        py::arg("layout") = "auto",
        "The forward layout ('words' or 'dot') that score() uses for a caption of `words` valid tokens "
        "against images of `regions` tokens of `dim` features (it depends on the caption only, never on "
        "the rest of the batch): `layout` or ALADIN_FAST_CPU_LAYOUT when set, else "
        "the shape-aware choice (choose_layout in kernel_driver.cpp).");
    m.def("available_isas", &available_isas, "Code paths usable on this CPU, best first.");
    m.def("best_isa", &best_isa, "The code path isa='auto' picks (ignoring ALADIN_FAST_ISA).");
    m.def("build_info", &build_info, "Compiler, OpenMP and ISA information of this build.");
}

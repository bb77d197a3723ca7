// Fused CPU k-means: every fit of a batch runs whole in C++, one instance per thread.
//
// Why: on the CPU the torch path is a chain of thin matmuls ([k, D] x [D, n] with k = 4), which
// BLAS runs at a small fraction of the machine's peak, plus dozens of small ops per iteration.
// Here one thread takes one instance and does seeding, every Lloyd iteration and the final
// assignment while the instance's features stay in its cache: memory is read about once, and each
// pass computes distances, labels and the new center sums together.
//
// The algorithm is the one of part_distill/mining/kmeans.py step for step (greedy k-means++ with
// the caller's uniforms, scikit-learn's tolerance rule, strict convergence, empty-cluster repair at
// the farthest points, a final E-step); only float rounding differs (sums here are accumulated in
// float64 per block of points). Results do not depend on the number of threads: the point blocks
// an instance is split into depend on its size only, and their partial sums are reduced in order.
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <limits>
#include <mutex>
#include <thread>
#include <vector>

namespace part_distill_kmeans {

struct Batch {
  const float* x;  // [B, N, D], rows of D contiguous floats
  int64_t stride_b, stride_n, N, D;
  const bool* valid;  // [B, N]
  const float* w;     // [B, N]
  const float* init;  // [B, k, D] or nullptr
  const double* u_first;   // [B]
  const double* u_trials;  // [B, k - 1, t]
  int64_t k, t, max_iter;
  bool cosine;
  double tol;
  int64_t* labels;  // [B, N], pre-filled with -1
  float* centers;   // [B, k, D]
  float* inertia;   // [B]
  int64_t* n_iter;  // [B]
  bool* finite;     // [B]
};

// Runs f(0..n-1) on up to `threads` threads (dynamic: each thread takes the next index). An
// exception on any thread (std::bad_alloc for a huge instance) stops the others and is rethrown
// here, after every thread has joined, so it reaches Python instead of terminating the process.
struct Runner {
  int threads;
  template <class F>
  void run(int64_t n, F&& f) const {
    if (threads <= 1 || n <= 1) {
      for (int64_t i = 0; i < n; ++i) f(i);
      return;
    }
    std::atomic<int64_t> next{0};
    std::exception_ptr error;
    std::mutex mu;
    auto work = [&]() {
      try {
        for (int64_t i; (i = next.fetch_add(1)) < n;) f(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        if (!error) error = std::current_exception();
        next = n;
      }
    };
    std::vector<std::thread> pool;
    int64_t extra = std::min<int64_t>(threads, n) - 1;
    pool.reserve(extra);
    for (int64_t i = 0; i < extra; ++i) pool.emplace_back(work);
    work();
    for (auto& th : pool) th.join();
    if (error) std::rethrow_exception(error);
  }
};

}  // namespace part_distill_kmeans

// The kernels are compiled twice: for AVX2 + FMA and for the baseline ISA; the caller picks at run time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PD_KMEANS_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace part_distill_kmeans { namespace avx2 {
#include "kmeans_cpu_impl.h"
}}  // namespace part_distill_kmeans::avx2
#pragma GCC pop_options
#endif
namespace part_distill_kmeans { namespace generic {
#include "kmeans_cpu_impl.h"
}}  // namespace part_distill_kmeans::generic

namespace {

using part_distill_kmeans::Batch;
using part_distill_kmeans::Runner;

// PART_DISTILL_KMEANS_ISA=baseline forces the portable build (read once; the tests compare both).
bool use_avx2() {
#ifdef PD_KMEANS_HAVE_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         std::string(std::getenv("PART_DISTILL_KMEANS_ISA") ? std::getenv("PART_DISTILL_KMEANS_ISA") : "") != "baseline";
  return ok;
#else
  return false;
#endif
}

void check(bool ok, const char* what) { TORCH_CHECK(ok, "part_distill._C.kmeans_fit: ", what); }

// Fits instances `order` (int64 [m], heaviest first) of the batch; writes into the output tensors.
void kmeans_fit(const at::Tensor& x, const at::Tensor& valid, const at::Tensor& w, const at::Tensor& init,
                const at::Tensor& u_first, const at::Tensor& u_trials, const at::Tensor& order, int64_t k, int64_t t,
                bool cosine, int64_t max_iter, double tol, int64_t threads, at::Tensor labels,
                at::Tensor centers, at::Tensor inertia, at::Tensor n_iter, at::Tensor finite) {
  check(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3, "x must be a CPU float32 [B, N, D] tensor");
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  check(D == 0 || x.stride(2) == 1, "x rows must be contiguous");
  check(valid.scalar_type() == at::kBool && valid.is_contiguous() && valid.numel() == B * N, "valid must be bool [B, N]");
  check(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == B * N, "w must be float32 [B, N]");
  check(k >= 1 && t >= 1, "k and t must be >= 1");
  check(u_first.scalar_type() == at::kDouble && u_first.is_contiguous() && u_first.numel() == B, "u_first must be float64 [B]");
  check(u_trials.scalar_type() == at::kDouble && u_trials.is_contiguous() && u_trials.numel() == B * (k - 1) * t, "u_trials must be float64 [B, k-1, t]");
  check(!init.defined() || init.numel() == 0 ||
            (init.scalar_type() == at::kFloat && init.is_contiguous() && init.numel() == B * k * D),
        "init must be empty or float32 [B, k, D]");
  check(order.scalar_type() == at::kLong && order.is_contiguous(), "order must be int64");
  check(labels.scalar_type() == at::kLong && labels.is_contiguous() && labels.numel() == B * N, "labels must be int64 [B, N]");
  check(centers.scalar_type() == at::kFloat && centers.is_contiguous() && centers.numel() == B * k * D, "centers must be float32 [B, k, D]");
  check(inertia.scalar_type() == at::kFloat && inertia.is_contiguous() && inertia.numel() == B, "inertia must be float32 [B]");
  check(n_iter.scalar_type() == at::kLong && n_iter.is_contiguous() && n_iter.numel() == B, "n_iter must be int64 [B]");
  check(finite.scalar_type() == at::kBool && finite.is_contiguous() && finite.numel() == B, "finite must be bool [B]");
  const int64_t* ord = order.data_ptr<int64_t>();
  const int64_t m = order.numel();
  for (int64_t i = 0; i < m; ++i) check(ord[i] >= 0 && ord[i] < B, "order holds an index outside [0, B)");

  Batch bt{x.data_ptr<float>(), x.stride(0), x.stride(1), N, D, valid.data_ptr<bool>(), w.data_ptr<float>(),
           (init.defined() && init.numel() > 0) ? init.data_ptr<float>() : nullptr, u_first.data_ptr<double>(),
           u_trials.data_ptr<double>(), k, t, max_iter, cosine, tol, labels.data_ptr<int64_t>(),
           centers.data_ptr<float>(), inertia.data_ptr<float>(), n_iter.data_ptr<int64_t>(), finite.data_ptr<bool>()};
  const int nthreads = static_cast<int>(std::max<int64_t>(threads, 1));
  // Enough instances: one per thread, each fitted single-threaded (its blocks in sequence).
  // Fewer instances than threads: one at a time, its point blocks spread over the threads.
  const bool outer = m >= nthreads;
  const Runner inner{outer ? 1 : nthreads};
  const bool avx2 = use_avx2();
  auto fit_one = [&](int64_t i) {
#ifdef PD_KMEANS_HAVE_AVX2
    if (avx2) return part_distill_kmeans::avx2::fit_instance(bt, ord[i], inner);
#endif
    part_distill_kmeans::generic::fit_instance(bt, ord[i], inner);
  };
  pybind11::gil_scoped_release no_gil;
  Runner{outer ? nthreads : 1}.run(m, fit_one);
}

std::string kernel_isa() { return use_avx2() ? "avx2+fma" : "baseline"; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("kmeans_fit", &kmeans_fit, "Fused batched k-means on the CPU (see part_distill/mining/kmeans.py)");
  mod.def("kmeans_isa", &kernel_isa, "Instruction set the k-means kernel runs with on this CPU");
}

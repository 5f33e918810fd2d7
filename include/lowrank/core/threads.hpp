#pragma once
// One knob for every thread pool the library touches: OpenMP (our row-wise kernels)
// and Eigen's GEMM.

#include <lowrank/core/error.hpp>

#include <Eigen/Core>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lowrank {

/// Sets the number of threads used by OpenMP kernels and Eigen's GEMM.
inline void set_num_threads(int n) {
    check(n >= 1, "set_num_threads", "expected at least 1 thread, got ", n);
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
    Eigen::setNbThreads(n);
}

/// The number of threads that set_num_threads last chose (1 without OpenMP).
inline int num_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

}  // namespace lowrank

// The one translation unit that compiles lowrank's SVD kernels for the project's own
// tests, examples and benchmarks, which are built with LOWRANK_SEPARATE_LINALG (see
// include/lowrank/linalg/svd.hpp and the lowrank-linalg target in CMakeLists.txt).
#define LOWRANK_LINALG_IMPLEMENTATION
#include <lowrank/linalg/svd.hpp>

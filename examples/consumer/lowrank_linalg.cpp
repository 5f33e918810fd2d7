// The one file of this program that compiles lowrank's SVD kernels. The whole program is
// built with LOWRANK_SEPARATE_LINALG (CMakeLists.txt), so main.cpp only declares them and
// does not spend the compile time on Eigen's SVDs again (README.md, "Compile the SVD once").
#define LOWRANK_LINALG_IMPLEMENTATION
#include <lowrank/linalg/svd.hpp>

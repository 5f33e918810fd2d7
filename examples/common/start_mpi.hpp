#pragma once
// Starting MPI in an example program's main(), before its command line (MPI may take its
// own arguments out of argv).

#include <lowrank/dist/mpi.hpp>

#include <exception>
#include <iostream>
#include <optional>
#include <string_view>

namespace lowrank::examples {

/// Starts MPI into `mpi`. A failure (a build without MPI started by mpirun with several
/// processes, or MPI_Init failing) is printed as "<program>: error: ..." and returns false,
/// so that main returns 1 like on any other error instead of aborting.
inline bool start_mpi(std::optional<MpiEnvironment>& mpi, int* argc, char*** argv, std::string_view program) {
    try {
        mpi.emplace(argc, argv);
        return true;
    } catch (const std::exception& e) {
        std::cerr << program << ": error: " << e.what() << "\n";
        return false;
    }
}

}  // namespace lowrank::examples

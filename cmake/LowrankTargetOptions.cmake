# lowrank_target_options(<target>): the flags for lowrank's OWN targets (tests, benchmarks,
# examples) and never for lowrank::lowrank itself, whose users pick their own flags.
#
# Warnings cover our headers (included with -I) but not Eigen, CLI11, Catch2, ...: imported
# targets' include directories are SYSTEM (-isystem) unless NO_SYSTEM_FROM_IMPORTED is set.
set(LOWRANK_CMAKE_HELPERS_DIR "${CMAKE_CURRENT_LIST_DIR}")

#
# lowrank_target_options(<target> [INLINE_LINALG]) also links the target to lowrank-linalg,
# the one compiled copy of the SVD kernels (include/lowrank/linalg/svd.hpp), unless
# INLINE_LINALG is given: a target whose Eigen is configured differently (EIGEN_USE_BLAS)
# must compile them itself, or two versions of Eigen's internals would meet at link time.
function(lowrank_target_options target)
    cmake_parse_arguments(PARSE_ARGV 1 _arg "INLINE_LINALG" "" "")
    get_target_property(_type ${target} TYPE)
    if(_type STREQUAL "INTERFACE_LIBRARY")
        set(_scope INTERFACE)
    else()
        set(_scope PRIVATE)
    endif()

    if(TARGET lowrank-linalg AND NOT target STREQUAL "lowrank-linalg" AND NOT _arg_INLINE_LINALG
       AND NOT _scope STREQUAL "INTERFACE")
        target_link_libraries(${target} PRIVATE lowrank-linalg)
    endif()

    # -std=c++20, not gnu++20: the code must not lean on GNU extensions by accident.
    if(NOT _scope STREQUAL "INTERFACE")
        set_target_properties(${target} PROPERTIES CXX_EXTENSIONS OFF)
    endif()

    if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
        target_compile_options(${target} ${_scope} -Wall -Wextra -Wpedantic)
        if(LOWRANK_WERROR)
            target_compile_options(${target} ${_scope} -Werror)
        endif()
        if(LOWRANK_NATIVE AND LOWRANK_MARCH)
            target_compile_options(${target} ${_scope} -march=${LOWRANK_MARCH})
        endif()
        if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_GREATER_EQUAL 12
           AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
            # GCC 12 bug 105593: thousands of false -W(maybe-)uninitialized warnings from its
            # AVX-512 intrinsics (Eigen with -march=native). The forced include silences
            # only the intrinsics headers' own lines (see the header); a global
            # -Wno-maybe-uninitialized would also hide real ones in our code.
            target_compile_options(${target} ${_scope}
                "SHELL:-include ${LOWRANK_CMAKE_HELPERS_DIR}/gcc12_intrinsics_workaround.hpp")
        endif()
    elseif(MSVC)
        target_compile_options(${target} ${_scope} /W4 /permissive-)
        if(LOWRANK_WERROR)
            target_compile_options(${target} ${_scope} /WX)
        endif()
    endif()
endfunction()

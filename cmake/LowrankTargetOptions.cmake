# lowrank_target_options(<target>): the flags for lowrank's OWN targets (tests, benchmarks,
# examples) and never for lowrank::lowrank itself, whose users pick their own flags.
#
# Warnings cover our headers (included with -I) but not Eigen, CLI11, Catch2, ...: imported
# targets' include directories are SYSTEM (-isystem) unless NO_SYSTEM_FROM_IMPORTED is set.
function(lowrank_target_options target)
    get_target_property(_type ${target} TYPE)
    if(_type STREQUAL "INTERFACE_LIBRARY")
        set(_scope INTERFACE)
    else()
        set(_scope PRIVATE)
    endif()

    # -std=c++20, not gnu++20: the code must not lean on GNU extensions by accident.
    if(NOT _scope STREQUAL "INTERFACE")
        set_target_properties(${target} PROPERTIES CXX_EXTENSIONS OFF)
    endif()

    if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
        target_compile_options(${target} ${_scope} -Wall -Wextra -Wpedantic)
        # GCC 12 reports false "may be used uninitialized" warnings from inside its own
        # AVX-512 intrinsics when Eigen's products are inlined (GCC bug 105593).
        if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
            target_compile_options(${target} ${_scope} -Wno-maybe-uninitialized)
        endif()
        if(LOWRANK_WERROR)
            target_compile_options(${target} ${_scope} -Werror)
        endif()
        if(LOWRANK_NATIVE)
            target_compile_options(${target} ${_scope} -march=native)
        endif()
    elseif(MSVC)
        target_compile_options(${target} ${_scope} /W4 /permissive-)
        if(LOWRANK_WERROR)
            target_compile_options(${target} ${_scope} /WX)
        endif()
    endif()
endfunction()

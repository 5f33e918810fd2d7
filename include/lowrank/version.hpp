#pragma once
// The library's version. CMake reads it from here (project(VERSION ...)), so the package's
// version, lowrankConfigVersion.cmake, lowrank.pc and this header never disagree.

#define LOWRANK_VERSION_MAJOR 0
#define LOWRANK_VERSION_MINOR 1
#define LOWRANK_VERSION_PATCH 0
/// MAJOR * 10000 + MINOR * 100 + PATCH, for #if comparisons.
#define LOWRANK_VERSION (LOWRANK_VERSION_MAJOR * 10000 + LOWRANK_VERSION_MINOR * 100 + LOWRANK_VERSION_PATCH)
#define LOWRANK_DETAIL_STR2(x) #x
#define LOWRANK_DETAIL_STR(x) LOWRANK_DETAIL_STR2(x)
#define LOWRANK_VERSION_STRING                                                            \
    LOWRANK_DETAIL_STR(LOWRANK_VERSION_MAJOR)                                             \
    "." LOWRANK_DETAIL_STR(LOWRANK_VERSION_MINOR) "." LOWRANK_DETAIL_STR(LOWRANK_VERSION_PATCH)

namespace lowrank {

/// "MAJOR.MINOR.PATCH" of the headers in use.
inline constexpr const char* version_string() { return LOWRANK_VERSION_STRING; }

}  // namespace lowrank

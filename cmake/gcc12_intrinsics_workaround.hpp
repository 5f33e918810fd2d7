// Force-included (-include) into lowrank's own targets when built by GCC 12 with
// -march=native; never part of the installed library.
//
// GCC 12.1-12.2 reports '__Y' "is/may be used uninitialized" inside its own AVX-512
// intrinsics (GCC bug 105593: the `__m512 __Y = __Y;` idiom of _mm512_undefined_*), once
// for every Eigen kernel inlined into our code: thousands of false warnings per build,
// which would drown real ones and break -Werror. GCC decides such middle-end warnings by
// the pragma state at the warning's location, which is inside the intrinsics headers, so
// including them once here under `ignored` silences exactly those locations and leaves
// -W(maybe-)uninitialized on for every line of ours.
#pragma once
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12 && (defined(__x86_64__) || defined(__i386__))
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

// CPL_FAST_SIMD_CLONES: x86-64 builds carry AVX-512 and AVX2 versions of a CPU kernel's float32 loops (GCC and
// clang pick one when the library loads); elsewhere the loops are compiled for the build's own target. The
// helpers such a loop calls must be force-inlined: GCC does not inline ordinary functions into the
// target_clones versions.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CPL_FAST_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CPL_FAST_SIMD_CLONES
#endif

// Self-test: bf16 16x16x16 wmma into f32, fragments loaded from dynamic shared
// memory. Expect HMMA in the SASS (and, as in the project's diag_cmma, the bf16
// fragment loads from a generic pointer: LD + MOVM rather than LDSM).
#include <mma.h>
#include <cuda_bf16.h>
// Preamble as cubecl-cpp emits it (shared/kernel.rs type_definitions): these
// typedefs clash with glibc under nvcc, which is why the chain uses NVRTC.
typedef unsigned int uint32_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned long long int uint64_t;
typedef signed char int8_t;
typedef signed short int16_t;
typedef signed int int32_t;
typedef signed long long int int64_t;

// 256 threads = 8 warps; warp w computes C[16w..16w+16, 0..16] = A[16w.., :16] * B.
extern "C" __global__ void __launch_bounds__(256) wmma_bf16(const __nv_bfloat16* a, const __nv_bfloat16* b, float* c) {
    extern __shared__ __align__(128) char shared_memory_0[];
    __nv_bfloat16* sa = reinterpret_cast<__nv_bfloat16*>(shared_memory_0);          // 128x16
    __nv_bfloat16* sb = reinterpret_cast<__nv_bfloat16*>(shared_memory_0 + 4096);   // 16x16
    uint32_t t = threadIdx.x;
    for (uint32_t i = t; i < 128 * 16; i += 256) sa[i] = a[blockIdx.x * 2048 + i];
    if (t < 256) sb[t] = b[t];
    __syncthreads();
    uint32_t w = t / 32;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::row_major> fa;
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __nv_bfloat16, nvcuda::wmma::row_major> fb;
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> fc;
    nvcuda::wmma::fill_fragment(fc, 0.0f);
    nvcuda::wmma::load_matrix_sync(fa, sa + w * 256, 16);
    nvcuda::wmma::load_matrix_sync(fb, sb, 16);
    nvcuda::wmma::mma_sync(fc, fa, fb, fc);
    nvcuda::wmma::store_matrix_sync(c + (blockIdx.x * 128 + w * 16) * 16, fc, 16, nvcuda::wmma::mem_row_major);
}

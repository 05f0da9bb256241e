// Self-test: asynchronous global->shared copies two ways cubecl-cpp emits them:
// raw cp.async (cuda/ptx/copy_async.rs) and cuda::memcpy_async on a
// cuda::barrier (cuda/barrier.rs; needs the cccl include path). Expect LDGSTS,
// and SYNCS for the mbarrier; the static __shared__ barrier shows as static smem.
#include <cuda/barrier>
#include <cooperative_groups.h>
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

extern "C" __global__ void __launch_bounds__(256) cp_async(const float* input, float* output) {
    extern __shared__ __align__(16) char shared_memory_0[];
    float* s0 = reinterpret_cast<float*>(shared_memory_0);          // 256 x float4
    float* s1 = reinterpret_cast<float*>(shared_memory_0 + 4096);   // 256 x float4
    // cuda::barrier has a constructor: NVRTC warns (#20054) about a static __shared__
    // one unless told that init() below does the initialisation.
#pragma nv_diag_suppress static_var_with_dynamic_init
    __shared__ cuda::barrier<cuda::thread_scope_block> bar;
    uint32_t t = threadIdx.x;
    const float* src = input + (blockIdx.x * 256 + t) * 4;
    // 1) raw cp.async, 16 bytes per thread, then commit + wait.
    uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(s0 + t * 4));
    asm volatile("cp.async.ca.shared::cta.global [%0], [%1], 16, 16;" :: "r"(dst), "l"(src) : "memory");
    asm volatile("cp.async.commit_group;" ::: "memory");
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    // 2) cuda::memcpy_async through an mbarrier.
    if (t == 0) init(&bar, blockDim.x);
    __syncthreads();
    cuda::memcpy_async(s1 + t * 4, src + 1024, 16, bar);
    bar.arrive_and_wait();
    float acc = 0.0f;
    for (int k = 0; k < 4; ++k) acc += s0[((t + 1) % 256) * 4 + k] * s1[t * 4 + k];
    output[blockIdx.x * 256 + t] = acc;
}

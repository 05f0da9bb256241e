// Self-test: deliberate register spill. __launch_bounds__(1024) caps ptxas at
// 64 registers per thread (65536 / 1024); 96 accumulators stay live across the
// loop, so ptxas must spill (nonzero "spill stores/loads", STL/LDL in SASS).
// (A dynamically indexed local array would also give STL/LDL, but ptxas books
// that as stack frame, not as spill: it would not test the spill check.)
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

#define N 96
extern "C" __global__ void __launch_bounds__(1024) spill_regs(const float* input, float* output, uint32_t steps) {
    uint32_t t = blockIdx.x * 1024 + threadIdx.x;
    float acc[N];
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = input[t * N + i];
    for (uint32_t s = 0; s < steps; ++s) {
        float x = input[s];
#pragma unroll
        for (int i = 0; i < N; ++i) acc[i] = acc[i] * acc[(i + 7) % N] + x;
    }
#pragma unroll
    for (int i = 0; i < N; ++i) output[t * N + i] = acc[i];
}

// Per-page checksums for dmamig (verification of copies), bit-identical to the numpy reference
// dmamig/dma/checksum.py: page_checksums(). For the page's little-endian 32-bit words w[j]:
//
//     x_j = w[j] | (j << 32)
//     m_j = x_j * 0x9E3779B97F4A7C15          (mod 2^64)
//     m_j = m_j ^ (m_j >> 31)
//     m_j = m_j * 0xBF58476D1CE4E5B9          (mod 2^64)
//     checksum = sum_j m_j                    (mod 2^64)
//
// Every step is exact unsigned 64-bit arithmetic and the final sum is associative and commutative, so the
// block reduction below may add terms in any order and still equal the sequential reference exactly.
//
// One block per page (grid-stride over pages); each thread reads 16 bytes (four words) at a time, reduces
// its partial sums with warp shuffles, then across warps through shared memory. Addresses are page byte
// addresses (uint64): device memory or pinned host memory through unified virtual addressing.
// page_size must be a multiple of 16; blockDim.x a multiple of 32, at most 1024.

__device__ __forceinline__ unsigned long long dmamig_mix(unsigned int word, unsigned long long j)
{
    unsigned long long m = ((unsigned long long)word | (j << 32)) * 0x9E3779B97F4A7C15ull;
    m ^= m >> 31;
    return m * 0xBF58476D1CE4E5B9ull;
}

extern "C" __global__ void page_checksum(const unsigned long long* __restrict__ page_addr,
                                         unsigned long long* __restrict__ out,
                                         unsigned long long nr_pages,
                                         unsigned long long page_size)
{
    __shared__ unsigned long long warp_sums[32];
    const unsigned long long quads = page_size / 16ull;
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int warp = threadIdx.x >> 5;
    const unsigned int nwarps = (blockDim.x + 31u) >> 5;

    for (unsigned long long page = blockIdx.x; page < nr_pages; page += gridDim.x) {
        const uint4* __restrict__ p = reinterpret_cast<const uint4*>(page_addr[page]);
        unsigned long long sum = 0ull;
        for (unsigned long long q = threadIdx.x; q < quads; q += blockDim.x) {
            const uint4 v = p[q];
            const unsigned long long j = q * 4ull;
            sum += dmamig_mix(v.x, j) + dmamig_mix(v.y, j + 1ull) + dmamig_mix(v.z, j + 2ull)
                 + dmamig_mix(v.w, j + 3ull);
        }
        for (int offset = 16; offset > 0; offset >>= 1) {
            sum += __shfl_down_sync(0xffffffffu, sum, offset);
        }
        if (lane == 0) {
            warp_sums[warp] = sum;
        }
        __syncthreads();
        if (warp == 0) {
            sum = (lane < nwarps) ? warp_sums[lane] : 0ull;
            for (int offset = 16; offset > 0; offset >>= 1) {
                sum += __shfl_down_sync(0xffffffffu, sum, offset);
            }
            if (lane == 0) {
                out[page] = sum;
            }
        }
        // warp_sums is reused by the next page of this block.
        __syncthreads();
    }
}

// Batched page gather/scatter copy for dmamig's DMA engine (METHOD_GATHER).
//
// One descriptor per page: src_addr[i] and dst_addr[i] are byte addresses (uint64) of a page-sized block.
// They may point at device memory of this GPU, a peer GPU with peer access enabled, or pinned host memory
// allocated with cudaHostAlloc: under unified virtual addressing the host pointer of pinned memory is also a
// valid device pointer, so this kernel reads and writes host pages directly over the bus with no staging copy.
//
// Each block copies pages in a grid-stride loop; threads move 16 bytes at a time (uint4 loads and stores),
// consecutive threads touching consecutive 16-byte words so every warp access is fully coalesced.
// page_size must be a multiple of 16 and every address 16-byte aligned (frames are page-aligned buffers).
//
// Reference implementation: the CPU backend's copy of the same runs (dmamig/backends/cpu_kernels.py);
// tests/test_cuda_backend.py checks the result against numpy on random pages.

extern "C" __global__ void page_gather_copy(const unsigned long long* __restrict__ src_addr,
                                            const unsigned long long* __restrict__ dst_addr,
                                            unsigned long long nr_pages,
                                            unsigned long long page_size)
{
    const unsigned long long words = page_size / 16ull;
    for (unsigned long long page = blockIdx.x; page < nr_pages; page += gridDim.x) {
        const uint4* __restrict__ src = reinterpret_cast<const uint4*>(src_addr[page]);
        uint4* __restrict__ dst = reinterpret_cast<uint4*>(dst_addr[page]);
        for (unsigned long long w = threadIdx.x; w < words; w += blockDim.x) {
            dst[w] = src[w];
        }
    }
}

// Device-side page access for dmamig's DeviceAccessor: a GPU reading and writing the pages it holds.
//
// page_access_read gathers whole pages into one dense buffer (pages[i] is the page at page_addr[i]);
// page_access_write scatters the dense buffer back to the pages. page_addr[i] is a byte address (uint64)
// of a page-sized block in this GPU's frame buffer. The accessor runs them only on pages resident on the
// device: that is the point of faulting them there first.
//
// One block per page in a grid-stride loop; each thread moves 16 bytes at a time (uint4), consecutive
// threads on consecutive words so every warp access is coalesced. page_size must be a multiple of 16, every
// address and the dense buffer 16-byte aligned.
//
// Reference implementation: CpuBackend.access_frames (dmamig/backends/cpu.py), numpy gather and scatter;
// tests/test_uvm_gpu.py checks both kernels against it on random pages.

extern "C" __global__ void page_access_read(const unsigned long long* __restrict__ page_addr,
                                            uint4* __restrict__ pages,
                                            unsigned long long nr_pages,
                                            unsigned long long page_size)
{
    const unsigned long long words = page_size / 16ull;
    for (unsigned long long page = blockIdx.x; page < nr_pages; page += gridDim.x) {
        const uint4* __restrict__ src = reinterpret_cast<const uint4*>(page_addr[page]);
        uint4* __restrict__ dst = pages + page * words;
        for (unsigned long long w = threadIdx.x; w < words; w += blockDim.x) {
            dst[w] = src[w];
        }
    }
}

extern "C" __global__ void page_access_write(const unsigned long long* __restrict__ page_addr,
                                             const uint4* __restrict__ pages,
                                             unsigned long long nr_pages,
                                             unsigned long long page_size)
{
    const unsigned long long words = page_size / 16ull;
    for (unsigned long long page = blockIdx.x; page < nr_pages; page += gridDim.x) {
        uint4* __restrict__ dst = reinterpret_cast<uint4*>(page_addr[page]);
        const uint4* __restrict__ src = pages + page * words;
        for (unsigned long long w = threadIdx.x; w < words; w += blockDim.x) {
            dst[w] = src[w];
        }
    }
}

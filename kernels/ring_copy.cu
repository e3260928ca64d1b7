// The CUDA consumer of dmamig's DMA channel rings (dmamig/dma/ring.py): one launch runs one submission's job on
// every channel of a device.
//
// The rings live in pinned host memory mapped for the device (under unified virtual addressing a host pointer
// is a device pointer). Channel c's words are ctl[c * ctl_words ...], its rows rows[c * row_cap * 4 ...] as
// (src address, dst address, bytes, flags) and its job slots jobs[c * job_cap * 4 ...] as (kind, first row,
// rows, status). seq0..seq7 name the job of each channel in this submission (-1: none). The grid holds
// blocks_per_channel blocks per channel.
//
// Every block first checks all of its channel's rows against the registered memory ranges (regions[0] is
// their count, then [lo, hi) pairs): a row outside them makes the job copy nothing and end with
// STATUS_BAD_ROW, never an illegal address. Then the blocks share the rows (row i to block i % bpc) and copy
// 16 bytes a thread where both ends are 16-byte aligned, bytes otherwise. The last block of a channel to
// finish (a device-memory counter per channel) writes the job's status, ROW_HEAD and then HEAD, each after a
// system-scope fence, so a host that reads HEAD sees the status and the copied bytes.
//
// Reference: the CPU backend's consumer (dmamig/backends/cpu/ring_consumer.py) runs the same rows; the CUDA stand-in
// in tests/test_cuda_fake.py runs this kernel's protocol in Python.

#define MAX_CHANNELS 8
#define STATUS_OK 1LL
#define STATUS_BAD_ROW 2LL
// Word indexes in a channel's ctl (dmamig/dma/ring.py).
#define HEAD 16
#define ROW_HEAD 17
#define HEARTBEAT 19

__device__ __forceinline__ bool registered(const volatile long long* regions, long long nreg,
                                           long long addr, long long nbytes)
{
    for (long long k = 1; k <= nreg; ++k) {
        if (regions[2 * k] <= addr && addr + nbytes <= regions[2 * k + 1]) {
            return true;
        }
    }
    return false;
}

extern "C" __global__ void ring_copy(long long* ctl, const long long* rows, long long* jobs,
                                     const long long* regions, unsigned int* done,
                                     long long seq0, long long seq1, long long seq2, long long seq3,
                                     long long seq4, long long seq5, long long seq6, long long seq7,
                                     int channels, long long row_cap, long long job_cap, int ctl_words,
                                     int blocks_per_channel)
{
    const int c = blockIdx.x / blocks_per_channel;
    const int b = blockIdx.x % blocks_per_channel;
    if (c >= channels || c >= MAX_CHANNELS) {
        return;
    }
    const long long seqs[MAX_CHANNELS] = {seq0, seq1, seq2, seq3, seq4, seq5, seq6, seq7};
    const long long seq = seqs[c];
    if (seq < 0) {
        return;
    }
    volatile long long* my_ctl = ctl + (long long)c * ctl_words;
    volatile long long* slot = jobs + ((long long)c * job_cap + seq % job_cap) * 4;
    const volatile long long* my_rows = rows + (long long)c * row_cap * 4;
    const volatile long long* reg = regions;
    const long long first = slot[1];
    const long long count = slot[2];
    const long long nreg = reg[0];

    __shared__ int bad;
    if (threadIdx.x == 0) {
        bad = 0;
    }
    __syncthreads();
    if (nreg > 0) {
        for (long long i = threadIdx.x; i < count; i += blockDim.x) {
            const volatile long long* row = my_rows + ((first + i) % row_cap) * 4;
            if (!registered(reg, nreg, row[0], row[2]) || !registered(reg, nreg, row[1], row[2])) {
                bad = 1;
            }
        }
    }
    __syncthreads();
    if (!bad) {
        for (long long i = b; i < count; i += blocks_per_channel) {
            const volatile long long* row = my_rows + ((first + i) % row_cap) * 4;
            const long long src = row[0];
            const long long dst = row[1];
            const long long nbytes = row[2];
            if (((src | dst | nbytes) & 15) == 0) {
                const uint4* __restrict__ s = reinterpret_cast<const uint4*>(src);
                uint4* __restrict__ d = reinterpret_cast<uint4*>(dst);
                for (long long w = threadIdx.x; w < nbytes / 16; w += blockDim.x) {
                    d[w] = s[w];
                }
            } else {
                const unsigned char* s = reinterpret_cast<const unsigned char*>(src);
                unsigned char* d = reinterpret_cast<unsigned char*>(dst);
                for (long long k = threadIdx.x; k < nbytes; k += blockDim.x) {
                    d[k] = s[k];
                }
            }
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence_system();  // this block's copies before its count
        const unsigned int before = atomicAdd(&done[c], 1u);
        if (before == (unsigned int)(blocks_per_channel - 1)) {
            done[c] = 0u;  // the next launch on this stream starts after this one ends
            __threadfence();
            slot[3] = bad ? STATUS_BAD_ROW : STATUS_OK;
            my_ctl[ROW_HEAD] = first + count;
            my_ctl[HEARTBEAT] = my_ctl[HEARTBEAT] + 1;
            __threadfence_system();  // the status and every block's bytes before HEAD
            my_ctl[HEAD] = seq + 1;
        }
    }
}

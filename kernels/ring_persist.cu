// The persistent consumer of dmamig's DMA channel rings (dmamig/dma/ring.py): one cooperative launch of a few
// blocks per device serves every channel of the device's lane until its rings stay idle for idle_ns, or until
// the host sets the stop word. An experiment setting (dma_engine="persistent"); the default consumer is one
// ring_copy.cu launch per submission.
//
// Layout as ring_copy.cu: the rings live in pinned host memory mapped for the device (a host pointer is a device
// pointer under unified virtual addressing); channel c's words are ctl[c * ctl_words ...], its rows
// rows[c * row_cap * 4 ...] as (src address, dst address, bytes, flags), its job slots jobs[c * job_cap * 4 ...]
// as (kind, first row, rows, status). host_ctl is the lane's own pinned words (STOP, SEEN per channel, the
// generation running); scratch is device memory (the dispatched round, the grid barrier, the finish count) that
// the host zeroes once; stage is device memory for a round's rows (row_cap rows per channel).
//
// Protocol, per round: the leader (warp 0 of block 0, one lane per channel) polls every channel's TAIL with
// system-scope acquire loads, issued by all lanes at once so that the PCIe round trips overlap, and backs off with
// __nanosleep while nothing is there. It takes at most one job per channel, writes the round into scratch, and
// every block passes a grid barrier (all blocks are resident: the launch is cooperative). The grid then reads each
// row of the round once from host memory into device memory (stage), checking it against the registered memory
// on the way (a row outside it marks its job bad: it copies nothing and ends with STATUS_BAD_ROW, never a wild
// write); a second barrier, then the blocks copy from the staged rows: a row of at least BIG_ROW bytes is spread
// over the whole grid, a smaller one goes to one block. (Every block reading every row over PCIe, as ring_copy
// does per channel, would read a quarter of a 4 KiB batch's payload again in 8-byte pieces.) The last block to
// finish (a device-memory count) writes each job's status and ROW_HEAD, adds the round's time to BUSY_NS, then
// after a system-scope fence publishes each HEAD with a release store, so a host that reads HEAD sees the status
// and the bytes. A job of another kind than rows in the ring (its rows are not the device's to read) ends
// STATUS_FAILED.
//
// Liveness: HEARTBEAT advances on every channel each HEARTBEAT_NS while the leader polls and after every round,
// so the host can tell a stalled consumer from a slow copy. Idle exit uses the CPU consumer's hand-shake: store
// IDLE (the generation that exits, never 0) on every channel, fence, look at every TAIL once more; a submitter
// stores TAIL, fences and reads IDLE, so one of the two sees the other and no job is left for a consumer that
// has gone: the host relaunches when it finds IDLE holding the generation it launched last.
//
// Reference: the CPU backend's consumer (dmamig/backends/cpu/ring_consumer.py) runs the same rows; the CUDA
// stand-in in tests/test_cuda_fake.py runs this kernel's protocol on a thread.

#define MAX_CHANNELS 8
#define JOB_ROWS 1LL
#define STATUS_OK 1LL
#define STATUS_BAD_ROW 2LL
#define STATUS_FAILED 3LL
// Word indexes in a channel's ctl (dmamig/dma/ring.py).
#define TAIL 0
#define HEAD 16
#define ROW_HEAD 17
#define BUSY_NS 18
#define HEARTBEAT 19
#define IDLE 32
// Word indexes in host_ctl (dmamig/backends/cuda/persistent_lane.py).
#define H_STOP 0
#define H_RUNNING 1
#define H_SEEN 8
// Word indexes in scratch (device memory, 64-bit words): the grid barrier and the finish count, then the round
// in two buffers by the round's parity, so that the leader may write round r + 1 while a slow block still reads
// round r (it cannot get further ahead: round r + 1 starts only once every block is done with round r).
#define S_BAR_COUNT 0
#define S_BAR_GEN 1
#define S_FINISHED 2
#define S_ROUND 8
#define ROUND_WORDS 48
#define R_EXIT 0
#define R_START_NS 1
#define R_SEQ 2
#define R_KIND 10
#define R_FIRST 18
#define R_COUNT 26
#define R_BAD 34
#define MAX_REGIONS 64
#define SCRATCH_WORDS (S_ROUND + 2 * ROUND_WORDS)
// A row this long is copied by the whole grid rather than by one block.
#define BIG_ROW (64LL * 1024)
// The leader's back-off while the rings are empty: short enough to start a job within a few microseconds.
#define NAP_MIN_NS 32u
#define NAP_MAX_NS 512u
#define HEARTBEAT_NS 100000ULL

__device__ __forceinline__ long long load_acquire_sys(const long long* p)
{
    long long v;
    asm volatile("ld.acquire.sys.global.s64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void store_release_sys(long long* p, long long v)
{
    asm volatile("st.release.sys.global.s64 [%0], %1;" :: "l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void store_relaxed_sys(long long* p, long long v)
{
    asm volatile("st.relaxed.sys.global.s64 [%0], %1;" :: "l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void fence_sc_sys()
{
    asm volatile("fence.sc.sys;" ::: "memory");
}

__device__ __forceinline__ unsigned long long now_ns()
{
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ bool registered(const long long* regions, long long nreg,
                                           long long addr, long long nbytes)
{
    for (long long k = 1; k <= nreg; ++k) {
        if (regions[2 * k] <= addr && addr + nbytes <= regions[2 * k + 1]) {
            return true;
        }
    }
    return false;
}

// A barrier of the whole grid (every block resident: a cooperative launch). Without cooperative_groups, so the
// source builds under NVRTC with no include path and without relocatable device code.
__device__ __forceinline__ void grid_barrier(volatile long long* scratch, unsigned int nblocks)
{
    __syncthreads();
    if (threadIdx.x == 0) {
        const long long gen = scratch[S_BAR_GEN];
        __threadfence();
        unsigned long long* count = (unsigned long long*)(scratch + S_BAR_COUNT);
        if (atomicAdd(count, 1ULL) == (unsigned long long)(nblocks - 1)) {
            *count = 0ULL;
            __threadfence();
            scratch[S_BAR_GEN] = gen + 1;
        } else {
            while (scratch[S_BAR_GEN] == gen) {
                __nanosleep(NAP_MIN_NS);
            }
        }
        __threadfence();
    }
    __syncthreads();
}

__device__ __forceinline__ void copy_bytes(long long src, long long dst, long long nbytes, long long start,
                                           long long step)
{
    if (((src | dst | nbytes) & 15) == 0) {
        const uint4* __restrict__ s = reinterpret_cast<const uint4*>(src);
        uint4* __restrict__ d = reinterpret_cast<uint4*>(dst);
        for (long long w = start; w < nbytes / 16; w += step) {
            d[w] = s[w];
        }
    } else {
        const unsigned char* s = reinterpret_cast<const unsigned char*>(src);
        unsigned char* d = reinterpret_cast<unsigned char*>(dst);
        for (long long k = start; k < nbytes; k += step) {
            d[k] = s[k];
        }
    }
}

extern "C" __global__ void ring_persist(long long* ctl, const long long* rows, long long* jobs,
                                        const long long* regions, long long* host_ctl, long long* scratch_words,
                                        long long* stage, int channels, long long row_cap, long long job_cap,
                                        int ctl_words, unsigned long long idle_ns, long long generation)
{
    volatile long long* scratch = scratch_words;
    const volatile long long* host_regions = regions;
    const unsigned int nblocks = gridDim.x;
    const long long nthreads = (long long)nblocks * blockDim.x;
    const long long gtid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int lane = threadIdx.x & 31;
    const bool leader = blockIdx.x == 0 && threadIdx.x < 32;
    const bool my_channel = leader && lane < channels && lane < MAX_CHANNELS;
    long long* my_ctl = ctl + (long long)lane * ctl_words;
    long long head = 0;
    long long beat = 0;
    long long round = 0;
    unsigned long long idle_since = 0;
    unsigned long long last_beat = 0;
    unsigned int nap = NAP_MIN_NS;

    if (my_channel) {
        head = load_acquire_sys(my_ctl + HEAD);
        beat = my_ctl[HEARTBEAT];
        store_relaxed_sys(my_ctl + IDLE, 0);  // running: a submitter need not launch
    }
    if (leader) {
        unsigned long long t = 0;
        if (lane == 0) {
            t = now_ns();
            store_relaxed_sys(host_ctl + H_RUNNING, generation);
        }
        idle_since = last_beat = __shfl_sync(0xffffffffu, t, 0);
    }

    // This block's copy of the round (the scratch buffer may be rewritten for the next round meanwhile).
    __shared__ long long r_seq[MAX_CHANNELS], r_kind[MAX_CHANNELS], r_first[MAX_CHANNELS], r_count[MAX_CHANNELS];
    __shared__ long long r_start, r_exit;
    __shared__ int bad[MAX_CHANNELS];
    __shared__ long long reg[2 * MAX_REGIONS + 2];
    while (true) {
        volatile long long* rb = scratch + S_ROUND + (round & 1) * ROUND_WORDS;
        if (leader) {
            // Poll until a channel has a job, the stop word is set, or the idle window passed.
            while (true) {
                long long tail = head;
                if (my_channel) {
                    tail = load_acquire_sys(my_ctl + TAIL);
                }
                const long long stop = lane == 31 ? load_acquire_sys(host_ctl + H_STOP) : 0;
                const unsigned int work = __ballot_sync(0xffffffffu, tail > head);
                const bool stopping = __shfl_sync(0xffffffffu, stop, 31) != 0;
                int verdict = 0;  // 1: a round; 2: exit
                if (work != 0u) {
                    verdict = 1;
                } else if (stopping) {
                    verdict = 2;
                } else {
                    unsigned long long t = 0;
                    if (lane == 0) {
                        t = now_ns();
                    }
                    t = __shfl_sync(0xffffffffu, t, 0);
                    if (t - last_beat >= HEARTBEAT_NS) {
                        last_beat = t;
                        if (my_channel) {
                            store_relaxed_sys(my_ctl + HEARTBEAT, ++beat);
                        }
                    }
                    if (t - idle_since >= idle_ns) {
                        // The exit hand-shake: IDLE, a fence, one more look at every TAIL.
                        if (my_channel) {
                            store_relaxed_sys(my_ctl + IDLE, generation);
                        }
                        fence_sc_sys();
                        if (my_channel) {
                            tail = load_acquire_sys(my_ctl + TAIL);
                        }
                        if (__ballot_sync(0xffffffffu, tail > head) != 0u) {
                            if (my_channel) {
                                store_relaxed_sys(my_ctl + IDLE, 0);
                            }
                            verdict = 1;
                        } else {
                            verdict = 2;
                        }
                    }
                }
                if (verdict == 1) {
                    if (my_channel) {
                        const bool take = tail > head;
                        const volatile long long* slot = jobs + ((long long)lane * job_cap + head % job_cap) * 4;
                        rb[R_SEQ + lane] = take ? head : -1;
                        rb[R_BAD + lane] = 0;
                        if (take) {
                            rb[R_KIND + lane] = slot[0];
                            rb[R_FIRST + lane] = slot[1];
                            rb[R_COUNT + lane] = slot[2];
                            store_relaxed_sys(host_ctl + H_SEEN + lane, head + 1);  // for the start latency
                            head += 1;
                        }
                    }
                    if (lane == 0) {
                        rb[R_EXIT] = 0;
                        rb[R_START_NS] = (long long)now_ns();
                    }
                    nap = NAP_MIN_NS;
                    break;
                }
                if (verdict == 2) {
                    if (lane == 0) {
                        rb[R_EXIT] = 1;
                    }
                    break;
                }
                __nanosleep(nap);
                nap = nap * 2 > NAP_MAX_NS ? NAP_MAX_NS : nap * 2;
            }
            __syncwarp();
        }
        grid_barrier(scratch, nblocks);
        if (threadIdx.x < MAX_CHANNELS) {
            const int c = threadIdx.x;
            r_seq[c] = c < channels ? rb[R_SEQ + c] : -1;
            r_kind[c] = rb[R_KIND + c];
            r_first[c] = rb[R_FIRST + c];
            r_count[c] = rb[R_COUNT + c];
        }
        if (threadIdx.x == 0) {
            r_exit = rb[R_EXIT];
            r_start = rb[R_START_NS];
        }
        __syncthreads();
        round += 1;
        if (r_exit) {
            break;
        }

        // Stage every row of the round once, in device memory, checking it against the registered memory (read
        // into shared memory for the round: a registration may have added a range since the last one).
        if (threadIdx.x == 0) {
            const long long n = load_acquire_sys(regions);  // the count is released after its ranges
            reg[0] = n < MAX_REGIONS ? n : MAX_REGIONS;
        }
        __syncthreads();
        for (long long k = threadIdx.x; k < 2 * reg[0]; k += blockDim.x) {
            reg[2 + k] = host_regions[2 + k];
        }
        __syncthreads();
        const long long nreg = reg[0];
        for (int c = 0; c < channels; ++c) {
            if (r_seq[c] < 0 || r_kind[c] != JOB_ROWS) {
                continue;
            }
            const volatile long long* ring = rows + (long long)c * row_cap * 4;
            long long* staged = stage + (long long)c * row_cap * 4;
            for (long long i = gtid; i < r_count[c]; i += nthreads) {
                const volatile long long* row = ring + ((r_first[c] + i) % row_cap) * 4;
                const long long src = row[0];
                const long long dst = row[1];
                const long long nbytes = row[2];
                staged[i * 4] = src;
                staged[i * 4 + 1] = dst;
                staged[i * 4 + 2] = nbytes;
                if (nreg > 0 && !(registered(reg, nreg, src, nbytes) && registered(reg, nreg, dst, nbytes))) {
                    rb[R_BAD + c] = 1;
                }
            }
        }
        grid_barrier(scratch, nblocks);
        if (threadIdx.x < MAX_CHANNELS) {
            bad[threadIdx.x] = threadIdx.x < channels ? (int)rb[R_BAD + threadIdx.x] : 0;
        }
        __syncthreads();

        // Copy: big rows over the whole grid, small ones a block each.
        long long spread = 0;
        for (int c = 0; c < channels; ++c) {
            if (r_seq[c] < 0 || r_kind[c] != JOB_ROWS || bad[c]) {
                continue;
            }
            const volatile long long* staged = stage + (long long)c * row_cap * 4;
            for (long long i = 0; i < r_count[c]; ++i) {
                const long long nbytes = staged[i * 4 + 2];
                if (nbytes >= BIG_ROW) {
                    copy_bytes(staged[i * 4], staged[i * 4 + 1], nbytes, gtid, nthreads);
                } else {
                    if (spread % nblocks == blockIdx.x) {
                        copy_bytes(staged[i * 4], staged[i * 4 + 1], nbytes, threadIdx.x, blockDim.x);
                    }
                    spread += 1;
                }
            }
        }

        // The last block to finish publishes the round.
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence_system();  // this block's copies before its count
            unsigned long long* finished = (unsigned long long*)(scratch_words + S_FINISHED);
            if (atomicAdd(finished, 1ULL) == (unsigned long long)(nblocks - 1)) {
                *finished = 0ULL;
                __threadfence();
                const long long took = (long long)now_ns() - r_start;
                for (int c = 0; c < channels; ++c) {
                    if (r_seq[c] < 0) {
                        continue;
                    }
                    long long* cc = ctl + (long long)c * ctl_words;
                    long long* slot = jobs + ((long long)c * job_cap + r_seq[c] % job_cap) * 4;
                    const bool rows_job = r_kind[c] == JOB_ROWS;
                    slot[3] = !rows_job ? STATUS_FAILED : (bad[c] ? STATUS_BAD_ROW : STATUS_OK);
                    if (rows_job) {
                        cc[ROW_HEAD] = r_first[c] + r_count[c];
                    }
                    cc[BUSY_NS] = cc[BUSY_NS] + took;
                }
                fence_sc_sys();  // the statuses and every block's bytes before HEAD
                for (int c = 0; c < channels; ++c) {
                    if (r_seq[c] >= 0) {
                        store_release_sys(ctl + (long long)c * ctl_words + HEAD, r_seq[c] + 1);
                    }
                }
            }
        }
        if (my_channel) {
            store_relaxed_sys(my_ctl + HEARTBEAT, ++beat);
        }
        if (leader) {
            unsigned long long t = 0;
            if (lane == 0) {
                t = now_ns();
            }
            idle_since = __shfl_sync(0xffffffffu, t, 0);
        }
    }
    if (leader && lane == 0) {
        store_relaxed_sys(host_ctl + H_RUNNING, 0);
    }
}

//! Process-wide allocator settings for training on Burn's CPU backends.
//!
//! Every tensor operation on a CPU backend writes a fresh output buffer. With glibc's default
//! settings, buffers of a few MB are returned to the operating system when they are freed and
//! the next one is page-faulted back in, one 4 KiB page at a time: on this project's 2-core
//! machine a `[2048, 384] · [384, 384]` product took 3.2 ms instead of 2.0 ms and a rank-1
//! `[2048, 1] · [1, 384]` product 1.5 ms instead of 0.5 ms, most of it in page faults. Keeping
//! freed memory in the process removes that cost; see docs/benchmarks-history.md for the effect
//! on a training step.

/// Tells glibc's `malloc` to keep freed memory for reuse: buffers up to 32 MiB come from the
/// heap rather than fresh `mmap`s, the heap is not trimmed back to the operating system, and
/// every thread allocates from the one heap (the threads of a batch's parts,
/// [`crate::shards`], would otherwise each keep an arena of freed buffers: 1.29 GB instead of
/// 0.90 GB peak for a MiniLM LoRA step in two parts).
///
/// Buffers above 32 MiB, the largest mmap threshold glibc accepts, are still mapped afresh and
/// faulted in each time. `GLIBC_TUNABLES=glibc.malloc.mmap_max=0` in the environment keeps
/// them too, trading memory for time: measured, one training step of a frozen 4096 → 14336
/// layer 11–15% faster with LoRA, KronA or Kron-LoRA for 2–9% more peak memory, full
/// fine-tuning of that layer 25% faster for 49% more, MiniLM's full fine-tuning 4% faster and
/// its adapters unchanged (docs/benchmarks-history.md). It is not the default here because
/// memory is what an adapter saves.
///
/// Call it once, at the start of `main`, in a binary that trains or runs inference on a CPU
/// backend. The price is memory: the process keeps its peak heap until it exits. It does not
/// change any result, only where buffers come from. Returns `true` when the settings were
/// applied; on other platforms or C libraries (which have their own policies) it does nothing
/// and returns `false`. The same settings can be given from outside the program with the
/// environment variables `MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647
/// MALLOC_ARENA_MAX=1`.
///
/// ```
/// let applied = kron_adapters::finetune::keep_freed_memory();
/// assert_eq!(applied, cfg!(all(target_os = "linux", target_env = "gnu")));
/// ```
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // 32 MiB is the largest fixed mmap threshold glibc accepts on 64-bit targets; a fixed
        // value also turns off glibc's own (slower to settle) dynamic threshold. Both settings
        // are needed: measured, either one alone leaves the page faults in place.
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        const TRIM_THRESHOLD: libc::c_int = libc::c_int::MAX;
        // SAFETY: mallopt only changes malloc's tuning parameters; it is thread-safe in glibc
        // and reports a refused value by returning 0.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
                && libc::mallopt(libc::M_ARENA_MAX, 1) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

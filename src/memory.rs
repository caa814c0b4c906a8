//! How the process uses glibc's allocator: one arena, large buffers mapped, and free memory
//! given back after a drain.
//!
//! Draining a backlog reads sled leaves of up to a megabyte and frees them again; glibc's
//! allocator keeps what it freed in its arenas, so the process would stay at the drain's
//! high-water mark for the rest of its life. [`trim`] hands the free pages back; the uplink
//! calls it once a drained backlog's blocks are deleted. Measured with a 1 M backlog drained by
//! `floorgate run` polling 64 devices: RSS 5 s after the drain 23–24 MiB with it, 30–32.5 MiB
//! without (3 runs each).

/// Sets glibc's allocator up for a small box; call it before any thread starts.
///
/// - One malloc arena instead of glibc's default of eight per core. Every thread that allocates
///   under contention would get an arena of its own, and memory freed in one arena is not
///   reused by another: while a backlog drains, the store reader, the acker, sled's threads and
///   the runtime each hold some. Peak RSS while a restarted 1 M backlog drained: 21.1 MiB
///   (20.7–21.3, 5 runs) with one arena against 23.2 (21.1–24.3, 5 runs) with two, at the same
///   drain rate. glibc's per-thread cache serves many small allocations without the arena's
///   lock.
/// - A fixed mmap threshold of 512 KiB. glibc raises its threshold to the size of the largest
///   mapped chunk freed, so that after the first large leaf sled read (a leaf of packed blocks
///   is up to a megabyte) later ones come from the heap and stay resident when freed. Fixed, a
///   leaf's buffer is mapped and unmapped; blocks (at most 256 KiB) and payloads stay in the
///   heap. Peak RSS while draining: 18.5 MiB (18.1–19.0, 6 runs) against 18.9 (18.8–19.4, 5).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets parameters of the allocator; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 10);
    }
}

/// Returns the allocator's free pages to the system (glibc's `malloc_trim`); logs the resident
/// size before and after at debug level. Does nothing where the C library is not glibc.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // Two reads of /proc only when they are logged.
        let logged = tracing::enabled!(tracing::Level::DEBUG);
        let before = if logged { resident_kib() } else { 0 };
        // SAFETY: malloc_trim only walks and releases the allocator's own free lists.
        unsafe {
            libc::malloc_trim(0);
        }
        if logged {
            tracing::debug!(
                before_kib = before,
                after_kib = resident_kib(),
                "gave free memory back"
            );
        }
    }
}

/// The process's resident set in KiB, from `/proc/self/status` (0 where unknown).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

//! Giving memory back to the system.
//!
//! Draining a backlog reads sled leaves of up to a megabyte and frees them again; glibc's
//! allocator keeps what it freed in its arenas (one per thread that allocated), so the
//! process stays at the drain's high-water mark for the rest of its life. [`trim`] hands the
//! free pages back. The uplink calls it once a drained backlog's blocks are deleted.

/// Returns the allocator's free pages to the system (glibc's `malloc_trim`); logs the resident
/// size before and after at debug level. Does nothing where the C library is not glibc.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let before = resident_kib();
        // SAFETY: malloc_trim only walks and releases the allocator's own free lists.
        unsafe {
            libc::malloc_trim(0);
        }
        tracing::debug!(
            before_kib = before,
            after_kib = resident_kib(),
            "gave free memory back"
        );
    }
}

/// The process's resident set in KiB, from `/proc/self/status` (0 where unknown).
pub fn resident_kib() -> u64 {
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

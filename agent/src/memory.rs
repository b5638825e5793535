//! The agent's heap, kept small: one malloc arena for every thread (the agent is one runtime
//! thread and short-lived helpers; an arena each would keep their freed memory apart), and
//! freed memory handed back to the kernel when a connection ends, so the idle agent's RSS is
//! what it holds, not what its busiest moment took. glibc only; elsewhere both do nothing.

/// Sets the allocator up; first thing in `main`, before any thread starts.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt changes an allocator setting; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Returns the heap's free pages to the kernel.
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator holds free; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

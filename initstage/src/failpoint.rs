//! Crash injection for tests (cargo feature `failpoints`).
//!
//! Every write, rename and fsync on the promotion/rollback path calls [`hit`] after it. With
//! `KEEL_FAILPOINT=N` (or `keel.failpoint=N` on the kernel command line) the N-th call aborts
//! the process, as a power cut would stop it. Without the feature, [`hit`] compiles to nothing.

#[cfg(feature = "failpoints")]
mod imp {
    use std::sync::atomic::{AtomicU64, Ordering};

    static TARGET: AtomicU64 = AtomicU64::new(0);
    static COUNT: AtomicU64 = AtomicU64::new(0);

    pub fn arm(n: Option<u64>) {
        let env = std::env::var("KEEL_FAILPOINT")
            .ok()
            .and_then(|v| v.parse().ok());
        if let Some(n) = env.or(n) {
            TARGET.store(n, Ordering::SeqCst);
        }
    }

    pub fn hit(step: &str) {
        let n = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
        if TARGET.load(Ordering::SeqCst) == n {
            eprintln!("keel: failpoint {n} ({step}): aborting");
            std::process::abort();
        }
    }
}

#[cfg(not(feature = "failpoints"))]
mod imp {
    pub fn arm(_: Option<u64>) {}
    #[inline(always)]
    pub fn hit(_: &str) {}
}

/// Arms the failpoint from `KEEL_FAILPOINT` or the command line's `keel.failpoint=`.
pub fn arm(n: Option<u64>) {
    imp::arm(n)
}

/// Marks the end of one write step; aborts here if this is the armed step.
pub fn hit(step: &str) {
    imp::hit(step)
}

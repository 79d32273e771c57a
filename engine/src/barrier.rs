//! Asymmetric memory barriers: a free "light" barrier for the hot side (every send) and
//! a "heavy" barrier for the cold side (parking, closing).
//!
//! The wake-up protocol needs store→load ordering on both sides (Dekker). Instead of a
//! full fence on every send, the sender issues only a compiler fence, and the rare side
//! (a receiver about to park, an endpoint closing) calls Linux `membarrier(2)` with
//! `MEMBARRIER_CMD_PRIVATE_EXPEDITED`: the kernel makes every running thread of the
//! process execute a full barrier before the call returns (threads not running pass one
//! when they are switched back in). That gives the same guarantee as a SeqCst fence on
//! both sides, and is how folly's `asymmetricLightBarrier`/`asymmetricHeavyBarrier` work.
//!
//! Where `membarrier` is not available (other systems, old kernels, seccomp), both sides
//! fall back to SeqCst fences. The choice is made once, in [`init`], before the first
//! cluster exists, so every thread that can reach a wake state sees the same mode.
//! Under `loom`, both barriers are SeqCst fences (the model of the same guarantee).

use std::sync::atomic::{compiler_fence, AtomicBool, Ordering};
use std::sync::Once;

use crate::sync;

/// Read on every send and every release: on a cache line of its own, so no static the
/// linker puts next to it (the program's own, when it links this library) can make that
/// read miss.
static ASYMMETRIC: crossbeam_utils::CachePadded<AtomicBool> =
    crossbeam_utils::CachePadded::new(AtomicBool::new(false));
static INIT: Once = Once::new();

#[cfg(all(target_os = "linux", not(loom)))]
mod membarrier {
    const QUERY: libc::c_int = 0;
    const PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
    const REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

    fn call(cmd: libc::c_int) -> libc::c_long {
        // SAFETY: membarrier takes (cmd, flags, cpu_id) integers and touches no memory of
        // ours; an unsupported command returns -1 with errno set.
        unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                cmd,
                0 as libc::c_uint,
                0 as libc::c_int,
            )
        }
    }

    /// Registers the process for private expedited barriers. `true` on success.
    pub(super) fn register() -> bool {
        let supported = call(QUERY);
        supported >= 0
            && supported & libc::c_long::from(PRIVATE_EXPEDITED) != 0
            && call(REGISTER_PRIVATE_EXPEDITED) == 0
    }

    /// A full barrier on every running thread of the process. `false` if it failed.
    pub(super) fn barrier() -> bool {
        call(PRIVATE_EXPEDITED) == 0
    }
}

/// Decides the barrier mode once per process. Called before any cluster exists.
pub(crate) fn init() {
    INIT.call_once(|| {
        #[cfg(all(target_os = "linux", not(loom)))]
        ASYMMETRIC.store(membarrier::register(), Ordering::Release);
    });
}

/// The hot side's barrier (after publishing, before reading the peer's state).
#[inline]
pub(crate) fn light() {
    if ASYMMETRIC.load(Ordering::Relaxed) {
        compiler_fence(Ordering::SeqCst);
    } else {
        sync::fence(Ordering::SeqCst);
    }
}

/// The cold side's barrier (after announcing park or close, before re-checking rings).
pub(crate) fn heavy() {
    #[cfg(all(target_os = "linux", not(loom)))]
    if ASYMMETRIC.load(Ordering::Relaxed) {
        if membarrier::barrier() {
            return;
        }
        // Registered but refused: cannot happen after a successful registration; a
        // full fence here would not protect senders that skip theirs, so stop.
        std::process::abort();
    }
    sync::fence(Ordering::SeqCst);
}

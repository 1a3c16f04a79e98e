//! Property tests standing in for fuzzing (cargo-fuzz needs a nightly toolchain): every parser of
//! outside input gets arbitrary and mutated bytes and must answer with an error, never a panic
//! or a huge allocation; every format with a writer round-trips.
//!
//! The runs are deterministic: a fixed seed and a fixed number of cases. To explore further,
//! set `PROPTEST_RNG_SEED` and `PROPTEST_CASES`, e.g.
//! `PROPTEST_RNG_SEED=$RANDOM PROPTEST_CASES=100000 cargo test -p flywheel-core --test properties`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::test_runner::{Config, RngSeed};

mod api;
mod chunker;
mod manifest;
mod nar;
mod nix;

/// The configuration of every property: `cases` cases from a fixed seed, no files written;
/// `PROPTEST_CASES` and `PROPTEST_RNG_SEED` override both.
pub fn config(cases: u32) -> Config {
    let from_env = Config::default();
    Config {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() { from_env.cases } else { cases },
        rng_seed: if std::env::var_os("PROPTEST_RNG_SEED").is_some() {
            from_env.rng_seed
        } else {
            RngSeed::Fixed(0x666c_7977_6865_656c)
        },
        failure_persistence: None,
        ..from_env
    }
}

/// Records the largest single allocation of each thread, so that a property can check that a
/// length field read from input never sizes a buffer.
struct LargestAllocation;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for LargestAllocation {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: LargestAllocation = LargestAllocation;

/// Runs `f` and returns its result with the largest single allocation it made on this thread.
pub fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = LARGEST.with(|largest| largest.replace(0));
    let out = f();
    let largest = LARGEST.with(|largest| largest.replace(before.max(largest.get())));
    (out, largest)
}

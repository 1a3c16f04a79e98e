//! Where storage, the reuse window and garbage collection read the time.
//!
//! Retention, the grace period and the reuse window all compare "now" with an age: an
//! object's modification time, a path's publication or last access. Reading "now" through a
//! [`Clock`] lets tests move time forward instead of sleeping through those periods. Object
//! stores stamp their own modification times from the real clock, so a test clock starts at
//! the real time and only ever moves forward: advancing it makes stored objects look older,
//! exactly as waiting would.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A source of the current time, in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;

    /// Seconds since the Unix epoch.
    fn now_secs(&self) -> u64 {
        self.now_ms() / 1000
    }
}

/// A clock shared by the parts of a server that must agree on the time.
pub type SharedClock = Arc<dyn Clock>;

/// The system's real-time clock: what every server runs on.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        // A clock set before 1970 is a broken host; 0 makes every object look young, which
        // keeps data rather than sweeping it.
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
    }
}

impl SystemClock {
    /// The system clock, shared.
    pub fn shared() -> SharedClock {
        Arc::new(SystemClock)
    }
}

/// A clock that stands still until it is told to move, for tests.
#[derive(Debug)]
pub struct ManualClock {
    now_ms: AtomicU64,
}

impl ManualClock {
    /// A clock standing at the real time now, so that objects stored from here on carry
    /// modification times consistent with it.
    pub fn starting_now() -> Arc<Self> {
        Arc::new(ManualClock { now_ms: AtomicU64::new(SystemClock.now_ms()) })
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.now_ms.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::starting_now();
        let start = clock.now_ms();
        assert!(start >= SystemClock.now_ms().saturating_sub(60_000), "starts near the real time");
        assert_eq!(clock.now_ms(), start);
        clock.advance(Duration::from_secs(3));
        assert_eq!(clock.now_ms(), start + 3000);
        assert_eq!(clock.now_secs(), (start + 3000) / 1000);
    }
}

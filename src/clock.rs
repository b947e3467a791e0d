//! Clocks and run control shared by every driver: the injected controller clock (wall-clock
//! time live, a test's own clock in tests) and the stop/reload flags that signal handlers and
//! tests set and the long-running loops read.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

/// The controller clock of the live runtime.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> i64;
}

/// Wall-clock time.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    }
}

/// Flags set by signal handlers (or tests) and read by the engine loop.
#[derive(Debug, Default)]
pub struct Control {
    stop: AtomicBool,
    reload: AtomicBool,
}

impl Control {
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
    pub fn request_reload(&self) {
        self.reload.store(true, Ordering::SeqCst);
    }
    /// Takes a pending reload request (SIGHUP), clearing it.
    pub fn take_reload(&self) -> bool {
        self.reload.swap(false, Ordering::SeqCst)
    }
}

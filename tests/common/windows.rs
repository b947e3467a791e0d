//! Windows for the controller-level tests (no Kafka): included by path, so those tests do not
//! build the broker helpers of `common`.

use segloop::window::WindowSummary;

/// The test window size (10 s).
pub const W: i64 = 10_000;

/// A window of 10 events of `segment` from `start`, every one with this `error`.
pub fn window(segment: &str, partition: i32, start: i64, error: f64) -> WindowSummary {
    WindowSummary::from_values(
        partition,
        segment,
        (start, start + W),
        10,
        &[("error", &[error; 10])],
        &[],
        0.01,
    )
}

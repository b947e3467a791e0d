//! Progress of a replay on standard error: on a terminal a bar redrawn in place with the rate
//! and the time left, otherwise a plain line every 10 s (logs and CI keep readable output).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Records between two looks at the clock (the replay calls [`Progress::add`] per record).
const CHECK_EVERY: u64 = 4096;

pub struct Progress {
    total: u64,
    done: u64,
    started: Instant,
    last: Instant,
    every: Duration,
    terminal: bool,
    drawn: bool,
}

impl Progress {
    /// A progress report over `total` records (the range's length, an upper bound).
    pub fn new(total: u64) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let now = Instant::now();
        Progress {
            total,
            done: 0,
            started: now,
            last: now,
            every: if terminal {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(10)
            },
            terminal,
            drawn: false,
        }
    }

    pub fn add(&mut self, n: u64) {
        let before = self.done;
        self.done += n;
        if self.done / CHECK_EVERY == before / CHECK_EVERY {
            return;
        }
        let now = Instant::now();
        if now.duration_since(self.last) >= self.every {
            self.last = now;
            self.draw();
        }
    }

    /// The line as of now: share, counts, rate, time left.
    pub fn line(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = self.done as f64 / secs;
        let share = if self.total == 0 {
            1.0
        } else {
            (self.done as f64 / self.total as f64).min(1.0)
        };
        let left = self.total.saturating_sub(self.done) as f64 / rate.max(1.0);
        let text = format!(
            "{:>3.0}% {} of {} records, {}/s, ETA {}",
            share * 100.0,
            count(self.done),
            count(self.total),
            count(rate as u64),
            duration(left)
        );
        if self.terminal {
            let filled = (share * 30.0).round() as usize;
            format!("[{}{}] {text}", "#".repeat(filled), ".".repeat(30 - filled))
        } else {
            format!("replay progress: {text}")
        }
    }

    fn draw(&mut self) {
        let line = self.line();
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let _ = write!(err, "\r{line}\x1b[K");
            self.drawn = true;
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    /// Ends the report with its final state (the range's length was an upper bound: what was
    /// read is the whole).
    pub fn finish(&mut self) {
        self.total = self.done;
        let line = self.line();
        if self.terminal {
            let _ = writeln!(std::io::stderr(), "\r{line}\x1b[K");
        } else {
            let _ = writeln!(std::io::stderr(), "{line}");
        }
    }
}

/// 1234567 → "1.23M".
fn count(n: u64) -> String {
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.1}k", n as f64 / 1e3),
        _ => format!("{:.2}M", n as f64 / 1e6),
    }
}

fn duration(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s / 60 % 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_shows_share_counts_rate_and_time_left() {
        let mut p = Progress::new(2_000_000);
        p.terminal = false;
        p.done = 500_000;
        p.started = Instant::now() - Duration::from_secs(2);
        let line = p.line();
        assert!(
            line.starts_with("replay progress:  25% 500.0k of 2.00M records"),
            "{line}"
        );
        assert!(line.contains("250.0k/s"), "{line}");
        assert!(line.contains("ETA 6s"), "{line}");
        p.terminal = true;
        assert!(
            p.line().starts_with("[########......................]"),
            "{}",
            p.line()
        );
    }
}

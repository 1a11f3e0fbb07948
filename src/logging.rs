//! Log set-up (log + simplelog), rate-limited warnings, and escaping client bytes.

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use simplelog::{
    ColorChoice, CombinedLogger, ConfigBuilder, LevelFilter, SharedLogger, TermLogger,
    TerminalMode, WriteLogger,
};

/// Installs the logger: stderr always, plus `file` (appended) if given. Timestamps
/// are RFC 3339 in UTC. Fails only if the file cannot be opened.
pub fn init(level: LevelFilter, file: Option<&Path>) -> Result<(), String> {
    let config = ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_time_offset(time::UtcOffset::UTC)
        .set_thread_level(LevelFilter::Off)
        .set_target_level(LevelFilter::Off)
        .set_location_level(LevelFilter::Off)
        // tiny_http narrates its internals at debug level and reports its own
        // accept errors, which the sidecar handles and logs itself (see `http`).
        .add_filter_ignore_str("tiny_http")
        .build();
    // Colour only on a terminal: scripts and tests read these lines.
    let color = if std::io::stderr().is_terminal() {
        ColorChoice::Auto
    } else {
        ColorChoice::Never
    };
    let mut loggers: Vec<Box<dyn SharedLogger>> = vec![TermLogger::new(
        level,
        config.clone(),
        TerminalMode::Stderr,
        color,
    )];
    if let Some(path) = file {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| {
                format!(
                    "log.file = {:?}: cannot open: {e}",
                    path.display().to_string()
                )
            })?;
        loggers.push(WriteLogger::new(level, config, f));
    }
    // A second init (tests that run several servers in one process) keeps the first.
    let _ = CombinedLogger::init(loggers);
    Ok(())
}

/// Client bytes as they may appear in a log line: escaped and cut to `max` bytes.
pub fn escape(bytes: &[u8], max: usize) -> String {
    let shown = &bytes[..bytes.len().min(max)];
    let mut s = format!("\"{}\"", shown.escape_ascii());
    if bytes.len() > max {
        s.push_str(&format!("... ({} bytes)", bytes.len()));
    }
    s
}

/// Warnings about one kind of client event (resets, timeouts) let through per
/// window, for the whole process.
pub const WARN_BURST: u32 = 10;
/// The window of [`WARN_BURST`].
pub const WARN_WINDOW: Duration = Duration::from_secs(10);

/// Lets through at most `burst` events per `window`, and says how many it held
/// back, so a flood of resets or timeouts cannot fill the disk. Owned by one
/// thread; [`SharedRateLimit`] is the one all workers use together.
#[derive(Debug)]
pub struct RateLimit {
    window: Duration,
    burst: u32,
    window_start: Option<Instant>,
    seen: u32,
    suppressed: u64,
}

impl RateLimit {
    /// At most `burst` per `window`.
    pub const fn new(burst: u32, window: Duration) -> RateLimit {
        RateLimit {
            window,
            burst,
            window_start: None,
            seen: 0,
            suppressed: 0,
        }
    }

    /// `Some(n)` if this event may be logged, where `n` events were held back
    /// since the last one that was; `None` to stay quiet.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .window_start
            .is_none_or(|s| now.duration_since(s) >= self.window);
        if fresh {
            self.window_start = Some(now);
            self.seen = 0;
        }
        if self.seen < self.burst {
            self.seen += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// A [`RateLimit`] for the whole process, so that the volume of warnings does not
/// grow with the number of workers. The lock is only taken on the warning path.
#[derive(Debug)]
pub struct SharedRateLimit(Mutex<RateLimit>);

impl SharedRateLimit {
    /// At most `burst` per `window`, across every thread.
    pub const fn new(burst: u32, window: Duration) -> SharedRateLimit {
        SharedRateLimit(Mutex::new(RateLimit::new(burst, window)))
    }

    /// As [`RateLimit::allow`]; the lock is released before anything is logged.
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut limit = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        limit.allow(now)
    }
}

/// Logs a warning through a [`RateLimit`] or [`SharedRateLimit`], with a note of what was held back.
#[macro_export]
macro_rules! warn_limited {
    ($limit:expr, $now:expr, $($arg:tt)+) => {
        if let Some(held) = $limit.allow($now) {
            if held > 0 {
                log::warn!("{} ({} similar messages suppressed)", format_args!($($arg)+), held);
            } else {
                log::warn!($($arg)+);
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_truncates_and_quotes() {
        assert_eq!(escape(b"a\x00\xff\"", 10), "\"a\\x00\\xff\\\"\"");
        assert_eq!(escape(b"abcdef", 3), "\"abc\"... (6 bytes)");
    }

    #[test]
    fn rate_limit_counts_what_it_holds_back() {
        let mut r = RateLimit::new(2, Duration::from_secs(10));
        let t = Instant::now();
        assert_eq!(r.allow(t), Some(0));
        assert_eq!(r.allow(t), Some(0));
        assert_eq!(r.allow(t), None);
        assert_eq!(r.allow(t), None);
        assert_eq!(r.allow(t + Duration::from_secs(11)), Some(2));
    }
}

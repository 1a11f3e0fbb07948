//! The server's CPU time and memory, read from `/proc/PID` (Linux), so a run can
//! report server CPU per message over exactly its measured window.

use std::time::Duration;

/// One reading of a process's counters.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// User + system CPU time of all its threads.
    pub cpu: Duration,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
}

/// Reads `/proc/PID/stat`.
pub fn sample(pid: u32) -> Result<Sample, String> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    parse_stat(&text).ok_or_else(|| format!("cannot parse {path}"))
}

/// Parses the fields we need from a `/proc/PID/stat` line.
pub fn parse_stat(text: &str) -> Option<Sample> {
    // The command name (field 2) is in parentheses and may itself hold spaces or
    // parentheses: fields are counted from the last `)`.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field N is fields[N - 3].
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    let rss_pages: u64 = fields.get(24 - 3)?.parse().ok()?;
    let ticks = rustix::param::clock_ticks_per_second().max(1);
    let cpu_ticks = utime + stime;
    Some(Sample {
        cpu: Duration::from_nanos(cpu_ticks.saturating_mul(1_000_000_000) / ticks),
        rss_bytes: rss_pages.saturating_mul(rustix::param::page_size() as u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_spaces_in_the_name() {
        let line = "1234 (tokio (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 555 100000 7 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        let s = parse_stat(line).unwrap();
        let ticks = rustix::param::clock_ticks_per_second();
        assert_eq!(s.cpu, Duration::from_nanos(300 * 1_000_000_000 / ticks));
        assert_eq!(s.rss_bytes, 7 * rustix::param::page_size() as u64);
    }

    #[test]
    fn reads_our_own_process() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_bytes > 0);
    }

    #[test]
    fn garbage_is_none() {
        assert!(parse_stat("").is_none());
        assert!(parse_stat("1 (x) S 1 2").is_none());
    }
}

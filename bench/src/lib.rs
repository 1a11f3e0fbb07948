//! Shared bits of the benchmark tools: flag parsing for the baseline servers and the
//! results file that `compare.sh` writes and `chart`/`report` read.
//!
//! # Layout
//! - `bin/mio-echo.rs`: one bare mio loop, echo; the practical limit on one core
//! - `bin/tokio-echo.rs`: idiomatic tokio echo and ack-line servers
//! - `bin/chart.rs`: throughput against connection count, as SVG
//! - `bin/report.rs`: the Markdown comparison table
//! - this file: `Flags` and `Results`

use std::collections::BTreeMap;

/// `--name value` flags, nothing else: the baselines need three flags, not clap.
pub struct Flags(BTreeMap<String, String>);

impl Flags {
    /// Parses `--name value` pairs; `known` lists the accepted names.
    pub fn parse(known: &[&str]) -> Result<Flags, String> {
        let mut map = BTreeMap::new();
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let name = arg
                .strip_prefix("--")
                .filter(|n| known.contains(n))
                .ok_or_else(|| {
                    format!("unknown argument {arg:?} (flags: --{})", known.join(", --"))
                })?;
            let value = args
                .next()
                .ok_or_else(|| format!("--{name} needs a value"))?;
            map.insert(name.to_string(), value);
        }
        Ok(Flags(map))
    }

    /// The value of `--name`, or `default`.
    pub fn get<'a>(&'a self, name: &str, default: &'a str) -> &'a str {
        self.0.get(name).map_or(default, String::as_str)
    }
}

/// One bench run as `compare.sh` records it: one JSON object per line,
/// `{"server": NAME, "scenario": NAME, "round": N, "result": <sockpool bench --json>}`.
#[derive(Debug, Clone)]
pub struct Run {
    pub server: String,
    pub scenario: String,
    pub result: serde_json::Value,
}

impl Run {
    /// A number from the bench result, by JSON pointer (`/msgs_per_s`).
    pub fn number(&self, pointer: &str) -> Option<f64> {
        self.result
            .pointer(pointer)
            .and_then(serde_json::Value::as_f64)
    }
}

/// Reads a results file; lines that are not run records are reported, not skipped.
pub fn read_runs(path: &str) -> Result<Vec<Run>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let mut runs = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("{path}:{}: {e}", n + 1))?;
        let field = |name: &str| {
            value
                .get(name)
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .ok_or_else(|| format!("{path}:{}: no string field {name:?}", n + 1))
        };
        runs.push(Run {
            server: field("server")?,
            scenario: field("scenario")?,
            result: value
                .get("result")
                .cloned()
                .unwrap_or(serde_json::Value::Null),
        });
    }
    Ok(runs)
}

/// The median of the values (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// Median of `pointer` over the runs of `server` in `scenario`.
pub fn median_of(runs: &[Run], server: &str, scenario: &str, pointer: &str) -> Option<f64> {
    let values: Vec<f64> = runs
        .iter()
        .filter(|r| r.server == server && r.scenario == scenario)
        .filter_map(|r| r.number(pointer))
        .collect();
    median(&values)
}

/// Smallest and largest value of a field over every run of one server in one scenario.
pub fn range_of(runs: &[Run], server: &str, scenario: &str, pointer: &str) -> Option<(f64, f64)> {
    runs.iter()
        .filter(|r| r.server == server && r.scenario == scenario)
        .filter_map(|r| r.number(pointer))
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
}

/// Server names in order of first appearance.
pub fn servers(runs: &[Run]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in runs {
        if !out.contains(&r.server) {
            out.push(r.server.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_handles_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN]), None);
    }
}

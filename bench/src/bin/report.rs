//! `report RESULTS.jsonl`: the Markdown comparison table, medians over rounds.
//!
//! One row per scenario and server. The ratio columns compare sockpool with that row's
//! server in the same scenario: above 1 means sockpool moved more messages per second,
//! or spent more server CPU per message. The `mem-base`/`mem-hold` pair becomes a
//! memory table: RSS with the held idle connections minus without, per connection.

use std::process::ExitCode;

use sockpool_bench::{median_of, range_of, read_runs, servers, Run};

/// The server every other one is compared with.
const SUBJECT: &str = "sockpool";

fn cell(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "–".to_string(), |v| format!("{v:.digits$}"))
}

/// `median (min–max)`: the spread over the rounds, since single runs here vary.
fn spread(median: Option<f64>, range: Option<(f64, f64)>, digits: usize) -> String {
    match (median, range) {
        (Some(m), Some((lo, hi))) if hi > lo => {
            format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
        }
        _ => cell(median, digits),
    }
}

fn percent(share: Option<f64>) -> String {
    share.map_or_else(|| "–".to_string(), |u| format!("{:.0}%", u * 100.0))
}

fn ratio(ours: Option<f64>, theirs: Option<f64>) -> String {
    match (ours, theirs) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "–".to_string(),
    }
}

fn table(runs: &[Run]) -> String {
    let mut scenarios: Vec<&str> = Vec::new();
    for r in runs {
        if !scenarios.contains(&r.scenario.as_str()) && !r.scenario.starts_with("mem-") {
            scenarios.push(&r.scenario);
        }
    }
    let mut out = String::new();
    out.push_str("| scenario | server | msgs/s median (min–max) | MB/s | p99 µs | server CPU µs/msg median (min–max) | server CPU use | bench CPU use | sockpool ÷ this, msgs/s | sockpool ÷ this, CPU/msg | runs |\n");
    out.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for scenario in scenarios {
        for server in servers(runs) {
            let n = runs
                .iter()
                .filter(|r| r.server == server && r.scenario == scenario)
                .count();
            if n == 0 {
                continue;
            }
            let m = |p: &str| median_of(runs, &server, scenario, p);
            let r = |p: &str| range_of(runs, &server, scenario, p);
            let ours = |p: &str| median_of(runs, SUBJECT, scenario, p);
            let (rate_ratio, cpu_ratio) = if server == SUBJECT {
                ("–".to_string(), "–".to_string())
            } else {
                (
                    ratio(ours("/msgs_per_s"), m("/msgs_per_s")),
                    ratio(ours("/server/cpu_us_per_msg"), m("/server/cpu_us_per_msg")),
                )
            };
            out.push_str(&format!(
                "| {scenario} | {server} | {} | {} | {} | {} | {} | {} | {rate_ratio} | {cpu_ratio} | {n} |\n",
                spread(m("/msgs_per_s"), r("/msgs_per_s"), 0),
                cell(m("/mb_per_s"), 1),
                cell(m("/latency_us/p99"), 0),
                spread(m("/server/cpu_us_per_msg"), r("/server/cpu_us_per_msg"), 2),
                percent(m("/server/cpu_util")),
                percent(m("/client/cpu_util")),
            ));
        }
    }
    out
}

fn memory_table(runs: &[Run]) -> Option<String> {
    let hold = runs
        .iter()
        .find(|r| r.scenario == "mem-hold")
        .and_then(|r| r.number("/hold"))
        .filter(|h| *h > 0.0)?;
    let mut out = format!(
        "| server | RSS without, MiB | RSS with {hold:.0} idle, MiB | bytes per idle connection | sockpool ÷ this |\n|---|---:|---:|---:|---:|\n"
    );
    let per_conn = |server: &str| {
        let with = median_of(runs, server, "mem-hold", "/server/rss_bytes")?;
        let without = median_of(runs, server, "mem-base", "/server/rss_bytes")?;
        Some((without, with, (with - without) / hold))
    };
    let ours = per_conn(SUBJECT).map(|p| p.2);
    for server in servers(runs) {
        let Some((without, with, per)) = per_conn(&server) else {
            continue;
        };
        let r = if server == SUBJECT {
            "–".to_string()
        } else {
            ratio(ours, Some(per))
        };
        out.push_str(&format!(
            "| {server} | {:.1} | {:.1} | {per:.0} | {r} |\n",
            without / 1_048_576.0,
            with / 1_048_576.0
        ));
    }
    Some(out)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input] = args.as_slice() else {
        eprintln!("usage: report RESULTS.jsonl");
        return ExitCode::from(2);
    };
    let runs = match read_runs(input) {
        Ok(r) if !r.is_empty() => r,
        Ok(_) => {
            eprintln!("report: {input} holds no runs");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("report: {e}");
            return ExitCode::FAILURE;
        }
    };
    print!("{}", table(&runs));
    if let Some(memory) = memory_table(&runs) {
        println!("\nMemory (server RSS, idle connections held during a 1-connection echo run):\n");
        print!("{memory}");
    }
    ExitCode::SUCCESS
}

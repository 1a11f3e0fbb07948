//! The shipped operations files, checked with the real tools where they exist here:
//! promtool for `config/prometheus/` (config, rules, rule unit tests, and every dashboard
//! expression compiled as PromQL), systemd-analyze for `config/systemd/sockpool.service`.
//! Grafana cannot run on this machine, so `dashboards/sockpool.json` is held to the rules
//! that make it import through the UI and provision from a file alike.
//!
//! A missing promtool or systemd-analyze skips its test with a note, except under
//! `CI=true`: `.ci/run` installs Debian's `prometheus` and `systemd`, so there a missing
//! tool is a failure, never a silent pass.

mod common;

use common::repo_file;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

// ------------------------------------------------------------------------ helpers

fn read(rel: &str) -> String {
    let path = repo_file(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn have(tool: &str) -> bool {
    common::have_tool(tool, "prometheus systemd")
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

use common::assert_success;

// ------------------------------------------------------------------------ PromQL scanning

/// One `name{matchers}` selector found in a PromQL expression.
#[derive(Debug)]
struct Selector {
    name: String,
    matchers: String,
}

/// What a small scan of a PromQL expression finds: metric selectors, range durations,
/// `by (...)` label lists and bare identifiers followed by neither `{` nor `(`. It skips
/// string literals; it is no parser, promtool is (see `dashboard_exprs_compile`).
#[derive(Debug, Default)]
struct Scan {
    selectors: Vec<Selector>,
    ranges: Vec<String>,
    grouping_labels: Vec<String>,
    bare_names: Vec<String>,
}

/// The end (exclusive) of the bracketed text opening at `open`, skipping quoted strings.
fn closing(s: &[u8], open: usize, close: u8) -> Option<usize> {
    let mut i = open + 1;
    while i < s.len() {
        match s[i] {
            b'"' | b'\'' => i = skip_string(s, i),
            c if c == close => return Some(i),
            _ => i += 1,
        }
    }
    None
}

fn skip_string(s: &[u8], start: usize) -> usize {
    let quote = s[start];
    let mut i = start + 1;
    while i < s.len() && s[i] != quote {
        i += if s[i] == b'\\' { 2 } else { 1 };
    }
    i + 1
}

/// Whether `rest` opens with `by (` or `without (`: the word before it is an aggregation
/// such as `sum`, not a metric name.
fn grouped(rest: &str) -> bool {
    ["by", "without"].iter().any(|kw| {
        rest.strip_prefix(kw)
            .is_some_and(|after| after.trim_start().starts_with('('))
    })
}

fn scan(expr: &str) -> Scan {
    const KEYWORDS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
    ];
    let s = expr.as_bytes();
    let mut out = Scan::default();
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        if c == b'"' || c == b'\'' {
            i = skip_string(s, i);
        } else if c == b'[' {
            let end = closing(s, i, b']').unwrap_or(s.len());
            out.ranges.push(expr[i + 1..end.min(s.len())].to_string());
            i = end + 1;
        } else if c.is_ascii_alphabetic() || c == b'_' || c == b':' {
            let start = i;
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'_' || s[i] == b':') {
                i += 1;
            }
            let word = &expr[start..i];
            let mut j = i;
            while j < s.len() && s[j] == b' ' {
                j += 1;
            }
            let next = s.get(j).copied();
            if word == "by" || word == "without" {
                if next == Some(b'(') {
                    let end = closing(s, j, b')').unwrap_or(s.len());
                    out.grouping_labels.extend(
                        expr[j + 1..end.min(s.len())]
                            .split(',')
                            .map(|l| l.trim().to_string()),
                    );
                    i = end + 1;
                }
            } else if next == Some(b'{') {
                let end = closing(s, j, b'}').unwrap_or(s.len());
                out.selectors.push(Selector {
                    name: word.to_string(),
                    matchers: expr[j + 1..end.min(s.len())].to_string(),
                });
                i = end + 1;
            } else if next != Some(b'(') && !KEYWORDS.contains(&word) && !grouped(&expr[j..]) {
                out.bare_names.push(word.to_string());
            }
        } else if c.is_ascii_digit() {
            // Numbers (0.99, 1e3) are not names.
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'.') {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn promql_scan_finds_selectors_ranges_and_labels() {
    let s = scan(
        r#"sum by (le, instance) (rate(a_total{job=~"$job", x="}"}[$__rate_interval])) / b or 0.99"#,
    );
    assert_eq!(s.selectors.len(), 1);
    assert_eq!(s.selectors[0].name, "a_total");
    assert_eq!(s.selectors[0].matchers, r#"job=~"$job", x="}""#);
    assert_eq!(s.ranges, ["$__rate_interval"]);
    assert_eq!(s.grouping_labels, ["le", "instance"]);
    assert_eq!(s.bare_names, ["b"]);
}

// ------------------------------------------------------------------------ Prometheus files

#[test]
fn promtool_check_config_accepts_prometheus_yml() {
    if !have("promtool") {
        return;
    }
    let out = run(Command::new("promtool")
        .args(["check", "config"])
        .arg(repo_file("config/prometheus/prometheus.yml")));
    assert_success(
        "promtool check config config/prometheus/prometheus.yml",
        &out,
    );
}

#[test]
fn promtool_check_rules_accepts_alerts_yml() {
    if !have("promtool") {
        return;
    }
    let out = run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo_file("config/prometheus/alerts.yml")));
    assert_success("promtool check rules config/prometheus/alerts.yml", &out);
}

#[test]
fn promtool_test_rules_passes_alerts_test_yml() {
    if !have("promtool") {
        return;
    }
    let out = run(Command::new("promtool")
        .args(["test", "rules", "alerts_test.yml"])
        .current_dir(repo_file("config/prometheus")));
    assert_success(
        "promtool test rules config/prometheus/alerts_test.yml",
        &out,
    );
}

/// The alerts, in file order, as (name, the lines of its rule).
fn alert_blocks() -> Vec<(String, String)> {
    let text = read("config/prometheus/alerts.yml");
    let mut blocks: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.trim().strip_prefix("- alert:") {
            blocks.push((name.trim().to_string(), String::new()));
        } else if let Some((_, body)) = blocks.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    blocks
}

use common::ALERTS;

#[test]
fn alerts_are_named_labelled_and_annotated() {
    let blocks = alert_blocks();
    let names: Vec<&str> = blocks.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names, ALERTS,
        "alerts.yml should hold exactly these alerts, in this order"
    );
    for (name, body) in &blocks {
        let camel = name.strip_prefix("Sockpool").is_some_and(|rest| {
            rest.starts_with(|c: char| c.is_ascii_uppercase())
                && rest.chars().all(|c| c.is_ascii_alphanumeric())
        });
        assert!(
            camel,
            "{name}: alert names are CamelCase with the Sockpool prefix"
        );
        let severity = body
            .lines()
            .find_map(|l| l.trim().strip_prefix("severity:"))
            .map(str::trim);
        assert!(
            matches!(severity, Some("critical" | "warning")),
            "{name}: needs a severity label of critical or warning, has {severity:?}"
        );
        for key in ["expr:", "for:", "summary:", "description:"] {
            assert!(
                body.lines().any(|l| l.trim().starts_with(key)),
                "{name}: missing `{key}`"
            );
        }
        assert!(
            body.contains(r#"job="sockpool""#),
            "{name}: every rule selects job=\"sockpool\""
        );
    }
}

/// Each alert needs a test where it fires and one where it must stay quiet; promtool
/// alone would pass a file that only ever expects silence.
#[test]
fn every_alert_has_a_firing_and_a_quiet_test() {
    let text = read("config/prometheus/alerts_test.yml");
    let mut fires: BTreeSet<String> = BTreeSet::new();
    let mut quiet: BTreeSet<String> = BTreeSet::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line.trim().strip_prefix("alertname:") else {
            continue;
        };
        let name = name.trim().to_string();
        let expectation = lines[i + 1..]
            .iter()
            .map(|l| l.trim())
            .find(|l| l.starts_with("exp_alerts:"));
        match expectation {
            Some("exp_alerts: []") => quiet.insert(name),
            Some(_) => {
                let labels_follow = lines
                    .get(i + 2..)
                    .is_some_and(|rest| rest.iter().take(3).any(|l| l.trim() == "- exp_labels:"));
                assert!(
                    labels_follow,
                    "alerts_test.yml: {name} expects alerts but lists no exp_labels"
                );
                fires.insert(name)
            }
            None => panic!("alerts_test.yml: the {name} check has no exp_alerts"),
        };
    }
    for alert in ALERTS {
        assert!(
            fires.contains(*alert),
            "alerts_test.yml never proves that {alert} fires"
        );
        assert!(
            quiet.contains(*alert),
            "alerts_test.yml never proves that {alert} stays quiet"
        );
    }
}

#[test]
fn prometheus_yml_scrapes_the_sockpool_job_and_loads_the_alerts() {
    let text = read("config/prometheus/prometheus.yml");
    assert!(
        text.contains("- job_name: sockpool"),
        "prometheus.yml needs a scrape job named sockpool"
    );
    assert!(
        text.contains(r#"targets: ["127.0.0.1:20001"]"#),
        "the target is the default metrics address"
    );
    assert!(
        text.contains("  - alerts.yml"),
        "prometheus.yml loads alerts.yml from beside it"
    );
}

// ------------------------------------------------------------------------ dashboard

fn dashboard() -> Value {
    let text = read("dashboards/sockpool.json");
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("dashboards/sockpool.json is not JSON: {e}"))
}

fn panels(d: &Value) -> &Vec<Value> {
    d["panels"]
        .as_array()
        .expect("the dashboard has a panels array")
}

fn is_row(p: &Value) -> bool {
    p["type"] == "row"
}

fn title(p: &Value) -> &str {
    p["title"].as_str().unwrap_or("")
}

/// Every (panel title, target) pair of the non-row panels.
fn targets(d: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for p in panels(d).iter().filter(|p| !is_row(p)) {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((title(p).to_string(), t.clone()));
        }
    }
    out
}

/// Every metric of DESIGN.md's table, as the names a query selects (the histogram by
/// its three series).
const METRICS: &[&str] = &[
    "sockpool_build_info",
    "sockpool_connections_accepted_total",
    "sockpool_connections_rejected_total",
    "sockpool_connections_closed_total",
    "sockpool_connections_active",
    "sockpool_connections_max",
    "sockpool_reset_errors_total",
    "sockpool_accept_errors_total",
    "sockpool_received_bytes_total",
    "sockpool_sent_bytes_total",
    "sockpool_messages_total",
    "sockpool_connection_duration_seconds_bucket",
    "sockpool_connection_duration_seconds_sum",
    "sockpool_connection_duration_seconds_count",
    "sockpool_workers",
    "sockpool_worker_connections",
    "sockpool_worker_busy_seconds_total",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_threads",
    "process_start_time_seconds",
];

/// What the Fleet row selects besides sockpool's own metrics: Prometheus's `up`, and
/// HAProxy's exporter for readiness (sockpool exports no readiness metric).
const FLEET_METRICS: &[&str] = &["up", "haproxy_server_status"];

/// The rows, the fleet first, then RED then USE, and the panels each holds, in order.
const ROWS: &[(&str, &[&str])] = &[
    (
        "Fleet",
        &[
            "Instances up",
            "Instances not ready",
            "Restarts",
            "Fleet messages/s",
            "Fleet connections",
            "Share by instance",
        ],
    ),
    (
        "Traffic",
        &[
            "Connections accepted/s",
            "Messages/s",
            "Bytes in/out per second",
        ],
    ),
    (
        "Errors",
        &[
            "Reset errors/s",
            "Closes by reason",
            "Rejections by reason",
            "Accept errors/s",
        ],
    ),
    (
        "Duration",
        &[
            "Connection duration p50/p90/p99",
            "Mean connection duration",
        ],
    ),
    (
        "Saturation",
        &[
            "Active connections vs limit",
            "Connection limit used",
            "Worker utilization",
            "Connections per worker",
        ],
    ),
    (
        "Process",
        &[
            "CPU",
            "Resident memory",
            "Open fds vs max fds",
            "Threads",
            "Build info",
            "Uptime",
        ],
    ),
];

/// Panels whose point is to set metrics side by side, and the metrics each must show.
const PANEL_METRICS: &[(&str, &[&str])] = &[
    ("Instances up", &["up"]),
    ("Instances not ready", &["haproxy_server_status"]),
    ("Restarts", &["process_start_time_seconds"]),
    ("Fleet messages/s", &["sockpool_messages_total"]),
    (
        "Fleet connections",
        &[
            "sockpool_connections_active",
            "sockpool_connections_max",
            "sockpool_connections_accepted_total",
        ],
    ),
    (
        "Share by instance",
        &[
            "sockpool_messages_total",
            "sockpool_connections_accepted_total",
        ],
    ),
    (
        "Bytes in/out per second",
        &["sockpool_received_bytes_total", "sockpool_sent_bytes_total"],
    ),
    (
        "Active connections vs limit",
        &["sockpool_connections_active", "sockpool_connections_max"],
    ),
    (
        "Worker utilization",
        &["sockpool_worker_busy_seconds_total"],
    ),
    ("Connections per worker", &["sockpool_worker_connections"]),
    (
        "Open fds vs max fds",
        &["process_open_fds", "process_max_fds"],
    ),
    (
        "Connection duration p50/p90/p99",
        &["sockpool_connection_duration_seconds_bucket"],
    ),
    ("Build info", &["sockpool_build_info"]),
];

#[test]
fn dashboard_imports_through_the_ui_and_provisions_from_a_file() {
    let d = dashboard();
    let inputs = d["__inputs"]
        .as_array()
        .expect("__inputs for the import UI");
    assert!(
        inputs.iter().any(|i| i["name"] == "DS_PROMETHEUS"
            && i["type"] == "datasource"
            && i["pluginId"] == "prometheus"),
        "__inputs must offer DS_PROMETHEUS, a prometheus data source"
    );
    // Provisioning loads the JSON as it is: an `id` would clash, a uid keeps links stable.
    assert!(d["id"].is_null(), "a shareable dashboard has id null");
    assert!(
        d["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty() && u.len() <= 40),
        "uid: 1 to 40 characters"
    );
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion 36+ (data source refs by uid)"
    );

    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("template variable `{name}` is missing"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    // The one place DS_PROMETHEUS may appear: the import UI fills it in, provisioning
    // leaves it and Grafana falls back to the default Prometheus.
    let text = serde_json::to_string(&d).expect("re-serialise");
    assert_eq!(
        text.matches("${DS_PROMETHEUS}").count(),
        2,
        "DS_PROMETHEUS only in datasource.current"
    );
    assert_eq!(ds["current"]["value"], "${DS_PROMETHEUS}");

    for (name, query) in [
        ("job", "label_values(sockpool_build_info, job)"),
        (
            "instance",
            r#"label_values(sockpool_build_info{job=~"$job"}, instance)"#,
        ),
    ] {
        let v = var(name);
        assert_eq!(v["type"], "query", "{name}");
        assert_eq!(v["query"], query, "{name}");
        assert_eq!(
            v["datasource"]["uid"], "${datasource}",
            "{name} queries through ${{datasource}}"
        );
        assert_eq!(v["includeAll"], true, "{name} offers All");
        // With allValue `.*`, "All" would also match process_* series of other jobs.
        assert!(
            v.get("allValue").is_none() || v["allValue"].is_null(),
            "{name}: All must list the sockpool values"
        );
    }
}

#[test]
fn dashboard_rows_go_red_then_use() {
    let d = dashboard();
    let mut seen: Vec<(String, Vec<String>)> = Vec::new();
    for p in panels(&d) {
        if is_row(p) {
            assert_eq!(
                p["collapsed"],
                false,
                "row {}: collapsed rows hide their panels elsewhere",
                title(p)
            );
            seen.push((title(p).to_string(), Vec::new()));
        } else {
            let (_, row) = seen
                .last_mut()
                .unwrap_or_else(|| panic!("panel {} comes before any row", title(p)));
            row.push(title(p).to_string());
        }
    }
    let want: Vec<(String, Vec<String>)> = ROWS
        .iter()
        .map(|(r, ps)| (r.to_string(), ps.iter().map(|p| p.to_string()).collect()))
        .collect();
    assert_eq!(seen, want);

    // Grafana lays panels out by gridPos, not array order: each row's panels sit below
    // it and above the next row.
    let mut row_y = -1i64;
    let mut last_y = -1i64;
    for p in panels(&d) {
        let y = p["gridPos"]["y"].as_i64().expect("gridPos.y");
        if is_row(p) {
            assert!(y > last_y, "row {} overlaps the panels above it", title(p));
            row_y = y;
        } else {
            assert!(y > row_y, "panel {} is not below its row", title(p));
        }
        last_y = last_y.max(y);
    }
}

#[test]
fn dashboard_panels_have_title_unit_description_and_datasource() {
    let d = dashboard();
    let mut ids = BTreeSet::new();
    for p in panels(&d) {
        let id = p["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("panel {} has no numeric id", title(p)));
        assert!(ids.insert(id), "panel id {id} is used twice");
        if is_row(p) {
            continue;
        }
        let t = title(p);
        assert!(!t.is_empty(), "panel {id} has no title");
        assert!(
            ["timeseries", "stat", "table", "gauge"].contains(&p["type"].as_str().unwrap_or("")),
            "{t}: type"
        );
        let desc = p["description"].as_str().unwrap_or("");
        assert!(
            !desc.is_empty() && !desc.contains('\n'),
            "{t}: needs a one-line description"
        );
        let unit = p["fieldConfig"]["defaults"]["unit"].as_str().unwrap_or("");
        assert!(!unit.is_empty(), "{t}: needs fieldConfig.defaults.unit");
        assert_eq!(p["datasource"]["type"], "prometheus", "{t}");
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "{t}: panels use the datasource variable"
        );
        let ts = p["targets"].as_array().filter(|a| !a.is_empty());
        let ts = ts.unwrap_or_else(|| panic!("{t}: no targets"));
        let mut refs = BTreeSet::new();
        for target in ts {
            assert_eq!(
                target["datasource"]["uid"], "${datasource}",
                "{t}: targets use the datasource variable"
            );
            assert!(
                refs.insert(target["refId"].as_str().unwrap_or("").to_string()),
                "{t}: refIds must be unique"
            );
            assert!(
                target["expr"]
                    .as_str()
                    .is_some_and(|e| !e.trim().is_empty()),
                "{t}: empty expr"
            );
        }
    }
}

#[test]
fn dashboard_queries_are_filtered_by_job_and_instance() {
    let d = dashboard();
    let known: BTreeSet<&str> = METRICS.iter().chain(FLEET_METRICS).copied().collect();
    let labels: BTreeSet<&str> = [
        "instance", "job", "le", "reason", "server", "version", "worker",
    ]
    .into();
    for (panel, target) in targets(&d) {
        let expr = target["expr"].as_str().unwrap_or("");
        let s = scan(expr);
        assert!(!s.selectors.is_empty(), "{panel}: {expr} selects no metric");
        for sel in &s.selectors {
            assert!(
                known.contains(sel.name.as_str()),
                "{panel}: {} is not a sockpool metric",
                sel.name
            );
            // HAProxy's series carry HAProxy's job and instance; they are selected by the
            // backend name of config/haproxy/haproxy.cfg instead.
            let wanted: &[&str] = if sel.name.starts_with("haproxy_") {
                &[r#"proxy="sockpool""#]
            } else {
                &[r#"job=~"$job""#, r#"instance=~"$instance""#]
            };
            for m in wanted {
                assert!(
                    sel.matchers.contains(m),
                    "{panel}: {}{{{}}} lacks {m}",
                    sel.name,
                    sel.matchers
                );
            }
        }
        assert!(
            s.bare_names.is_empty(),
            "{panel}: unfiltered names {:?} in {expr}",
            s.bare_names
        );
        for r in &s.ranges {
            assert_eq!(
                r, "$__rate_interval",
                "{panel}: rates use [$__rate_interval]"
            );
        }
        for l in &s.grouping_labels {
            assert!(
                labels.contains(l.as_str()),
                "{panel}: groups by unknown label {l}"
            );
        }
        // Only the three variables exist; a typo would reach Prometheus as `$jbo`.
        let rest = expr
            .replace("$__rate_interval", "")
            .replace("$job", "")
            .replace("$instance", "");
        assert!(!rest.contains('$'), "{panel}: unknown variable in {expr}");
    }
}

#[test]
fn dashboard_shows_every_metric_where_it_belongs() {
    let d = dashboard();
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (panel, target) in targets(&d) {
        for sel in scan(target["expr"].as_str().unwrap_or("")).selectors {
            used.entry(sel.name).or_default().insert(panel.clone());
        }
    }
    for m in METRICS {
        assert!(used.contains_key(*m), "no panel shows {m}");
    }
    for (panel, metrics) in PANEL_METRICS {
        for m in *metrics {
            assert!(
                used.get(*m).is_some_and(|ps| ps.contains(*panel)),
                "panel {panel} should show {m}"
            );
        }
    }
    let quantiles: Vec<String> = targets(&d)
        .into_iter()
        .filter(|(p, _)| p == "Connection duration p50/p90/p99")
        .map(|(_, t)| t["expr"].as_str().unwrap_or("").to_string())
        .collect();
    for q in [
        "histogram_quantile(0.5,",
        "histogram_quantile(0.9,",
        "histogram_quantile(0.99,",
    ] {
        assert!(
            quantiles
                .iter()
                .any(|e| e.starts_with(q) && e.contains("by (le)")),
            "duration panel lacks {q}"
        );
    }
}

#[test]
fn dashboard_layout_fits_the_grid_without_overlaps() {
    let d = dashboard();
    let mut cells: BTreeMap<(i64, i64), String> = BTreeMap::new();
    for p in panels(&d) {
        let g = &p["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| g[k].as_i64().unwrap_or(-1));
        assert!(
            x >= 0 && y >= 0 && w > 0 && h > 0 && x + w <= 24,
            "{}: bad gridPos {g}",
            title(p)
        );
        for cx in x..x + w {
            for cy in y..y + h {
                if let Some(other) = cells.insert((cx, cy), title(p).to_string()) {
                    panic!("panels {other} and {} overlap at ({cx}, {cy})", title(p));
                }
            }
        }
    }
}

/// promtool compiles every dashboard expression, with the variables filled in as
/// Grafana would, by loading them as recording rules: a PromQL syntax error fails here
/// without a running Prometheus.
#[test]
fn dashboard_exprs_compile() {
    if !have("promtool") {
        return;
    }
    let d = dashboard();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let all = targets(&d);
    for (i, (_, t)) in all.iter().enumerate() {
        let expr = t["expr"]
            .as_str()
            .unwrap_or("")
            .replace("$__rate_interval", "1m")
            .replace("$job", "sockpool")
            .replace("$instance", "127.0.0.1:20001");
        let quoted = serde_json::to_string(&expr).expect("quote");
        rules.push_str(&format!(
            "      - record: dashboard_expr_{i}\n        expr: {quoted}\n"
        ));
    }
    let path = dir.path().join("dashboard_rules.yml");
    std::fs::write(&path, rules).expect("write rules");
    let out = run(Command::new("promtool").args(["check", "rules"]).arg(&path));
    assert_success("promtool check rules on the dashboard expressions", &out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("{} rules found", all.len())),
        "promtool saw: {stdout}"
    );
}

// ------------------------------------------------------------------------ systemd

const UNIT: &str = "config/systemd/sockpool.service";
const SOCKET_UNIT: &str = "config/systemd/sockpool.socket";

/// `Key=value` settings of the unit, every value of a repeated key in order.
fn unit_settings() -> BTreeMap<String, Vec<String>> {
    settings_of(UNIT)
}

/// `Key=value` settings of a unit file, every value of a repeated key in order.
fn settings_of(unit: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in read(unit).lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.entry(k.trim().to_string())
                .or_default()
                .push(v.trim().to_string());
        }
    }
    out
}

/// The unit with ExecStart pointing at the binary cargo built, since systemd-analyze
/// verify rejects a unit whose binary does not exist (it is not installed here).
fn unit_for_this_build(dir: &Path) -> PathBuf {
    let text = read(UNIT);
    let bin = env!("CARGO_BIN_EXE_sockpool");
    assert_eq!(
        text.matches("ExecStart=/usr/local/bin/sockpool ").count(),
        1,
        "one ExecStart of the installed binary"
    );
    let path = dir.join("sockpool.service");
    std::fs::write(
        &path,
        text.replace(
            "ExecStart=/usr/local/bin/sockpool ",
            &format!("ExecStart={bin} "),
        ),
    )
    .expect("write unit");
    path
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    if !have("systemd-analyze") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let unit = unit_for_this_build(dir.path());
    let out = run(Command::new("systemd-analyze").arg("verify").arg(&unit));
    assert_success("systemd-analyze verify", &out);
    // verify exits 0 on an unknown key or a bad value and only warns, naming the unit
    // file; so any line about our unit is a failure. Lines about other units of this
    // machine are not ours to judge.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("sockpool")).collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify warns about the unit:\n{}",
        ours.join("\n")
    );
}

#[test]
fn systemd_analyze_verify_accepts_the_socket_unit_with_its_service() {
    if !have("systemd-analyze") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let service = unit_for_this_build(dir.path());
    let socket = dir.path().join("sockpool.socket");
    std::fs::write(&socket, read(SOCKET_UNIT)).expect("write socket unit");
    let out = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(&socket)
        .arg(&service));
    assert_success("systemd-analyze verify", &out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("sockpool")).collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify warns about the units:\n{}",
        ours.join("\n")
    );
}

/// The socket unit hands sockpool.service (same name) its data socket first and
/// its metrics socket second, at the addresses, backlog and TCP_NODELAY of the
/// default config, unnamed (so sockpool takes fd 3 as data and fd 4 as metrics).
#[test]
fn socket_unit_matches_the_default_config() {
    let s = settings_of(SOCKET_UNIT);
    let defaults = default_config();
    let get = |table: &str, key: &str| defaults[table][key].clone();
    let listen: Vec<String> = s.get("ListenStream").cloned().unwrap_or_default();
    assert_eq!(
        listen,
        [
            get("server", "listen").as_str().unwrap().to_string(),
            get("metrics", "listen").as_str().unwrap().to_string()
        ],
        "{SOCKET_UNIT}: ListenStream= data first, then metrics"
    );
    assert_eq!(
        s.get("Backlog").map(|v| v.join(",")),
        Some(get("server", "backlog").as_integer().unwrap().to_string())
    );
    assert_eq!(
        s.get("NoDelay").map(|v| v.join(",")),
        Some(get("server", "tcp_nodelay").as_bool().unwrap().to_string())
    );
    for k in ["FileDescriptorName", "Service", "Accept"] {
        assert!(
            !s.contains_key(k),
            "{SOCKET_UNIT}: no {k}= (see its comment)"
        );
    }
}

/// `sockpool print-default-config`, parsed.
fn default_config() -> toml::Table {
    let out = run(Command::new(env!("CARGO_BIN_EXE_sockpool")).arg("print-default-config"));
    assert_success("sockpool print-default-config", &out);
    String::from_utf8_lossy(&out.stdout)
        .parse()
        .unwrap_or_else(|e| panic!("print-default-config is not TOML: {e}"))
}

#[test]
fn systemd_analyze_security_rates_the_unit_ok() {
    if !have("systemd-analyze") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let unit = unit_for_this_build(dir.path());
    // --threshold is the exposure level times ten: fail above 2.0 ("OK" runs to 3.9).
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=20", "--no-pager"])
        .arg(&unit));
    assert_success("systemd-analyze security --threshold=20", &out);
}

/// A systemd time span or sockpool duration (`20s`, `500ms`, `5m`, `1min`, bare
/// seconds) in seconds.
fn seconds(span: &str) -> f64 {
    let span = span.trim().trim_matches('"');
    let split = span
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(span.len());
    let (n, unit) = span.split_at(split);
    let n: f64 = n
        .parse()
        .unwrap_or_else(|e| panic!("bad duration {span:?}: {e}"));
    n * match unit.trim() {
        "" | "s" | "sec" => 1.0,
        "ms" | "msec" => 0.001,
        "m" | "min" => 60.0,
        "h" | "hr" => 3600.0,
        other => panic!("unknown duration unit {other:?} in {span:?}"),
    }
}

#[test]
fn systemd_unit_runs_hardened_with_limits_matched_to_the_server() {
    let s = unit_settings();
    let one = |k: &str| -> &str {
        match s.get(k).map(Vec::as_slice) {
            Some([v]) => v,
            other => panic!("{UNIT}: expected one {k}=, found {other:?}"),
        }
    };
    // sockpool sends READY=1 from its main process once it serves (tests/notify.rs).
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("NotifyAccess"), "main");
    assert_eq!(
        one("ExecStart"),
        "/usr/local/bin/sockpool serve --config /etc/sockpool/sockpool.toml"
    );
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("DynamicUser"), "yes");
    assert_eq!(one("ConfigurationDirectory"), "sockpool");
    for (k, v) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateDevices", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert_eq!(one(k), v, "{UNIT}: {k}");
    }
    assert_eq!(
        s.get("SystemCallFilter")
            .and_then(|v| v.first())
            .map(String::as_str),
        Some("@system-service")
    );
    assert!(
        !s.contains_key("ExecReload"),
        "SIGHUP is ignored, so there is nothing to reload"
    );

    // The limits must fit the server's own defaults, read from the binary itself.
    let out = run(Command::new(env!("CARGO_BIN_EXE_sockpool")).arg("print-default-config"));
    assert_success("sockpool print-default-config", &out);
    let defaults: toml::Table = String::from_utf8_lossy(&out.stdout)
        .parse()
        .unwrap_or_else(|e| panic!("print-default-config is not TOML: {e}"));
    let key = |table: &str, key: &str| {
        defaults
            .get(table)
            .and_then(|t| t.get(key))
            .unwrap_or_else(|| panic!("print-default-config has no {table}.{key}"))
            .clone()
    };
    let max_connections = key("server", "max_connections")
        .as_integer()
        .expect("server.max_connections is an integer");
    let shutdown = |k: &str| {
        seconds(
            key("shutdown", k)
                .as_str()
                .unwrap_or_else(|| panic!("shutdown.{k} is a string")),
        )
    };
    let drain = shutdown("drain_delay") + shutdown("grace") + shutdown("metrics_linger");

    let nofile: i64 = one("LimitNOFILE")
        .parse()
        .expect("LimitNOFILE is one number (soft = hard)");
    // Listeners, the sidecar, its clients, logs and the process's own files need fds
    // beyond one per connection; a quarter on top leaves room.
    assert!(
        nofile >= max_connections + max_connections / 4,
        "LimitNOFILE={nofile} leaves too little headroom over max_connections={max_connections}"
    );
    let stop = seconds(one("TimeoutStopSec"));
    assert!(
        stop >= drain + 5.0,
        "TimeoutStopSec={stop}s must exceed shutdown.drain_delay + grace + metrics_linger \
         = {drain}s by a margin"
    );
    assert!(
        Duration::from_secs_f64(stop) < Duration::from_secs(120),
        "a stop should not hang for minutes"
    );
}

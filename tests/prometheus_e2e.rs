//! sockpool scraped by a real Prometheus, end to end.
//!
//! The test starts the real server and Debian's `prometheus` on loopback ports, with the
//! shipped `config/prometheus/prometheus.yml` and `alerts.yml` (only the target and the
//! intervals changed: a 1 s scrape and evaluation). It drives mixed traffic (messages,
//! resets, idle and write timeouts, max_connections rejections), waits until Prometheus
//! has scraped the final counters, then sends **every** expression of every dashboard
//! panel and every alert through Prometheus's HTTP query API:
//!
//! - a dashboard expression fails the test on a query error, on no data, or, where the
//!   test caused the traffic it shows, on a zero;
//! - an alert expression fails it on a query error or a rule that Prometheus reports
//!   unhealthy. Most alerts have no data here by design (their condition is not met), so
//!   each metric selector inside each alert is queried on its own and must have data;
//!   no alert may fire, and the rejections the test caused must put
//!   SockpoolRejectingConnections in `pending`.
//!
//! It also runs `promtool check metrics` on a live scrape, and `promtool check config`,
//! `check rules` and `test rules`. Without Prometheus the test is skipped, except under
//! `CI=true` (where `.ci/run` installs it), where that is a failure.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::prometheus::{patch, Prometheus, Sample, PROM_WAIT};
use common::{repo_file, Server};

/// What `$__rate_interval` becomes: long enough that every rate covers the whole test.
const RATE_INTERVAL: &str = "2m";
/// The server's limit, small so that the test can reach it.
const MAX_CONNECTIONS: usize = 4;
const WORKERS: usize = 2;

fn have(tool: &str) -> bool {
    common::have_tool(tool, "prometheus")
}

use common::assert_success;

// ------------------------------------------------------------------------ Prometheus

/// Starts Prometheus in `dir` on the shipped prometheus.yml and alerts.yml, retargeted
/// at `target` with 1 s intervals.
fn start_prometheus(dir: &Path, target: SocketAddr) -> Prometheus {
    let shipped = std::fs::read_to_string(repo_file("config/prometheus/prometheus.yml"))
        .expect("prometheus.yml");
    let target = target.to_string();
    let config = patch(
        shipped,
        &[
            ("scrape_interval: 15s", "scrape_interval: 1s"),
            ("evaluation_interval: 15s", "evaluation_interval: 1s"),
            ("scrape_timeout: 5s", "scrape_timeout: 1s"),
            ("127.0.0.1:20001", &target),
        ],
    );
    std::fs::write(dir.join("prometheus.yml"), config).expect("write prometheus.yml");
    std::fs::copy(
        repo_file("config/prometheus/alerts.yml"),
        dir.join("alerts.yml"),
    )
    .expect("copy alerts.yml");
    Prometheus::start(&dir.join("prometheus.yml"), dir)
}

// ------------------------------------------------------------------------ traffic

/// Waits until the server has counted every connection closed.
fn wait_idle(server: &Server) {
    server.wait_metric("sockpool_connections_active", |v| v == 0.0);
}

/// Clean sessions: each sends `lines` lines, reads every reply, half-closes and reads to EOF.
fn drive_messages(server: &Server, sessions: usize, lines: usize) {
    for i in 0..sessions {
        let mut s = server.connect();
        let mut want = String::new();
        for j in 0..lines {
            s.write_all(format!("hello {i}.{j}\n").as_bytes())
                .expect("send line");
            want.push_str(&format!("Server received \"hello {i}.{j}\"\n"));
        }
        let mut reader = BufReader::new(s.try_clone().expect("clone"));
        let mut got = String::new();
        for _ in 0..lines {
            let before = got.len();
            reader.read_line(&mut got).expect("read reply");
            assert!(
                got.len() > before,
                "connection closed before every reply came; got {got:?}"
            );
        }
        assert_eq!(got, want, "replies of session {i}");
        s.shutdown(std::net::Shutdown::Write).expect("half-close");
        let rest = common::read_to_eof(&mut s);
        assert!(
            rest.is_empty(),
            "unexpected bytes after the replies: {rest:?}"
        );
    }
}

/// Connections that send a line, read its reply, then reset (SO_LINGER 0).
fn drive_resets(server: &Server, n: usize) {
    for _ in 0..n {
        let mut s = server.connect();
        s.write_all(b"bye\n").expect("send");
        let reply = common::read_exact_bytes(&mut s, "Server received \"bye\"\n".len());
        assert_eq!(reply, b"Server received \"bye\"\n");
        common::reset(s);
    }
}

/// Connections that say nothing until the server's idle timeout closes them.
fn drive_idle_timeouts(server: &Server, n: usize) {
    let conns: Vec<TcpStream> = (0..n).map(|_| server.connect()).collect();
    for mut s in conns {
        let got = common::read_to_eof(&mut s);
        assert!(got.is_empty(), "an idle connection got {got:?}");
    }
}

/// Fills the server to max_connections and opens one more, which must get the busy
/// message. Idle timeouts may free a slot on a slow machine, so it tries a few times.
fn drive_rejection(server: &Server) {
    for _attempt in 0..5 {
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut s = server.connect();
            // A reply proves that a worker owns the connection, so it counts as active.
            s.write_all(b"hold\n").expect("send");
            let reply = common::read_exact_bytes(&mut s, "Server received \"hold\"\n".len());
            assert_eq!(reply, b"Server received \"hold\"\n");
            held.push(s);
        }
        let mut extra = server.connect();
        let got = common::read_to_eof(&mut extra);
        if got == b"ERROR server busy\n" {
            return;
        }
        assert!(got.is_empty(), "the connection over the limit got {got:?}");
        // It was accepted after all (a held one timed out first): try again.
        drop(held);
        wait_idle(server);
    }
    panic!(
        "never saw a max_connections rejection in 5 attempts; log:\n{}",
        server.log()
    );
}

/// A client that sends lines and never reads its replies: once the server's queue for it
/// is full it stops reading (flow control), and after `write_timeout` without write
/// progress it closes the connection as `write_timeout`.
fn drive_write_timeout(server: &Server) {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    // A tiny receive window makes the server's writes stall after a few MiB, not dozens.
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    sock.connect(&server.addr.into()).expect("connect");
    let mut s: TcpStream = sock.into();
    // One answered line first: proof that a worker owns it (rather than a rejection).
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    s.write_all(b"first\n").expect("send");
    let reply = common::read_exact_bytes(&mut s, "Server received \"first\"\n".len());
    assert_eq!(
        reply, b"Server received \"first\"\n",
        "the write-timeout client was not served"
    );
    s.set_write_timeout(Some(Duration::from_millis(200)))
        .expect("write timeout");
    let mut chunk = Vec::with_capacity(64 * 1024);
    while chunk.len() < 64 * 1024 {
        chunk.extend_from_slice(&[b'w'; 1023]);
        chunk.push(b'\n');
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sent = 0usize;
    while Instant::now() < deadline && sent < 256 << 20 {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            // The server closed the connection (EPIPE or ECONNRESET): the point of it all.
            Err(_) => break,
        }
    }
    server.wait_metric(
        "sockpool_connections_closed_total{reason=\"write_timeout\"}",
        |v| v >= 1.0,
    );
}

// ------------------------------------------------------------------------ the test

/// Every dashboard target as (panel title, refId, expr with the variables filled in).
fn dashboard_queries(job: &str, instance: &str) -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(repo_file("dashboards/sockpool.json")).expect("dashboard");
    let d: Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            let raw = t["expr"].as_str().expect("expr");
            // HAProxy's series need a running HAProxy: tests/fleet.rs evaluates those
            // against a real one, with the shipped haproxy.cfg and fleet config.
            if raw.contains("haproxy_") {
                continue;
            }
            let expr = raw
                .replace("$__rate_interval", RATE_INTERVAL)
                .replace("$job", job)
                .replace("$instance", instance);
            let title = p["title"].as_str().expect("title").to_string();
            out.push((title, t["refId"].as_str().expect("refId").to_string(), expr));
        }
    }
    out
}

/// The `name{...}` selectors inside a PromQL expression (string literals skipped).
fn selectors(expr: &str) -> Vec<String> {
    let s = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        if s[i].is_ascii_alphabetic() || s[i] == b'_' {
            let start = i;
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'_' || s[i] == b':') {
                i += 1;
            }
            if s.get(i) == Some(&b'{') {
                let mut j = i + 1;
                let mut quoted = false;
                while j < s.len() && (quoted || s[j] != b'}') {
                    if s[j] == b'"' {
                        quoted = !quoted;
                    } else if s[j] == b'\\' {
                        j += 1;
                    }
                    j += 1;
                }
                out.push(expr[start..(j + 1).min(s.len())].to_string());
                i = j + 1;
            }
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn dashboard_and_alert_queries_work_against_real_prometheus() {
    if !have("prometheus") || !have("promtool") {
        return;
    }
    let max = MAX_CONNECTIONS.to_string();
    let workers = WORKERS.to_string();
    let server = Server::start(&[
        "--workers",
        &workers,
        "--max-connections",
        &max,
        "--framing",
        "line",
        "--idle-timeout",
        "1s",
        "--write-timeout",
        "1s",
    ]);
    let metrics_addr = server.metrics_addr.expect("metrics listener");
    let prom_dir = tempfile::tempdir().expect("temp dir");
    let prom = start_prometheus(prom_dir.path(), metrics_addr);
    let instance = metrics_addr.to_string();
    let up = format!(r#"up{{job="sockpool", instance="{instance}"}}"#);
    prom.wait_for("a first successful scrape", &up, |r| {
        r.iter().any(|s| s.value == 1.0)
    });

    // Each phase starts once the server has counted the previous one's closes, so that
    // no leftover connection takes a slot under max_connections.
    drive_messages(&server, 10, 5);
    drive_resets(&server, 5);
    server.wait_metric("sockpool_connections_closed_total{reason=\"reset\"}", |v| {
        v >= 5.0
    });
    wait_idle(&server);
    drive_idle_timeouts(&server, 2);
    wait_idle(&server);
    drive_rejection(&server);
    wait_idle(&server);
    drive_write_timeout(&server);
    let at_rest = server.assert_counters_add_up(0.0);

    // Prometheus must have scraped the final counters before anything is judged.
    for series in [
        "sockpool_connections_accepted_total",
        "sockpool_messages_total",
        "sockpool_connections_closed_total{reason=\"reset\"}",
        "sockpool_connections_closed_total{reason=\"idle_timeout\"}",
        "sockpool_connections_closed_total{reason=\"write_timeout\"}",
        "sockpool_connections_rejected_total{reason=\"max_connections\"}",
    ] {
        let want = common::metric_value(&at_rest, series)
            .unwrap_or_else(|| panic!("no {series} in the scrape"));
        let (name, labels) = series
            .split_once('{')
            .map_or((series, ""), |(n, l)| (n, l.trim_end_matches('}')));
        let sep = if labels.is_empty() { "" } else { ", " };
        let promql = format!(r#"{name}{{job="sockpool", instance="{instance}"{sep}{labels}}}"#);
        prom.wait_for(&format!("{series} = {want}"), &promql, |r| {
            r.iter().any(|s| s.value == want)
        });
    }

    check_dashboard(&prom, &instance);
    check_alerts(&prom);
    check_promtool(&server, prom_dir.path());
}

fn check_dashboard(prom: &Prometheus, instance: &str) {
    let mut results: BTreeMap<(String, String), Vec<Sample>> = BTreeMap::new();
    let mut failures = Vec::new();
    for (title, ref_id, expr) in dashboard_queries("sockpool", instance) {
        match prom.query(&expr) {
            Ok(r) if r.is_empty() => {
                failures.push(format!("{title} [{ref_id}]: no data for {expr}"))
            }
            Ok(r) => {
                results.insert((title, ref_id), r);
            }
            Err(e) => failures.push(format!("{title} [{ref_id}]: {e} for {expr}")),
        }
    }
    assert!(
        failures.is_empty(),
        "dashboard queries failed:\n{}\n{}",
        failures.join("\n"),
        prom.log()
    );
    eprintln!(
        "dashboard: {} expressions evaluated, every one with data",
        results.len()
    );

    let get = |title: &str, ref_id: &str| -> &Vec<Sample> {
        results
            .get(&(title.to_string(), ref_id.to_string()))
            .unwrap_or_else(|| panic!("the dashboard has no panel {title:?} with target {ref_id}"))
    };
    let positive = |title: &str, ref_id: &str| {
        let r = get(title, ref_id);
        assert!(
            r.iter().all(|s| s.value.is_finite() && s.value > 0.0),
            "{title} [{ref_id}] should be positive after the test's traffic: {r:?}"
        );
    };
    let by_label = |title: &str, label: &str| -> BTreeMap<String, f64> {
        get(title, "A")
            .iter()
            .map(|s| (s.labels.get(label).cloned().unwrap_or_default(), s.value))
            .collect()
    };

    positive("Instances up", "A");
    positive("Fleet messages/s", "A");
    positive("Fleet connections", "C");
    for q in ["A", "B"] {
        let share = get("Share by instance", q);
        assert!(
            share.len() == 1 && share[0].value == 1.0,
            "one instance has the whole share: {share:?}"
        );
    }
    positive("Connections accepted/s", "A");
    positive("Messages/s", "A");
    positive("Bytes in/out per second", "A");
    positive("Bytes in/out per second", "B");
    positive("Reset errors/s", "A");
    for q in ["A", "B", "C"] {
        positive("Connection duration p50/p90/p99", q);
    }
    positive("Mean connection duration", "A");
    positive("CPU", "A");
    positive("Resident memory", "A");
    positive("Open fds vs max fds", "A");
    positive("Open fds vs max fds", "B");
    positive("Threads", "A");
    positive("Uptime", "A");

    let closes = by_label("Closes by reason", "reason");
    let reasons = [
        "client_closed",
        "reset",
        "idle_timeout",
        "write_timeout",
        "protocol_error",
        "io_error",
        "server_shutdown",
    ];
    assert_eq!(
        closes.keys().map(String::as_str).collect::<Vec<_>>().len(),
        reasons.len(),
        "closes: {closes:?}"
    );
    for r in reasons {
        assert!(
            closes.contains_key(r),
            "Closes by reason lacks {r}: {closes:?}"
        );
    }
    for r in ["client_closed", "reset", "idle_timeout", "write_timeout"] {
        assert!(
            closes[r] > 0.0,
            "the test closed connections as {r}, but the panel shows {closes:?}"
        );
    }
    let rejections = by_label("Rejections by reason", "reason");
    for r in ["max_connections", "per_ip_limit", "shutting_down"] {
        assert!(
            rejections.contains_key(r),
            "Rejections by reason lacks {r}: {rejections:?}"
        );
    }
    assert!(
        rejections["max_connections"] > 0.0,
        "the test was rejected, the panel shows {rejections:?}"
    );
    assert!(
        get("Accept errors/s", "A").iter().all(|s| s.value == 0.0),
        "no accept errors were caused"
    );

    let limit = get("Active connections vs limit", "B");
    assert!(
        limit.iter().all(|s| s.value == MAX_CONNECTIONS as f64),
        "limit series: {limit:?}"
    );
    let per_worker = by_label("Worker utilization", "worker");
    assert_eq!(
        per_worker.len(),
        WORKERS,
        "one utilization series per worker: {per_worker:?}"
    );
    assert!(
        per_worker
            .values()
            .all(|v| v.is_finite() && (0.0..=1.0).contains(v)),
        "{per_worker:?}"
    );
    assert!(
        per_worker.values().any(|v| *v > 0.0),
        "no worker did any work: {per_worker:?}"
    );
    let conns = by_label("Connections per worker", "worker");
    assert_eq!(
        conns.keys().cloned().collect::<Vec<_>>(),
        ["0", "1"],
        "worker labels: {conns:?}"
    );
    let build = get("Build info", "A");
    assert!(
        build.iter().any(|s| s.labels.get("version").map(String::as_str) == Some(env!("CARGO_PKG_VERSION"))),
        "build info: {build:?}"
    );
}

use common::ALERTS;

fn check_alerts(prom: &Prometheus) {
    // The rules as Prometheus itself parsed them from alerts.yml, once each has run.
    let deadline = Instant::now() + PROM_WAIT;
    let rules = loop {
        let data = prom
            .api("/api/v1/rules?type=alert")
            .unwrap_or_else(|e| panic!("rules API: {e}"));
        let rules: Vec<Value> = data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        if !rules.is_empty() && rules.iter().all(|r| r["health"] != "unknown") {
            break rules;
        }
        assert!(
            Instant::now() < deadline,
            "alert rules never evaluated: {rules:?}\n{}",
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let mut names: Vec<&str> = rules.iter().filter_map(|r| r["name"].as_str()).collect();
    names.sort_unstable();
    let mut want = ALERTS.to_vec();
    want.sort_unstable();
    assert_eq!(names, want, "Prometheus loaded these alerts");

    let mut failures = Vec::new();
    for rule in &rules {
        let name = rule["name"].as_str().unwrap_or("?");
        let expr = rule["query"].as_str().unwrap_or("");
        if rule["health"] != "ok" {
            failures.push(format!(
                "{name}: health {} ({})",
                rule["health"], rule["lastError"]
            ));
        }
        if !matches!(
            rule["labels"]["severity"].as_str(),
            Some("critical" | "warning")
        ) {
            failures.push(format!("{name}: severity {}", rule["labels"]["severity"]));
        }
        for a in ["summary", "description"] {
            if rule["annotations"][a].as_str().is_none_or(str::is_empty) {
                failures.push(format!("{name}: no {a} annotation"));
            }
        }
        if let Err(e) = prom.query(expr) {
            failures.push(format!("{name}: {e} for {expr}"));
        }
        let sels = selectors(expr);
        if sels.is_empty() {
            failures.push(format!("{name}: no metric selector found in {expr}"));
        }
        for sel in sels {
            match prom.query(&sel) {
                Ok(r) if r.is_empty() => failures.push(format!("{name}: no data for {sel}")),
                Ok(_) => {}
                Err(e) => failures.push(format!("{name}: {e} for {sel}")),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "alert checks failed:\n{}",
        failures.join("\n")
    );
    eprintln!(
        "alerts: {} rules healthy, every expression and selector evaluated",
        rules.len()
    );

    // The rejections above make SockpoolRejectingConnections pending (it needs 5 minutes
    // to fire), and nothing else may be firing on a healthy server.
    let deadline = Instant::now() + PROM_WAIT;
    loop {
        let data = prom
            .api("/api/v1/alerts")
            .unwrap_or_else(|e| panic!("alerts API: {e}"));
        let alerts = data["alerts"].as_array().cloned().unwrap_or_default();
        let firing: Vec<&Value> = alerts.iter().filter(|a| a["state"] == "firing").collect();
        assert!(
            firing.is_empty(),
            "alerts fire on a healthy server: {firing:?}"
        );
        let pending = alerts.iter().any(|a| {
            a["labels"]["alertname"] == "SockpoolRejectingConnections"
                && a["labels"]["reason"] == "max_connections"
                && a["state"] == "pending"
        });
        if pending {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SockpoolRejectingConnections never went pending after real rejections: {alerts:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn check_promtool(server: &Server, prom_dir: &Path) {
    // `promtool check metrics` lints the live exposition format (names, types, help).
    let scrape = server.scrape();
    let out = common::run_with_input(
        Command::new("promtool").args(["check", "metrics"]),
        scrape.as_bytes(),
        "promtool check metrics",
    );
    assert_success(
        &format!("promtool check metrics on a live scrape:\n{scrape}\n"),
        &out,
    );

    // The config Prometheus ran with (the shipped one, retargeted), and the shipped files.
    let run = |args: &[&str], dir: &Path| {
        Command::new("promtool")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("promtool {args:?}: {e}"))
    };
    assert_success(
        "promtool check config (as run)",
        &run(&["check", "config", "prometheus.yml"], prom_dir),
    );
    let shipped = repo_file("config/prometheus");
    assert_success(
        "promtool check config",
        &run(&["check", "config", "prometheus.yml"], &shipped),
    );
    assert_success(
        "promtool check rules",
        &run(&["check", "rules", "alerts.yml"], &shipped),
    );
    assert_success(
        "promtool test rules",
        &run(&["test", "rules", "alerts_test.yml"], &shipped),
    );
}

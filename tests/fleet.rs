//! The fleet's operations files, checked with the real tools:
//!
//! - `config/haproxy/haproxy.cfg` with `haproxy -c`, and held to the settings a drain
//!   needs (health checks on /-/ready, fast checks, retries + redispatch, PROXY v2,
//!   timeouts above sockpool's idle timeout, no shutdown-sessions);
//! - `config/prometheus/prometheus-fleet.yml` and its `targets/` with `promtool`;
//! - the dashboard's Fleet row, every expression, against a real Prometheus running the
//!   shipped fleet config (file_sd rewritten to three real instances) and scraping a
//!   real HAProxy running the shipped haproxy.cfg (ports rewritten): instances up, not
//!   ready (HAProxy's health check of /-/ready), restarts, fleet sums that match the
//!   per-instance panels, and shares.
//!
//! Traffic goes to the instances directly here: the end-to-end test through HAProxy,
//! with PROXY protocol, is tests/haproxy_e2e.rs's job.
//!
//! A missing haproxy, prometheus or promtool skips its test with a note, except under
//! `CI=true` (`.ci/run` installs them), where that is a failure.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

use common::prometheus::{patch, Prometheus, Sample};
use common::{repo_file, Server};

const HAPROXY_CFG: &str = "config/haproxy/haproxy.cfg";
const FLEET_YML: &str = "config/prometheus/prometheus-fleet.yml";

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_file(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn haproxy_check(path: &Path) -> Output {
    run(Command::new("haproxy").arg("-c").arg("-f").arg(path))
}

// ------------------------------------------------------------------------ haproxy.cfg

#[test]
fn haproxy_accepts_the_shipped_config() {
    if !common::have_tool("haproxy", "haproxy") {
        return;
    }
    let out = haproxy_check(&repo_file(HAPROXY_CFG));
    common::assert_success("haproxy -c -f config/haproxy/haproxy.cfg", &out);
}

#[test]
fn haproxy_rejects_a_misspelled_keyword() {
    if !common::have_tool("haproxy", "haproxy") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    for (from, to) in [
        ("    balance leastconn", "    balanse leastconn"),
        (" fall 1 rise 2", " fal 1 rise 2"),
        ("    option redispatch", "    option redispach"),
    ] {
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, patch(read(HAPROXY_CFG), &[(from, to)])).expect("write");
        let out = haproxy_check(&path);
        assert!(
            !out.status.success(),
            "haproxy -c accepted {to:?}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The settings of haproxy.cfg, comments dropped, one line each, whitespace squeezed.
fn haproxy_lines() -> Vec<String> {
    read(HAPROXY_CFG)
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect()
}

/// A sockpool duration in seconds.
fn seconds(d: &str) -> f64 {
    let split = d.find(|c: char| !c.is_ascii_digit()).unwrap_or(d.len());
    let (n, unit) = d.split_at(split);
    let n: f64 = n
        .parse()
        .unwrap_or_else(|e| panic!("bad duration {d:?}: {e}"));
    n * match unit {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        "h" => 3600.0,
        other => panic!("unknown unit {other:?} in {d:?}"),
    }
}

#[test]
fn haproxy_cfg_balances_checks_readiness_and_keeps_the_drain() {
    let lines = haproxy_lines();
    let has = |l: &str| lines.iter().any(|x| x == l);
    for want in [
        "mode tcp",
        "balance leastconn",
        "option httpchk GET /-/ready",
        "http-check expect status 200",
        "retries 3",
        "option redispatch",
        "http-request use-service prometheus-exporter if { path /metrics }",
    ] {
        assert!(has(want), "haproxy.cfg lacks `{want}`");
    }
    let default_server = lines
        .iter()
        .find(|l| l.starts_with("default-server "))
        .expect("a default-server line");
    for opt in [
        "check",
        "inter 500ms",
        "fastinter 500ms",
        "downinter 1s",
        "fall 1",
        "rise 2",
        "send-proxy-v2",
    ] {
        assert!(
            format!("{default_server} ").contains(&format!(" {opt} ")),
            "default-server lacks {opt}: {default_server}"
        );
    }
    // Three servers, each checked on its own metrics port, without a PROXY header.
    let servers: Vec<&String> = lines.iter().filter(|l| l.starts_with("server ")).collect();
    assert_eq!(servers.len(), 3, "{servers:?}");
    for s in &servers {
        let words: Vec<&str> = s.split(' ').collect();
        assert!(
            words
                .windows(2)
                .any(|w| w[0] == "port" && w[1].parse::<u16>().is_ok()),
            "{s}: the check goes to the metrics port"
        );
        assert!(
            !s.contains("check-send-proxy"),
            "{s}: the metrics port takes no PROXY header"
        );
    }
    assert!(
        !lines.iter().any(|l| l.contains("on-marked-down")),
        "on-marked-down shutdown-sessions would cut the drain"
    );
    assert!(
        read(HAPROXY_CFG).contains("Not `on-marked-down shutdown-sessions`"),
        "a comment says why shutdown-sessions is not used"
    );

    // Timeouts above sockpool's idle timeout, read from the binary's own defaults.
    let out = run(Command::new(common::bin()).arg("print-default-config"));
    common::assert_success("sockpool print-default-config", &out);
    let defaults: toml::Table = String::from_utf8_lossy(&out.stdout)
        .parse()
        .expect("default config is TOML");
    let idle = seconds(
        defaults["connection"]["idle_timeout"]
            .as_str()
            .expect("connection.idle_timeout"),
    );
    for which in ["client", "server"] {
        let t = lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("timeout {which} ")))
            .unwrap_or_else(|| panic!("no timeout {which} in defaults"));
        assert!(
            seconds(t) > idle,
            "timeout {which} {t} must exceed sockpool's idle_timeout ({idle}s)"
        );
    }
}

// ------------------------------------------------------------------------ prometheus-fleet.yml

#[test]
fn promtool_accepts_the_fleet_config_and_its_targets() {
    if !common::have_tool("promtool", "prometheus") {
        return;
    }
    let out = run(Command::new("promtool")
        .args(["check", "config"])
        .arg(repo_file(FLEET_YML)));
    common::assert_success("promtool check config prometheus-fleet.yml", &out);
    let stdout =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !stdout.contains("WARNING"),
        "promtool warns (a missing targets file?):\n{stdout}"
    );
}

#[test]
fn promtool_rejects_a_misspelled_targets_file() {
    if !common::have_tool("promtool", "prometheus") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(dir.path().join("targets")).expect("mkdir");
    std::fs::copy(repo_file(FLEET_YML), dir.path().join("fleet.yml")).expect("copy");
    std::fs::copy(
        repo_file("config/prometheus/alerts.yml"),
        dir.path().join("alerts.yml"),
    )
    .expect("copy");
    let targets = patch(
        read("config/prometheus/targets/sockpool.json"),
        &[(r#""labels""#, r#""lables""#)],
    );
    std::fs::write(dir.path().join("targets/sockpool.json"), targets).expect("write");
    let out = run(Command::new("promtool")
        .args(["check", "config"])
        .arg(dir.path().join("fleet.yml")));
    assert!(
        !out.status.success(),
        "promtool accepted a targets file with `lables`:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn fleet_config_discovers_instances_from_files_and_scrapes_haproxy() {
    let text = read(FLEET_YML);
    for want in [
        "  - job_name: sockpool\n",
        "    file_sd_configs:\n",
        "          - targets/*.json\n",
        "  - job_name: haproxy\n",
        "  - alerts.yml\n",
    ] {
        assert!(text.contains(want), "prometheus-fleet.yml lacks {want:?}");
    }
    // The example targets are the metrics ports of haproxy.cfg's three servers.
    let targets: Value =
        serde_json::from_str(&read("config/prometheus/targets/sockpool.json")).expect("JSON");
    let listed: Vec<&str> = targets[0]["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let checked: Vec<String> = haproxy_lines()
        .iter()
        .filter(|l| l.starts_with("server "))
        .map(|l| {
            let w: Vec<&str> = l.split(' ').collect();
            let host = w[2].rsplit_once(':').expect("host:port").0;
            let port = w.iter().skip_while(|x| **x != "port").nth(1).expect("port");
            format!("{host}:{port}")
        })
        .collect();
    assert_eq!(listed, checked);
}

// ------------------------------------------------------------------------ the Fleet row, live

/// A running HAProxy; killed on drop.
struct HaProxy {
    child: Child,
    log: PathBuf,
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl HaProxy {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The shipped haproxy.cfg with its listeners and servers moved to the test's ports.
fn haproxy_cfg_for(servers: &[&Server], front: u16, stats: u16) -> String {
    let mut edits: Vec<(String, String)> = vec![
        ("bind :20000".into(), format!("bind 127.0.0.1:{front}")),
        (
            "bind 127.0.0.1:8404".into(),
            format!("bind 127.0.0.1:{stats}"),
        ),
    ];
    for (i, s) in servers.iter().enumerate() {
        let n = i + 1;
        let metrics = s.metrics_addr.expect("metrics listener").port();
        edits.push((
            format!("server sockpool{n} 127.0.0.1:200{n}0 port 200{n}1"),
            format!("server sockpool{n} {} port {metrics}", s.addr),
        ));
    }
    let edits: Vec<(&str, &str)> = edits
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    patch(read(HAPROXY_CFG), &edits)
}

fn start_haproxy(dir: &Path, cfg: &str) -> HaProxy {
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg).expect("write haproxy.cfg");
    let out = haproxy_check(&path);
    common::assert_success("haproxy -c on the test's haproxy.cfg", &out);
    let log = dir.join("haproxy.log");
    let file = std::fs::File::create(&log).expect("haproxy.log");
    let err = file.try_clone().expect("clone");
    // -db: stay in the foreground, so that the test owns the process.
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .expect("spawn haproxy");
    HaProxy { child, log }
}

/// A few request/reply sessions straight to one instance.
fn drive(server: &Server, sessions: usize) {
    for i in 0..sessions {
        let mut s = server.connect();
        let line = format!("fleet {i}\n");
        s.write_all(line.as_bytes()).expect("send");
        let want = format!("Server received \"fleet {i}\"\n");
        let got = common::read_exact_bytes(&mut s, want.len());
        assert_eq!(String::from_utf8_lossy(&got), want);
    }
}

/// Every target of every panel in the dashboard's row `row`: (title, refId, expr).
fn row_queries(row: &str) -> Vec<(String, String, String)> {
    let d: Value = serde_json::from_str(&read("dashboards/sockpool.json")).expect("dashboard");
    let mut current = String::new();
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        if p["type"] == "row" {
            current = p["title"].as_str().unwrap_or("").to_string();
            continue;
        }
        if current != row {
            continue;
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                p["title"].as_str().unwrap_or("").to_string(),
                t["refId"].as_str().unwrap_or("").to_string(),
                t["expr"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    out
}

/// Grafana's substitution: `$instance` with "All" of several values becomes a regex
/// alternation.
fn fill(expr: &str, instances: &[String]) -> String {
    let alternation = format!("({})", instances.join("|").replace('.', "\\\\."));
    expr.replace("$__rate_interval", "2m")
        .replace("$job", "sockpool")
        .replace("$instance", &alternation)
}

fn by_instance(samples: &[Sample]) -> BTreeMap<String, f64> {
    samples
        .iter()
        .map(|s| {
            (
                s.labels.get("instance").cloned().unwrap_or_default(),
                s.value,
            )
        })
        .collect()
}

fn total(samples: &[Sample]) -> f64 {
    assert_eq!(samples.len(), 1, "one fleet-wide series: {samples:?}");
    samples[0].value
}

#[test]
fn fleet_row_against_real_prometheus_and_haproxy() {
    if !common::have_tool("haproxy", "haproxy") || !common::have_tool("prometheus", "prometheus") {
        return;
    }
    const MAX: &str = "50";
    // A long grace and a held connection keep one instance alive but not ready later.
    let args = [
        "--workers",
        "1",
        "--max-connections",
        MAX,
        "--shutdown-grace",
        "60s",
    ];
    let mut servers: Vec<Server> = (0..3).map(|_| Server::start(&args)).collect();
    let instances: Vec<String> = servers
        .iter()
        .map(|s| s.metrics_addr.expect("metrics").to_string())
        .collect();

    let dir = tempfile::tempdir().expect("temp dir");
    let stats = common::prometheus::free_port();
    let front = common::prometheus::free_port();
    let haproxy = start_haproxy(
        dir.path(),
        &haproxy_cfg_for(&servers.iter().collect::<Vec<_>>(), front, stats),
    );

    // The shipped fleet config: 1 s intervals, the targets file rewritten, HAProxy's
    // exporter at the test's stats port.
    let stats_addr = format!("127.0.0.1:{stats}");
    let config = patch(
        read(FLEET_YML),
        &[
            ("scrape_interval: 15s", "scrape_interval: 1s"),
            ("evaluation_interval: 15s", "evaluation_interval: 1s"),
            ("refresh_interval: 1m", "refresh_interval: 1s"),
            (
                r#"targets: ["127.0.0.1:8404"]"#,
                &format!(r#"targets: ["{stats_addr}"]"#),
            ),
        ],
    )
    .replace("scrape_timeout: 5s", "scrape_timeout: 1s");
    std::fs::create_dir(dir.path().join("targets")).expect("mkdir targets");
    std::fs::write(dir.path().join("prometheus-fleet.yml"), config).expect("write config");
    std::fs::copy(
        repo_file("config/prometheus/alerts.yml"),
        dir.path().join("alerts.yml"),
    )
    .expect("copy alerts.yml");
    let mut targets: Value =
        serde_json::from_str(&read("config/prometheus/targets/sockpool.json")).expect("targets");
    targets[0]["targets"] = serde_json::json!(instances);
    std::fs::write(
        dir.path().join("targets/sockpool.json"),
        serde_json::to_string(&targets).expect("JSON"),
    )
    .expect("write targets");
    let prom = Prometheus::start(&dir.path().join("prometheus-fleet.yml"), dir.path());

    let fail = |what: &str| -> String { format!("{what}\n--- haproxy\n{}", haproxy.log()) };
    prom.wait_for("3 sockpool targets up", r#"sum(up{job="sockpool"})"#, |r| {
        r.first().is_some_and(|s| s.value == 3.0)
    });
    prom.wait_for("HAProxy scraped", r#"up{job="haproxy"}"#, |r| {
        r.first().is_some_and(|s| s.value == 1.0)
    });
    // HAProxy's health checks of /-/ready put every server UP.
    prom.wait_for(
        "3 servers UP in HAProxy",
        r#"sum(haproxy_server_status{proxy="sockpool", state="UP"})"#,
        |r| r.first().is_some_and(|s| s.value == 3.0),
    );

    // Different traffic per instance, so that the shares differ.
    for (i, s) in servers.iter().enumerate() {
        drive(s, 2 + 2 * i);
    }
    for (i, s) in servers.iter().enumerate() {
        let want = s.metric("sockpool_messages_total");
        assert_eq!(want, (2 + 2 * i) as f64);
        let q = format!(
            r#"sockpool_messages_total{{job="sockpool", instance="{}"}}"#,
            instances[i]
        );
        prom.wait_for(&format!("{q} = {want}"), &q, |r| {
            r.first().is_some_and(|x| x.value == want)
        });
    }

    // ---- every Fleet expression, with the variables as Grafana fills them for "All"
    let queries = row_queries("Fleet");
    assert!(queries.len() >= 6, "the Fleet row: {queries:?}");
    // One evaluation time for every query, so that sums can be compared exactly.
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let mut results: BTreeMap<(String, String), Vec<Sample>> = BTreeMap::new();
    for (title, ref_id, expr) in &queries {
        let promql = fill(expr, &instances);
        let r = prom.query_at(&promql, at).unwrap_or_else(|e| {
            panic!("{}", fail(&format!("{title} [{ref_id}]: {e} for {promql}")))
        });
        assert!(
            !r.is_empty(),
            "{}",
            fail(&format!("{title} [{ref_id}]: no data for {promql}"))
        );
        results.insert((title.clone(), ref_id.clone()), r);
    }
    let get = |t: &str, r: &str| -> &Vec<Sample> {
        results
            .get(&(t.to_string(), r.to_string()))
            .unwrap_or_else(|| panic!("no panel {t:?} target {r}"))
    };
    assert_eq!(total(get("Instances up", "A")), 3.0);
    assert_eq!(total(get("Instances up", "B")), 3.0);
    assert_eq!(total(get("Instances not ready", "A")), 0.0);
    let restarts = by_instance(get("Restarts", "A"));
    assert_eq!(restarts.len(), 3, "{restarts:?}");
    assert!(restarts.values().all(|v| *v == 0.0), "{restarts:?}");
    assert_eq!(total(get("Fleet connections", "A")), 0.0, "at rest");
    assert_eq!(total(get("Fleet connections", "B")), 3.0 * 50.0);
    assert!(total(get("Fleet connections", "C")) > 0.0);

    // The fleet sum equals the sum of the per-instance series of the Traffic row.
    let fleet = total(get("Fleet messages/s", "A"));
    let (_, _, per_instance_expr) = row_queries("Traffic")
        .into_iter()
        .find(|(t, _, _)| t == "Messages/s")
        .expect("the Messages/s panel");
    let per_instance = by_instance(
        &prom
            .query_at(&fill(&per_instance_expr, &instances), at)
            .expect("Messages/s query"),
    );
    assert_eq!(per_instance.len(), 3, "{per_instance:?}");
    let sum: f64 = per_instance.values().sum();
    assert!(fleet > 0.0);
    assert!(
        (fleet - sum).abs() <= 1e-9 * fleet.max(1.0),
        "fleet {fleet} != per-instance sum {sum} ({per_instance:?})"
    );
    for r in ["A", "B"] {
        let shares = by_instance(get("Share by instance", r));
        assert_eq!(shares.len(), 3, "{shares:?}");
        let s: f64 = shares.values().sum();
        assert!((s - 1.0).abs() < 1e-9, "shares add up to 1: {shares:?}");
    }
    // 2, 4 and 6 messages over the same window: the shares keep that order. (Not the
    // exact proportions: each series' rate is extrapolated from its own samples.)
    let shares = by_instance(get("Share by instance", "A"));
    let ordered: Vec<f64> = instances.iter().map(|i| shares[i]).collect();
    assert!(
        ordered[0] < ordered[1] && ordered[1] < ordered[2],
        "shares should follow the traffic 2 < 4 < 6: {shares:?}"
    );

    // ---- one instance stops: not ready at once (HAProxy's check of /-/ready), still up
    // while its held connection keeps it in its grace.
    let mut held = servers[0].connect();
    servers[0].wait_metric("sockpool_connections_active", |v| v == 1.0);
    servers[0].signal(rustix::process::Signal::TERM);
    let not_ready = fill(
        &queries
            .iter()
            .find(|(t, _, _)| t == "Instances not ready")
            .expect("panel")
            .2,
        &instances,
    );
    prom.wait_for("one instance not ready", &not_ready, |r| {
        r.first().is_some_and(|s| s.value == 1.0)
    });
    let up = fill(
        &queries
            .iter()
            .find(|(t, r, _)| t == "Instances up" && r == "A")
            .expect("panel")
            .2,
        &instances,
    );
    assert_eq!(
        total(&prom.query(&up).expect("up")),
        3.0,
        "the draining instance still answers scrapes"
    );

    // ---- it ends and comes back on the same ports: Restarts counts it.
    held.write_all(b"bye\n").expect("send");
    let _ = common::read_exact_bytes(&mut held, b"Server received \"bye\"\n".len());
    drop(held);
    let status = servers[0].wait_exit();
    assert!(status.success(), "{status:?}");
    let (addr, metrics) = (
        servers[0].addr.to_string(),
        servers[0].metrics_addr.expect("metrics").to_string(),
    );
    let mut again = args.to_vec();
    again.extend(["--listen", &addr, "--metrics-listen", &metrics]);
    servers[0] = Server::start(&again);
    let restarts_expr = fill(
        &queries
            .iter()
            .find(|(t, _, _)| t == "Restarts")
            .expect("panel")
            .2,
        &instances,
    );
    let r = prom.wait_for("one restart", &restarts_expr, |r| {
        r.iter().map(|s| s.value).sum::<f64>() == 1.0
    });
    assert_eq!(by_instance(&r)[&instances[0]], 1.0, "{r:?}");
    prom.wait_for("all servers back UP", &not_ready, |r| {
        r.first().is_some_and(|s| s.value == 0.0)
    });
    drop(haproxy);
}

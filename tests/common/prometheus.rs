//! A real Prometheus for the tests: started on a loopback port with a config directory
//! the test prepared, queried over its HTTP API, killed on drop. Used by
//! tests/prometheus_e2e.rs, tests/haproxy_e2e.rs and tests/fleet.rs.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Bound on every wait for Prometheus (start, scrapes, rule evaluation).
pub const PROM_WAIT: Duration = Duration::from_secs(60);

/// One sample of an instant query.
#[derive(Debug, Clone)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `text` with each `from` replaced by `to`, each found exactly once, so that a change
/// to a shipped file fails the test loudly rather than testing something else.
pub fn patch(mut text: String, edits: &[(&str, &str)]) -> String {
    for (from, to) in edits {
        assert_eq!(
            text.matches(from).count(),
            1,
            "{from:?} should appear exactly once in:\n{text}"
        );
        text = text.replace(from, to);
    }
    text
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Percent-encodes a query-string value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A GET over HTTP/1.0: (status, body), or why it failed (the server may not be
/// listening yet, which must not panic like `common::http_get`). A chunked body (HAProxy
/// answers even HTTP/1.0 with one) is dechunked.
pub fn try_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header in {text:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status: {head}"))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok((status, dechunk(body)?));
    }
    Ok((status, body.to_string()))
}

fn dechunk(mut body: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body
            .split_once("\r\n")
            .ok_or_else(|| format!("bad chunk in {body:?}"))?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("chunk size {size:?}: {e}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest
            .get(..size)
            .ok_or_else(|| format!("short chunk in {rest:?}"))?;
        out.push_str(chunk);
        body = rest[size..].strip_prefix("\r\n").unwrap_or(&rest[size..]);
    }
}

impl Prometheus {
    /// Starts prometheus on `config` (a file inside a directory the caller keeps), with
    /// its data under `dir`; retries on another port if the chosen one was taken.
    pub fn start(config: &Path, dir: &Path) -> Prometheus {
        let log = dir.join("prometheus.log");
        let mut last_log = String::new();
        for attempt in 0..3 {
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let out = std::fs::File::create(&log).expect("create prometheus.log");
            let err = out.try_clone().expect("clone log handle");
            let child = Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join(format!("data{attempt}")).display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start prometheus: {e}"));
            let mut prom = Prometheus {
                child,
                addr,
                log: log.clone(),
            };
            match prom.wait_ready() {
                Ok(()) => return prom,
                Err(why) => {
                    last_log = format!("{why}\n{}", prom.log());
                    if !last_log.contains("address already in use") {
                        break;
                    }
                }
            }
        }
        panic!("prometheus did not start:\n{last_log}");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + PROM_WAIT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("prometheus exited with {status}"));
            }
            if let Ok((200, _)) = try_get(self.addr, "/-/ready") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("prometheus not ready at {}", self.addr));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// GET an API path; Ok(data) on `"status": "success"`, Err(message) otherwise.
    pub fn api(&self, path: &str) -> Result<Value, String> {
        let (status, body) = try_get(self.addr, path)?;
        let v: Value = serde_json::from_str(&body)
            .map_err(|e| format!("HTTP {status}, not JSON ({e}): {body}"))?;
        if v["status"] == "success" {
            Ok(v["data"].clone())
        } else {
            Err(format!("HTTP {status}: {}: {}", v["errorType"], v["error"]))
        }
    }

    /// An instant query: the result vector (a scalar becomes one unlabelled sample).
    pub fn query(&self, promql: &str) -> Result<Vec<Sample>, String> {
        self.query_path(&format!("/api/v1/query?query={}", encode(promql)), promql)
    }

    /// An instant query evaluated at `time` (Unix seconds), so that several queries see
    /// the same samples.
    pub fn query_at(&self, promql: &str, time: f64) -> Result<Vec<Sample>, String> {
        self.query_path(
            &format!("/api/v1/query?query={}&time={time:.3}", encode(promql)),
            promql,
        )
    }

    fn query_path(&self, path: &str, promql: &str) -> Result<Vec<Sample>, String> {
        let data = self.api(path)?;
        let parse = |v: &Value| {
            v[1].as_str()
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        match data["resultType"].as_str() {
            Some("vector") => Ok(data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| Sample {
                    labels: r["metric"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                        .collect(),
                    value: parse(&r["value"]),
                })
                .collect()),
            Some("scalar") => Ok(vec![Sample {
                labels: BTreeMap::new(),
                value: parse(&data["result"]),
            }]),
            other => Err(format!("unexpected resultType {other:?} for {promql}")),
        }
    }

    /// Waits until `promql` returns a result that satisfies `pred`; returns it.
    pub fn wait_for(
        &self,
        what: &str,
        promql: &str,
        pred: impl Fn(&[Sample]) -> bool,
    ) -> Vec<Sample> {
        let deadline = Instant::now() + PROM_WAIT;
        let mut last = Ok(Vec::new());
        while Instant::now() < deadline {
            last = self.query(promql);
            if let Ok(r) = &last {
                if pred(r) {
                    return r.clone();
                }
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let targets = self
            .api("/api/v1/targets")
            .map(|t| t["activeTargets"].to_string());
        panic!(
            "Prometheus never saw {what} within {PROM_WAIT:?}: {promql} -> {last:?}\ntargets: {targets:?}\n{}",
            self.log()
        );
    }
}

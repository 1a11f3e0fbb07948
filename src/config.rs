//! Configuration: built-in defaults, the TOML file, command-line flags, validation.
//!
//! This is the only module that reads config files. Every key goes through one
//! function, [`Config::set`], whether it comes from the file or from a flag, so the
//! two cannot disagree on what a value means, and every error names the key (or
//! flag) and the bad value. Precedence: flags > file > defaults.

use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::protocol::Codec;

/// The documented default config file, shipped as `config/sockpool.toml`.
pub const DEFAULT_CONFIG_FILE: &str = include_str!("../config/sockpool.toml");

/// What the server does with client bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Answer with `Server received "<data>"`.
    Ack,
    /// Send every byte back (RFC 862).
    Echo,
}

/// How ack mode cuts input into messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// One reply per read chunk.
    Read,
    /// One reply per line.
    Line,
}

/// `[server]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// 0 = one per CPU core; see [`Config::effective_workers`].
    pub workers: usize,
    pub max_connections: usize,
    /// 0 = unlimited.
    pub max_connections_per_ip: usize,
    pub backlog: u32,
    pub busy_message: String,
    pub tcp_nodelay: bool,
}

/// `[connection]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionConfig {
    pub mode: Mode,
    pub framing: Framing,
    pub max_line_bytes: usize,
    pub max_pending_write_bytes: usize,
    /// `None`: disabled.
    pub idle_timeout: Option<Duration>,
    /// `None`: disabled.
    pub write_timeout: Option<Duration>,
}

/// `[shutdown]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ShutdownConfig {
    pub grace: Duration,
}

/// `[metrics]`.
#[derive(Clone, PartialEq)]
pub struct MetricsConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub bearer_token_file: Option<PathBuf>,
    /// The token read from `bearer_token_file` at load time (trimmed). Never printed.
    pub bearer_token: Option<String>,
}

impl fmt::Debug for MetricsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsConfig")
            .field("enabled", &self.enabled)
            .field("listen", &self.listen)
            .field("bearer_token_file", &self.bearer_token_file)
            .field(
                "bearer_token",
                &self.bearer_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// `[log]`.
#[derive(Clone, Debug, PartialEq)]
pub struct LogConfig {
    pub level: log::LevelFilter,
    pub file: Option<PathBuf>,
}

/// The whole configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub connection: ConnectionConfig,
    pub shutdown: ShutdownConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            server: ServerConfig {
                listen: "0.0.0.0:20000".parse().expect("valid literal"),
                workers: 0,
                max_connections: 10_000,
                max_connections_per_ip: 0,
                backlog: 1024,
                busy_message: "ERROR server busy\n".to_string(),
                tcp_nodelay: true,
            },
            connection: ConnectionConfig {
                mode: Mode::Ack,
                framing: Framing::Read,
                max_line_bytes: 65536,
                max_pending_write_bytes: 1 << 20,
                idle_timeout: Some(Duration::from_secs(60)),
                write_timeout: Some(Duration::from_secs(30)),
            },
            shutdown: ShutdownConfig {
                grace: Duration::from_secs(10),
            },
            metrics: MetricsConfig {
                enabled: true,
                listen: "127.0.0.1:20001".parse().expect("valid literal"),
                bearer_token_file: None,
                bearer_token: None,
            },
            log: LogConfig {
                level: log::LevelFilter::Info,
                file: None,
            },
        }
    }
}

/// A config or usage error: exit code 2, nothing bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// A value as it arrived: typed from TOML, or text from a flag.
#[derive(Debug, Clone)]
pub enum Raw {
    Text(String),
    Int(i64),
    Bool(bool),
    /// A TOML value of another type (array, table, float, date): always wrong here.
    Other(&'static str, String),
    /// A command-line flag's text, parsed by the key's own type.
    Flag(String),
}

impl fmt::Display for Raw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Raw::Text(s) | Raw::Flag(s) => write!(f, "{s:?}"),
            Raw::Int(i) => write!(f, "{i}"),
            Raw::Bool(b) => write!(f, "{b}"),
            Raw::Other(_, s) => f.write_str(s),
        }
    }
}

impl From<&toml::Value> for Raw {
    fn from(v: &toml::Value) -> Raw {
        match v {
            toml::Value::String(s) => Raw::Text(s.clone()),
            toml::Value::Integer(i) => Raw::Int(*i),
            toml::Value::Boolean(b) => Raw::Bool(*b),
            other => Raw::Other(other.type_str(), other.to_string()),
        }
    }
}

impl Raw {
    fn text(&self) -> Result<&str, String> {
        match self {
            Raw::Text(s) | Raw::Flag(s) => Ok(s),
            Raw::Int(_) => Err("expected a string, found an integer".into()),
            Raw::Bool(_) => Err("expected a string, found a boolean".into()),
            Raw::Other(t, _) => Err(format!("expected a string, found {t}")),
        }
    }

    fn count(&self, min: u64, max: u64) -> Result<u64, String> {
        let n = match self {
            Raw::Int(i) => u64::try_from(*i).map_err(|_| "must not be negative".to_string())?,
            Raw::Flag(s) => s
                .trim()
                .parse::<u64>()
                .map_err(|_| "expected a whole number".to_string())?,
            Raw::Text(_) => return Err("expected an integer, found a string".into()),
            Raw::Bool(_) => return Err("expected an integer, found a boolean".into()),
            Raw::Other(t, _) => return Err(format!("expected an integer, found {t}")),
        };
        if n < min || n > max {
            return Err(format!("must be between {min} and {max}"));
        }
        Ok(n)
    }

    fn boolean(&self) -> Result<bool, String> {
        match self {
            Raw::Bool(b) => Ok(*b),
            Raw::Flag(s) => match s.as_str() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err("expected true or false".into()),
            },
            _ => Err("expected a boolean (true or false)".into()),
        }
    }

    fn addr(&self) -> Result<SocketAddr, String> {
        self.text()?
            .parse()
            .map_err(|_| "expected IP:PORT, such as 127.0.0.1:20000 or [::1]:20000".into())
    }

    /// A timeout: a duration, with 0 meaning "disabled".
    fn timeout(&self) -> Result<Option<Duration>, String> {
        let d = match self {
            Raw::Int(i) if *i < 0 => return Err("must not be negative".into()),
            Raw::Int(i) if *i as u64 > MAX_DURATION.as_secs() => return Err(too_long()),
            Raw::Int(i) => Duration::from_secs(*i as u64),
            _ => parse_duration(self.text()?)?,
        };
        Ok((!d.is_zero()).then_some(d))
    }

    fn choice<T: Copy>(&self, options: &[(&str, T)]) -> Result<T, String> {
        let s = self.text()?;
        options
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                let names: Vec<_> = options.iter().map(|(n, _)| *n).collect();
                format!("expected one of {}", names.join(", "))
            })
    }
}

/// Longest duration accepted anywhere: deadlines are `Instant + duration`, which
/// must not overflow, and nothing here needs more than a year.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

fn too_long() -> String {
    "duration too large (at most a year)".into()
}

/// Parses a human duration: `0`, or a whole number with a unit `ms`, `s`, `m`, `h`
/// (`500ms`, `30s`, `5m`, `1h`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let bad = || "expected a duration such as 500ms, 30s, 5m or 1h (0 disables)".to_string();
    let n: u64 = num.parse().map_err(|_| bad())?;
    let per_unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(bad()),
    };
    let ms = n.checked_mul(per_unit_ms).ok_or_else(too_long)?;
    if ms > MAX_DURATION.as_millis() as u64 {
        return Err(too_long());
    }
    Ok(Duration::from_millis(ms))
}

/// Formats a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0".into()
    } else if ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// The problem [`Config::set`] reports for a key it does not know.
const UNKNOWN_KEY: &str = "unknown key";

/// Upper bound on `server.workers`: more threads than this is a typo, not a plan.
const MAX_WORKERS: u64 = 1024;

impl Config {
    /// Sets one key from a raw value. The single place that maps key names to
    /// fields; `Err` is the problem, without the key (the caller adds it).
    pub fn set(&mut self, key: &str, raw: &Raw) -> Result<(), String> {
        let c = self;
        match key {
            "server.listen" => c.server.listen = raw.addr()?,
            "server.workers" => c.server.workers = raw.count(0, MAX_WORKERS)? as usize,
            "server.max_connections" => {
                c.server.max_connections = raw.count(1, 10_000_000)? as usize
            }
            "server.max_connections_per_ip" => {
                c.server.max_connections_per_ip = raw.count(0, 10_000_000)? as usize
            }
            "server.backlog" => c.server.backlog = raw.count(1, 65_535)? as u32,
            "server.busy_message" => {
                let s = raw.text()?;
                if s.len() > 4096 {
                    return Err("must be at most 4096 bytes".into());
                }
                c.server.busy_message = s.to_string();
            }
            "server.tcp_nodelay" => c.server.tcp_nodelay = raw.boolean()?,
            "connection.mode" => {
                c.connection.mode = raw.choice(&[("ack", Mode::Ack), ("echo", Mode::Echo)])?
            }
            "connection.framing" => {
                c.connection.framing =
                    raw.choice(&[("read", Framing::Read), ("line", Framing::Line)])?
            }
            "connection.max_line_bytes" => {
                c.connection.max_line_bytes = raw.count(1, 1 << 30)? as usize
            }
            "connection.max_pending_write_bytes" => {
                c.connection.max_pending_write_bytes = raw.count(1024, 1 << 32)? as usize
            }
            "connection.idle_timeout" => c.connection.idle_timeout = raw.timeout()?,
            "connection.write_timeout" => c.connection.write_timeout = raw.timeout()?,
            "shutdown.grace" => c.shutdown.grace = raw.timeout()?.unwrap_or(Duration::ZERO),
            "metrics.enabled" => c.metrics.enabled = raw.boolean()?,
            "metrics.listen" => c.metrics.listen = raw.addr()?,
            "metrics.bearer_token_file" => {
                c.metrics.bearer_token_file = Some(PathBuf::from(raw.text()?))
            }
            "log.level" => {
                c.log.level = raw.choice(&[
                    ("off", log::LevelFilter::Off),
                    ("error", log::LevelFilter::Error),
                    ("warn", log::LevelFilter::Warn),
                    ("info", log::LevelFilter::Info),
                    ("debug", log::LevelFilter::Debug),
                    ("trace", log::LevelFilter::Trace),
                ])?
            }
            "log.file" => c.log.file = Some(PathBuf::from(raw.text()?)),
            _ => return Err(UNKNOWN_KEY.into()),
        }
        Ok(())
    }

    /// Applies a TOML document on top of `self`.
    pub fn merge_toml(&mut self, text: &str, origin: &str) -> Result<(), ConfigError> {
        let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError(format!("{origin}: {}", e.to_string().trim_end()))
        })?;
        for (section, body) in &doc {
            let toml::Value::Table(body) = body else {
                return Err(ConfigError(format!(
                    "{origin}: {section} = {body}: unknown key (expected a [section])"
                )));
            };
            for (name, value) in body {
                let key = format!("{section}.{name}");
                let raw = Raw::from(value);
                self.set(&key, &raw).map_err(|problem| {
                    if problem == UNKNOWN_KEY {
                        ConfigError(format!("{origin}: unknown key {key}"))
                    } else {
                        ConfigError(format!("{origin}: {key} = {raw}: {problem}"))
                    }
                })?;
            }
        }
        Ok(())
    }

    /// Builds the configuration: defaults, then the file (if any), then flags; then
    /// validates it and reads the bearer token file.
    pub fn load(file: Option<&Path>, flags: &[(&str, &str, Raw)]) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!("cannot read config file {}: {e}", path.display()))
            })?;
            config.merge_toml(&text, &path.display().to_string())?;
        }
        for (flag, key, raw) in flags {
            config
                .set(key, raw)
                .map_err(|problem| ConfigError(format!("{flag} {raw}: {problem}")))?;
        }
        config.validate()?;
        Ok(config)
    }

    /// Cross-key checks, and reading the token file. Runs before anything is bound.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        let err = |key: &str, value: String, problem: &str| {
            Err(ConfigError(format!("{key} = {value}: {problem}")))
        };
        if self.connection.mode == Mode::Echo && self.connection.framing == Framing::Line {
            return err(
                "connection.framing",
                "\"line\"".into(),
                "framing applies to mode = \"ack\" only; echo mode has no framing",
            );
        }
        if self.metrics.enabled && addrs_conflict(self.server.listen, self.metrics.listen) {
            return err(
                "metrics.listen",
                format!("{:?}", self.metrics.listen.to_string()),
                &format!("conflicts with server.listen = \"{}\"", self.server.listen),
            );
        }
        self.metrics.bearer_token = None;
        if let Some(path) = &self.metrics.bearer_token_file {
            let shown = format!("{:?}", path.display().to_string());
            let token = match std::fs::read_to_string(path) {
                Ok(t) => t.trim().to_string(),
                Err(e) => {
                    return err(
                        "metrics.bearer_token_file",
                        shown,
                        &format!("cannot read: {e}"),
                    )
                }
            };
            if !crate::http::bearer_token_ok(&token) {
                return err(
                    "metrics.bearer_token_file",
                    shown,
                    "the token must be one non-empty word of RFC 6750 token68 characters \
                     (ASCII letters, digits, -._~+/ then = padding)",
                );
            }
            self.metrics.bearer_token = Some(token);
        }
        if let Some(file) = &self.log.file {
            let dir = match file.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            if !dir.is_dir() {
                return err(
                    "log.file",
                    format!("{:?}", file.display().to_string()),
                    &format!("directory {} does not exist", dir.display()),
                );
            }
        }
        Ok(())
    }

    /// `server.workers` with 0 resolved to the number of CPU cores.
    pub fn effective_workers(&self) -> usize {
        match self.server.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// The codec every connection runs.
    pub fn codec(&self) -> Codec {
        match (self.connection.mode, self.connection.framing) {
            (Mode::Echo, _) => Codec::Echo,
            (Mode::Ack, Framing::Read) => Codec::AckRead,
            (Mode::Ack, Framing::Line) => Codec::AckLine {
                max_line_bytes: self.connection.max_line_bytes,
            },
        }
    }

    /// The effective configuration as a TOML document that [`Config::load`] reads
    /// back to the same value.
    pub fn to_toml(&self) -> String {
        let q = |s: &str| toml::Value::String(s.to_string()).to_string();
        let t = |d: Option<Duration>| q(&format_duration(d.unwrap_or(Duration::ZERO)));
        let mut o = String::new();
        let s = &self.server;
        let _ = writeln!(o, "[server]");
        let _ = writeln!(o, "listen = {}", q(&s.listen.to_string()));
        let _ = writeln!(o, "workers = {}", s.workers);
        let _ = writeln!(o, "max_connections = {}", s.max_connections);
        let _ = writeln!(o, "max_connections_per_ip = {}", s.max_connections_per_ip);
        let _ = writeln!(o, "backlog = {}", s.backlog);
        let _ = writeln!(o, "busy_message = {}", q(&s.busy_message));
        let _ = writeln!(o, "tcp_nodelay = {}", s.tcp_nodelay);
        let c = &self.connection;
        let _ = writeln!(o, "\n[connection]");
        let mode = match c.mode {
            Mode::Ack => "ack",
            Mode::Echo => "echo",
        };
        let framing = match c.framing {
            Framing::Read => "read",
            Framing::Line => "line",
        };
        let _ = writeln!(o, "mode = {}", q(mode));
        let _ = writeln!(o, "framing = {}", q(framing));
        let _ = writeln!(o, "max_line_bytes = {}", c.max_line_bytes);
        let _ = writeln!(o, "max_pending_write_bytes = {}", c.max_pending_write_bytes);
        let _ = writeln!(o, "idle_timeout = {}", t(c.idle_timeout));
        let _ = writeln!(o, "write_timeout = {}", t(c.write_timeout));
        let _ = writeln!(o, "\n[shutdown]\ngrace = {}", t(Some(self.shutdown.grace)));
        let m = &self.metrics;
        let _ = writeln!(
            o,
            "\n[metrics]\nenabled = {}\nlisten = {}",
            m.enabled,
            q(&m.listen.to_string())
        );
        if let Some(p) = &m.bearer_token_file {
            let _ = writeln!(o, "bearer_token_file = {}", q(&p.display().to_string()));
        }
        let level = self.log.level.to_string().to_lowercase();
        let _ = writeln!(o, "\n[log]\nlevel = {}", q(&level));
        if let Some(p) = &self.log.file {
            let _ = writeln!(o, "file = {}", q(&p.display().to_string()));
        }
        o
    }
}

/// Two listen addresses that cannot both be bound. Port 0 picks a free port, so it
/// never conflicts.
fn addrs_conflict(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// `sockpool serve` flags. Values are kept as text and parsed by [`Config::set`], so
/// a bad flag is reported exactly like a bad key.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServeFlags {
    /// TOML config file (see `sockpool print-default-config`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to accept clients on [server.listen].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Address of the metrics HTTP server [metrics.listen].
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Do not serve metrics [metrics.enabled = false].
    #[arg(long)]
    pub no_metrics: bool,
    /// Worker threads, 0 = one per core [server.workers].
    #[arg(long, value_name = "N")]
    pub workers: Option<String>,
    /// Most connections open at once [server.max_connections].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<String>,
    /// ack | echo [connection.mode].
    #[arg(long, value_name = "MODE")]
    pub mode: Option<String>,
    /// read | line [connection.framing].
    #[arg(long, value_name = "FRAMING")]
    pub framing: Option<String>,
    /// e.g. 60s; 0 disables [connection.idle_timeout].
    #[arg(long, value_name = "DUR")]
    pub idle_timeout: Option<String>,
    /// e.g. 30s; 0 disables [connection.write_timeout].
    #[arg(long, value_name = "DUR")]
    pub write_timeout: Option<String>,
    /// Longest line in line framing [connection.max_line_bytes].
    #[arg(long, value_name = "N")]
    pub max_line_bytes: Option<String>,
    /// Time for connections to finish after SIGTERM [shutdown.grace].
    #[arg(long, value_name = "DUR")]
    pub shutdown_grace: Option<String>,
    /// error | warn | info | debug | trace [log.level].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Also append logs to this file [log.file].
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<String>,
}

impl ServeFlags {
    /// The flags given, as `(flag, key, value)` in a fixed order.
    pub fn overrides(&self) -> Vec<(&'static str, &'static str, Raw)> {
        let pairs: [(&str, &str, &Option<String>); 12] = [
            ("--listen", "server.listen", &self.listen),
            ("--metrics-listen", "metrics.listen", &self.metrics_listen),
            ("--workers", "server.workers", &self.workers),
            (
                "--max-connections",
                "server.max_connections",
                &self.max_connections,
            ),
            ("--mode", "connection.mode", &self.mode),
            ("--framing", "connection.framing", &self.framing),
            (
                "--idle-timeout",
                "connection.idle_timeout",
                &self.idle_timeout,
            ),
            (
                "--write-timeout",
                "connection.write_timeout",
                &self.write_timeout,
            ),
            (
                "--max-line-bytes",
                "connection.max_line_bytes",
                &self.max_line_bytes,
            ),
            ("--shutdown-grace", "shutdown.grace", &self.shutdown_grace),
            ("--log-level", "log.level", &self.log_level),
            ("--log-file", "log.file", &self.log_file),
        ];
        let mut out: Vec<_> = pairs
            .into_iter()
            .filter_map(|(flag, key, v)| v.as_ref().map(|v| (flag, key, Raw::Flag(v.clone()))))
            .collect();
        if self.no_metrics {
            out.push(("--no-metrics", "metrics.enabled", Raw::Bool(false)));
        }
        out
    }

    /// Loads the configuration these flags describe.
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::load(self.config.as_deref(), &self.overrides())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_file_matches_built_in_defaults() {
        let mut c = Config::default();
        c.merge_toml(DEFAULT_CONFIG_FILE, "default").unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn effective_config_round_trips() {
        let mut c = Config::default();
        c.merge_toml(
            "[server]\nbusy_message = \"no \\\"room\\\"\\n\"\n[connection]\nmode = \"echo\"\nidle_timeout = \"1500ms\"\nwrite_timeout = 0\n[log]\nfile = \"x.log\"",
            "t",
        )
        .unwrap();
        let mut back = Config::default();
        back.merge_toml(&c.to_toml(), "back").unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn errors_name_key_and_value() {
        let cases = [
            ("[server]\nworkers = \"abc\"", "server.workers = \"abc\""),
            ("[server]\nworkers = -1", "server.workers = -1"),
            (
                "[server]\nmax_connections = 0",
                "server.max_connections = 0",
            ),
            (
                "[server]\nlisten = \"nowhere\"",
                "server.listen = \"nowhere\"",
            ),
            (
                "[connection]\nmode = \"shout\"",
                "connection.mode = \"shout\"",
            ),
            (
                "[connection]\nidle_timeout = \"soon\"",
                "connection.idle_timeout = \"soon\"",
            ),
            (
                "[server]\ntcp_nodelay = \"yes\"",
                "server.tcp_nodelay = \"yes\"",
            ),
            ("[server]\nbogus = 1", "unknown key server.bogus"),
            (
                "[connection]\nidle_timeout = 9223372036854775807",
                "connection.idle_timeout = 9223372036854775807: duration too large",
            ),
            ("[nope]\nx = 1", "unknown key nope.x"),
            ("top = 1", "top = 1"),
            (
                "[connection]\nmax_line_bytes = [1]",
                "connection.max_line_bytes = [1]",
            ),
        ];
        for (text, want) in cases {
            let e = Config::default().merge_toml(text, "f.toml").unwrap_err();
            assert!(e.0.contains(want), "{text:?} gave {e}");
        }
    }

    #[test]
    fn flags_override_file_and_name_the_flag() {
        let c = Config::load(
            None,
            &[("--workers", "server.workers", Raw::Flag("3".into()))],
        )
        .unwrap();
        assert_eq!(c.server.workers, 3);
        let e = Config::load(
            None,
            &[(
                "--idle-timeout",
                "connection.idle_timeout",
                Raw::Flag("5 parsecs".into()),
            )],
        )
        .unwrap_err();
        assert!(
            e.0.starts_with("--idle-timeout \"5 parsecs\": expected a duration"),
            "{e}"
        );
    }

    #[test]
    fn contradictions_are_errors() {
        let mut c = Config::default();
        c.metrics.listen = "0.0.0.0:20000".parse().unwrap();
        assert!(c.validate().unwrap_err().0.starts_with("metrics.listen"));
        c.metrics.enabled = false;
        assert!(c.validate().is_ok());
        let mut c = Config::default();
        c.connection.mode = Mode::Echo;
        c.connection.framing = Framing::Line;
        assert!(c
            .validate()
            .unwrap_err()
            .0
            .starts_with("connection.framing"));
        let mut c = Config::default();
        c.log.file = Some("/no/such/dir/x.log".into());
        assert!(c.validate().unwrap_err().0.starts_with("log.file"));
        let mut c = Config::default();
        c.metrics.bearer_token_file = Some("/no/such/token".into());
        assert!(c
            .validate()
            .unwrap_err()
            .0
            .starts_with("metrics.bearer_token_file"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "s", "5", "-1s", "1.5s", "99999999999999999999h", "5 m"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        for d in [0, 1, 999, 1000, 60_000, 90_000, 3_600_000] {
            let d = Duration::from_millis(d);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }
}

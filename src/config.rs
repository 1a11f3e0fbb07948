//! Configuration: built-in defaults, the TOML file, command-line flags, validation.
//!
//! This is the only module that reads config files. Every key is one row of
//! [`KEYS`]: its name, its documentation, its flag (if any), how a value is parsed
//! and how it is printed. That one table drives [`Config::set`] (for the file and
//! the flags alike, so the two cannot disagree on what a value means), the
//! `sockpool serve` flags ([`ServeFlags`]), [`Config::to_toml`] and the documented
//! default file ([`default_file`], shipped as `config/sockpool.toml` and held to the
//! table by a test). Every error names the key (or flag) and the bad value.
//! Precedence: flags > file > defaults.

use std::fmt::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::protocol::Codec;

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

/// An address block such as `127.0.0.0/8` or `::1/128` (`server.proxy_trusted`).
///
/// IPv4-mapped IPv6 is folded into IPv4 on both sides: a block written
/// `::ffff:10.0.0.0/104` is `10.0.0.0/8`, and a peer `::ffff:10.1.2.3` (an IPv4
/// client of a dual-stack listener) is inside `10.0.0.0/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// The network address; its host bits are zero.
    pub addr: IpAddr,
    /// Leading bits that must match: at most 32 (IPv4) or 128 (IPv6).
    pub prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside this block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask(u32::from(ip).into(), self.prefix, 32) == u128::from(u32::from(net))
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask(u128::from(ip), self.prefix, 128) == u128::from(net)
            }
            _ => false,
        }
    }
}

/// `bits` (of an address `width` bits wide) with all but the first `prefix` zeroed.
fn mask(bits: u128, prefix: u8, width: u8) -> u128 {
    let host_bits = u32::from(width - prefix);
    if host_bits >= 128 {
        0
    } else {
        bits & !((1u128 << host_bits) - 1)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    /// `ADDR/PREFIX`, or a bare address meaning that one address.
    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = || "expected an address block such as 10.0.0.0/8 or fd00::/8".to_string();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let width: u8 = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(p) if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) => return Err(bad()),
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= width => n,
                _ => return Err(format!("the prefix length must be at most {width}")),
            },
        };
        // Fold ::ffff:a.b.c.d/96+n into a.b.c.d/n, so that `contains` compares like
        // with like (peers are folded the same way).
        let (addr, prefix, width) = match addr {
            IpAddr::V6(v6) if prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), prefix - 96, 32),
                None => (addr, prefix, width),
            },
            _ => (addr, prefix, width),
        };
        let bits = match addr {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        let net = mask(bits, prefix, width);
        if net != bits {
            let net = match addr {
                IpAddr::V4(_) => IpAddr::from((net as u32).to_be_bytes()),
                IpAddr::V6(_) => IpAddr::from(net.to_be_bytes()),
            };
            return Err(format!("host bits are set (the block is {net}/{prefix})"));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
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
    /// SO_REUSEPORT on the data listener: a new instance can bind while the old
    /// one drains.
    pub reuse_port: bool,
    /// Every connection from a `proxy_trusted` peer starts with a PROXY v1/v2 header.
    pub proxy_protocol: bool,
    /// Peers allowed to send a PROXY header; any other peer is rejected.
    pub proxy_trusted: Vec<Cidr>,
}

impl ServerConfig {
    /// Whether `peer` may send a PROXY header (`server.proxy_trusted`).
    pub fn proxy_trusts(&self, peer: IpAddr) -> bool {
        self.proxy_trusted.iter().any(|c| c.contains(peer))
    }
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
    /// After the first stop signal: not ready, but still accepting, this long.
    pub drain_delay: Duration,
    /// Then, with the listener closed: time for open connections to finish.
    pub grace: Duration,
    /// After the last connection closed: `/metrics` still answers this long.
    pub metrics_linger: Duration,
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
    /// The built-in defaults. [`default_file`] prints them through [`KEYS`].
    fn default() -> Config {
        let cidr = |s: &str| s.parse::<Cidr>().expect("valid literal");
        Config {
            server: ServerConfig {
                listen: "0.0.0.0:20000".parse().expect("valid literal"),
                workers: 0,
                max_connections: 10_000,
                max_connections_per_ip: 0,
                backlog: 1024,
                busy_message: "ERROR server busy\n".to_string(),
                tcp_nodelay: true,
                reuse_port: false,
                proxy_protocol: false,
                proxy_trusted: vec![cidr("127.0.0.0/8"), cidr("::1/128")],
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
                drain_delay: Duration::ZERO,
                grace: Duration::from_secs(10),
                metrics_linger: Duration::ZERO,
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
    /// A TOML array.
    List(Vec<Raw>),
    /// A TOML value of another type (table, float, date): always wrong here.
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
            Raw::List(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
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
            toml::Value::Array(items) => Raw::List(items.iter().map(Raw::from).collect()),
            other => Raw::Other(other.type_str(), other.to_string()),
        }
    }
}

impl Raw {
    fn what(&self) -> String {
        match self {
            Raw::Text(_) | Raw::Flag(_) => "a string".into(),
            Raw::Int(_) => "an integer".into(),
            Raw::Bool(_) => "a boolean".into(),
            Raw::List(_) => "an array".into(),
            Raw::Other(t, _) => t.to_string(),
        }
    }

    fn text(&self) -> Result<&str, String> {
        match self {
            Raw::Text(s) | Raw::Flag(s) => Ok(s),
            other => Err(format!("expected a string, found {}", other.what())),
        }
    }

    fn count(&self, min: u64, max: u64) -> Result<u64, String> {
        let n = match self {
            Raw::Int(i) => u64::try_from(*i).map_err(|_| "must not be negative".to_string())?,
            Raw::Flag(s) => s
                .trim()
                .parse::<u64>()
                .map_err(|_| "expected a whole number".to_string())?,
            other => return Err(format!("expected an integer, found {}", other.what())),
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

    /// A plain duration, 0 allowed.
    fn duration(&self) -> Result<Duration, String> {
        Ok(self.timeout()?.unwrap_or(Duration::ZERO))
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

    /// An array of address blocks; the problem names the bad item.
    fn cidrs(&self) -> Result<Vec<Cidr>, String> {
        let Raw::List(items) = self else {
            return Err(format!(
                "expected an array of address blocks such as [\"10.0.0.0/8\"], found {}",
                self.what()
            ));
        };
        items
            .iter()
            .map(|item| {
                let s = item.text()?;
                s.parse::<Cidr>().map_err(|e| format!("{s:?}: {e}"))
            })
            .collect()
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

/// Formats a duration the way [`parse_duration`] reads it: whole hours as `h`,
/// other whole seconds as `s` (`60s`, as operators write timeouts), the rest as `ms`.
/// Zero is `0`, which reads as "disabled" for a timeout.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0".into()
    } else if ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// A TOML value as the default file and `check-config` print it: strings always
/// in one line as a basic string (`"ERROR server busy\n"`, not a multi-line
/// string), everything else as the `toml` crate prints it.
fn show(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => {
            let mut o = String::with_capacity(s.len() + 2);
            o.push('"');
            for c in s.chars() {
                match c {
                    '"' => o.push_str("\\\""),
                    '\\' => o.push_str("\\\\"),
                    '\n' => o.push_str("\\n"),
                    '\r' => o.push_str("\\r"),
                    '\t' => o.push_str("\\t"),
                    c if c.is_control() => {
                        let _ = write!(o, "\\u{:04X}", c as u32);
                    }
                    c => o.push(c),
                }
            }
            o.push('"');
            o
        }
        toml::Value::Array(items) => {
            let items: Vec<String> = items.iter().map(show).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// Upper bound on `server.workers`: more threads than this is a typo, not a plan.
const MAX_WORKERS: u64 = 1024;

/// A key's command-line flag.
#[derive(Debug)]
pub struct Flag {
    /// With the dashes: `--listen`.
    pub long: &'static str,
    /// What the flag does, for `--help` (the key is appended in brackets).
    pub help: &'static str,
    pub kind: FlagKind,
}

/// Whether a flag takes a value.
#[derive(Debug)]
pub enum FlagKind {
    /// `--listen ADDR`: the text is parsed like the key's value in the file.
    Value(&'static str),
    /// `--reuse-port`, `--no-metrics`: sets a boolean key to this value.
    Switch(bool),
}

/// One config key: everything about it in one row.
pub struct Key {
    /// `section.name`.
    pub name: &'static str,
    /// The comment above the key in the default file, one `#` line per line.
    pub doc: &'static str,
    /// An optional key without a default is shown commented out with this value.
    pub example: Option<&'static str>,
    pub flag: Option<Flag>,
    /// Parses and stores a value; `Err` is the problem, without the key.
    set: fn(&mut Config, &Raw) -> Result<(), String>,
    /// The current value as TOML, `None` for an optional key that is unset.
    get: fn(&Config) -> Option<toml::Value>,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key").field("name", &self.name).finish()
    }
}

impl Key {
    /// The section: `server` of `server.listen`.
    pub fn section(&self) -> &'static str {
        self.name.split_once('.').map_or(self.name, |(s, _)| s)
    }

    /// The name inside its section: `listen` of `server.listen`.
    pub fn short(&self) -> &'static str {
        self.name.split_once('.').map_or(self.name, |(_, k)| k)
    }

    /// The key's value in `config`, as TOML (`None`: an optional key that is unset).
    pub fn value(&self, config: &Config) -> Option<toml::Value> {
        (self.get)(config)
    }
}

fn text(s: impl fmt::Display) -> Option<toml::Value> {
    Some(toml::Value::String(s.to_string()))
}

fn int(n: impl TryInto<i64>) -> Option<toml::Value> {
    Some(toml::Value::Integer(n.try_into().unwrap_or(i64::MAX)))
}

fn boolean(b: bool) -> Option<toml::Value> {
    Some(toml::Value::Boolean(b))
}

/// A timeout: `0` when disabled.
fn dur(d: Option<Duration>) -> Option<toml::Value> {
    text(format_duration(d.unwrap_or(Duration::ZERO)))
}

/// A delay: `0s` when there is none (it disables nothing).
fn delay(d: Duration) -> Option<toml::Value> {
    match d.is_zero() {
        true => text("0s"),
        false => text(format_duration(d)),
    }
}

fn path(p: &Option<PathBuf>) -> Option<toml::Value> {
    p.as_ref().and_then(|p| text(p.display()))
}

const LOG_LEVELS: [(&str, log::LevelFilter); 6] = [
    ("off", log::LevelFilter::Off),
    ("error", log::LevelFilter::Error),
    ("warn", log::LevelFilter::Warn),
    ("info", log::LevelFilter::Info),
    ("debug", log::LevelFilter::Debug),
    ("trace", log::LevelFilter::Trace),
];

const fn value(long: &'static str, value_name: &'static str, help: &'static str) -> Option<Flag> {
    Some(Flag {
        long,
        help,
        kind: FlagKind::Value(value_name),
    })
}

const fn switch(long: &'static str, to: bool, help: &'static str) -> Option<Flag> {
    Some(Flag {
        long,
        help,
        kind: FlagKind::Switch(to),
    })
}

/// Every config key, in the order of the default file. Adding a key is adding a
/// field, its default and one row here; the shipped file is then
/// `sockpool print-default-config` (a test holds it to that).
pub static KEYS: &[Key] = &[
    Key {
        name: "server.listen",
        doc: "Address and port to accept clients on. 20000 is the tutorial's port.\n\
              Under systemd socket activation the inherited socket is used instead.",
        example: None,
        flag: value("--listen", "ADDR", "Address to accept clients on"),
        set: |c, r| put(&mut c.server.listen, r.addr()?),
        get: |c| text(c.server.listen),
    },
    Key {
        name: "server.workers",
        doc: "Worker threads, each driving many connections. 0 = one per CPU core.",
        example: None,
        flag: value("--workers", "N", "Worker threads, 0 = one per core"),
        set: |c, r| put(&mut c.server.workers, r.count(0, MAX_WORKERS)? as usize),
        get: |c| int(c.server.workers),
    },
    Key {
        name: "server.max_connections",
        doc: "Most connections open at once. Over it a client gets busy_message and is closed.\n\
              Clamped, with a warning, to what RLIMIT_NOFILE allows (the soft limit is raised\n\
              to the hard limit at start).",
        example: None,
        flag: value("--max-connections", "N", "Most connections open at once"),
        set: |c, r| {
            put(
                &mut c.server.max_connections,
                r.count(1, 10_000_000)? as usize,
            )
        },
        get: |c| int(c.server.max_connections),
    },
    Key {
        name: "server.max_connections_per_ip",
        doc: "Most connections open at once from one IP address. 0 = unlimited.",
        example: None,
        flag: None,
        set: |c, r| {
            put(
                &mut c.server.max_connections_per_ip,
                r.count(0, 10_000_000)? as usize,
            )
        },
        get: |c| int(c.server.max_connections_per_ip),
    },
    Key {
        name: "server.backlog",
        doc: "Length of the kernel's queue of connections waiting to be accepted.",
        example: None,
        flag: None,
        set: |c, r| put(&mut c.server.backlog, r.count(1, 65_535)? as u32),
        get: |c| int(c.server.backlog),
    },
    Key {
        name: "server.busy_message",
        doc: "Sent to a client refused for a limit, before closing. \"\" sends nothing.",
        example: None,
        flag: None,
        set: |c, r| {
            let s = r.text()?;
            if s.len() > 4096 {
                return Err("must be at most 4096 bytes".into());
            }
            c.server.busy_message = s.to_string();
            Ok(())
        },
        get: |c| text(&c.server.busy_message),
    },
    Key {
        name: "server.tcp_nodelay",
        doc: "Disable Nagle's algorithm, so that small replies leave at once.",
        example: None,
        flag: None,
        set: |c, r| put(&mut c.server.tcp_nodelay, r.boolean()?),
        get: |c| boolean(c.server.tcp_nodelay),
    },
    Key {
        name: "server.reuse_port",
        doc: "SO_REUSEPORT: a new instance can bind the same port while the old one drains.\n\
              Set net.ipv4.tcp_migrate_req = 1 too, or connections queued on the old\n\
              instance when it closes its listener are lost (see the README).",
        example: None,
        flag: switch(
            "--reuse-port",
            true,
            "Let a new instance bind the port while this one drains",
        ),
        set: |c, r| put(&mut c.server.reuse_port, r.boolean()?),
        get: |c| boolean(c.server.reuse_port),
    },
    Key {
        name: "server.proxy_protocol",
        doc: "Expect a PROXY v1/v2 header (HAProxy send-proxy[-v2]) on every connection.\n\
              The address in it is the client for logs and max_connections_per_ip.\n\
              It must arrive within idle_timeout of the accept (no limit when that is 0),\n\
              else the connection is closed as protocol_error.",
        example: None,
        flag: switch(
            "--proxy-protocol",
            true,
            "Expect a PROXY v1/v2 header on every connection",
        ),
        set: |c, r| put(&mut c.server.proxy_protocol, r.boolean()?),
        get: |c| boolean(c.server.proxy_protocol),
    },
    Key {
        name: "server.proxy_trusted",
        doc: "With proxy_protocol: only these peers (address blocks) may send one; others\n\
              are rejected.",
        example: None,
        flag: None,
        set: |c, r| put(&mut c.server.proxy_trusted, r.cidrs()?),
        get: |c| {
            let items = c.server.proxy_trusted.iter();
            Some(toml::Value::Array(
                items.map(|b| toml::Value::String(b.to_string())).collect(),
            ))
        },
    },
    Key {
        name: "connection.mode",
        doc: "\"ack\": answer with Server received \"<data>\" (the tutorial's protocol).\n\
              \"echo\": send every byte back unchanged (RFC 862).",
        example: None,
        flag: value("--mode", "MODE", "ack | echo"),
        set: |c, r| {
            put(
                &mut c.connection.mode,
                r.choice(&[("ack", Mode::Ack), ("echo", Mode::Echo)])?,
            )
        },
        get: |c| match c.connection.mode {
            Mode::Ack => text("ack"),
            Mode::Echo => text("echo"),
        },
    },
    Key {
        name: "connection.framing",
        doc: "ack mode only. \"read\": one reply per chunk read (tutorial-compatible).\n\
              \"line\": one reply per line ending in \\n; pipelining works.",
        example: None,
        flag: value("--framing", "FRAMING", "read | line"),
        set: |c, r| {
            let options = [("read", Framing::Read), ("line", Framing::Line)];
            put(&mut c.connection.framing, r.choice(&options)?)
        },
        get: |c| match c.connection.framing {
            Framing::Read => text("read"),
            Framing::Line => text("line"),
        },
    },
    Key {
        name: "connection.max_line_bytes",
        doc: "Line framing: the longest line, without its terminator. A longer one gets\n\
              \"ERROR line too long\" and the connection is closed.",
        example: None,
        flag: value("--max-line-bytes", "N", "Longest line in line framing"),
        set: |c, r| {
            put(
                &mut c.connection.max_line_bytes,
                r.count(1, 1 << 30)? as usize,
            )
        },
        get: |c| int(c.connection.max_line_bytes),
    },
    Key {
        name: "connection.max_pending_write_bytes",
        doc: "Replies queued for a client that does not read; past this the server stops\n\
              reading from it until it catches up.",
        example: None,
        flag: None,
        set: |c, r| {
            put(
                &mut c.connection.max_pending_write_bytes,
                r.count(1024, 1 << 32)? as usize,
            )
        },
        get: |c| int(c.connection.max_pending_write_bytes),
    },
    Key {
        name: "connection.idle_timeout",
        doc: "Close a connection after this long with no byte received and nothing owed.",
        example: None,
        flag: value("--idle-timeout", "DUR", "e.g. 60s; 0 disables"),
        set: |c, r| put(&mut c.connection.idle_timeout, r.timeout()?),
        get: |c| dur(c.connection.idle_timeout),
    },
    Key {
        name: "connection.write_timeout",
        doc: "Close a connection after this long with bytes owed and no write progress.",
        example: None,
        flag: value("--write-timeout", "DUR", "e.g. 30s; 0 disables"),
        set: |c, r| put(&mut c.connection.write_timeout, r.timeout()?),
        get: |c| dur(c.connection.write_timeout),
    },
    Key {
        name: "shutdown.drain_delay",
        doc: "After SIGTERM/SIGINT: report not-ready (/-/ready 503, STOPPING=1 to systemd)\n\
              but keep accepting and serving this long, so that a load balancer's health\n\
              check takes the instance out before it stops accepting.",
        example: None,
        flag: value(
            "--shutdown-drain-delay",
            "DUR",
            "Keep accepting this long after SIGTERM, not ready",
        ),
        set: |c, r| put(&mut c.shutdown.drain_delay, r.duration()?),
        get: |c| delay(c.shutdown.drain_delay),
    },
    Key {
        name: "shutdown.grace",
        doc: "Then: everything already queued is accepted, the listener is closed, and\n\
              open connections get this long to finish. The rest are closed. A second\n\
              signal exits at once.",
        example: None,
        flag: value(
            "--shutdown-grace",
            "DUR",
            "Time for connections to finish after the listener closes",
        ),
        set: |c, r| put(&mut c.shutdown.grace, r.duration()?),
        get: |c| delay(c.shutdown.grace),
    },
    Key {
        name: "shutdown.metrics_linger",
        doc: "After the last connection closed: keep /metrics answering this long, so a\n\
              final scrape sees the drain (/-/ready stays 503).",
        example: None,
        flag: None,
        set: |c, r| put(&mut c.shutdown.metrics_linger, r.duration()?),
        get: |c| delay(c.shutdown.metrics_linger),
    },
    Key {
        name: "metrics.enabled",
        doc: "Serve Prometheus metrics, /-/healthy and /-/ready over HTTP.",
        example: None,
        flag: switch("--no-metrics", false, "Do not serve metrics"),
        set: |c, r| put(&mut c.metrics.enabled, r.boolean()?),
        get: |c| boolean(c.metrics.enabled),
    },
    Key {
        name: "metrics.listen",
        doc: "Loopback by default: widen it on purpose.",
        example: None,
        flag: value(
            "--metrics-listen",
            "ADDR",
            "Address of the metrics HTTP server",
        ),
        set: |c, r| put(&mut c.metrics.listen, r.addr()?),
        get: |c| text(c.metrics.listen),
    },
    Key {
        name: "metrics.bearer_token_file",
        doc: "Optional: require \"Authorization: Bearer <token>\" on /metrics. The file holds\n\
              the token; surrounding whitespace is ignored.",
        example: Some("/etc/sockpool/metrics.token"),
        flag: None,
        set: |c, r| {
            put(
                &mut c.metrics.bearer_token_file,
                Some(PathBuf::from(r.text()?)),
            )
        },
        get: |c| path(&c.metrics.bearer_token_file),
    },
    Key {
        name: "log.level",
        doc: "error | warn | info | debug | trace",
        example: None,
        flag: value(
            "--log-level",
            "LEVEL",
            "error | warn | info | debug | trace",
        ),
        set: |c, r| put(&mut c.log.level, r.choice(&LOG_LEVELS)?),
        get: |c| text(c.log.level.to_string().to_lowercase()),
    },
    Key {
        name: "log.file",
        doc: "Optional: also append logs to this file (its directory must exist). Under the\n\
              shipped systemd unit stderr already goes to the journal; for a file there, add\n\
              LogsDirectory=sockpool to the unit and use /var/log/sockpool/sockpool.log.",
        example: Some("/var/log/sockpool.log"),
        flag: value("--log-file", "PATH", "Also append logs to this file"),
        set: |c, r| put(&mut c.log.file, Some(PathBuf::from(r.text()?))),
        get: |c| path(&c.log.file),
    },
];

/// Stores a parsed value: the end of every row's `set`.
fn put<T>(slot: &mut T, value: T) -> Result<(), String> {
    *slot = value;
    Ok(())
}

/// The row of `name`, if it is a key.
pub fn key(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == name)
}

/// The sections, in the order of [`KEYS`].
fn sections() -> Vec<&'static str> {
    let mut out: Vec<&str> = Vec::new();
    for k in KEYS {
        if !out.contains(&k.section()) {
            out.push(k.section());
        }
    }
    out
}

/// The opening comment of the default file.
const FILE_HEADER: &str = "\
# sockpool configuration. Every key is shown with its built-in default; delete
# what you do not change. Unknown keys are an error. Durations are written like
# \"500ms\", \"30s\", \"5m\" or \"1h\"; \"0\" disables a timeout.
# Command-line flags override this file (see `sockpool serve --help`).
";

/// The documented default config file: every key of [`KEYS`] with its comment and
/// its built-in default. `sockpool print-default-config` prints it, and the shipped
/// `config/sockpool.toml` is exactly this text (a test checks it).
pub fn default_file() -> String {
    let defaults = Config::default();
    let mut o = String::from(FILE_HEADER);
    for section in sections() {
        let _ = writeln!(o, "\n[{section}]");
        for k in KEYS.iter().filter(|k| k.section() == section) {
            for line in k.doc.lines() {
                let _ = writeln!(o, "# {}", line.trim());
            }
            match (k.value(&defaults), k.example) {
                (Some(v), _) => {
                    let _ = writeln!(o, "{} = {}", k.short(), show(&v));
                }
                (None, Some(example)) => {
                    let v = toml::Value::String(example.to_string());
                    let _ = writeln!(o, "# {} = {}", k.short(), show(&v));
                }
                (None, None) => {}
            }
        }
    }
    o
}

impl Config {
    /// Sets one key from a raw value (the file and the flags both come here).
    /// `Err` is the problem, without the key (the caller adds it).
    pub fn set(&mut self, name: &str, raw: &Raw) -> Result<(), String> {
        match key(name) {
            Some(k) => (k.set)(self, raw),
            None => Err(UNKNOWN_KEY.into()),
        }
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
    /// back to the same value: every key of [`KEYS`], without the comments.
    pub fn to_toml(&self) -> String {
        let mut o = String::new();
        for (i, section) in sections().into_iter().enumerate() {
            let _ = writeln!(o, "{}[{section}]", if i > 0 { "\n" } else { "" });
            for k in KEYS.iter().filter(|k| k.section() == section) {
                if let Some(v) = k.value(self) {
                    let _ = writeln!(o, "{} = {}", k.short(), show(&v));
                }
            }
        }
        o
    }
}

/// The problem [`Config::set`] reports for a key it does not know.
const UNKNOWN_KEY: &str = "unknown key";

/// Two listen addresses that cannot both be bound. Port 0 picks a free port, so it
/// never conflicts.
fn addrs_conflict(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// `sockpool serve` flags: `--config FILE` and one flag per row of [`KEYS`] that
/// has one. Values are kept as text and parsed by [`Config::set`], so a bad flag is
/// reported exactly like a bad key. Built from the table (no derive), so a key's
/// flag cannot be forgotten in `--help` or in [`ServeFlags::overrides`].
#[derive(Debug, Clone, Default)]
pub struct ServeFlags {
    /// TOML config file (see `sockpool print-default-config`).
    pub config: Option<PathBuf>,
    /// The flags given, as `(flag, key, value)`, in the order of [`KEYS`].
    pub given: Vec<(&'static str, &'static str, Raw)>,
}

/// The clap id of the `--config` flag (keys use their own names as ids).
const CONFIG_ID: &str = "config";

impl clap::Args for ServeFlags {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let mut cmd = cmd.arg(
            clap::Arg::new(CONFIG_ID)
                .long("config")
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .help("TOML config file (see `sockpool print-default-config`)"),
        );
        for k in KEYS {
            let Some(flag) = &k.flag else { continue };
            let help = match flag.kind {
                FlagKind::Switch(to) => format!("{} [{} = {to}]", flag.help, k.name),
                FlagKind::Value(_) => format!("{} [{}]", flag.help, k.name),
            };
            let arg = clap::Arg::new(k.name)
                .long(flag.long.trim_start_matches('-'))
                .help(help);
            cmd = cmd.arg(match flag.kind {
                FlagKind::Value(name) => arg.value_name(name).action(clap::ArgAction::Set),
                FlagKind::Switch(_) => arg.action(clap::ArgAction::SetTrue),
            });
        }
        cmd
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for ServeFlags {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = ServeFlags::default();
        flags.update_from_arg_matches(m)?;
        Ok(flags)
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        if let Some(p) = m.get_one::<PathBuf>(CONFIG_ID) {
            self.config = Some(p.clone());
        }
        for k in KEYS {
            let Some(flag) = &k.flag else { continue };
            let raw = match flag.kind {
                FlagKind::Value(_) => m.get_one::<String>(k.name).map(|v| Raw::Flag(v.clone())),
                FlagKind::Switch(to) => m.get_flag(k.name).then_some(Raw::Bool(to)),
            };
            if let Some(raw) = raw {
                self.given.retain(|(_, key, _)| *key != k.name);
                self.given.push((flag.long, k.name, raw));
            }
        }
        Ok(())
    }
}

impl ServeFlags {
    /// The flags given, as `(flag, key, value)` in the order of [`KEYS`].
    pub fn overrides(&self) -> Vec<(&'static str, &'static str, Raw)> {
        self.given.clone()
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
    fn default_file_reads_back_to_the_built_in_defaults() {
        let mut c = Config::default();
        c.merge_toml(&default_file(), "default").unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn every_key_prints_what_it_parses() {
        // A value other than the default for each key, to catch a `get` that reads
        // the wrong field.
        let mut c = Config::default();
        c.merge_toml(
            "[server]\nlisten = \"127.0.0.2:7\"\nworkers = 3\nmax_connections = 9\n\
             max_connections_per_ip = 2\nbacklog = 5\nbusy_message = \"full\\t\\u0001\"\n\
             tcp_nodelay = false\nreuse_port = true\nproxy_protocol = true\n\
             proxy_trusted = [\"10.0.0.0/8\", \"fd00::/8\", \"192.0.2.7\"]\n\
             [connection]\nmode = \"ack\"\nframing = \"line\"\nmax_line_bytes = 10\n\
             max_pending_write_bytes = 2048\nidle_timeout = \"5m\"\nwrite_timeout = \"0\"\n\
             [shutdown]\ndrain_delay = \"1500ms\"\ngrace = \"2h\"\nmetrics_linger = \"7s\"\n\
             [metrics]\nenabled = false\nlisten = \"127.0.0.3:8\"\nbearer_token_file = \"t\"\n\
             [log]\nlevel = \"debug\"\nfile = \"x.log\"\n",
            "t",
        )
        .unwrap();
        let shown = c.to_toml();
        for k in KEYS {
            let default = k.value(&Config::default());
            // Echo mode has no framing, so mode stays "ack" to let framing change.
            if k.name != "connection.mode" {
                assert_ne!(k.value(&c), default, "{} kept its default", k.name);
            }
        }
        let mut back = Config::default();
        back.merge_toml(&shown, "back").unwrap();
        assert_eq!(back, c, "{shown}");
        assert!(
            shown.contains("busy_message = \"full\\t\\u0001\""),
            "{shown}"
        );
        assert!(
            shown.contains("proxy_trusted = [\"10.0.0.0/8\", \"fd00::/8\", \"192.0.2.7/32\"]"),
            "{shown}"
        );
    }

    #[test]
    fn cidr_blocks_parse_contain_and_fold_mapped_ipv4() {
        let c = |s: &str| s.parse::<Cidr>().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(c("127.0.0.0/8").contains(ip("127.1.2.3")));
        assert!(c("127.0.0.0/8").contains(ip("::ffff:127.0.0.1")));
        assert!(!c("127.0.0.0/8").contains(ip("128.0.0.1")));
        assert!(!c("127.0.0.0/8").contains(ip("::1")));
        assert!(c("::1/128").contains(ip("::1")));
        assert!(!c("::1/128").contains(ip("::2")));
        assert!(c("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(!c("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(c("::/0").contains(ip("2001:db8::1")));
        assert!(c("fd00::/8").contains(ip("fdab::1")));
        assert!(c("192.0.2.7").contains(ip("192.0.2.7")));
        assert!(!c("192.0.2.7").contains(ip("192.0.2.8")));
        assert_eq!(c("::ffff:10.0.0.0/104"), c("10.0.0.0/8"));
        assert!(c("::ffff:10.0.0.0/104").contains(ip("10.9.9.9")));
        assert_eq!(c("::ffff:10.0.0.0/104").to_string(), "10.0.0.0/8");
        for (bad, why) in [
            ("10.0.0.1/8", "host bits are set (the block is 10.0.0.0/8)"),
            ("10.0.0.0/33", "at most 32"),
            ("::/129", "at most 128"),
            ("10.0.0.0/", "expected an address block"),
            ("10.0.0.0/+8", "expected an address block"),
            ("localhost/8", "expected an address block"),
            ("", "expected an address block"),
        ] {
            let e = bad.parse::<Cidr>().unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_bad_proxy_trusted_block_names_the_key_and_the_item() {
        for (text, want) in [
            (
                "[server]\nproxy_trusted = [\"10.0.0.0/8\", \"10.1.0.0/8\"]",
                "server.proxy_trusted = [\"10.0.0.0/8\", \"10.1.0.0/8\"]: \"10.1.0.0/8\": host bits are set",
            ),
            (
                "[server]\nproxy_trusted = \"10.0.0.0/8\"",
                "server.proxy_trusted = \"10.0.0.0/8\": expected an array",
            ),
            (
                "[server]\nproxy_trusted = [8]",
                "server.proxy_trusted = [8]: expected a string, found an integer",
            ),
        ] {
            let e = Config::default().merge_toml(text, "f.toml").unwrap_err();
            assert!(e.0.contains(want), "{text:?} gave {e}");
        }
        let mut c = Config::default();
        c.merge_toml("[server]\nproxy_trusted = []", "f").unwrap();
        assert!(!c.server.proxy_trusts("127.0.0.1".parse().unwrap()));
        assert!(Config::default()
            .server
            .proxy_trusts("::ffff:127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn serve_flags_come_from_the_table_and_set_their_keys() {
        use clap::{Args, FromArgMatches};
        let cmd = ServeFlags::augment_args(clap::Command::new("serve"));
        let m = cmd
            .try_get_matches_from([
                "serve",
                "--config",
                "c.toml",
                "--reuse-port",
                "--proxy-protocol",
                "--shutdown-drain-delay",
                "2s",
                "--no-metrics",
                "--workers",
                "3",
            ])
            .unwrap();
        let flags = ServeFlags::from_arg_matches(&m).unwrap();
        assert_eq!(flags.config.as_deref(), Some(Path::new("c.toml")));
        let given: Vec<_> = flags.overrides().iter().map(|(f, k, _)| (*f, *k)).collect();
        assert_eq!(
            given,
            [
                ("--workers", "server.workers"),
                ("--reuse-port", "server.reuse_port"),
                ("--proxy-protocol", "server.proxy_protocol"),
                ("--shutdown-drain-delay", "shutdown.drain_delay"),
                ("--no-metrics", "metrics.enabled"),
            ]
        );
        let c = Config::load(None, &flags.overrides()).unwrap();
        assert!(c.server.reuse_port && c.server.proxy_protocol && !c.metrics.enabled);
        assert_eq!(c.shutdown.drain_delay, Duration::from_secs(2));
        assert_eq!(c.server.workers, 3);
    }

    #[test]
    fn every_flag_is_unique_and_names_a_key() {
        let mut seen = std::collections::HashSet::new();
        for k in KEYS {
            assert!(seen.insert(k.name), "{} twice", k.name);
            if let Some(f) = &k.flag {
                assert!(f.long.starts_with("--"), "{}", f.long);
                assert!(seen.insert(f.long), "{} twice", f.long);
            }
        }
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

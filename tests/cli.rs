//! The command line: config errors exit 2 naming the key, runtime errors exit 1
//! naming the address, check-config and print-default-config.

mod common;

use std::io::Write;

use common::{run, Server};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bad_flags_and_keys_exit_2_naming_key_and_value() {
    let cases: &[(&[&str], &str)] = &[
        (&["serve", "--workers", "many"], "--workers \"many\""),
        (
            &["serve", "--idle-timeout", "5 parsecs"],
            "--idle-timeout \"5 parsecs\"",
        ),
        (&["serve", "--mode", "shout"], "--mode \"shout\""),
        (&["serve", "--listen", "nowhere"], "--listen \"nowhere\""),
        (
            &["serve", "--max-connections", "0"],
            "--max-connections \"0\"",
        ),
        (&["serve", "--frobnicate"], "--frobnicate"),
        (
            &["serve", "--mode", "echo", "--framing", "line"],
            "connection.framing",
        ),
        (&["serve", "--log-file", "/no/such/dir/s.log"], "log.file"),
        (
            &["serve", "--shutdown-drain-delay", "soon"],
            "--shutdown-drain-delay \"soon\"",
        ),
        (&["serve", "--reuse-port=yes"], "--reuse-port"),
        (&["serve", "--proxy-protocol=1"], "--proxy-protocol"),
    ];
    for (args, want) in cases {
        let o = run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("listening on"));
    }
}

#[test]
fn config_file_errors_exit_2_and_nothing_is_bound() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[server]\nworkers = \"x\"\n", "server.workers = \"x\""),
        (
            "[server]\nlisten = \"127.0.0.1:0\"\nextra = 1\n",
            "unknown key server.extra",
        ),
        (
            "[metrics]\nlisten = \"127.0.0.1:20000\"\n[server]\nlisten = \"127.0.0.1:20000\"\n",
            "metrics.listen",
        ),
        (
            "[metrics]\nbearer_token_file = \"/no/such/token\"\n",
            "metrics.bearer_token_file",
        ),
        ("[connection\n", "TOML parse error"),
        (
            "[server]\nproxy_trusted = [\"127.0.0.0/8\", \"10.0.0.0/33\"]\n",
            "server.proxy_trusted = [\"127.0.0.0/8\", \"10.0.0.0/33\"]: \"10.0.0.0/33\": the prefix length must be at most 32",
        ),
        (
            "[server]\nproxy_trusted = [\"localhost\"]\n",
            "server.proxy_trusted = [\"localhost\"]: \"localhost\": expected an address block",
        ),
        (
            "[shutdown]\nmetrics_linger = \"-1s\"\n",
            "shutdown.metrics_linger = \"-1s\"",
        ),
        ("[server]\nreuse_port = \"yes\"\n", "server.reuse_port = \"yes\""),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.toml"));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        for args in [
            vec!["serve", "--config", path.to_str().unwrap()],
            vec!["check-config", path.to_str().unwrap()],
        ] {
            let o = run(&args);
            assert_eq!(o.status.code(), Some(2), "{text:?}: {}", stderr(&o));
            assert!(stderr(&o).contains(want), "{text:?}: {}", stderr(&o));
        }
    }
}

#[test]
fn print_default_config_is_valid_and_check_config_prints_the_effective_values() {
    let o = run(&["print-default-config"]);
    assert_eq!(o.status.code(), Some(0));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("listen = \"0.0.0.0:20000\""));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("default.toml");
    std::fs::write(&path, &text).unwrap();
    let o = run(&["check-config", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let shown = String::from_utf8(o.stdout).unwrap();
    for line in [
        "workers = 0",
        "idle_timeout = \"60s\"",
        "drain_delay = \"0s\"",
        "proxy_trusted = [\"127.0.0.0/8\", \"::1/128\"]",
        "max_pending_write_bytes = 1048576",
        "level = \"info\"",
    ] {
        assert!(shown.contains(line), "missing {line}:\n{shown}");
    }
}

#[test]
fn config_file_is_loaded_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 3\n[connection]\nmode = \"echo\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let server = Server::start(&["--config", path.to_str().unwrap(), "--workers", "1"]);
    assert!(
        server.log().contains("(mode=echo framing=read workers=1)"),
        "{}",
        server.log()
    );
    assert_eq!(server.metric("sockpool_workers"), 1.0);
}

#[test]
fn new_flags_set_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.toml");
    std::fs::write(
        &path,
        "[server]\nproxy_trusted = [\"10.0.0.0/8\", \"::ffff:192.0.2.0/120\"]\n",
    )
    .unwrap();
    let o = run(&["check-config", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(
        shown.contains("proxy_trusted = [\"10.0.0.0/8\", \"192.0.2.0/24\"]"),
        "{shown}"
    );
    let server = Server::start(&[
        "--reuse-port",
        "--proxy-protocol",
        "--shutdown-drain-delay",
        "250ms",
        "--workers",
        "1",
    ]);
    assert!(!server.log().contains("error"), "{}", server.log());
}

#[test]
fn address_in_use_exits_1_naming_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let o = run(&["serve", "--listen", &addr, "--no-metrics"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains(&addr), "{}", stderr(&o));
    let o = run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        &addr,
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains(&addr), "{}", stderr(&o));
}

#[test]
fn workers_zero_means_one_per_core() {
    let server = Server::start(&["--workers", "0", "--no-metrics"]);
    let cores = std::thread::available_parallelism().unwrap().get();
    assert!(
        server.log().contains(&format!("workers={cores})")),
        "{}",
        server.log()
    );
}

#[test]
fn max_connections_is_clamped_to_rlimit_nofile_with_a_warning() {
    // prlimit (util-linux) lowers the hard limit for the child only.
    if !common::have_tool("prlimit", "util-linux") {
        return;
    }
    let mut child = std::process::Command::new("prlimit")
        .args([
            "--nofile=512:512",
            common::bin(),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-metrics",
            "--max-connections",
            "10000",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = String::new();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    use std::io::BufRead;
    while !log.contains("listening on") {
        if stderr.read_line(&mut log).unwrap() == 0 {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        log.contains("max_connections = 10000 does not fit RLIMIT_NOFILE = 512; using 448"),
        "{log}"
    );
}

//! Bad configuration: every key with a wrong type or range, contradictions and
//! unusable files exit 2 naming the key, and bind nothing.

mod common;

use common::run;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Both `check-config FILE` and `serve --config FILE` exit 2, name `want` on
/// stderr and bind nothing.
fn assert_rejected(dir: &std::path::Path, n: usize, text: &str, want: &str) {
    let path = dir.join(format!("bad{n}.toml"));
    std::fs::write(&path, text).unwrap();
    let file = path.to_str().unwrap();
    for args in [vec!["check-config", file], vec!["serve", "--config", file]] {
        let o = run(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{text:?} {args:?}: {err}");
        assert!(err.contains(want), "{text:?}: wanted {want:?} in: {err}");
        assert!(!err.contains("listening on"), "{text:?}: {err}");
    }
}

/// Every key of config/sockpool.toml with a value of the wrong type and one out of
/// range (tests/cli.rs has the flags and a few file cases).
#[test]
fn every_config_key_with_a_wrong_type_or_range_exits_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        ("server", "listen", "20000"),
        ("server", "listen", "\"127.0.0.1\""),
        ("server", "listen", "\"127.0.0.1:70000\""),
        ("server", "workers", "true"),
        ("server", "workers", "1025"),
        ("server", "max_connections", "\"10\""),
        ("server", "max_connections", "0"),
        ("server", "max_connections", "-5"),
        ("server", "max_connections_per_ip", "1.5"),
        ("server", "max_connections_per_ip", "-1"),
        ("server", "backlog", "[1]"),
        ("server", "backlog", "0"),
        ("server", "backlog", "65536"),
        ("server", "busy_message", "42"),
        ("server", "tcp_nodelay", "1"),
        ("server", "tcp_nodelay", "\"true\""),
        ("connection", "mode", "1"),
        ("connection", "mode", "\"ECHO\""),
        ("connection", "framing", "false"),
        ("connection", "framing", "\"lines\""),
        ("connection", "max_line_bytes", "\"64k\""),
        ("connection", "max_line_bytes", "0"),
        ("connection", "max_line_bytes", "1073741825"),
        ("connection", "max_pending_write_bytes", "{ a = 1 }"),
        ("connection", "max_pending_write_bytes", "1023"),
        ("connection", "idle_timeout", "true"),
        ("connection", "idle_timeout", "\"-1s\""),
        ("connection", "idle_timeout", "-1"),
        ("connection", "idle_timeout", "\"2y\""),
        ("connection", "write_timeout", "1.5"),
        ("connection", "write_timeout", "\"9000h\""),
        ("shutdown", "grace", "[]"),
        ("shutdown", "grace", "\"ten seconds\""),
        ("metrics", "enabled", "\"yes\""),
        ("metrics", "listen", "true"),
        ("metrics", "listen", "\"localhost:9000\""),
        ("metrics", "bearer_token_file", "7"),
        ("log", "level", "3"),
        ("log", "level", "\"verbose\""),
        ("log", "file", "false"),
    ];
    let mut n = 0;
    for (section, key, value) in cases {
        n += 1;
        let text = format!("[{section}]\n{key} = {value}\n");
        assert_rejected(dir.path(), n, &text, &format!("{section}.{key}"));
    }
    // A long busy message is out of range too.
    let long = "x".repeat(5000);
    assert_rejected(
        dir.path(),
        1000,
        &format!("[server]\nbusy_message = \"{long}\"\n"),
        "server.busy_message",
    );
}

#[test]
fn contradictory_or_unusable_config_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let empty_token = d.join("empty.token");
    std::fs::write(&empty_token, "  \n").unwrap();
    let two_words = d.join("two.token");
    std::fs::write(&two_words, "two words\n").unwrap();
    let cases = [
        (
            "[server]\nlisten = \"127.0.0.1:20500\"\n[metrics]\nlisten = \"127.0.0.1:20500\"\n"
                .to_string(),
            "metrics.listen",
        ),
        (
            "[server]\nlisten = \"0.0.0.0:20501\"\n[metrics]\nlisten = \"127.0.0.1:20501\"\n"
                .to_string(),
            "metrics.listen",
        ),
        (
            "[server]\nmax_connections = 0\n".to_string(),
            "server.max_connections",
        ),
        (
            "[connection]\nmode = \"echo\"\nframing = \"line\"\n".to_string(),
            "connection.framing",
        ),
        (
            // A directory cannot be read as a token (and root can read any file).
            format!(
                "[metrics]\nbearer_token_file = {:?}\n",
                d.display().to_string()
            ),
            "metrics.bearer_token_file",
        ),
        (
            format!(
                "[metrics]\nbearer_token_file = {:?}\n",
                empty_token.display().to_string()
            ),
            "metrics.bearer_token_file",
        ),
        (
            format!(
                "[metrics]\nbearer_token_file = {:?}\n",
                two_words.display().to_string()
            ),
            "metrics.bearer_token_file",
        ),
        (
            format!(
                "[log]\nfile = {:?}\n",
                d.join("missing/dir/s.log").display().to_string()
            ),
            "log.file",
        ),
        ("[server]\n[server]\n".to_string(), "TOML parse error"),
        ("server = 1\n".to_string(), "server = 1"),
        ("[server.deeper]\nx = 1\n".to_string(), "server.deeper"),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        assert_rejected(d, i, text, want);
    }
    // The same ports with metrics disabled are fine.
    let path = d.join("ok.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:20500\"\n[metrics]\nenabled = false\nlisten = \"127.0.0.1:20500\"\n",
    )
    .unwrap();
    let o = run(&["check-config", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// A timeout written as a bare integer is seconds; one too large for the clock
/// once made every worker panic on its first connection ("overflow when adding
/// duration to instant") while the process kept running and accepting.
#[test]
fn regression_huge_integer_timeouts_are_config_errors_not_worker_panics() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (section, key)) in [
        ("connection", "idle_timeout"),
        ("connection", "write_timeout"),
        ("shutdown", "grace"),
    ]
    .into_iter()
    .enumerate()
    {
        let text = format!("[{section}]\n{key} = 9223372036854775807\n");
        assert_rejected(dir.path(), i, &text, &format!("{section}.{key}"));
    }
}

//! One table of config keys (`sockpool::config::KEYS`) drives the flags, the file
//! parser, `check-config`, `print-default-config` and the shipped
//! `config/sockpool.toml`. These tests hold the shipped file and the contract
//! (DESIGN.md's config block and flag list, where that file is at hand) to it.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use common::run;

fn default_file() -> String {
    let out = run(&["print-default-config"]);
    common::assert_success("sockpool print-default-config", &out);
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn the_shipped_config_file_is_print_default_config() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/sockpool.toml");
    let shipped = std::fs::read_to_string(&path).expect("config/sockpool.toml");
    let printed = default_file();
    if shipped != printed {
        let first = shipped
            .lines()
            .zip(printed.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(shipped.lines().count().min(printed.lines().count()));
        panic!(
            "config/sockpool.toml differs from the key table at line {}:\n  shipped: {:?}\n  table:   {:?}\n\
             Regenerate it: cargo run -q -- print-default-config > config/sockpool.toml",
            first + 1,
            shipped.lines().nth(first),
            printed.lines().nth(first)
        );
    }
}

/// Every key of the default file, with its comment above it and its value; the
/// optional ones (shown commented out) with their example.
#[test]
fn every_key_is_documented_and_check_config_reads_the_file_back() {
    let text = default_file();
    let mut previous = "";
    for line in text.lines() {
        let is_key = !line.starts_with('#') && !line.starts_with('[') && line.contains(" = ");
        if is_key {
            assert!(
                previous.starts_with("# "),
                "{line:?} has no comment above it"
            );
        }
        previous = line;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("default.toml");
    std::fs::write(&path, &text).unwrap();
    let out = run(&["check-config", path.to_str().unwrap()]);
    common::assert_success("check-config of the default file", &out);
    let shown = String::from_utf8_lossy(&out.stdout);
    let keys = |t: &str| -> BTreeSet<String> { keys_of(t).into_iter().map(|(k, _)| k).collect() };
    assert_eq!(keys(&shown), keys(&text), "check-config shows every key");
}

/// `(section.key, value text)` of every `key = value` line (not the commented ones).
fn keys_of(text: &str) -> Vec<(String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(s) = line.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s.to_string();
        } else if !line.starts_with('#') {
            if let Some((k, v)) = line.split_once(" = ") {
                out.push((format!("{section}.{}", k.trim()), v.trim().to_string()));
            }
        }
    }
    out
}

/// `section.key` of every commented-out key (`# key = "example"`).
fn commented_keys(text: &str) -> BTreeSet<String> {
    let mut section = String::new();
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(s) = line.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s.to_string();
        } else if let Some(rest) = line.strip_prefix("# ") {
            if let Some((k, _)) = rest.split_once(" = ") {
                if !k.contains(' ') {
                    out.insert(format!("{section}.{k}"));
                }
            }
        }
    }
    out
}

/// DESIGN.md, the contract, if it is beside the repository (it is not part of it).
fn design() -> Option<String> {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let candidates = [
        std::env::var_os("SOCKPOOL_DESIGN").map(PathBuf::from),
        Some(here.join("../shared/DESIGN.md")),
        Some(PathBuf::from("/work/shared/DESIGN.md")),
    ];
    for path in candidates.into_iter().flatten() {
        if let Ok(text) = std::fs::read_to_string(&path) {
            return Some(text);
        }
    }
    eprintln!("SKIPPED: no DESIGN.md beside the repository (set SOCKPOOL_DESIGN)");
    None
}

/// Everything up to the first unquoted `#`: DESIGN.md comments its values inline.
fn strip_inline_comment(value: &str) -> &str {
    let mut quoted = false;
    for (i, c) in value.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '#' if !quoted => return value[..i].trim(),
            _ => {}
        }
    }
    value.trim()
}

#[test]
fn the_key_table_is_design_md_config_block() {
    let Some(design) = design() else { return };
    let start = design
        .find("## Config file (TOML)")
        .expect("DESIGN.md has a config section");
    let block = &design[start..];
    let block = &block[block.find("```toml").expect("a toml block") + 7..];
    let block = &block[..block.find("```").expect("the block ends")];
    let contract: Vec<(String, String)> = keys_of(block)
        .into_iter()
        .map(|(k, v)| {
            let v = strip_inline_comment(&v).to_string();
            (k, v)
        })
        .collect();
    let ours = keys_of(&default_file());
    let parse = |v: &str| -> toml::Value {
        format!("v = {v}")
            .parse::<toml::Table>()
            .unwrap_or_else(|e| panic!("{v:?}: {e}"))["v"]
            .clone()
    };
    for (key, value) in &contract {
        let mine = ours
            .iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("DESIGN.md's {key} is not in the key table"));
        assert_eq!(parse(&mine.1), parse(value), "default of {key}");
    }
    for (key, _) in &ours {
        assert!(
            contract.iter().any(|(k, _)| k == key),
            "{key} is in the key table but not in DESIGN.md's config block"
        );
    }
    assert_eq!(
        commented_keys(block),
        commented_keys(&default_file()),
        "optional keys (commented out)"
    );
}

#[test]
fn every_flag_of_design_md_is_a_serve_flag_and_no_other() {
    let Some(design) = design() else { return };
    let para = &design[design
        .find("`sockpool serve [--config FILE]")
        .expect("serve usage")..];
    let para = &para[..para.find("DUR is").expect("end of the flag list")];
    let contract: BTreeSet<String> = para
        .split('`')
        .skip(1)
        .step_by(2)
        .filter_map(|s| s.strip_prefix("--"))
        .map(|s| format!("--{}", s.split_whitespace().next().unwrap_or("")))
        .filter(|f| f != "--config")
        .collect();
    let out = run(&["serve", "--help"]);
    common::assert_success("sockpool serve --help", &out);
    let help = String::from_utf8_lossy(&out.stdout);
    let ours: BTreeSet<String> = help
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches(',').to_string())
        .filter(|f| f != "--config" && f != "--help")
        .collect();
    assert_eq!(ours, contract, "serve flags vs DESIGN.md");
}

//! `deploy/kubernetes/`, checked offline with the real tools:
//!
//! - `kubernetes-validate --strict` (PyPI; it bundles the Kubernetes schemas) for two
//!   Kubernetes versions, on every manifest but the PodMonitor (a CRD it has no schema for);
//! - the PodMonitor against the prometheus-operator PodMonitor schema vendored in
//!   `deploy/kubernetes/schema/` (`tests/podmonitor_schema.py`, python3-jsonschema);
//! - the ConfigMap's embedded sockpool.toml with `sockpool check-config`;
//! - terminationGracePeriodSeconds above shutdown.drain_delay + shutdown.grace;
//! - the probes, the job label, the image and the pod's security settings.
//!
//! Each check is also shown failing on a manifest with a misspelled field.
//!
//! A missing kubernetes-validate or python3 skips its tests with a note, except under
//! `CI=true` (`.ci/run` installs both), where it is a failure.

mod common;

use common::repo_file;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// Two Kubernetes versions the manifests must fit: an old one still found in the field
/// and the newest kubernetes-validate bundles.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

/// The manifests kubernetes-validate knows the kinds of.
const CORE_MANIFESTS: &[&str] = &[
    "configmap.yaml",
    "deployment.yaml",
    "service.yaml",
    "poddisruptionbudget.yaml",
];

fn manifest(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/kubernetes")
        .join(name)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn have_kubernetes_validate() -> bool {
    common::have_tool_installed_by(
        "kubernetes-validate",
        "python3 -m pip install kubernetes-validate",
    )
}

fn have_python() -> bool {
    common::have_tool("python3", "python3 python3-jsonschema python3-yaml")
}

/// The YAML documents of a file, as JSON (through python3-yaml: no YAML parser is a
/// dependency of this crate).
fn yaml_docs(path: &Path) -> Vec<Value> {
    let out = run(Command::new("python3")
        .arg("-c")
        .arg(
            "import json, sys, yaml\n\
             print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]))",
        )
        .arg(path));
    common::assert_success(&format!("python3 yaml load of {}", path.display()), &out);
    serde_json::from_slice(&out.stdout).expect("JSON from python3")
}

fn yaml_doc(name: &str) -> Value {
    let mut docs = yaml_docs(&manifest(name));
    assert_eq!(docs.len(), 1, "{name}: one document per file");
    docs.remove(0)
}

/// A copy of a manifest with `from` replaced by `to` (exactly once), in `dir`.
fn mutated(dir: &Path, name: &str, from: &str, to: &str) -> PathBuf {
    let text = read(&manifest(name));
    assert_eq!(text.matches(from).count(), 1, "{name}: {from:?} once");
    let path = dir.join(name);
    std::fs::write(&path, text.replacen(from, to, 1)).expect("write");
    path
}

fn kubernetes_validate(version: &str, files: &[PathBuf]) -> Output {
    run(Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", version])
        .args(files))
}

// ------------------------------------------------------------------------ kubernetes-validate

#[test]
fn kubernetes_validate_strict_accepts_the_manifests() {
    if !have_kubernetes_validate() {
        return;
    }
    let files: Vec<PathBuf> = CORE_MANIFESTS.iter().map(|m| manifest(m)).collect();
    for v in KUBERNETES_VERSIONS {
        let out = kubernetes_validate(v, &files);
        common::assert_success(&format!("kubernetes-validate --strict -k {v}"), &out);
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        for m in CORE_MANIFESTS {
            assert!(
                text.lines().any(|l| l.contains(m) && l.contains("passed")),
                "{m} was not validated against {v}:\n{text}"
            );
        }
    }
}

#[test]
fn every_manifest_is_checked() {
    let mut found: Vec<String> = std::fs::read_dir(manifest(""))
        .expect("deploy/kubernetes")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    found.sort();
    let mut checked: Vec<String> = CORE_MANIFESTS
        .iter()
        .chain(&["podmonitor.yaml"])
        .map(|s| s.to_string())
        .collect();
    checked.sort();
    assert_eq!(found, checked, "a manifest that no test validates");
}

#[test]
fn kubernetes_validate_rejects_a_misspelled_field() {
    if !have_kubernetes_validate() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, from, to, unexpected) in [
        (
            "deployment.yaml",
            "readinessProbe:",
            "readinesProbe:",
            "'readinesProbe' was unexpected",
        ),
        (
            "service.yaml",
            "targetPort: data",
            "targetport: data",
            "'targetport' was unexpected",
        ),
        (
            "poddisruptionbudget.yaml",
            "maxUnavailable: 1",
            "maxUnavailible: 1",
            "'maxUnavailible' was unexpected",
        ),
    ] {
        let bad = mutated(dir.path(), name, from, to);
        for v in KUBERNETES_VERSIONS {
            let out = kubernetes_validate(v, std::slice::from_ref(&bad));
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && text.contains(unexpected),
                "{name} with {to:?} should fail against {v}:\n{text}"
            );
        }
    }
}

// ------------------------------------------------------------------------ PodMonitor

fn podmonitor_check(path: &Path) -> Output {
    run(Command::new("python3")
        .arg(repo_file("tests/podmonitor_schema.py"))
        .arg(path)
        .arg(repo_file("deploy/kubernetes/schema/podmonitor.schema.json")))
}

#[test]
fn podmonitor_matches_the_prometheus_operator_schema() {
    if !have_python() {
        return;
    }
    let out = podmonitor_check(&manifest("podmonitor.yaml"));
    common::assert_success("tests/podmonitor_schema.py podmonitor.yaml", &out);
}

#[test]
fn podmonitor_with_a_misspelled_field_fails_the_schema() {
    if !have_python() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    for (from, to) in [
        ("jobLabel:", "jobLable:"),
        ("podMetricsEndpoints:", "podMetricEndpoints:"),
        ("    - port: metrics", "    - prot: metrics"),
    ] {
        let bad = mutated(dir.path(), "podmonitor.yaml", from, to);
        let out = podmonitor_check(&bad);
        assert_eq!(
            out.status.code(),
            Some(1),
            "podmonitor.yaml with {to:?} should fail:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn podmonitor_job_is_sockpool() {
    if !have_python() {
        return;
    }
    let pm = yaml_doc("podmonitor.yaml");
    let dep = yaml_doc("deployment.yaml");
    let job_label = pm["spec"]["jobLabel"].as_str().expect("spec.jobLabel");
    let pod_labels = &dep["spec"]["template"]["metadata"]["labels"];
    assert_eq!(
        pod_labels[job_label], "sockpool",
        "the job is the pod label {job_label}, which alerts.yml expects to be sockpool"
    );
    for (k, v) in pm["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
    {
        assert_eq!(&pod_labels[k], v, "the PodMonitor selects the pods");
    }
    let endpoints = pm["spec"]["podMetricsEndpoints"]
        .as_array()
        .expect("endpoints");
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0]["port"], "metrics");
    assert_eq!(endpoints[0]["path"], "/metrics");
}

// ------------------------------------------------------------------------ the embedded config

/// The `sockpool.toml` key of the ConfigMap, taken from the block scalar by its
/// indentation (the same text YAML gives; `embedded_config_is_what_yaml_reads` checks).
fn embedded_config(configmap: &str) -> Option<String> {
    let mut lines = configmap.lines();
    lines.find(|l| l.trim_end() == "  sockpool.toml: |")?;
    let mut out = String::new();
    for l in lines {
        if l.trim().is_empty() {
            out.push('\n');
        } else if let Some(body) = l.strip_prefix("    ") {
            out.push_str(body);
            out.push('\n');
        } else {
            break;
        }
    }
    Some(out.trim_end().to_string() + "\n")
}

fn check_config(text: &str) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("sockpool.toml");
    std::fs::write(&path, text).expect("write config");
    run(Command::new(common::bin()).arg("check-config").arg(&path))
}

#[test]
fn embedded_config_is_what_yaml_reads() {
    if !have_python() {
        return;
    }
    let cm = yaml_doc("configmap.yaml");
    let yaml = cm["data"]["sockpool.toml"]
        .as_str()
        .expect("data.sockpool.toml");
    let ours = embedded_config(&read(&manifest("configmap.yaml"))).expect("sockpool.toml");
    assert_eq!(ours, yaml);
}

/// Needs the config keys shutdown.drain_delay and server.proxy_protocol (DESIGN.md).
#[test]
fn embedded_config_passes_check_config() {
    let text = embedded_config(&read(&manifest("configmap.yaml"))).expect("sockpool.toml");
    let out = check_config(&text);
    common::assert_success(
        "sockpool check-config on the ConfigMap's sockpool.toml",
        &out,
    );
    let effective = String::from_utf8_lossy(&out.stdout);
    for line in [r#"listen = "0.0.0.0:20000""#, r#"listen = "0.0.0.0:20001""#] {
        assert!(
            effective.contains(line),
            "effective config lacks {line}:\n{effective}"
        );
    }
}

#[test]
fn embedded_config_with_a_misspelled_key_fails_check_config() {
    let text = embedded_config(&read(&manifest("configmap.yaml"))).expect("sockpool.toml");
    for (from, to) in [("grace = ", "grac = "), ("workers = ", "worker = ")] {
        assert_eq!(text.matches(from).count(), 1, "{from}");
        let out = check_config(&text.replacen(from, to, 1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{to}: {stderr}");
        let key = to.trim_end_matches(" = ");
        assert!(stderr.contains(key), "the error names {key}: {stderr}");
    }
}

// ------------------------------------------------------------------------ grace period

/// A sockpool duration ("5s", "500ms", "2m", "0") in seconds.
fn seconds(d: &str) -> Result<f64, String> {
    let split = d
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(d.len());
    let (n, unit) = d.split_at(split);
    let n: f64 = n.parse().map_err(|e| format!("bad duration {d:?}: {e}"))?;
    Ok(n * match unit {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("unknown unit {other:?} in {d:?}")),
    })
}

/// Whether the Deployment gives a pod longer than the config's drain_delay + grace
/// (with one second to spare for the process to exit), so the kubelet never kills
/// one that is still draining.
fn grace_fits(deployment: &str, config: &str) -> Result<(), String> {
    let period: f64 = deployment
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds:"))
        .ok_or("the Deployment sets no terminationGracePeriodSeconds")?
        .trim()
        .parse()
        .map_err(|e| format!("terminationGracePeriodSeconds: {e}"))?;
    let table: toml::Table = config.parse().map_err(|e| format!("config: {e}"))?;
    let shutdown = table
        .get("shutdown")
        .and_then(|s| s.as_table())
        .ok_or("the config has no [shutdown]")?;
    let key = |k: &str| -> Result<f64, String> {
        seconds(
            shutdown
                .get(k)
                .and_then(|v| v.as_str())
                .ok_or(format!("the config sets no shutdown.{k}"))?,
        )
    };
    let need = key("drain_delay")? + key("grace")?;
    if period > need + 1.0 {
        Ok(())
    } else {
        Err(format!(
            "terminationGracePeriodSeconds {period} is not above drain_delay + grace = {need} (+1s)"
        ))
    }
}

#[test]
fn grace_period_exceeds_drain_delay_plus_grace() {
    let dep = read(&manifest("deployment.yaml"));
    let cfg = embedded_config(&read(&manifest("configmap.yaml"))).expect("sockpool.toml");
    grace_fits(&dep, &cfg).unwrap();
    // The check fails on a period too short, and on a misspelled key on either side.
    assert!(grace_fits(
        &dep.replace(
            "terminationGracePeriodSeconds: 35",
            "terminationGracePeriodSeconds: 25"
        ),
        &cfg
    )
    .is_err());
    assert!(grace_fits(
        &dep.replace(
            "terminationGracePeriodSeconds:",
            "terminationGracePeriodSecond:"
        ),
        &cfg
    )
    .is_err());
    assert!(grace_fits(&dep, &cfg.replace("drain_delay =", "drain_dealy =")).is_err());
}

// ------------------------------------------------------------------------ the pod spec

#[test]
fn deployment_probes_drain_and_runs_unprivileged() {
    if !have_python() {
        return;
    }
    let dep = yaml_doc("deployment.yaml");
    let pod = &dep["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];

    assert_eq!(
        c["image"],
        format!("sockpool:{}", env!("CARGO_PKG_VERSION")),
        "the image tests/container.rs builds"
    );
    assert_eq!(
        c["args"],
        serde_json::json!(["serve", "--config", "/etc/sockpool/sockpool.toml"])
    );
    let ports: Vec<(&str, i64)> = c["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or(""),
                p["containerPort"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(ports, [("data", 20000), ("metrics", 20001)]);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/-/ready");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "metrics");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/-/healthy");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "metrics");
    assert!(
        c["lifecycle"]["preStop"].is_null(),
        "shutdown.drain_delay replaces a preStop sleep"
    );
    for k in ["cpu", "memory"] {
        assert!(!c["resources"]["requests"][k].is_null(), "requests.{k}");
    }
    assert!(
        !c["resources"]["limits"]["memory"].is_null(),
        "limits.memory"
    );

    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert!(pod["securityContext"]["runAsUser"].as_i64().unwrap_or(0) > 0);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        c["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );

    // The Service and the PDB select these pods.
    let labels = &dep["spec"]["template"]["metadata"]["labels"];
    for (name, selector) in [
        (
            "service.yaml",
            yaml_doc("service.yaml")["spec"]["selector"].clone(),
        ),
        (
            "poddisruptionbudget.yaml",
            yaml_doc("poddisruptionbudget.yaml")["spec"]["selector"]["matchLabels"].clone(),
        ),
    ] {
        for (k, v) in selector.as_object().expect("selector") {
            assert_eq!(&labels[k], v, "{name} selects the pods");
        }
    }
}

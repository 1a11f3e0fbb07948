//! The container image of `Containerfile`, built with the real podman.
//!
//! The test lays out the image's root file system with `scripts/container-rootfs.sh`
//! from the binary cargo built (the same script and Containerfile a release uses), builds
//! it `FROM scratch` with `podman build` in storage of its own (its own `--root` and
//! `--runroot`, the vfs driver: nothing of the machine's podman is used or left behind),
//! and then:
//!
//! - inspects the image: entrypoint, exposed ports, a non-root user;
//! - copies the binary back out of a created (never started) container and shows that
//!   it is the binary that went in and that it serves a client;
//! - copies the image's whole file system out and runs the server from it under
//!   `chroot` as the image's user, which shows the image holds every library the
//!   binary needs.
//!
//! It does not run the container: on these machines crun cannot set the rlimits podman
//! asks for (`setrlimit RLIMIT_NOFILE: Operation not permitted`), and with those
//! lowered, crun refuses the hybrid cgroup setup. The chroot run is the nearest honest
//! substitute.
//!
//! Without podman the test is skipped, except under `CI=true` (`.ci/run` installs it),
//! where that is a failure.

mod common;

use common::repo_file;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use common::LogTail;

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// podman with storage in `dir` only.
struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    fn new() -> Podman {
        Podman {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(self.dir.path().join("root"))
            .arg("--runroot")
            .arg(self.dir.path().join("runroot"))
            .arg("--tmpdir")
            .arg(self.dir.path().join("tmp"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "none",
            ])
            .env("TMPDIR", self.dir.path());
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = run(self.cmd().args(args));
        common::assert_success(&format!("podman {}", args.join(" ")), &out);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers are only created, never started; removing them all is enough.
        let _ = self.cmd().args(["rm", "--all", "--force"]).output();
    }
}

/// A server process started from some binary; killed on drop.
struct Running {
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address after `marker` on a sockpool startup line.
fn addr_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let end = rest.find([' ', '/']).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Starts `cmd` (some way of running `sockpool serve` on 127.0.0.1:0) and waits for
/// both startup lines.
fn start(mut cmd: Command) -> Running {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    // The tail keeps draining the log, so the server never blocks on a full pipe.
    let log = LogTail::collect(child.stderr.take().expect("stderr"));
    let found = log.wait_for(common::WAIT, |text| {
        let mut lines = text.lines();
        let addr = lines
            .clone()
            .find_map(|l| addr_after(l, "] listening on "))?;
        let metrics = lines.find_map(|l| addr_after(l, "] metrics on http://"))?;
        Some((addr, metrics))
    });
    let (addr, metrics) = found.unwrap_or_else(|log| {
        let _ = child.kill();
        let status = child.wait();
        panic!("{cmd:?} did not start ({status:?}):\n{log}");
    });
    Running {
        child,
        addr,
        metrics,
    }
}

/// One exchange in the tutorial's protocol, a readiness check, then a clean stop.
fn serves_a_client(mut server: Running, what: &str) {
    let mut s = TcpStream::connect(server.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"hello from the image\n").unwrap();
    let want = b"Server received \"hello from the image\"\n";
    let got = common::read_exact_bytes(&mut s, want.len());
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(want),
        "{what}: reply"
    );
    drop(s);
    let (status, _, _) = common::http_get(server.metrics, "/-/ready", &[]);
    assert_eq!(status, 200, "{what}: /-/ready");

    let pid = rustix::process::Pid::from_raw(server.child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    let status = common::wait_child(&mut server.child, common::WAIT);
    assert!(
        status.is_some_and(|s| s.success()),
        "{what}: exit after SIGTERM: {status:?}"
    );
}

#[test]
fn image_builds_from_scratch_and_its_binary_serves() {
    if !common::have_tool("podman", "podman") {
        return;
    }
    let work = tempfile::tempdir().expect("temp dir");
    let context = work.path().join("context");
    let out = run(Command::new("bash")
        .arg(repo_file("scripts/container-rootfs.sh"))
        .arg(common::bin())
        .arg(&context));
    common::assert_success("scripts/container-rootfs.sh", &out);

    let podman = Podman::new();
    let tag = format!("sockpool:{}", env!("CARGO_PKG_VERSION"));
    let containerfile = repo_file("Containerfile");
    let containerfile = containerfile.to_str().expect("utf-8 path");
    let context_arg = context.to_str().expect("utf-8 path");
    podman.ok(&[
        "build",
        "--quiet",
        "-t",
        &tag,
        "-f",
        containerfile,
        context_arg,
    ]);

    // ---- what the image says about itself
    let config: Value = serde_json::from_str(&podman.ok(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config}}",
        &tag,
    ]))
    .expect("image config JSON");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/sockpool"]),
        "{config}"
    );
    let mut ports: Vec<&str> = config["ExposedPorts"]
        .as_object()
        .expect("ExposedPorts")
        .keys()
        .map(String::as_str)
        .collect();
    ports.sort_unstable();
    assert_eq!(ports, ["20000/tcp", "20001/tcp"], "{config}");
    let user = config["User"].as_str().unwrap_or("");
    let uid = user.split(':').next().unwrap_or("");
    assert!(
        !uid.is_empty() && uid != "0" && uid != "root",
        "the image runs as root: User={user:?}"
    );
    assert_eq!(user, "65532:65532", "the ids deployment.yaml sets too");

    // ---- the binary, copied back out of a container that is created, never started
    let id = podman.ok(&["create", &tag]);
    let out_dir = work.path().join("out");
    std::fs::create_dir(&out_dir).expect("mkdir");
    let copied = out_dir.join("sockpool");
    let copied_arg = copied.to_str().expect("utf-8 path").to_string();
    podman.ok(&["cp", &format!("{id}:/usr/local/bin/sockpool"), &copied_arg]);
    assert!(
        std::fs::read(&copied).expect("copied binary")
            == std::fs::read(common::bin()).expect("built binary"),
        "the image holds the binary that went in"
    );
    let mut cmd = Command::new(&copied);
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    serves_a_client(start(cmd), "the binary copied out of the image");

    // ---- the image's own file system, run under chroot as the image's user
    if !rustix::process::geteuid().is_root() {
        assert!(
            !common::in_ci(),
            "CI runs as root; the chroot check needs it"
        );
        eprintln!("SKIPPED: the chroot run of the image's file system needs root");
        return;
    }
    let rootfs = work.path().join("rootfs");
    let rootfs_arg = rootfs.to_str().expect("utf-8 path").to_string();
    podman.ok(&["cp", &format!("{id}:/"), &rootfs_arg]);
    let mut files = Vec::new();
    list_files(&rootfs, &rootfs, &mut files);
    files.sort();
    assert!(
        files.iter().any(|f| f == "usr/local/bin/sockpool")
            && files.iter().any(|f| f.contains("libc.so")),
        "the image's files: {files:?}"
    );
    let mut cmd = Command::new("chroot");
    cmd.arg(format!("--userspec={user}")).arg(&rootfs).args([
        "/usr/local/bin/sockpool",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    serves_a_client(start(cmd), "the image's file system under chroot");
}

/// Every regular file under `dir`, relative to `root`.
fn list_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        let t = e.file_type().expect("file type");
        if t.is_dir() {
            list_files(root, &p, out);
        } else {
            out.push(
                p.strip_prefix(root)
                    .expect("under root")
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
}

#[test]
fn containerfile_is_from_scratch_and_names_no_registry() {
    let text = std::fs::read_to_string(repo_file("Containerfile")).expect("Containerfile");
    let from: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().to_ascii_uppercase().starts_with("FROM "))
        .collect();
    assert_eq!(
        from,
        ["FROM scratch"],
        "nothing can be pulled where it is built"
    );
    assert!(
        !text.lines().any(|l| l.trim_start().starts_with("RUN ")),
        "a scratch image has no shell to RUN anything in"
    );
    let mut buf = String::new();
    std::fs::File::open(repo_file("scripts/container-rootfs.sh"))
        .and_then(|mut f| f.read_to_string(&mut buf))
        .expect("scripts/container-rootfs.sh");
    assert!(
        buf.contains("ldd"),
        "the rootfs script copies what ldd lists"
    );
}

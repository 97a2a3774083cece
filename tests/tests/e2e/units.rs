//! The shipped systemd units and snippets: `systemd-analyze verify`, the
//! `systemd-analyze security` gate, sysusers.d and tmpfiles.d applied to a
//! scratch root, and the daemon started the way the unit starts it.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use airgate_tests::{Daemon, NotifySocket, Sandbox, airgate_bin, get};
use nix::sys::signal::Signal;

use crate::tls::Site;

fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
}

const UNITS: [&str; 5] = [
    "airgate.service",
    "airgate.socket",
    "airgate-tls.socket",
    "airgate-evidence.service",
    "airgate-evidence.timer",
];

/// The units with ExecStart pointing at the binary under test (verify checks it exists).
fn units_in(sb: &Sandbox) -> Vec<PathBuf> {
    UNITS
        .iter()
        .map(|unit| {
            let text =
                std::fs::read_to_string(repo_file(&format!("systemd/{unit}"))).expect("unit");
            let text = text.replace("/usr/bin/airgate", &airgate_bin().display().to_string());
            let path = sb.path().join(unit);
            std::fs::write(&path, text).expect("write unit");
            path
        })
        .collect()
}

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    let sb = Sandbox::new();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(units_in(&sb))
        .output()
        .expect("systemd-analyze (package systemd) must be installed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("airgate")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
}

#[test]
fn service_exposure_is_at_most_2_0() {
    let sb = Sandbox::new();
    let services: Vec<PathBuf> = units_in(&sb)
        .into_iter()
        .filter(|u| u.extension().is_some_and(|e| e == "service"))
        .collect();
    assert_eq!(services.len(), 2, "the daemon and the evidence pack");
    for service in &services {
        // --threshold is in tenths: 20 means an overall exposure of 2.0.
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--threshold=20", "--no-pager"])
            .arg(service)
            .output()
            .expect("systemd-analyze");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let overall = stdout
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or("(no overall line)");
        println!("{overall}");
        assert!(
            out.status.success(),
            "exposure above 2.0: {overall}\n{stdout}"
        );
    }
}

fn id_of(file: &Path, name: &str) -> u32 {
    std::fs::read_to_string(file)
        .expect("read")
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f[0] == name).then(|| f[2].parse().expect("id"))
        })
        .unwrap_or_else(|| panic!("{name} not in {}", file.display()))
}

#[test]
fn sysusers_and_tmpfiles_create_the_user_and_tight_directories() {
    use std::os::unix::fs::MetadataExt;
    let sb = Sandbox::new();
    let root = sb.path();
    std::fs::create_dir_all(root.join("etc")).expect("etc");
    let status = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.display()))
        .arg(repo_file("systemd/sysusers.d/airgate.conf"))
        .status()
        .expect("systemd-sysusers");
    assert!(status.success());
    let airgate = id_of(&root.join("etc/passwd"), "airgate");
    let clients = id_of(&root.join("etc/group"), "airgate-clients");
    let status = Command::new("systemd-tmpfiles")
        .arg(format!("--root={}", root.display()))
        .arg("--create")
        .arg(repo_file("systemd/tmpfiles.d/airgate.conf"))
        .status()
        .expect("systemd-tmpfiles");
    assert!(status.success());
    for (dir, mode, uid, gid) in [
        ("run/airgate", 0o750, 0, clients),
        ("etc/airgate", 0o750, 0, airgate),
        ("var/lib/airgate", 0o700, airgate, airgate),
        ("var/lib/airgate/inbox", 0o730, airgate, airgate),
        ("var/lib/airgate-evidence", 0o700, 0, 0),
    ] {
        let meta = std::fs::metadata(root.join(dir)).expect(dir);
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "{dir} mode");
        assert_eq!((meta.uid(), meta.gid()), (uid, gid), "{dir} owner");
    }
}

#[test]
fn example_configuration_is_valid() {
    let out = Command::new(airgate_bin())
        .arg("check-config")
        .arg(repo_file("packaging/airgate.toml"))
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The example names the group the package creates; on a build host it may be missing.
    if !out.status.success() {
        let only_groups = stderr
            .lines()
            .skip(1)
            .all(|l| l.contains("no such group \"airgate-clients\""));
        assert!(only_groups, "{stderr}");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// As airgate.service runs it: an unprivileged user, no new privileges, an
/// empty capability bounding set, both sockets passed by name
/// (LISTEN_FDS/LISTEN_FDNAMES), NOTIFY_SOCKET and WATCHDOG_USEC.
#[tokio::test]
async fn started_the_way_the_unit_starts_it() {
    const UID: u32 = 5100;
    let sb = Sandbox::new();
    let site = Site::new(&sb);
    let notify = NotifySocket::bind(sb.path());
    std::fs::set_permissions(&notify.path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    std::fs::set_permissions(sb.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let run = sb.path().join("run");
    std::fs::create_dir(&run).expect("run dir");
    let state = sb.path().join("state");
    // Exists already: the bundle was published into state/inbox (root's, 0755).
    std::fs::create_dir_all(&state).expect("state dir");
    let owned = |p: &Path| {
        nix::unistd::chown(
            p,
            Some(nix::unistd::Uid::from_raw(UID)),
            Some(nix::unistd::Gid::from_raw(UID)),
        )
    };
    for p in [&run, &state, &site.dir.join("server.key")] {
        owned(p).expect("chown");
    }
    // The build's target directory may sit in root's home (mode 0700): give
    // the unprivileged daemon a binary it can reach, as /usr/bin would be.
    let bin_dir = sb.path().join("bin");
    std::fs::create_dir(&bin_dir).expect("bin dir");
    let bin = bin_dir.join("airgate");
    std::fs::hard_link(airgate_bin(), &bin)
        .or_else(|_| std::fs::copy(airgate_bin(), &bin).map(drop))
        .expect("place binary");
    let socket = run.join("airgate.sock");
    let port = free_port();
    // The daemon is told other addresses: only the passed sockets may be used.
    let config = site
        .config(&sb)
        .replace(
            &sb.socket().display().to_string(),
            &run.join("unused.sock").display().to_string(),
        )
        .replace("127.0.0.1:0", "127.0.0.1:1");
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={UID}"))
        .arg(format!("--regid={UID}"))
        .args([
            "--clear-groups",
            "--no-new-privs",
            "--bounding-set=-all",
            "--inh-caps=-all",
        ])
        .arg("systemd-socket-activate")
        .arg("--listen")
        .arg(&socket)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--fdname=unix:tls")
        .args([
            "-E",
            "NOTIFY_SOCKET",
            "-E",
            "WATCHDOG_USEC",
            "-E",
            "AIRGATE_FAILPOINTS",
        ])
        .arg(&bin);
    let notify_path = notify.path.to_string_lossy().into_owned();
    let mut d = Daemon::spawn(
        &sb,
        &config,
        &[
            ("NOTIFY_SOCKET", &notify_path),
            ("WATCHDOG_USEC", "300000"),
            ("AIRGATE_FAILPOINTS", "state-probe-hang-after=2500ms"),
        ],
        cmd,
    );
    d.socket = socket.clone();
    let start = std::time::Instant::now();
    while !socket.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "socket not created; {}",
            d.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first connection starts the daemon, as with a real .socket unit.
    d.wait_healthy();
    let first = notify.wait_for("READY=1", Duration::from_secs(20));
    assert!(
        !first.iter().any(|m| m.contains("WATCHDOG=1")),
        "no ping before READY: {first:?}"
    );

    let status = get(&socket, "/admin/status", &[]).json();
    let daemon_pid = status["pid"].as_u64().expect("pid");
    let listeners = status["listeners"].as_array().expect("listeners");
    assert!(
        listeners.iter().all(|l| l["activated"] == true),
        "{listeners:?}"
    );
    assert_eq!(listeners[1]["address"], format!("127.0.0.1:{port}"));
    // Not waiting for a bundle: ready to serve the API, not inference.
    assert_eq!(status["ready"], false);

    let proc_status =
        std::fs::read_to_string(format!("/proc/{daemon_pid}/status")).expect("proc status");
    for want in [
        "NoNewPrivs:\t1",
        "CapBnd:\t0000000000000000",
        "CapEff:\t0000000000000000",
    ] {
        assert!(
            proc_status.contains(want),
            "{want:?} missing:\n{proc_status}"
        );
    }
    assert!(
        proc_status.contains(&format!("Uid:\t{UID}\t{UID}\t{UID}\t{UID}")),
        "{proc_status}"
    );

    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let (r, _) = site
        .client("claims")
        .get(addr, "/v1/whoami")
        .await
        .expect("mTLS on the passed socket");
    assert_eq!(r.json()["tenant"], "claims");

    // Pings while every worker progresses; none once the state probe hangs.
    let seen = notify.collect(Duration::from_millis(4500));
    let pings: Vec<Duration> = seen
        .iter()
        .filter(|(_, m)| m == "WATCHDOG=1")
        .map(|(t, _)| *t)
        .collect();
    assert!(pings.len() >= 3, "{seen:?}");
    let last = pings.last().copied().unwrap_or_default();
    assert!(
        last < Duration::from_millis(3500),
        "pings went on after the worker hung: {seen:?}"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(daemon_pid).expect("pid")),
        Signal::SIGTERM,
    )
    .expect("kill");
    notify.wait_for("STOPPING=1", Duration::from_secs(10));
    assert!(
        d.wait_exit(Duration::from_secs(15)).success(),
        "{}",
        d.stderr()
    );
}

/// What airgate-evidence.service runs (its ExecStart, with the paths moved
/// into a sandbox) on a host whose log began last month: while no signed
/// checkpoint vouches for the month's last records (the daemon was killed)
/// nothing is written and it exits 75 (the unit runs it again); once one
/// does, last month's pack, read from the running daemon over the admin
/// socket, verifies, and a second run leaves it as it is.
#[test]
fn the_evidence_unit_packs_last_month_once_from_the_running_daemon() {
    let sb = Sandbox::new();
    let (month, offset) = crate::report::last_month(10);
    let failpoint = format!("clock-offset={offset}");
    let last_month = [("AIRGATE_FAILPOINTS", failpoint.as_str())];

    let unit =
        std::fs::read_to_string(repo_file("systemd/airgate-evidence.service")).expect("unit");
    assert!(unit.contains("\nRestartForceExitStatus=75\n"), "{unit}");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let packs = sb.path().join("evidence");
    std::fs::create_dir(&packs).expect("evidence dir");
    let args: Vec<String> = exec
        .split_whitespace()
        .map(|a| match a {
            "/usr/bin/airgate" => airgate_bin().display().to_string(),
            "/var/lib/airgate-evidence" => packs.display().to_string(),
            "/etc/airgate/airgate.toml" => sb.config_path().display().to_string(),
            other => other.to_owned(),
        })
        .collect();
    let run = || {
        Command::new(&args[0])
            .args(&args[1..])
            .output()
            .expect("run")
    };
    let listed = || std::fs::read_dir(&packs).expect("dir").count();

    // Killed: no checkpoint after last month's records.
    let mut d = Daemon::start(&sb, &sb.config("", ""), &last_month);
    d.signal(Signal::SIGKILL);
    let _ = d.wait_exit(Duration::from_secs(20));
    let out = run();
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not yet vouched for"),
        "{out:?}"
    );
    assert_eq!(listed(), 0, "nothing written, no temporary left");

    // A clean stop seals a checkpoint over them; then the daemon runs on.
    let mut d = Daemon::start(&sb, &sb.config("", ""), &last_month);
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(20)).code(), Some(0));
    let d = Daemon::start(&sb, &sb.config("", ""), &[]);
    let out = run();
    assert!(out.status.success(), "{out:?}");
    let pack = packs.join(format!("airgate-evidence-{month}.tar"));
    assert!(pack.exists(), "{out:?}");
    let out = Command::new(airgate_bin())
        .args(["evidence", "verify"])
        .arg(&pack)
        .arg("--host-key")
        .arg(sb.path().join("state/host.pub"))
        .output()
        .expect("verify");
    let verified = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        verified.contains(&format!("evidence pack OK: {month}"))
            && verified.contains("the month is wholly between signed checkpoints"),
        "{verified}"
    );
    let written = std::fs::read(&pack).expect("pack");
    let again = run();
    assert!(
        again.status.success() && String::from_utf8_lossy(&again.stdout).contains("written before"),
        "{again:?}"
    );
    assert_eq!(std::fs::read(&pack).expect("pack"), written);
    assert_eq!(listed(), 1);
    // This month is not over: --into refuses it (-o writes one so far).
    let out = Command::new(airgate_bin())
        .args(["evidence", "--month", "this", "--into"])
        .arg(&packs)
        .arg("--config")
        .arg(sb.config_path())
        .output()
        .expect("this month");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert_eq!(listed(), 1);
    drop(d);
}

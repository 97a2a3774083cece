//! The shipped unit files pass `systemd-analyze verify`, and the example
//! configuration passes `airgate check-config`.

use std::path::PathBuf;
use std::process::Command;

use airgate_tests::{Sandbox, airgate_bin};

fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
}

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    let sb = Sandbox::new();
    // verify checks that ExecStart's binary exists: point it at the one under test.
    for unit in ["airgate.service", "airgate.socket"] {
        let text = std::fs::read_to_string(repo_file(&format!("systemd/{unit}"))).expect("unit");
        let text = text.replace("/usr/bin/airgate", &airgate_bin().display().to_string());
        std::fs::write(sb.path().join(unit), text).expect("write unit");
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(sb.path().join("airgate.service"))
        .arg(sb.path().join("airgate.socket"))
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
fn example_configuration_is_valid() {
    let out = Command::new(airgate_bin())
        .arg("check-config")
        .arg(repo_file("packaging/airgate.toml"))
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The example names the group the .deb creates; on a build host it may be missing.
    if !out.status.success() {
        let only_groups = stderr
            .lines()
            .skip(1)
            .all(|l| l.contains("no such group \"airgate-clients\""));
        assert!(only_groups, "{stderr}");
    }
}

//! `modelgate demo`, the README's first command, run as a user runs it: it must exit 0 and its
//! summary must say what the demo claims to show.

use std::process::Command;

/// Runs `modelgate demo` with `args`; it must exit 0. Its standard output.
fn demo(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_modelgate"))
        .arg("demo")
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "demo failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn the_demo_shows_the_experiment_shadow_drift_and_retrain_trigger() {
    let stdout = demo(&["--requests", "3000"]);
    for expected in [
        // Version 2 is the better model, the split is 50/50, and outcomes show it.
        "the difference is significant",
        "the split matches the 50/50 weights",
        // The shadow answered copies and was compared.
        "agreement 0.",
        // The policy asked for a retrain once drift started.
        "retrain_triggered",
        "modelgate ctl --addr",
        "temporary files removed",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
    }
    // The shifted feature is named (another one may, rarely, be a false discovery at 5%).
    let drift = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("→ drifted:"))
        .unwrap_or_else(|| panic!("no drift verdict in:\n{stdout}"));
    assert!(drift.contains("petal_length"), "{drift}");
    assert!(stdout.contains("(0 failed)"), "{stdout}");
    // Its steps are numbered 1 to 9, in order, also when stdout is not a terminal (as here).
    let steps: Vec<u32> = stdout
        .lines()
        .filter_map(|l| l.split_once(". ").and_then(|(n, _)| n.parse().ok()))
        .collect();
    assert_eq!(steps, (1..=9).collect::<Vec<u32>>(), "{stdout}");
}

#[test]
fn the_fleet_demo_spreads_traffic_over_three_replicas_and_reads_one_fleet() {
    let redis = std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !redis {
        assert!(
            std::env::var_os("MODELGATE_REQUIRE_PEERS").is_none(),
            "redis-server is not installed"
        );
        eprintln!("skipped: redis-server is not installed");
        return;
    }
    let stdout = demo(&["--replicas", "3", "--requests", "1200"]);
    for expected in [
        "modelgate replica 1:",
        "modelgate replica 3:",
        "fleet store: redis://127.0.0.1:",
        // Every outcome, sent to the last replica, joined whichever replica served it.
        "1200 calls answered (0 failed)",
        "1200 outcomes recorded",
        "drift is evaluated per replica",
        "temporary files removed",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
    }
    // The experiment's requests and the shadow's copies, read from replica 3, cover the whole
    // fleet's traffic: with production's calls they add up to every call.
    let number =
        |line: &str, i: usize| -> u64 { line.split_whitespace().nth(i).unwrap().parse().unwrap() };
    let requests: u64 = stdout
        .lines()
        .filter(|l| {
            l.trim_start().starts_with("control ") || l.trim_start().starts_with("treatment ")
        })
        .map(|l| number(l, 3))
        .sum();
    let mirrored: u64 = stdout
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("mirrored "))
        .map(|rest| rest.split(',').next().unwrap().trim().parse().unwrap())
        .unwrap_or_else(|| panic!("no shadow line in:\n{stdout}"));
    assert_eq!(requests + mirrored, 1200, "{stdout}");
}

//! The binary's command line: bad settings exit non-zero naming the setting, before binding.

use std::process::Command;

fn modelgate(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_modelgate"))
        .args(args)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_settings_exit_non_zero_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (code, err) = modelgate(&["serve", "--data-dir", d, "--max-in-flight", "0"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--max-in-flight"), "{err}");
    let (code, err) = modelgate(
        &["serve", "--data-dir", d],
        &[("MODELGATE_CONNECT_TIMEOUT", "forever")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--connect-timeout"), "{err}");
    let file = dir.path().join("modelgate.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:0\"\nmax_in_fligth = 5\n").unwrap();
    let (code, err) = modelgate(&["serve", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown setting 'max_in_fligth'"), "{err}");
    // Nothing was created: validation happens before any port or database is opened.
    assert!(!dir.path().join("CURRENT").exists());
}

#[test]
fn a_port_in_use_is_reported_by_its_setting() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = modelgate(
        &[
            "serve",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--control-listen",
            &addr,
        ],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("cannot listen on {addr} (--control-listen)")),
        "{err}"
    );
}

#[test]
fn model_server_rejects_a_bad_spec() {
    let (code, err) = modelgate(
        &["model-server", "--model", "name=m;kind=tree;weights=1"],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("kind 'tree'"), "{err}");
}

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

/// Reads `child`'s stderr until a line contains `until` (or 30 s pass), then stops the child.
fn stderr_until(mut child: std::process::Child, until: &str) -> String {
    use std::io::{BufRead, BufReader};
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
                if line.contains(until) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    seen
}

/// The number logged as `name=N` on a log line; panics naming the field when it is missing.
fn log_field(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {line:?}"))
}

/// `modelgate serve` on free loopback ports with its database in `dir`, logs piped from stderr.
fn serve_on_free_ports(dir: &std::path::Path) -> Command {
    let mut serve = Command::new(env!("CARGO_BIN_EXE_modelgate"));
    serve
        .args(["serve", "--data-dir", dir.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--control-listen", "127.0.0.1:0"])
        .args(["--admin-listen", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    serve
}

#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let serve = serve_on_free_ports(dir.path())
        // An unknown variable: a WARN line, which a terminal would show in colour.
        .env("MODELGATE_NOT_A_SETTING", "1")
        .env_remove("NO_COLOR")
        .spawn()
        .unwrap();
    let logs = stderr_until(serve, "modelgate listening");
    assert!(logs.contains("modelgate listening"), "{logs}");
    assert!(
        logs.lines()
            .any(|l| l.contains("WARN") && l.contains("MODELGATE_NOT_A_SETTING")),
        "{logs}"
    );
    assert!(
        !logs.contains('\x1b'),
        "escape codes in logs to a pipe:\n{logs:?}"
    );

    let model_server = Command::new(env!("CARGO_BIN_EXE_modelgate"))
        .args(["model-server", "--listen", "127.0.0.1:0"])
        .args(["--model", "name=m;kind=linear;weights=1;bias=0"])
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let logs = stderr_until(model_server, "model server listening");
    assert!(logs.contains("model server listening"), "{logs}");
    assert!(
        !logs.contains('\x1b'),
        "escape codes in logs to a pipe:\n{logs:?}"
    );
}

/// The binary allocates with jemalloc under its built-in settings (src/main.rs, `malloc_conf`):
/// jemalloc prints the options it runs with at exit when asked, and complains on stderr about a
/// setting it cannot parse.
#[test]
fn the_allocator_is_jemalloc_with_its_settings() {
    let (code, stderr) = modelgate(&["--version"], &[("_RJEM_MALLOC_CONF", "stats_print:true")]);
    assert_eq!(code, 0, "{stderr}");
    for option in [
        "opt.narenas: 1",
        "opt.tcache_max: 4096",
        "opt.dirty_decay_ms: 500",
        "opt.muzzy_decay_ms: 0",
    ] {
        assert!(stderr.contains(option), "{option} not in:\n{stderr}");
    }
    let (code, stderr) = modelgate(&["--version"], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("<jemalloc>"), "{stderr}");
    // The environment still overrides a setting, for an operator tuning memory against CPU.
    let (_, stderr) = modelgate(
        &["--version"],
        &[("_RJEM_MALLOC_CONF", "narenas:3,stats_print:true")],
    );
    assert!(stderr.contains("opt.narenas: 3"), "{stderr}");
}

/// Each data thread allocates from a jemalloc arena of its own (src/main.rs, `own_arena`), so two
/// data threads never wait on each other's allocator locks; the arenas are new ones, not the
/// process's first, which the other threads share.
#[cfg(not(target_env = "msvc"))]
#[test]
fn every_data_thread_gets_an_allocator_arena_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let serve = serve_on_free_ports(dir.path())
        .args(["--log-level", "debug", "--data-threads", "3"])
        .spawn()
        .unwrap();
    let logs = stderr_until(serve, "modelgate listening");
    let mut arenas: Vec<(u64, u64)> = logs
        .lines()
        .filter(|l| l.contains("data thread allocates from an arena of its own"))
        .map(|l| (log_field(l, "thread"), log_field(l, "arena")))
        .collect();
    arenas.sort();
    assert_eq!(
        arenas.iter().map(|a| a.0).collect::<Vec<_>>(),
        [0, 1, 2],
        "{logs}"
    );
    let mut distinct: Vec<u64> = arenas.iter().map(|a| a.1).collect();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "arenas shared: {arenas:?}");
    assert!(distinct.iter().all(|&a| a >= 1), "{arenas:?}");
}

/// Once it serves, `modelgate serve` releases the pages of code and read-only data that starting
/// up mapped (src/startup_pages.rs): its binary's and libc's at least, tens of MiB with RocksDB.
/// The tests that drive the binary afterwards (the demo, the tutorial, restarts) run the code
/// mapped back.
#[cfg(target_os = "linux")]
#[test]
fn serve_releases_the_pages_mapped_to_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let serve = serve_on_free_ports(dir.path())
        .args(["--log-level", "debug"])
        .spawn()
        .unwrap();
    let logs = stderr_until(serve, "released the pages mapped to start up");
    let line = logs
        .lines()
        .find(|l| l.contains("released the pages mapped to start up"))
        .unwrap_or_else(|| panic!("no release logged:\n{logs}"));
    assert!(log_field(line, "mappings") >= 2, "{line}");
    assert!(log_field(line, "bytes") > 10 << 20, "{line}");
    let listening = logs
        .find("modelgate listening")
        .expect("the listening line");
    assert!(
        listening < logs.find("released the pages").unwrap(),
        "released before every port served:\n{logs}"
    );
}

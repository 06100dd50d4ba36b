//! The README's five-minute tutorial, run as written: every line between `<!-- tutorial -->` and
//! `<!-- /tutorial -->` goes through bash with the real `modelgate` binary on PATH. Only the
//! fixed ports and the data directory are swapped for free ones, so the test never collides with
//! anything. Lines ending in `&` start background servers (stopped at the end); every other line
//! must exit 0. grpcurl and curl lines need those tools (scripts/test.sh installs them and sets
//! MODELGATE_REQUIRE_PEERS); without them they are skipped with a note, and the steps that depend
//! on the grpcurl call are skipped too.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The tutorial's commands, continuation lines joined, comments and blank lines dropped.
fn tutorial_commands() -> Vec<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let start = readme
        .find("<!-- tutorial -->")
        .expect("README has a tutorial block");
    let end = readme.find("<!-- /tutorial -->").expect("…and its end");
    let block = &readme[start..end];
    let mut commands = Vec::new();
    let mut current = String::new();
    for line in block
        .lines()
        .filter(|l| !l.starts_with("```") && !l.starts_with("<!--"))
    {
        let line = line.trim();
        if current.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => current.push_str(head),
            None => {
                current.push_str(line);
                commands.push(std::mem::take(&mut current));
            }
        }
    }
    commands
}

fn on_path(tool: &str) -> bool {
    Command::new("bash")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn wait_for(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The number on the `key  value` line of a `ctl` answer shown as a table.
fn number_field(stdout: &str, key: &str) -> Option<f64> {
    stdout.lines().find_map(|l| {
        let (k, v) = l.split_once(char::is_whitespace)?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The sum of `column` in the table titled `title:` of a `ctl` answer.
fn column_sum(stdout: &str, title: &str, column: &str) -> Option<f64> {
    let mut lines = stdout
        .lines()
        .skip_while(|l| *l != format!("{title}:"))
        .skip(1);
    let header: Vec<&str> = lines.next()?.split_whitespace().collect();
    let at = header.iter().position(|h| *h == column)?;
    Some(
        lines
            .take_while(|l| !l.trim().is_empty())
            .filter_map(|l| l.split_whitespace().nth(at)?.parse::<f64>().ok())
            .sum(),
    )
}

struct Background(Vec<Child>);

impl Drop for Background {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn the_readme_tutorial_runs_as_written() {
    let commands = tutorial_commands();
    assert!(commands.len() >= 10, "{commands:#?}");
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_modelgate")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let ports: Vec<(String, u16)> = ["8001", "8002", "9000", "9001", "9002"]
        .iter()
        .map(|p| (format!("127.0.0.1:{p}"), free_port()))
        .collect();
    let control = ports
        .iter()
        .find(|(p, _)| p.ends_with(":9001"))
        .map(|(_, n)| format!("127.0.0.1:{n}"))
        .unwrap();
    let data_dir = dir.path().join("data");
    let mut background = Background(Vec::new());
    let mut waiting: Vec<SocketAddr> = Vec::new();
    let mut skipped_call = false;
    for original in &commands {
        let mut cmd = original.replace("/tmp/modelgate-tutorial", data_dir.to_str().unwrap());
        for (fixed, port) in &ports {
            cmd = cmd.replace(fixed, &format!("127.0.0.1:{port}"));
        }
        let run = |cmd: &str| {
            let mut c = Command::new("bash");
            c.args(["-c", cmd])
                .env("PATH", &path)
                .env("MODELGATE_CTL_ADDR", &control)
                .env_remove("MODELGATE_CONTROL_TOKEN")
                .env_remove("RUST_LOG");
            c
        };
        if let Some(bg) = cmd.strip_suffix('&') {
            // The ports this server listens on must be up before the next foreground step.
            for (_, port) in &ports {
                if bg.contains(&format!("--listen 127.0.0.1:{port}"))
                    || bg.contains(&format!("-listen 127.0.0.1:{port}"))
                {
                    waiting.push(SocketAddr::from(([127, 0, 0, 1], *port)));
                }
            }
            let child = run(&format!("exec {}", bg.trim()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            background.0.push(child);
            continue;
        }
        for addr in waiting.drain(..) {
            wait_for(addr);
        }
        // A peer tool anywhere in the line (a loop of grpcurl calls too).
        let tool = ["grpcurl", "curl"]
            .into_iter()
            .find(|t| cmd.split_whitespace().any(|w| w == *t))
            .unwrap_or_default();
        if !tool.is_empty() && !on_path(tool) {
            assert!(
                std::env::var_os("MODELGATE_REQUIRE_PEERS").is_none(),
                "{tool} is required (MODELGATE_REQUIRE_PEERS) but not installed"
            );
            eprintln!("{tool} is not installed; skipping: {original}");
            skipped_call |= tool == "grpcurl";
            continue;
        }
        if skipped_call && cmd.contains("tutorial-1") {
            eprintln!("skipping (depends on the grpcurl call): {original}");
            continue;
        }
        let out = run(&cmd).output().unwrap();
        assert!(
            out.status.success(),
            "tutorial step failed ({}):\n  {original}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        // A few steps whose output says whether the tutorial did what it claims.
        if original.contains("models versions iris") {
            assert!(stdout.contains("production"), "{stdout}");
        }
        if original.contains("predictions get tutorial-1") {
            assert!(
                stdout.contains("requestId") && stdout.contains("tutorial-1"),
                "{stdout}"
            );
            // The features under their names, beside the prediction; no JSON.
            let rows: Vec<Vec<&str>> = stdout
                .lines()
                .skip_while(|l| *l != "rows:")
                .skip(1)
                .map(|l| l.split_whitespace().collect())
                .collect();
            assert_eq!(
                rows.first().map(Vec::as_slice),
                Some(
                    &[
                        "row",
                        "input[0]",
                        "input[1]",
                        "input[2]",
                        "input[3]",
                        "prediction",
                        "entity"
                    ][..]
                ),
                "{stdout}"
            );
            assert_eq!(
                rows[1],
                ["0", "6.1", "2.8", "4.7", "1.2", "1", "alice"],
                "{stdout}"
            );
            assert!(!stdout.contains('{'), "{stdout}");
        }
        // After the calls from more users, the experiment and the shadow have something to show.
        if original.contains("experiments results iris-ab") && !skipped_call {
            let requests = column_sum(&stdout, "variants", "requests");
            assert!(requests.is_some_and(|n| n > 0.0), "{stdout}");
        }
        if original.contains("shadows report iris 2") && !skipped_call {
            let mirrored = number_field(&stdout, "mirrored");
            assert!(mirrored.is_some_and(|n| n > 0.0), "{stdout}");
        }
        if original.contains("events watch") {
            assert!(stdout.contains("experiment_created"), "{stdout}");
        }
        if original.starts_with("curl") {
            assert!(stdout.contains("modelgate_requests_total{"), "{stdout}");
        }
    }
}

//! `modelgate ctl` as a user runs it: the real binary against a live modelgate and model servers,
//! every control service at least once, tables and JSON, exit codes, the token.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

struct Ctl {
    addr: String,
    token: Option<String>,
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ctl {
    fn run_with_stdin(&self, args: &[&str], stdin: &str) -> Out {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_modelgate"));
        cmd.arg("ctl")
            .args(args)
            .env("MODELGATE_CTL_ADDR", &self.addr)
            .env_remove("MODELGATE_CONTROL_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(t) = &self.token {
            cmd.env("MODELGATE_CONTROL_TOKEN", t);
        }
        let mut child = cmd.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn run(&self, args: &[&str]) -> Out {
        self.run_with_stdin(args, "")
    }

    /// Runs a command that must succeed and returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert_eq!(o.code, 0, "ctl {args:?} failed: {}{}", o.stdout, o.stderr);
        o.stdout
    }

    /// Runs a command with `-o json` that must succeed and parses its answer.
    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ctl {args:?}: not JSON ({e}): {out}"))
    }
}

fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> tokio::task::JoinHandle<T> {
    tokio::task::spawn_blocking(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_control_service_from_the_shell() {
    let dir = tempfile::tempdir().unwrap();
    let one =
        model_server("name=iris;kind=logistic;weights=0.9,-1.2,0.8,0.6;bias=-2.5;version=1").await;
    let two =
        model_server("name=iris;kind=logistic;weights=1,-1,0.8,0.5;bias=-6.4;version=2").await;
    let mg = start(dir.path()).await;
    let (e1, e2) = (one.endpoint(), two.endpoint());
    let addr = mg.control_addr.to_string();
    let data = mg.data_addr;
    let csv = dir.path().join("reference.csv");
    let mut text = String::from("sepal_length,sepal_width,petal_length,petal_width\n");
    for i in 0..200 {
        let f = i as f64;
        text.push_str(&format!(
            "{},{},{},{}\n",
            5.0 + (f * 0.37).sin(),
            3.0 + (f * 0.2).cos(),
            3.5 + (f * 0.1).sin(),
            1.2
        ));
    }
    std::fs::write(&csv, text).unwrap();
    let csv = csv.to_str().unwrap().to_string();

    // The CLI runs in blocking threads; the servers keep running on this runtime.
    let ctl = Ctl { addr, token: None };
    let request_id = {
        let ctl_addr = ctl.addr.clone();
        blocking(move || {
            let ctl = Ctl {
                addr: ctl_addr,
                token: None,
            };
            let names = "--features=input=sepal_length,sepal_width,petal_length,petal_width";
            let v = ctl.json(&[
                "models",
                "register",
                "iris",
                "--endpoint",
                &e1,
                "--metric",
                "accuracy=0.91",
                "--tag",
                "team=risk",
                "--prediction",
                "label:label",
                names,
            ]);
            assert_eq!(v["version"]["version"], 1);
            assert_eq!(v["version"]["tags"]["team"], "risk");
            assert_eq!(v["version"]["stage"], "STAGE_STAGING");
            ctl.ok(&[
                "models",
                "register",
                "iris",
                "--endpoint",
                &e2,
                "--metric",
                "accuracy=0.94",
                "--prediction",
                "label:label",
                names,
            ]);
            let p = ctl.json(&["models", "promote", "iris", "1"]);
            assert_eq!(p["version"]["stage"], "STAGE_PRODUCTION");
            ctl.ok(&["models", "alias", "iris", "challenger", "2"]);
            let table = ctl.ok(&["models", "versions", "iris"]);
            let rows: Vec<Vec<&str>> = table
                .lines()
                .map(|l| l.split_whitespace().collect())
                .collect();
            assert_eq!(rows[0][..3], ["version", "stage", "endpoint"], "{table}");
            assert_eq!(rows[1][..2], ["1", "production"], "{table}");
            assert_eq!(rows[2][..2], ["2", "staging"], "{table}");
            assert!(rows[2].contains(&"challenger"), "{table}");
            let list = ctl.ok(&["models", "list"]);
            assert!(
                list.contains("iris") && list.contains("challenger=2"),
                "{list}"
            );
            assert_eq!(ctl.json(&["models", "production", "iris"])["version"], 1);
            assert_eq!(
                ctl.json(&["models", "get", "iris", "challenger"])["version"],
                2
            );
            let policy = ctl.json(&["models", "policy", "iris", "--min", "accuracy=0.9"]);
            assert_eq!(policy["minimumMetrics"]["accuracy"], 0.9);

            let e = ctl.json(&[
                "experiments",
                "create",
                "ab",
                "--model",
                "iris",
                "--variant",
                "control=1",
                "--variant",
                "treatment=challenger:1",
                "--coverage",
                "0.5",
            ]);
            assert_eq!(e["state"], "EXPERIMENT_STATE_RUNNING");
            assert_eq!(e["variants"][1]["version"], 2);
            let list = ctl.ok(&["experiments", "list"]);
            assert!(list.contains("ab") && list.contains("running"), "{list}");
            assert_eq!(
                ctl.json(&["experiments", "pause", "ab"])["state"],
                "EXPERIMENT_STATE_PAUSED"
            );
            assert_eq!(
                ctl.json(&["experiments", "resume", "ab"])["state"],
                "EXPERIMENT_STATE_RUNNING"
            );
            // Without --timeout a shadow's copies get the documented 1 s, whatever deadline the
            // calls themselves have (--call-timeout).
            let s = ctl.json(&["shadows", "set", "iris", "2"]);
            assert_eq!(s["timeout"], "1s", "{s}");
            let s = ctl.json(&["--call-timeout", "5s", "shadows", "set", "iris", "2"]);
            assert_eq!(s["timeout"], "1s", "{s}");
            let s = ctl.json(&[
                "shadows",
                "set",
                "iris",
                "2",
                "--fraction",
                "0.5",
                "--timeout",
                "2s",
                "--compare",
                "tolerance:0.01",
            ]);
            assert_eq!(s["sampleFraction"], 0.5);
            assert_eq!(s["timeout"], "2s");
            assert!(ctl.ok(&["shadows", "list"]).contains("iris"));
            ctl.ok(&["drift", "set-reference", "iris", "--csv", &csv]);
            let r = ctl.json(&["drift", "reference", "iris"]);
            assert_eq!(r["rows"], 200);
            // No policy yet: nothing triggers, and the cooldown shown is the one a policy gets.
            let none = ctl.json(&["drift", "policy", "iris"]);
            assert_eq!(
                (none["onDataDrift"].clone(), none["cooldown"].clone()),
                (false.into(), "3600s".into())
            );
            let policy = ctl.json(&[
                "drift",
                "policy",
                "iris",
                "--on-data-drift",
                "true",
                "--cooldown",
                "1h",
            ]);
            assert_eq!(policy["onDataDrift"], true);
            assert_eq!(ctl.json(&["drift", "policy", "iris"])["cooldown"], "3600s");
            ctl.ok(&[
                "features", "register", "balance", "--type", "number", "--ttl", "1h",
            ]);
            let put = ctl.json(&["features", "put", "acct-1", "balance=12.5"]);
            assert_eq!(put["accepted"], 1);
            let got = ctl.json(&[
                "features",
                "get",
                "--entity",
                "acct-1",
                "--feature",
                "balance",
            ]);
            assert_eq!(got["entities"][0]["cells"][0]["value"]["number"], 12.5);
            assert!(ctl.ok(&["features", "list"]).contains("balance"));
        })
        .await
        .unwrap();

        // Traffic with a known request id, so outcomes can name it.
        let mut infer = infer_client(data).await;
        for i in 0..20 {
            let mut req = tonic::Request::new(infer_request(
                "iris",
                &[&[5.0, 3.0, 1.0 + i as f32 * 0.3, 0.5]],
            ));
            req.metadata_mut()
                .insert("x-user-id", format!("u{i}").parse().unwrap());
            req.metadata_mut()
                .insert("x-request-id", format!("tut-{i}").parse().unwrap());
            infer.model_infer(req).await.unwrap();
        }
        mg.recorder.flush().await;
        "tut-3".to_string()
    };

    let addr = ctl.addr.clone();
    blocking(move || {
        let ctl = Ctl { addr, token: None };
        let p = ctl.json(&["predictions", "get", &request_id]);
        assert_eq!(p["requestId"], request_id.as_str());
        assert_eq!(p["featureNames"][2], "petal_length");
        let list = ctl.ok(&["predictions", "list", "iris", "--limit", "5"]);
        assert_eq!(list.lines().count(), 6, "a header and five rows: {list}");
        let o = ctl.json(&["outcomes", "record", &request_id, "--label", "1"]);
        assert_eq!(o["requestId"], request_id.as_str());
        // Many outcomes from a JSON-lines file on stdin.
        let lines: String = (4..20)
            .map(|i| {
                format!(
                    "{{\"requestId\":\"tut-{i}\",\"actual\":{{\"label\":\"{}\"}}}}\n",
                    i % 2
                )
            })
            .collect();
        let o = ctl.run_with_stdin(&["outcomes", "import", "-", "-o", "json"], &lines);
        assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
        let v: Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(v["accepted"], 16, "{v}");
        let perf = ctl.json(&["outcomes", "performance", "iris", "--version", "1"]);
        assert!(perf["allTime"]["outcomes"].as_u64().unwrap() > 0, "{perf}");
        let results = ctl.ok(&["experiments", "results", "ab"]);
        assert!(
            results.contains("variants:") && results.contains("treatment"),
            "{results}"
        );
        let report = ctl.json(&["drift", "report", "iris", "--evaluate"]);
        assert_eq!(report["model"], "iris");
        let shadow = ctl.json(&["shadows", "report", "iris", "2"]);
        assert_eq!(shadow["version"], 2);
        ctl.ok(&["drift", "capture", "iris", "--rows", "10"]);
        // The event log, from the start, stops once the stored events are shown.
        let events = ctl.ok(&["events", "watch"]);
        assert!(
            events.contains("version_registered") && events.contains("experiment_created"),
            "{events}"
        );
        let typed = ctl.ok(&["events", "watch", "--type", "version_promoted"]);
        assert_eq!(typed.lines().count(), 1, "{typed}");
        // Any method, like grpcurl.
        let v: Value =
            serde_json::from_str(&ctl.ok(&["call", "Registry/ListModels", "{}"])).unwrap();
        assert_eq!(v["models"][0]["model"], "iris");
        let c = ctl.ok(&["experiments", "conclude", "ab", "--winner", "treatment"]);
        assert!(c.contains("concluded"), "{c}");
        assert_eq!(ctl.json(&["models", "production", "iris"])["version"], 2);
        ctl.ok(&["shadows", "remove", "iris", "2"]);
    })
    .await
    .unwrap();
    mg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_and_messages_scripts_can_trust() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = modelgate::config::Config::for_tests(dir.path());
    config.control_token = Some("s3cret".into());
    let mg = start_with(config).await;
    let addr = mg.control_addr.to_string();
    blocking(move || {
        let no_token = Ctl {
            addr: addr.clone(),
            token: None,
        };
        let o = no_token.run(&["models", "list"]);
        assert_eq!(o.code, 7, "{}", o.stderr);
        assert!(
            o.stderr.starts_with("error: UNAUTHENTICATED:"),
            "{}",
            o.stderr
        );
        let ctl = Ctl {
            addr: addr.clone(),
            token: Some("s3cret".into()),
        };
        assert!(ctl.ok(&["models", "list"]).contains("no models"));
        // Unknown model: NOT_FOUND, with the server's message.
        let o = ctl.run(&["models", "versions", "nope"]);
        assert_eq!(o.code, 4, "{}", o.stderr);
        assert!(
            o.stderr.contains("NOT_FOUND") && o.stderr.contains("nope"),
            "{}",
            o.stderr
        );
        // A bad argument the server refuses: INVALID_ARGUMENT naming the field.
        let o = ctl.run(&["models", "register", "iris", "--endpoint", "ftp://x"]);
        assert_eq!(o.code, 5, "{}", o.stderr);
        assert!(
            o.stderr.contains("INVALID_ARGUMENT") && o.stderr.contains("endpoint"),
            "{}",
            o.stderr
        );
        // A bad argument caught before calling: usage, 2.
        let o = ctl.run(&["models", "stage", "iris", "1", "prod"]);
        assert_eq!(o.code, 2, "{}", o.stderr);
        assert!(
            o.stderr
                .contains("expected none, staging, production or archived"),
            "{}",
            o.stderr
        );
        let o = ctl.run(&["call", "Registry/Nope", "{}"]);
        assert_eq!(o.code, 2, "{}", o.stderr);
        assert!(o.stderr.contains("has no method \"Nope\""), "{}", o.stderr);
        let o = ctl.run(&["call", "Registry/ListModels", "{\"bogus\":1}"]);
        assert_eq!(o.code, 2, "{}", o.stderr);
        // Nobody listening: 3.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let o = Ctl {
            addr: closed.to_string(),
            token: None,
        }
        .run(&["models", "list"]);
        assert_eq!(o.code, 3, "{}", o.stderr);
        assert!(o.stderr.contains("cannot reach modelgate"), "{}", o.stderr);
        // A port that accepts connections (the kernel does) but never answers: the call ends at
        // --call-timeout, not at the default 30 s.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let started = std::time::Instant::now();
        let o = Ctl {
            addr: silent.local_addr().unwrap().to_string(),
            token: None,
        }
        .run(&["--call-timeout", "300ms", "models", "list"]);
        assert_eq!(o.code, 3, "{}", o.stderr);
        assert!(
            o.stderr.contains("DEADLINE_EXCEEDED") && o.stderr.contains("--call-timeout (300ms)"),
            "{}",
            o.stderr
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    })
    .await
    .unwrap();
    mg.shutdown().await;
}

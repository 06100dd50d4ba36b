//! The deployment files agree with the code: `deploy/Dockerfile`, the Kubernetes manifests in
//! `deploy/k8s/` and `deploy/modelgate.example.toml` are read and checked against the flags,
//! defaults and loader of `modelgate serve` (`modelgate::config`). No network, Docker or cluster:
//! what a reviewer would check by eye, checked by the test instead.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};
use modelgate::config::{self, Config, Env, ServeArgs};
use serde::Deserialize;
use serde_norway::Value;

/// `modelgate serve`'s flags as a command of their own, as `src/main.rs` builds them.
#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

// ---- the code's settings ----------------------------------------------------------------------

/// Every `serve` flag id (`max_in_flight`) with its default values (none for optional flags).
fn flags() -> BTreeMap<String, Vec<String>> {
    Cli::command()
        .get_arguments()
        .filter(|a| a.get_id() != "help")
        .map(|a| {
            let defaults = a
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect();
            (a.get_id().to_string(), defaults)
        })
        .collect()
}

/// `MODELGATE_MAX_IN_FLIGHT` for `max_in_flight`.
fn env_name(id: &str) -> String {
    format!("{}{}", config::ENV_PREFIX, id.to_ascii_uppercase())
}

/// The environment variables `serve` reads as settings.
fn setting_env_names() -> BTreeSet<String> {
    flags().keys().map(|id| env_name(id)).collect()
}

/// Loads settings the way `modelgate serve` does (`config::apply_sources`, then clap, then
/// `Config::from_args`): `env` as the environment, the config file (named by `MODELGATE_CONFIG`)
/// read through `read_file`.
fn load(
    env: &Env,
    read_file: impl Fn(&Path) -> std::io::Result<String>,
) -> Result<(Config, ArgMatches, Vec<String>), String> {
    let argv = [OsString::from("modelgate")];
    let (cmd, warnings) =
        config::apply_sources(Cli::command(), &argv, env, read_file).map_err(|e| e.to_string())?;
    let matches = cmd.try_get_matches_from(argv).map_err(|e| e.to_string())?;
    let cli = Cli::from_arg_matches(&matches).map_err(|e| e.to_string())?;
    let config = Config::from_args(cli.serve).map_err(|e| e.to_string())?;
    Ok((config, matches, warnings))
}

fn no_file(p: &Path) -> std::io::Result<String> {
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("{} is not provided by this test", p.display()),
    ))
}

/// The built-in defaults.
fn defaults() -> Config {
    load(&Env::new(), no_file).expect("the defaults load").0
}

// ---- Kubernetes manifests ---------------------------------------------------------------------

const K8S: &str = "deploy/k8s";

/// One YAML document and the file it came from.
struct Doc {
    file: String,
    value: Value,
}

/// Every YAML document of every file under deploy/k8s.
fn k8s_docs() -> Vec<Doc> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join(K8S))
        .unwrap_or_else(|e| panic!("cannot list {K8S}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML files in {K8S}");
    let mut docs = Vec::new();
    for path in files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, doc) in serde_norway::Deserializer::from_str(&text).enumerate() {
            let value = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{K8S}/{file}: document {} is not YAML: {e}", i + 1));
            if value.is_null() {
                continue; // an empty document (a trailing `---`)
            }
            docs.push(Doc {
                file: file.clone(),
                value,
            });
        }
    }
    docs
}

fn kind(v: &Value) -> &str {
    v["kind"].as_str().unwrap_or("")
}

fn name(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or("")
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

/// The one object of `kind` called `name`.
fn object<'a>(docs: &'a [Doc], kind_: &str, name_: &str) -> &'a Value {
    let found: Vec<&Doc> = docs
        .iter()
        .filter(|d| kind(&d.value) == kind_ && name(&d.value) == name_)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind_} named '{name_}' in {K8S}, found {}",
        found.len()
    );
    &found[0].value
}

/// The Deployment: exactly one.
fn deployment(docs: &[Doc]) -> &Value {
    let found: Vec<&Doc> = docs
        .iter()
        .filter(|d| kind(&d.value) == "Deployment")
        .collect();
    assert_eq!(found.len(), 1, "expected one Deployment in {K8S}");
    &found[0].value
}

fn pod_spec(docs: &[Doc]) -> &Value {
    let spec = &deployment(docs)["spec"]["template"]["spec"];
    assert!(
        spec.is_mapping(),
        "the Deployment has no spec.template.spec"
    );
    spec
}

/// The modelgate container of the Pod template.
fn sidecar(docs: &[Doc]) -> &Value {
    let found: Vec<&Value> = seq(&pod_spec(docs)["containers"])
        .iter()
        .filter(|c| c["name"].as_str() == Some("modelgate"))
        .collect();
    assert_eq!(found.len(), 1, "expected one container named 'modelgate'");
    let c = found[0];
    let image = c["image"].as_str().unwrap_or("");
    assert!(
        image.contains("modelgate"),
        "the modelgate container runs image '{image}', not a modelgate image"
    );
    c
}

/// The Pod's other containers (the model server).
fn model_servers(docs: &[Doc]) -> Vec<&Value> {
    seq(&pod_spec(docs)["containers"])
        .iter()
        .filter(|c| c["name"].as_str() != Some("modelgate"))
        .collect()
}

/// A container's declared ports: name → number.
fn container_ports(c: &Value) -> BTreeMap<String, u16> {
    seq(&c["ports"])
        .iter()
        .map(|p| {
            let n = p["containerPort"].as_u64().unwrap_or_else(|| {
                panic!(
                    "container '{}' has a port without a numeric containerPort",
                    c["name"].as_str().unwrap_or("?")
                )
            });
            let name = p["name"].as_str().unwrap_or("").to_string();
            (name, u16::try_from(n).expect("a port number"))
        })
        .collect()
}

/// A probe's or Service's port (number, or name of one of the container's ports) as a number.
fn resolve_port(c: &Value, port: &Value, what: &str) -> u16 {
    if let Some(n) = port.as_u64() {
        return u16::try_from(n).expect("a port number");
    }
    let name = port
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no port given"));
    *container_ports(c).get(name).unwrap_or_else(|| {
        panic!("{what}: port '{name}' is not a named port of the modelgate container")
    })
}

/// A volume mount of container `c` that holds `path`, and the volume it mounts.
fn mount_of<'a>(
    pod: &'a Value,
    c: &'a Value,
    path: &str,
) -> Option<(&'a Value, &'a Value, String)> {
    let path = Path::new(path);
    let mut best: Option<(&Value, String)> = None;
    for m in seq(&c["volumeMounts"]) {
        let mount_path = m["mountPath"].as_str().unwrap_or("");
        if let Ok(rest) = path.strip_prefix(mount_path) {
            let longer = best.as_ref().is_none_or(|(b, _)| {
                b["mountPath"].as_str().unwrap_or("").len() < mount_path.len()
            });
            if longer {
                best = Some((m, rest.to_string_lossy().into_owned()));
            }
        }
    }
    let (m, rest) = best?;
    let volume = seq(&pod["volumes"])
        .iter()
        .find(|v| v["name"] == m["name"])
        .unwrap_or_else(|| {
            panic!(
                "volumeMount '{}' names no volume of the Pod",
                m["name"].as_str().unwrap_or("?")
            )
        });
    Some((m, volume, rest))
}

/// The text a file at `path` in the modelgate container has when it comes from a ConfigMap key.
fn configmap_file(docs: &[Doc], path: &str) -> String {
    let pod = pod_spec(docs);
    let c = sidecar(docs);
    let (m, volume, key) = mount_of(pod, c, path).unwrap_or_else(|| {
        panic!("{path} is not on any volume mounted in the modelgate container")
    });
    let cm_name = volume["configMap"]["name"].as_str().unwrap_or_else(|| {
        panic!(
            "{path} is on volume '{}', which is not a ConfigMap",
            volume["name"].as_str().unwrap_or("?")
        )
    });
    assert!(
        m["subPath"].is_null(),
        "{path} is mounted with subPath: ConfigMap updates would never reach it"
    );
    let cm = object(docs, "ConfigMap", cm_name);
    cm["data"][key.as_str()]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap '{cm_name}' has no key '{key}' for {path}"))
        .to_string()
}

/// Literal environment of a container (`value`), and the variables set some other way.
fn literal_env(c: &Value) -> (BTreeMap<String, String>, BTreeMap<String, Value>) {
    let mut literal = BTreeMap::new();
    let mut from = BTreeMap::new();
    for e in seq(&c["env"]) {
        let n = e["name"]
            .as_str()
            .expect("an env entry has a name")
            .to_string();
        if let Some(v) = e["value"].as_str() {
            literal.insert(n, v.to_string());
        } else {
            from.insert(n, e["valueFrom"].clone());
        }
    }
    (literal, from)
}

/// Seconds a container's preStop hook sleeps (`exec: sleep N`), else 0.
fn pre_stop_sleep(c: &Value) -> u64 {
    let command = seq(&c["lifecycle"]["preStop"]["exec"]["command"]);
    match command {
        [cmd, n] if cmd.as_str() == Some("sleep") => {
            n.as_str().and_then(|n| n.parse().ok()).unwrap_or(0)
        }
        _ => c["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_u64()
            .unwrap_or(0),
    }
}

/// The modelgate container's effective settings: the image's ENV, then the container's env
/// (the Secret's token resolved), the config file and the state file from the ConfigMap.
struct PodSettings {
    config: Config,
    env: BTreeMap<String, String>,
    warnings: Vec<String>,
    _state_dir: tempfile::TempDir,
}

fn pod_settings(docs: &[Doc]) -> PodSettings {
    let c = sidecar(docs);
    let mut env: BTreeMap<String, String> = dockerfile_env();
    let (literal, from) = literal_env(c);
    env.extend(literal);
    for (n, v) in &from {
        let secret = &v["secretKeyRef"];
        let cm = &v["configMapKeyRef"];
        let value = if secret.is_mapping() {
            let s = object(docs, "Secret", secret["name"].as_str().unwrap_or(""));
            let key = secret["key"].as_str().unwrap_or("");
            s["stringData"][key]
                .as_str()
                .map(str::to_string)
                .or_else(|| {
                    s["data"][key]
                        .as_str()
                        .map(|_| "from-base64-data".to_string())
                })
                .unwrap_or_else(|| panic!("{n}: Secret '{}' has no key '{key}'", name(s)))
        } else if cm.is_mapping() {
            let m = object(docs, "ConfigMap", cm["name"].as_str().unwrap_or(""));
            let key = cm["key"].as_str().unwrap_or("");
            m["data"][key]
                .as_str()
                .unwrap_or_else(|| panic!("{n}: ConfigMap '{}' has no key '{key}'", name(m)))
                .to_string()
        } else {
            panic!("{n}: valueFrom {v:?} is neither a secretKeyRef nor a configMapKeyRef");
        };
        env.insert(n.clone(), value);
    }
    // The config file comes from the ConfigMap through the loader's file reader.
    let files: HashMap<PathBuf, String> = env
        .get("MODELGATE_CONFIG")
        .map(|p| (PathBuf::from(p), configmap_file(docs, p)))
        .into_iter()
        .collect();
    // The state file is read from disk by Config::from_args: the ConfigMap's text goes to a
    // temporary file that stands in for the mounted one.
    let state_dir = tempfile::tempdir().unwrap();
    if let Some(p) = env.get("MODELGATE_STATE_FILE").cloned() {
        let local = state_dir.path().join("state.toml");
        std::fs::write(&local, configmap_file(docs, &p)).unwrap();
        env.insert(
            "MODELGATE_STATE_FILE".into(),
            local.to_string_lossy().into_owned(),
        );
    }
    let env_map: Env = env.clone().into_iter().collect();
    let (config, _, warnings) = load(&env_map, |p| {
        files.get(p).cloned().ok_or_else(|| no_file(p).unwrap_err())
    })
    .unwrap_or_else(|e| panic!("the modelgate container's settings do not load: {e}"));
    PodSettings {
        config,
        env,
        warnings,
        _state_dir: state_dir,
    }
}

#[test]
fn every_manifest_parses_and_the_kustomization_lists_every_file() {
    let docs = k8s_docs();
    let mut seen = BTreeSet::new();
    for d in &docs {
        let v = &d.value;
        assert!(
            v["apiVersion"].as_str().is_some() && !kind(v).is_empty(),
            "{K8S}/{}: a document without apiVersion or kind",
            d.file
        );
        if kind(v) == "Kustomization" {
            continue;
        }
        assert!(
            !name(v).is_empty(),
            "{K8S}/{}: a {} without metadata.name",
            d.file,
            kind(v)
        );
        assert!(
            seen.insert((kind(v).to_string(), name(v).to_string())),
            "{K8S}/{}: {} '{}' is defined twice",
            d.file,
            kind(v),
            name(v)
        );
    }
    let k: Vec<&Doc> = docs
        .iter()
        .filter(|d| kind(&d.value) == "Kustomization")
        .collect();
    assert_eq!(
        k.len(),
        1,
        "expected one Kustomization (kustomization.yaml)"
    );
    assert_eq!(
        k[0].file, "kustomization.yaml",
        "the Kustomization must be kustomization.yaml"
    );
    let listed: BTreeSet<String> = seq(&k[0].value["resources"])
        .iter()
        .map(|r| r.as_str().expect("resources are file names").to_string())
        .collect();
    let files: BTreeSet<String> = docs
        .iter()
        .map(|d| d.file.clone())
        .filter(|f| f != "kustomization.yaml")
        .collect();
    assert_eq!(
        listed, files,
        "kustomization.yaml's resources must list every manifest in {K8S} (`kubectl apply -k` applies only those)"
    );
    for kind_ in ["Deployment", "Service", "Secret", "ConfigMap"] {
        assert!(
            docs.iter().any(|d| kind(&d.value) == kind_),
            "{K8S} has no {kind_}"
        );
    }
}

#[test]
fn sidecar_ports_are_the_codes_defaults() {
    let docs = k8s_docs();
    let d = defaults();
    let ports = container_ports(sidecar(&docs));
    let expected: BTreeMap<String, u16> = [
        ("grpc", d.listen.port()),
        ("control", d.control_listen.port()),
        ("admin", d.admin_listen.port()),
    ]
    .into_iter()
    .map(|(n, p)| (n.to_string(), p))
    .collect();
    assert_eq!(
        ports, expected,
        "the modelgate container's ports must be data (grpc) {}, control {} and admin {}: the defaults of --listen, --control-listen and --admin-listen",
        d.listen, d.control_listen, d.admin_listen
    );
    for p in seq(&sidecar(&docs)["ports"]) {
        assert!(
            p["hostPort"].is_null(),
            "the modelgate container must not bind a hostPort ({p:?})"
        );
    }
}

#[test]
fn the_pods_settings_load_and_keep_the_control_port_private() {
    let docs = k8s_docs();
    let pod = pod_settings(&docs);
    let c = &pod.config;
    let d = defaults();
    assert!(
        pod.warnings.is_empty(),
        "modelgate would warn about the Pod's environment: {:?}",
        pod.warnings
    );
    // The ports the container declares are the ones modelgate listens on in the Pod.
    for (setting, addr, default) in [
        ("--listen", c.listen, d.listen),
        ("--control-listen", c.control_listen, d.control_listen),
        ("--admin-listen", c.admin_listen, d.admin_listen),
    ] {
        assert_eq!(
            addr, default,
            "{setting} is {addr} in the Pod, not its default {default}: the manifests assume the defaults"
        );
    }
    assert!(
        c.control_listen.ip().is_loopback(),
        "the control port listens on {} in the Pod: keep it on 127.0.0.1 so only the Pod's containers reach it",
        c.control_listen
    );
    assert!(
        c.control_token.is_some(),
        "the Pod sets no control token (MODELGATE_CONTROL_TOKEN from the Secret)"
    );
    assert!(
        c.state_file.is_some(),
        "the Pod sets no --state-file (MODELGATE_STATE_FILE)"
    );
    // RocksDB is on the Pod's data volume, on disk.
    let data_dir = c.data_dir.to_string_lossy().into_owned();
    let (m, volume, rest) = mount_of(pod_spec(&docs), sidecar(&docs), &data_dir)
        .unwrap_or_else(|| panic!("--data-dir {data_dir} is on no volume: RocksDB would write into the container's root filesystem"));
    assert!(
        rest.is_empty(),
        "--data-dir {data_dir} should be the mount path of its volume, not below it ({})",
        m["mountPath"].as_str().unwrap_or("")
    );
    assert!(
        !volume["emptyDir"].is_null() || !volume["persistentVolumeClaim"].is_null(),
        "--data-dir {data_dir} is on volume '{}', which is neither an emptyDir nor a PVC",
        volume["name"].as_str().unwrap_or("?")
    );
    assert_ne!(
        volume["emptyDir"]["medium"].as_str(),
        Some("Memory"),
        "the data volume is tmpfs: RocksDB's files would count against the memory limit"
    );
    assert_ne!(
        m["readOnly"].as_bool(),
        Some(true),
        "the data volume is mounted read-only"
    );
    assert_eq!(
        pod.env.get("MODELGATE_DATA_DIR").map(String::as_str),
        Some(data_dir.as_str()),
        "set MODELGATE_DATA_DIR explicitly in the Pod: the environment beats a config file's data_dir"
    );
}

#[test]
fn termination_grace_covers_prestop_and_shutdown_grace() {
    let docs = k8s_docs();
    let spec = pod_spec(&docs);
    let grace = spec["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds is set (the default, 30s, should be explicit)");
    let default_grace = defaults().shutdown_grace;
    assert!(
        Duration::from_secs(grace) > default_grace,
        "terminationGracePeriodSeconds {grace}s does not exceed --shutdown-grace's default {default_grace:?}"
    );
    let pod = pod_settings(&docs);
    let needed = Duration::from_secs(pre_stop_sleep(sidecar(&docs))) + pod.config.shutdown_grace;
    assert!(
        Duration::from_secs(grace) > needed,
        "terminationGracePeriodSeconds {grace}s does not exceed modelgate's preStop sleep + --shutdown-grace ({needed:?}); queued records would be lost to SIGKILL"
    );
    for m in model_servers(&docs) {
        let s = pre_stop_sleep(m);
        assert!(
            s < grace,
            "container '{}' sleeps {s}s in preStop, not less than terminationGracePeriodSeconds {grace}s",
            m["name"].as_str().unwrap_or("?")
        );
    }
}

#[test]
fn probes_are_ready_and_live_on_the_admin_port() {
    let docs = k8s_docs();
    let c = sidecar(&docs);
    let admin = defaults().admin_listen.port();
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/live")] {
        let get = &c[probe]["httpGet"];
        assert!(
            get.is_mapping(),
            "the modelgate container has no {probe} with httpGet"
        );
        assert_eq!(
            get["path"].as_str(),
            Some(path),
            "the modelgate container's {probe} must GET {path}"
        );
        let port = resolve_port(c, &get["port"], probe);
        assert_eq!(
            port, admin,
            "the modelgate container's {probe} must use the admin port {admin}, not {port}"
        );
        assert!(
            get["scheme"].is_null() || get["scheme"].as_str() == Some("HTTP"),
            "the admin port speaks plain HTTP; {probe} uses scheme {:?}",
            get["scheme"]
        );
    }
}

#[test]
fn the_service_exposes_only_the_data_port() {
    let docs = k8s_docs();
    let c = sidecar(&docs);
    let data = defaults().listen.port();
    let labels = &deployment(&docs)["spec"]["template"]["metadata"]["labels"];
    let services: Vec<&Doc> = docs
        .iter()
        .filter(|d| kind(&d.value) == "Service")
        .collect();
    assert!(!services.is_empty(), "no Service in {K8S}");
    for s in services {
        let s = &s.value;
        let selector = s["spec"]["selector"]
            .as_mapping()
            .unwrap_or_else(|| panic!("Service '{}' has no selector", name(s)));
        for (k, v) in selector {
            assert_eq!(
                &labels[k.as_str().unwrap_or("")],
                v,
                "Service '{}' selects {k:?}={v:?}, which the Pod template does not carry",
                name(s)
            );
        }
        let ports = seq(&s["spec"]["ports"]);
        assert_eq!(
            ports.len(),
            1,
            "Service '{}' must expose exactly one port, modelgate's data port",
            name(s)
        );
        let p = &ports[0];
        let target = if p["targetPort"].is_null() {
            p["port"].clone()
        } else {
            p["targetPort"].clone()
        };
        let target = resolve_port(c, &target, &format!("Service '{}'", name(s)));
        assert_eq!(
            target, data,
            "Service '{}' targets port {target}; only the data port {data} may be exposed (control and admin stay in the Pod)",
            name(s)
        );
        assert_eq!(
            p["name"].as_str(),
            Some("grpc"),
            "Service '{}': name the data port 'grpc'",
            name(s)
        );
        let proto = p["appProtocol"].as_str().unwrap_or("");
        assert!(
            proto == "grpc" || proto == "kubernetes.io/h2c",
            "Service '{}': appProtocol '{proto}' should say gRPC over cleartext HTTP/2 (kubernetes.io/h2c or grpc)",
            name(s)
        );
    }
}

#[test]
fn prometheus_scrapes_metrics_on_the_admin_port() {
    let docs = k8s_docs();
    let annotations = &deployment(&docs)["spec"]["template"]["metadata"]["annotations"];
    let admin = defaults().admin_listen.port().to_string();
    for (key, want) in [
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", admin.as_str()),
        ("prometheus.io/path", "/metrics"),
    ] {
        assert_eq!(
            annotations[key].as_str(),
            Some(want),
            "the Pod template's annotation {key} must be the string \"{want}\" (annotation values must be quoted strings), found {:?}",
            annotations[key]
        );
    }
}

#[test]
fn the_control_token_comes_from_a_secret() {
    let docs = k8s_docs();
    let (literal, from) = literal_env(sidecar(&docs));
    let var = env_name("control_token");
    assert!(
        !literal.contains_key(&var),
        "{var} is written into the Deployment; take it from a Secret (secretKeyRef)"
    );
    let r = &from
        .get(&var)
        .unwrap_or_else(|| panic!("the modelgate container does not set {var}"))["secretKeyRef"];
    assert!(r.is_mapping(), "{var} must come from a secretKeyRef");
    let secret = object(&docs, "Secret", r["name"].as_str().unwrap_or(""));
    let key = r["key"].as_str().unwrap_or("");
    assert!(
        !secret["stringData"][key].is_null() || !secret["data"][key].is_null(),
        "Secret '{}' has no key '{key}' for {var}",
        name(secret)
    );
    // Not in the ConfigMap either.
    for cm in docs.iter().filter(|d| kind(&d.value) == "ConfigMap") {
        for (k, v) in cm.value["data"].as_mapping().into_iter().flatten() {
            let text = v.as_str().unwrap_or("");
            assert!(
                !text
                    .lines()
                    .any(|l| l.trim_start().starts_with("control_token")),
                "ConfigMap '{}' key {k:?} sets control_token; keep the token in the Secret",
                name(&cm.value)
            );
        }
    }
}

#[test]
fn every_modelgate_variable_in_the_manifests_is_a_setting() {
    let docs = k8s_docs();
    let known = setting_env_names();
    let spec = pod_spec(&docs);
    for c in seq(&spec["containers"])
        .iter()
        .chain(seq(&spec["initContainers"]))
    {
        for e in seq(&c["env"]) {
            let n = e["name"].as_str().unwrap_or("");
            if n.starts_with(config::ENV_PREFIX) {
                assert!(
                    known.contains(n),
                    "container '{}' sets {n}, which is not a `modelgate serve` setting (no such flag in ServeArgs)",
                    c["name"].as_str().unwrap_or("?")
                );
            }
        }
    }
    assert_eq!(
        spec["enableServiceLinks"].as_bool(),
        Some(false),
        "set enableServiceLinks: false, or a Service named 'modelgate' injects MODELGATE_* variables modelgate reads as settings"
    );
}

#[test]
fn the_state_file_routes_to_the_model_server_in_the_pod() {
    let docs = k8s_docs();
    // Loading the Pod's settings loads its state file with the code's own loader.
    let pod = pod_settings(&docs);
    assert!(
        pod.config.state_file.is_some(),
        "the Pod sets no --state-file"
    );
    let (literal, _) = literal_env(sidecar(&docs));
    let mounted = literal
        .get("MODELGATE_STATE_FILE")
        .expect("the modelgate container sets MODELGATE_STATE_FILE");
    let text = configmap_file(&docs, mounted);
    let state: toml::Value = toml::from_str(&text)
        .unwrap_or_else(|e| panic!("the ConfigMap's state file is not TOML: {e}"));
    // modelgate forwards gRPC: the endpoint must be one of the model server's gRPC ports (named
    // `…grpc…`), not its HTTP port.
    let server_ports: BTreeSet<u16> = model_servers(&docs)
        .iter()
        .flat_map(|c| container_ports(c).into_iter())
        .filter(|(name, _)| name.contains("grpc"))
        .map(|(_, port)| port)
        .collect();
    let mut endpoints = Vec::new();
    collect_endpoints(&state, &mut endpoints);
    assert!(
        !endpoints.is_empty(),
        "the ConfigMap's state file names no endpoint"
    );
    for e in endpoints {
        let authority = e
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("endpoint '{e}' is not http://"))
            .trim_end_matches('/');
        let addr: SocketAddr = authority
            .replace("localhost", "127.0.0.1")
            .parse()
            .unwrap_or_else(|_| panic!("endpoint '{e}' is not http://IP:PORT"));
        assert!(
            addr.ip().is_loopback(),
            "endpoint '{e}': the model server is in the same Pod, reach it on 127.0.0.1"
        );
        assert!(
            server_ports.contains(&addr.port()),
            "endpoint '{e}': port {} is not a gRPC port of the model server container (ports named *grpc*: {server_ports:?})",
            addr.port()
        );
    }
}

fn collect_endpoints(v: &toml::Value, out: &mut Vec<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                match v {
                    toml::Value::String(s) if k == "endpoint" => out.push(s.clone()),
                    v => collect_endpoints(v, out),
                }
            }
        }
        toml::Value::Array(a) => a.iter().for_each(|v| collect_endpoints(v, out)),
        _ => {}
    }
}

// ---- Dockerfile -------------------------------------------------------------------------------

const DOCKERFILE: &str = "deploy/Dockerfile";

/// One instruction: its stage (0 = first FROM), keyword (upper case) and arguments.
struct Instruction {
    stage: usize,
    keyword: String,
    args: String,
}

fn dockerfile() -> Vec<Instruction> {
    let text = read(DOCKERFILE);
    let mut out = Vec::new();
    let mut stage = None::<usize>;
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue; // comments (and parser directives), even inside a continued instruction
        }
        if let Some(cont) = t.strip_suffix('\\') {
            current.push_str(cont);
            current.push(' ');
            continue;
        }
        current.push_str(t);
        let full = std::mem::take(&mut current);
        let full = full.trim();
        if full.is_empty() {
            continue;
        }
        let (keyword, args) = full.split_once(char::is_whitespace).unwrap_or((full, ""));
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" {
            stage = Some(stage.map_or(0, |s| s + 1));
        }
        out.push(Instruction {
            stage: stage.expect("the Dockerfile starts with FROM"),
            keyword,
            args: args.trim().to_string(),
        });
    }
    out
}

fn final_stage(all: &[Instruction]) -> Vec<&Instruction> {
    let last = all.iter().map(|i| i.stage).max().unwrap_or(0);
    all.iter().filter(|i| i.stage == last).collect()
}

/// The final stage's `ENV` (key=value form).
fn dockerfile_env() -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for i in final_stage(&dockerfile()) {
        if i.keyword == "ENV" {
            for pair in i.args.split_whitespace() {
                let (k, v) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("{DOCKERFILE}: write ENV as KEY=value ({})", i.args));
                env.insert(k.to_string(), v.trim_matches('"').to_string());
            }
        }
    }
    env
}

fn exec_form(args: &str, what: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|_| {
        panic!("{DOCKERFILE}: {what} should be in exec form [\"…\"], found {args}")
    })
}

#[test]
fn dockerfile_exposes_the_default_ports() {
    let all = dockerfile();
    let d = defaults();
    let exposed: BTreeSet<u16> = final_stage(&all)
        .iter()
        .filter(|i| i.keyword == "EXPOSE")
        .flat_map(|i| i.args.split_whitespace())
        .map(|p| {
            p.trim_end_matches("/tcp")
                .parse()
                .unwrap_or_else(|_| panic!("{DOCKERFILE}: EXPOSE {p} is not a port"))
        })
        .collect();
    let want: BTreeSet<u16> = [
        d.listen.port(),
        d.control_listen.port(),
        d.admin_listen.port(),
    ]
    .into();
    assert_eq!(
        exposed, want,
        "{DOCKERFILE} must EXPOSE the default data, control and admin ports"
    );
}

#[test]
fn dockerfile_runs_modelgate_serve_as_a_non_root_user() {
    let all = dockerfile();
    let stage = final_stage(&all);
    let user = stage
        .iter()
        .rev()
        .find(|i| i.keyword == "USER")
        .unwrap_or_else(|| {
            panic!("{DOCKERFILE}: the runtime stage sets no USER, so it runs as root")
        });
    let uid = user.args.split(':').next().unwrap_or("");
    let uid: u32 = uid.parse().unwrap_or_else(|_| {
        panic!(
            "{DOCKERFILE}: USER {} should be numeric, so Kubernetes' runAsNonRoot can verify it",
            user.args
        )
    });
    assert_ne!(uid, 0, "{DOCKERFILE}: USER {} is root", user.args);
    let docs = k8s_docs();
    assert_eq!(
        sidecar(&docs)["securityContext"]["runAsUser"].as_u64(),
        Some(u64::from(uid)),
        "the modelgate container's runAsUser should be the image's USER {uid}"
    );
    let entry = stage
        .iter()
        .rev()
        .find(|i| i.keyword == "ENTRYPOINT")
        .expect("an ENTRYPOINT");
    assert_eq!(
        exec_form(&entry.args, "ENTRYPOINT"),
        ["modelgate"],
        "{DOCKERFILE}: ENTRYPOINT must be [\"modelgate\"]"
    );
    let cmd = stage
        .iter()
        .rev()
        .find(|i| i.keyword == "CMD")
        .expect("a CMD");
    assert_eq!(
        exec_form(&cmd.args, "CMD"),
        ["serve"],
        "{DOCKERFILE}: CMD must be [\"serve\"]"
    );
    // The image's settings are real ones, and its data dir is created for that user.
    let known = setting_env_names();
    let env = dockerfile_env();
    for k in env.keys().filter(|k| k.starts_with(config::ENV_PREFIX)) {
        assert!(
            known.contains(k),
            "{DOCKERFILE} sets {k}, which is not a `modelgate serve` setting"
        );
    }
    let data_dir = env
        .get("MODELGATE_DATA_DIR")
        .unwrap_or_else(|| panic!("{DOCKERFILE} sets no MODELGATE_DATA_DIR (the default ./modelgate-data is relative to /)"));
    assert!(
        stage.iter().any(|i| i.keyword == "RUN"
            && i.args.contains(data_dir.as_str())
            && i.args.contains(&uid.to_string())),
        "{DOCKERFILE}: no RUN creates {data_dir} for UID {uid}"
    );
}

#[test]
fn dockerfile_healthcheck_gets_ready() {
    let all = dockerfile();
    let stage = final_stage(&all);
    let hc = stage
        .iter()
        .find(|i| i.keyword == "HEALTHCHECK")
        .unwrap_or_else(|| panic!("{DOCKERFILE}: the runtime stage has no HEALTHCHECK"));
    let cmd = hc
        .args
        .split_once("CMD")
        .unwrap_or_else(|| panic!("{DOCKERFILE}: HEALTHCHECK without CMD"))
        .1
        .trim();
    let argv = exec_form(cmd, "HEALTHCHECK CMD");
    let admin = defaults().admin_listen.port();
    let url = format!("http://127.0.0.1:{admin}/ready");
    assert!(
        argv.iter().any(|a| a == &url),
        "{DOCKERFILE}: HEALTHCHECK must GET {url}, found {argv:?}"
    );
    // The checking program is installed in the runtime image.
    let program = &argv[0];
    assert!(
        stage.iter().any(|i| i.keyword == "RUN"
            && i.args.contains("install")
            && i.args.split_whitespace().any(|w| w == program)),
        "{DOCKERFILE}: HEALTHCHECK runs {program}, which no RUN in the runtime stage installs"
    );
}

/// `rel` (a path relative to the repository root) would be left out of the build context.
fn docker_ignored(rel: &str, patterns: &[String]) -> bool {
    patterns.iter().any(|p| {
        let (anywhere, p) = match p.strip_prefix("**/") {
            Some(rest) => (true, rest),
            None => (false, p.as_str()),
        };
        let p = p.trim_start_matches('/').trim_end_matches('/');
        if let Some(ext) = p.strip_prefix('*') {
            return !ext.contains('*') && rel.ends_with(ext);
        }
        rel == p
            || rel.starts_with(&format!("{p}/"))
            || (anywhere && (rel.ends_with(&format!("/{p}")) || rel.contains(&format!("/{p}/"))))
    })
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    if dir.is_dir() {
        for e in std::fs::read_dir(dir).unwrap() {
            files_under(&e.unwrap().path(), out);
        }
    } else {
        out.push(dir.to_path_buf());
    }
}

#[test]
fn dockerfile_builds_from_what_the_context_sends() {
    let all = dockerfile();
    let builder: Vec<&Instruction> = all.iter().filter(|i| i.stage == 0).collect();
    assert!(
        builder
            .iter()
            .any(|i| i.keyword == "RUN" && i.args.contains("cargo build --release --locked")),
        "{DOCKERFILE}: the builder must run `cargo build --release --locked`"
    );
    let ignore: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    for p in ["target", ".git"] {
        assert!(
            docker_ignored(p, &ignore),
            ".dockerignore must exclude {p}/"
        );
    }
    // Every COPY source of the builder exists and is in the context.
    let mut copied = Vec::new();
    for i in builder.iter().filter(|i| i.keyword == "COPY") {
        assert!(
            !i.args.starts_with("--from"),
            "the builder copies from another stage"
        );
        let words: Vec<&str> = i
            .args
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        for src in &words[..words.len() - 1] {
            let src = src.trim_start_matches("./").trim_end_matches('/');
            let path = repo().join(src);
            assert!(
                path.exists(),
                "{DOCKERFILE} copies {src}, which does not exist"
            );
            let mut files = Vec::new();
            files_under(&path, &mut files);
            for f in files {
                let rel = f
                    .strip_prefix(repo())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                assert!(
                    !docker_ignored(&rel, &ignore),
                    ".dockerignore excludes {rel}, which {DOCKERFILE} copies"
                );
            }
            copied.push(src.to_string());
        }
    }
    // Every target Cargo.toml declares (cargo refuses a manifest whose targets are missing), and
    // build.rs's .proto files, are copied.
    let manifest: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
    let mut needed = vec!["Cargo.toml".to_string(), "Cargo.lock".to_string()];
    if repo().join("build.rs").exists() {
        needed.push("build.rs".into());
        needed.push("proto".into());
    }
    needed.push("src/lib.rs".into());
    needed.push("src/main.rs".into());
    for (section, dir) in [
        ("bin", "src/bin"),
        ("bench", "benches"),
        ("example", "examples"),
        ("test", "tests"),
    ] {
        for t in manifest
            .get(section)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let path = match t.get("path").and_then(|p| p.as_str()) {
                Some(p) => p.to_string(),
                None => format!("{dir}/{}.rs", t["name"].as_str().unwrap_or("")),
            };
            needed.push(path);
        }
    }
    for n in needed {
        assert!(
            copied
                .iter()
                .any(|c| n == *c || n.starts_with(&format!("{c}/"))),
            "{DOCKERFILE}'s builder does not copy {n}, which the build needs"
        );
    }
}

// ---- deploy/modelgate.example.toml ------------------------------------------------------------

const EXAMPLE: &str = "deploy/modelgate.example.toml";

/// `key = value` lines of the example: key → (line index, commented out).
fn example_keys(text: &str) -> BTreeMap<String, (usize, bool)> {
    let mut keys = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let (commented, body) = match line.strip_prefix('#') {
            Some(rest) => (true, rest.trim_start()),
            None => (false, line),
        };
        let Some((key, _)) = body.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'-')
        {
            let previous = keys.insert(key.replace('-', "_"), (i, commented));
            assert!(previous.is_none(), "{EXAMPLE}: {key} appears twice");
        }
    }
    keys
}

fn example_env(path: &Path) -> Env {
    [(env_name("config"), path.to_string_lossy().into_owned())]
        .into_iter()
        .collect()
}

#[test]
fn example_config_loads_with_the_codes_loader_at_the_defaults() {
    let path = repo().join(EXAMPLE);
    let (_, matches, warnings) = load(&example_env(&path), |p| std::fs::read_to_string(p))
        .unwrap_or_else(|e| panic!("{EXAMPLE} does not load as a --config file: {e}"));
    assert!(warnings.is_empty(), "{warnings:?}");
    let text = read(EXAMPLE);
    let keys = example_keys(&text);
    for (id, default) in flags() {
        if id == "config" {
            continue;
        }
        let Some(&(_, false)) = keys.get(&id) else {
            continue; // missing (another test says so) or commented out
        };
        let raw: Vec<String> = matches
            .get_raw(&id)
            .into_iter()
            .flatten()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        assert!(
            !default.is_empty(),
            "{EXAMPLE} sets {id}, which has no default: comment it out like the other optional settings"
        );
        assert_eq!(
            raw, default,
            "{EXAMPLE} sets {id} to {raw:?}, but its default is {default:?}; the example lists the defaults"
        );
    }
    // The loader is strict, so the file above has no unknown key.
    let bad = format!("{text}\nmax_in_fligth = 1\n");
    let err = load(&example_env(&path), |_| Ok(bad.clone()))
        .map(|_| ())
        .unwrap_err();
    assert!(err.contains("unknown setting 'max_in_fligth'"), "{err}");
}

#[test]
fn example_config_documents_every_flag() {
    let text = read(EXAMPLE);
    let lines: Vec<&str> = text.lines().collect();
    let keys = example_keys(&text);
    let flags = flags();
    for (key, &(line, _)) in &keys {
        assert!(
            flags.contains_key(key) && key != "config",
            "{EXAMPLE} line {}: '{key}' is not a `modelgate serve` setting",
            line + 1
        );
    }
    assert!(
        text.contains(&env_name("config")),
        "{EXAMPLE} should say how it is named: --config / MODELGATE_CONFIG"
    );
    for id in flags.keys().filter(|id| *id != "config") {
        let &(line, _) = keys.get(id).unwrap_or_else(|| {
            panic!(
                "{EXAMPLE} does not list the setting {id} (--{})",
                id.replace('_', "-")
            )
        });
        // The comment block right above the key: what it does, its default, its variable.
        let block: Vec<&str> = lines[..line]
            .iter()
            .rev()
            .take_while(|l| l.starts_with('#') && !l.contains(" = "))
            .copied()
            .collect();
        let block = block.join("\n");
        let env = env_name(id);
        assert!(
            block.contains(&env),
            "{EXAMPLE}: the comment above {id} does not name {env}"
        );
        assert!(
            block.contains("Default:"),
            "{EXAMPLE}: the comment above {id} does not give its default"
        );
        assert!(
            block.lines().count() >= 2,
            "{EXAMPLE}: the comment above {id} should say what it does, not only its default"
        );
    }
}

#[test]
fn example_configs_commented_values_are_valid() {
    let path = repo().join(EXAMPLE);
    let text = read(EXAMPLE);
    for (key, (line, commented)) in example_keys(&text) {
        // state_file is read when loaded; the Pod's state file is loaded in the Kubernetes tests.
        // The TLS files are read when loaded too (tests/tls.rs starts modelgate with real ones).
        const READ_FILES: &[&str] = &[
            "state_file",
            "tls_cert",
            "tls_key",
            "tls_client_ca",
            "upstream_ca",
            "upstream_cert",
            "upstream_key",
            "control_tls_cert",
            "control_tls_key",
            "control_client_ca",
        ];
        if !commented || READ_FILES.contains(&key.as_str()) {
            continue;
        }
        let edited: String = text
            .lines()
            .enumerate()
            .map(|(i, l)| {
                if i == line {
                    l.trim_start_matches('#').trim_start()
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        load(&example_env(&path), |_| Ok(edited.clone())).unwrap_or_else(|e| {
            panic!("{EXAMPLE}: the commented example of {key} does not load: {e}")
        });
    }
}

/// What `cargo install` and the Docker image ship is a plain release build: debug info (line
/// tables over RocksDB's C++ made the binary 458 MB) lives in the `profiling` profile only. And
/// every dev-profile dependency is built without debug info, so that the host and target builds
/// of crates shared by build scripts and modelgate agree in `cargo clippy` and `cargo test`, and
/// RocksDB is compiled once per machine (see Cargo.toml).
#[test]
fn release_builds_ship_without_debug_info() {
    let manifest: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
    let profiles = &manifest["profile"];
    let release = profiles.get("release").and_then(|r| r.as_table());
    assert!(
        release.is_none_or(|r| r.get("debug").is_none_or(|d| d.as_bool() == Some(false))),
        "[profile.release] must not carry debug info: {release:?}"
    );
    assert_eq!(profiles["profiling"]["inherits"].as_str(), Some("release"));
    assert_eq!(
        profiles["profiling"]["debug"].as_str(),
        Some("line-tables-only")
    );
    for section in [
        &profiles["dev"]["package"]["*"],
        &profiles["dev"]["build-override"],
    ] {
        assert_eq!(section["debug"].as_bool(), Some(false), "{section:?}");
        assert_eq!(section["opt-level"].as_integer(), Some(1), "{section:?}");
    }
}

// ---- the fleet overlay ------------------------------------------------------------------------

const FLEET: &str = "deploy/k8s-fleet";

#[test]
fn the_fleet_overlay_sets_real_settings_and_queries_real_metrics() {
    let kustomization: Value =
        serde_norway::from_str(&read(&format!("{FLEET}/kustomization.yaml")))
            .expect("kustomization parses");
    // Every resource and patch it names exists; it builds on the sidecar deployment.
    let resources: Vec<&str> = kustomization["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(resources.contains(&"../k8s"), "{resources:?}");
    let patches: Vec<&str> = kustomization["patches"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    for f in resources.iter().chain(&patches) {
        assert!(
            repo().join(FLEET).join(f).exists(),
            "{FLEET}/{f} is missing"
        );
    }
    // The patch targets the sidecar deployment's modelgate container with real settings, the
    // Redis URL from a Secret the overlay ships.
    let patch: Value = serde_norway::from_str(&read(&format!("{FLEET}/fleet-patch.yaml"))).unwrap();
    let base = k8s_docs();
    assert_eq!(name(&patch), name(deployment(&base)));
    assert!(patch["spec"]["replicas"].as_u64().unwrap() > 1);
    let container = &patch["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["name"].as_str(), Some("modelgate"));
    let known = setting_env_names();
    let env = seq(&container["env"]);
    for e in env {
        let n = e["name"].as_str().unwrap();
        assert!(known.contains(n), "{n} is not a modelgate setting");
    }
    let store = env
        .iter()
        .find(|e| e["name"].as_str() == Some("MODELGATE_FLEET_STORE"))
        .expect("the patch sets MODELGATE_FLEET_STORE");
    let secret: Value =
        serde_norway::from_str(&read(&format!("{FLEET}/fleet-secret.yaml"))).unwrap();
    let key = &store["valueFrom"]["secretKeyRef"];
    assert_eq!(key["name"].as_str(), Some(name(&secret)));
    let url = secret["stringData"][key["key"].as_str().unwrap()]
        .as_str()
        .unwrap();
    // The shipped URL loads as a setting.
    let env: Env = [("MODELGATE_FLEET_STORE".to_string(), url.to_string())].into();
    let (config, _, _) = load(&env, no_file).expect("the overlay's settings load");
    assert!(config.fleet.is_some());

    // The analysis queries metrics modelgate exposes.
    use modelgate::app::outcomes::OutcomeObserver;
    let metrics = modelgate::telemetry::Metrics::new();
    // A family is exposed once it has a sample: one outcome of each kind.
    for success in [Some(true), Some(false)] {
        let j = modelgate::outcome::Judgement {
            success,
            error: None,
        };
        metrics.observe_variant_outcome("e", "v", &j, Some(1.0));
    }
    let page = metrics.encode(modelgate::telemetry::Exposition::Prometheus);
    let template = read(&format!("{FLEET}/analysis-template.yaml"));
    let used: BTreeSet<&str> = template
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("modelgate_"))
        .collect();
    assert!(!used.is_empty());
    for m in used {
        let family = m.strip_suffix("_total").unwrap_or(m);
        assert!(
            page.contains(&format!("# TYPE {m} ")) || page.contains(&format!("# TYPE {family} ")),
            "{m} is not a modelgate metric"
        );
    }
}

// ---- the release build's execution profile ----------------------------------------------------

const PROFILE: &str = "pgo/modelgate.profdata";

/// The profile the release build is optimised with is an indexed LLVM profile (what
/// `llvm-profdata merge` writes), not a Git LFS pointer or a raw profile, and every way of
/// building the release binary for users passes it to rustc.
#[test]
fn release_builds_use_the_committed_execution_profile() {
    let bytes = std::fs::read(repo().join(PROFILE)).expect("the committed profile");
    // The indexed format's magic: 0xff 'lprofi' 0x81, then a little-endian format version.
    assert!(
        bytes.starts_with(b"\xfflprofi\x81"),
        "{PROFILE} is not an indexed LLVM profile (regenerate it with scripts/pgo.sh)"
    );
    assert!(
        bytes.len() > 100_000,
        "{PROFILE} is too small to hold modelgate's counters ({} bytes)",
        bytes.len()
    );
    let flag = format!("-Cprofile-use=/src/{PROFILE}");
    let docker = read(DOCKERFILE);
    assert!(
        docker.contains(&flag) && docker.contains("COPY pgo ./pgo"),
        "{DOCKERFILE} must copy pgo/ and build with {flag}"
    );
    let release = read("scripts/release.sh");
    assert!(
        release.contains(&format!("PROFILE=\"$ROOT/{PROFILE}\""))
            && release.contains("-Cprofile-use=$PROFILE"),
        "scripts/release.sh must build with {PROFILE}"
    );
    assert!(
        read("scripts/demo.sh").contains("scripts/release.sh"),
        "the demo runs the profile-optimised build"
    );
}

const SYMBOL_ORDER: &str = "pgo/symbol-order.txt";

/// The order serving's functions are linked in names functions of the binary as the linker sees
/// them (mangled Rust and C++ names, one per line; the hottest, HPACK's encoder, among the
/// first), and the release script and the Dockerfile hand it to the build script that passes it
/// to the linker.
#[test]
fn release_builds_link_serving_code_in_the_committed_order() {
    let order = read(SYMBOL_ORDER);
    let names: Vec<&str> = order.lines().collect();
    assert!(
        names.len() > 500,
        "{SYMBOL_ORDER} lists {} functions (regenerate it with scripts/symbol_order.sh)",
        names.len()
    );
    for name in &names {
        assert!(
            !name.is_empty() && !name.contains(char::is_whitespace),
            "{SYMBOL_ORDER}: {name:?} is not a symbol name"
        );
    }
    assert!(
        names[..50]
            .iter()
            .any(|n| n.contains("hpack") || n.contains("HeaderBlock")),
        "{SYMBOL_ORDER} starts with the hottest functions"
    );
    let build = read("build.rs");
    assert!(
        build.contains("MODELGATE_SYMBOL_ORDER") && build.contains("--symbol-ordering-file"),
        "build.rs passes MODELGATE_SYMBOL_ORDER to the linker"
    );
    assert!(
        read("scripts/release.sh").contains(&format!("ORDER=\"$ROOT/{SYMBOL_ORDER}\"")),
        "scripts/release.sh links in {SYMBOL_ORDER}'s order"
    );
    assert!(
        read(DOCKERFILE).contains(&format!("MODELGATE_SYMBOL_ORDER=$([ \"$TRIPLE\" = x86_64-unknown-linux-gnu ] && echo /src/{SYMBOL_ORDER})")),
        "{DOCKERFILE} links in {SYMBOL_ORDER}'s order"
    );
}

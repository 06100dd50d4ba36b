//! TLS: the data port over TLS and mTLS, `https://` upstreams (verified, with and without a
//! client certificate), the control port's mTLS, the data port never answering control calls,
//! bad TLS files stopping start-up, and secrets kept out of the logs. Every certificate is made
//! here with rcgen: no key is checked in.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use common::*;
use modelgate::config::Config;
use modelgate::model_server::{self, ModelSpec};
use modelgate::pb::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use modelgate::pb::modelgate::v1 as pb;
use modelgate::pb::modelgate::v1::registry_client::RegistryClient;
use modelgate::tls::{ServerTlsFiles, UpstreamTlsFiles};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, ServerTlsConfig};

const IRIS: &str = "name=iris;kind=logistic;weights=0.6,-1.4,0.5,1.2;bias=-2.62;version=1";

/// A CA and the PEM files of certificates it issued, in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM files.
struct Issued {
    cert: PathBuf,
    key: PathBuf,
}

impl Issued {
    fn identity(&self) -> Identity {
        Identity::from_pem(
            std::fs::read(&self.cert).unwrap(),
            std::fs::read(&self.key).unwrap(),
        )
    }
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Pki { dir, ca }
    }

    fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn ca_cert(&self) -> Certificate {
        Certificate::from_pem(self.ca.pem())
    }

    /// A certificate for `localhost` and 127.0.0.1, good for servers and clients.
    fn issue(&self, name: &str) -> Issued {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let issued = Issued {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}-key.pem")),
        };
        std::fs::write(&issued.cert, cert.pem()).unwrap();
        std::fs::write(&issued.key, key.serialize_pem()).unwrap();
        issued
    }

    fn server_files(&self, issued: &Issued, client_ca: bool) -> ServerTlsFiles {
        ServerTlsFiles {
            cert: issued.cert.clone(),
            key: issued.key.clone(),
            client_ca: client_ca.then(|| self.ca_path()),
        }
    }
}

/// A TLS channel to `addr` trusting `pki`'s CA, with a client certificate when given.
async fn tls_channel(
    addr: std::net::SocketAddr,
    pki: &Pki,
    identity: Option<Identity>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(pki.ca_cert())
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(id);
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
}

/// Registers `endpoint` as version 1 of iris and promotes it, over the plaintext control port.
async fn route_iris(control: std::net::SocketAddr, endpoint: &str) {
    let mut reg = registry(control).await;
    assert_eq!(register(&mut reg, "iris", endpoint).await, 1);
    promote(&mut reg, "iris", "1").await;
}

/// One ModelInfer through `channel`.
async fn infer(channel: Channel) -> Result<Vec<f64>, tonic::Status> {
    let mut client = GrpcInferenceServiceClient::new(channel);
    let resp = client
        .model_infer(infer_request("iris", &[&[6.1, 2.8, 4.7, 1.2]]))
        .await?;
    Ok(first_output(resp.get_ref()))
}

#[tokio::test]
async fn model_infer_through_a_tls_data_port() {
    let pki = Pki::new("data");
    let server = pki.issue("modelgate");
    let db = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(db.path());
    config.tls = Some(pki.server_files(&server, false));
    let mg = start_with(config).await;
    let upstream =
        model_server("name=iris;kind=logistic;weights=0.6,-1.4,0.5,1.2;bias=-2.62;version=1").await;
    route_iris(mg.control_addr, &upstream.endpoint()).await;

    // Several calls, on fresh connections, so that both data threads serve TLS.
    for _ in 0..4 {
        let channel = tls_channel(mg.data_addr, &pki, None)
            .await
            .expect("TLS handshake with the data port");
        let probabilities = infer(channel).await.expect("ModelInfer over TLS");
        assert_eq!(probabilities.len(), 2);
        assert!((probabilities[0] + probabilities[1] - 1.0).abs() < 1e-6);
    }
    // Health is served over TLS too.
    let channel = tls_channel(mg.data_addr, &pki, None).await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "inference.GRPCInferenceService".into(),
        })
        .await
        .expect("health over TLS");

    // Cleartext HTTP/2 to a TLS port gets no answer.
    let plain = Channel::from_shared(format!("http://{}", mg.data_addr))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(plain) = plain {
        assert!(infer(plain).await.is_err(), "a cleartext call was answered");
    }
    // A client that trusts another CA refuses modelgate's certificate.
    let stranger = Pki::new("stranger");
    let refused = match tls_channel(mg.data_addr, &stranger, None).await {
        Ok(c) => infer(c).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a client trusting another CA accepted modelgate");
    mg.shutdown().await;
}

#[tokio::test]
async fn mtls_data_port_refuses_clients_without_a_trusted_certificate() {
    let pki = Pki::new("mtls");
    let server = pki.issue("modelgate");
    let client = pki.issue("app");
    let db = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(db.path());
    config.tls = Some(pki.server_files(&server, true));
    let mg = start_with(config).await;
    let upstream = model_server(IRIS).await;
    route_iris(mg.control_addr, &upstream.endpoint()).await;

    // No certificate: the handshake (or, with TLS 1.3, the first call) fails.
    let without = match tls_channel(mg.data_addr, &pki, None).await {
        Ok(c) => infer(c).await.map(drop),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    assert!(
        without.is_err(),
        "a client without a certificate was served"
    );

    // A certificate from another CA is refused as well.
    let other = Pki::new("other");
    let foreign = other.issue("intruder");
    let with_foreign = match tls_channel(mg.data_addr, &pki, Some(foreign.identity())).await {
        Ok(c) => infer(c).await.map(drop),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    assert!(
        with_foreign.is_err(),
        "a client certificate from an unknown CA was accepted"
    );

    // The CA's client is served.
    let channel = tls_channel(mg.data_addr, &pki, Some(client.identity()))
        .await
        .expect("mTLS handshake");
    let probabilities = infer(channel).await.expect("ModelInfer over mTLS");
    assert_eq!(probabilities.len(), 2);
    mg.shutdown().await;
}

/// A built-in model server over TLS; clients must present a certificate of `pki` when
/// `require_client_cert`.
async fn tls_model_server(
    pki: &Pki,
    issued: &Issued,
    require_client_cert: bool,
) -> model_server::RunningModelServer {
    let mut tls = ServerTlsConfig::new().identity(issued.identity());
    if require_client_cert {
        tls = tls.client_ca_root(pki.ca_cert());
    }
    let spec: ModelSpec = IRIS.parse().unwrap();
    model_server::spawn_tls(ANY, vec![spec], Some(tls))
        .await
        .unwrap()
}

#[tokio::test]
async fn https_upstream_with_mtls_reached_through_modelgate() {
    let pki = Pki::new("upstream");
    let upstream_cert = pki.issue("model-server");
    let modelgate_cert = pki.issue("modelgate");
    let upstream = tls_model_server(&pki, &upstream_cert, true).await;
    assert!(upstream.endpoint().starts_with("https://127.0.0.1:"));

    let db = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(db.path());
    config.upstream_tls = UpstreamTlsFiles {
        ca: Some(pki.ca_path()),
        cert: Some(modelgate_cert.cert.clone()),
        key: Some(modelgate_cert.key.clone()),
    };
    let mg = start_with(config).await;
    route_iris(mg.control_addr, &upstream.endpoint()).await;
    let mut reg = registry(mg.control_addr).await;
    let versions = reg
        .list_model_versions(pb::ListModelVersionsRequest {
            model: "iris".into(),
            stage: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(
        versions[0].endpoint,
        upstream.endpoint(),
        "kept as https://"
    );
    for _ in 0..4 {
        let probabilities = infer(channel(mg.data_addr).await)
            .await
            .expect("ModelInfer to an https:// upstream");
        assert_eq!(probabilities.len(), 2);
    }
    mg.shutdown().await;

    // The same upstream, from a modelgate that trusts the CA but has no client certificate:
    // the model server refuses it, and the caller gets UNAVAILABLE.
    let db = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(db.path());
    config.upstream_tls.ca = Some(pki.ca_path());
    let mg = start_with(config).await;
    route_iris(mg.control_addr, &upstream.endpoint()).await;
    let err = infer(channel(mg.data_addr).await)
        .await
        .expect_err("an upstream requiring a client certificate served modelgate without one");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    mg.shutdown().await;
}

#[tokio::test]
async fn untrusted_upstream_certificate_is_unavailable_naming_the_verification_error() {
    let pki = Pki::new("untrusted");
    let upstream_cert = pki.issue("model-server");
    let upstream = tls_model_server(&pki, &upstream_cert, false).await;
    // No --upstream-ca: the system roots, which do not know this CA.
    let db = tempfile::tempdir().unwrap();
    let mg = start(db.path()).await;
    route_iris(mg.control_addr, &upstream.endpoint()).await;
    let err = infer(channel(mg.data_addr).await)
        .await
        .expect_err("an upstream with an untrusted certificate was used");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message()
            .contains("certificate verify failed: UnknownIssuer"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains(&upstream.endpoint()),
        "{}",
        err.message()
    );

    // A plaintext model server registered as https:// fails the handshake, also named.
    let plain = model_server(IRIS).await;
    let mut reg = registry(mg.control_addr).await;
    let https_plain = plain.endpoint().replace("http://", "https://");
    assert_eq!(register(&mut reg, "iris", &https_plain).await, 2);
    promote(&mut reg, "iris", "2").await;
    let err = infer(channel(mg.data_addr).await).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("TLS handshake failed"),
        "{}",
        err.message()
    );
    mg.shutdown().await;
}

/// modelgate whose control port requires a certificate from `pki` and the token
/// `t0ken-for-tests`, and an operator's certificate.
async fn mtls_control_port(pki: &Pki, db: &Path) -> (modelgate::server::Running, Issued) {
    let server = pki.issue("modelgate-control");
    let mut config = Config::for_tests(db);
    config.control_tls = Some(pki.server_files(&server, true));
    config.control_token = Some("t0ken-for-tests".into());
    (start_with(config).await, pki.issue("operator"))
}

#[tokio::test]
async fn control_port_mtls_requires_a_client_certificate_and_the_token() {
    let (pki, db) = (Pki::new("control"), tempfile::tempdir().unwrap());
    let (mg, operator) = mtls_control_port(&pki, db.path()).await;
    let list = |channel: Channel, token: Option<&'static str>| async move {
        let mut reg = RegistryClient::new(channel);
        let mut req = tonic::Request::new(pb::ListModelsRequest::default());
        if let Some(t) = token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        reg.list_models(req).await
    };

    // Without a client certificate: refused, token or not.
    let without = match tls_channel(mg.control_addr, &pki, None).await {
        Ok(c) => list(c, Some("t0ken-for-tests")).await.map(drop),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    assert!(
        without.is_err(),
        "control call served without a certificate"
    );
    // Cleartext is not served at all.
    if let Ok(c) = Channel::from_shared(format!("http://{}", mg.control_addr))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect()
        .await
    {
        assert!(list(c, Some("t0ken-for-tests")).await.is_err());
    }
    // With a certificate, the token is still required.
    let channel = tls_channel(mg.control_addr, &pki, Some(operator.identity()))
        .await
        .expect("control mTLS handshake");
    let err = list(channel.clone(), None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    // Certificate and token: served.
    let models = list(channel, Some("t0ken-for-tests"))
        .await
        .expect("control call with certificate and token")
        .into_inner();
    assert!(models.models.is_empty());
    mg.shutdown().await;
}

fn authorized<T>(mut req: tonic::Request<T>) -> tonic::Request<T> {
    req.metadata_mut()
        .insert("authorization", "Bearer secret-token".parse().unwrap());
    req
}

#[tokio::test]
async fn the_data_port_never_answers_control_calls() {
    let db = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(db.path());
    config.control_token = Some("secret-token".into());
    let mg = start_with(config).await;
    let upstream = model_server(IRIS).await;
    let mut ctl = RegistryClient::new(channel(mg.control_addr).await);
    for _ in 0..2 {
        ctl.register_model_version(authorized(tonic::Request::new(
            pb::RegisterModelVersionRequest {
                model: "iris".into(),
                endpoint: upstream.endpoint(),
                ..Default::default()
            },
        )))
        .await
        .unwrap();
    }
    ctl.transition_stage(authorized(tonic::Request::new(transition(
        "iris",
        "1",
        pb::Stage::Production,
    ))))
    .await
    .unwrap();
    // The control port answers ListModels...
    let listed = ctl
        .list_models(authorized(tonic::Request::new(
            pb::ListModelsRequest::default(),
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.models.len(), 1);

    // ...the data port, with the right token, does not: not routed anywhere, the proxy refuses
    // it (no model named, no default model)...
    let mut data = RegistryClient::new(channel(mg.data_addr).await);
    let err = data
        .list_models(authorized(tonic::Request::new(
            pb::ListModelsRequest::default(),
        )))
        .await
        .unwrap_err();
    assert_ne!(err.code(), tonic::Code::Ok);
    assert_ne!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    // ...and routed to a model it is passed through to the model server, which has no such
    // service.
    let mut req = authorized(tonic::Request::new(pb::ListModelsRequest::default()));
    req.metadata_mut()
        .insert("x-model-name", "iris".parse().unwrap());
    let err = data.list_models(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    // The same holds for writes: promoting version 2 through the data port does nothing.
    let mut req = authorized(tonic::Request::new(transition(
        "iris",
        "2",
        pb::Stage::Production,
    )));
    req.metadata_mut()
        .insert("x-model-name", "iris".parse().unwrap());
    let err = data.transition_stage(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    let versions = ctl
        .list_model_versions(authorized(tonic::Request::new(
            pb::ListModelVersionsRequest {
                model: "iris".into(),
                stage: 0,
            },
        )))
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(versions[1].stage, pb::Stage::Staging as i32);
    mg.shutdown().await;
}

/// Runs `modelgate serve` with `args` (fresh ports, a data dir under `dir`) and returns its
/// exit status and stderr, for settings that must stop it at start.
fn serve_fails(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let data_dir = dir.join("data");
    let out = Command::new(env!("CARGO_BIN_EXE_modelgate"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--control-listen", "127.0.0.1:0"])
        .args(["--admin-listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data_dir)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!data_dir.exists(), "the data dir was created");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_tls_files_stop_start_up_with_status_2_naming_the_flag() {
    let pki = Pki::new("files");
    let good = pki.issue("modelgate");
    let other = pki.issue("other");
    let dir = tempfile::tempdir().unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (cert, key, other_key, ca) = (
        s(&good.cert),
        s(&good.key),
        s(&other.key),
        s(&pki.ca_path()),
    );
    let missing = s(&dir.path().join("missing.pem"));
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "no PEM here").unwrap();
    let junk = s(&junk);
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (
            vec!["--tls-cert", &missing, "--tls-key", &key],
            "--tls-cert (MODELGATE_TLS_CERT)",
            "missing.pem",
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", &missing],
            "--tls-key (MODELGATE_TLS_KEY)",
            "missing.pem",
        ),
        (
            vec!["--tls-cert", &junk, "--tls-key", &key],
            "--tls-cert",
            "no PEM certificate",
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", &other_key],
            "--tls-key",
            "does not match",
        ),
        (vec!["--tls-cert", &cert], "--tls-key", "required"),
        (
            vec![
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--tls-client-ca",
                &junk,
            ],
            "--tls-client-ca",
            "junk.pem",
        ),
        (
            vec!["--control-tls-cert", &cert, "--control-tls-key", &junk],
            "--control-tls-key",
            "no PEM private key",
        ),
        (
            vec!["--control-client-ca", &ca],
            "--control-client-ca",
            "--control-tls-cert",
        ),
        (
            vec!["--upstream-ca", &missing],
            "--upstream-ca",
            "missing.pem",
        ),
        (
            vec!["--upstream-cert", &cert, "--upstream-key", &other_key],
            "--upstream-key",
            "does not match",
        ),
    ];
    for (args, flag, detail) in cases {
        let (code, stderr) = serve_fails(dir.path(), &args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(flag),
            "{args:?} should name {flag}: {stderr}"
        );
        assert!(
            stderr.contains(detail),
            "{args:?} should say {detail}: {stderr}"
        );
        assert!(!stderr.contains("BEGIN"), "{args:?} printed PEM: {stderr}");
    }
    // The environment is checked the same way.
    let out = Command::new(env!("CARGO_BIN_EXE_modelgate"))
        .args(["serve", "--data-dir"])
        .arg(dir.path().join("env-data"))
        .env("MODELGATE_TLS_CERT", &cert)
        .env("MODELGATE_TLS_KEY", &missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("MODELGATE_TLS_KEY"));
}

#[tokio::test]
async fn secrets_never_reach_the_logs() {
    let pki = Pki::new("logs");
    let server = pki.issue("modelgate");
    let client = pki.issue("app");
    let dir = tempfile::tempdir().unwrap();
    let token = "log-canary-token-7f3a";
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_modelgate"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--control-listen", "127.0.0.1:0"])
        .args(["--admin-listen", "127.0.0.1:0", "--data-threads", "1"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--tls-cert", &s(&server.cert), "--tls-key", &s(&server.key)])
        .args(["--tls-client-ca", &s(&pki.ca_path())])
        .args(["--control-tls-cert", &s(&server.cert)])
        .args(["--control-tls-key", &s(&server.key)])
        .args(["--log-level", "debug", "--log-format", "json"])
        .env("MODELGATE_CONTROL_TOKEN", token)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed if the test fails half-way, so that no modelgate outlives it.
    struct KillOnDrop(u32, bool);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            if !self.1 {
                let _ = Command::new("kill")
                    .args(["-KILL", &self.0.to_string()])
                    .status();
            }
        }
    }
    let mut guard = KillOnDrop(child.id(), false);
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let (addrs_tx, addrs_rx) = std::sync::mpsc::channel::<(String, String)>();
    let reader = {
        let (lines, stderr) = (lines.clone(), child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().push(line.clone());
                let Ok(f) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if f["message"] == "modelgate listening" {
                    let addr = |k: &str| f[k].as_str().unwrap_or_default().to_string();
                    let _ = addrs_tx.send((addr("data"), addr("control")));
                }
            }
        })
    };
    let (data, control) = addrs_rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("modelgate did not start ({e}): {:?}", lines.lock()));
    let (data, control) = (data.parse().unwrap(), control.parse().unwrap());
    // Calls that log at debug: a refused handshake, a call with the token, one without.
    let _ = match tls_channel(data, &pki, None).await {
        Ok(c) => infer(c).await.map(drop),
        Err(e) => Err(tonic::Status::unknown(e.to_string())),
    };
    let c = tls_channel(data, &pki, Some(client.identity()))
        .await
        .unwrap();
    let err = infer(c).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    let mut reg = RegistryClient::new(tls_channel(control, &pki, None).await.unwrap());
    let mut req = tonic::Request::new(pb::ListModelsRequest::default());
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    reg.list_models(req).await.expect("control call over TLS");
    let mut req = tonic::Request::new(pb::ListModelsRequest::default());
    req.metadata_mut()
        .insert("authorization", "Bearer wrong-token".parse().unwrap());
    assert!(reg.list_models(req).await.is_err());

    // Clients close their connections first: shutdown waits for open ones.
    drop(reg);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = tokio::task::spawn_blocking(move || {
        let status = child.wait().unwrap();
        reader.join().unwrap();
        status
    })
    .await
    .unwrap();
    guard.1 = true;
    assert!(status.success(), "{status:?}");
    let logs = lines.lock().join("\n");
    assert!(logs.contains("modelgate listening"), "{logs}");
    // Debug logging was on, and saw the refused handshake.
    assert!(
        logs.contains("TLS handshake failed on the data port"),
        "{logs}"
    );
    assert!(!logs.contains(token), "the control token was logged");
    assert!(
        !logs.contains("wrong-token"),
        "a presented token was logged"
    );
    assert!(!logs.contains("PRIVATE KEY"), "key material was logged");
    // Not even a line of the key's base64.
    let key_pem = std::fs::read_to_string(&server.key).unwrap();
    for line in key_pem.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!logs.contains(line), "key material was logged");
    }
}

/// `modelgate ctl ARGS` with the control token in its environment: (exit code, stdout + stderr).
async fn ctl(args: Vec<String>) -> (i32, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_modelgate"))
        .arg("ctl")
        .args(&args)
        .env("MODELGATE_CONTROL_TOKEN", "t0ken-for-tests")
        .env_remove("MODELGATE_CTL_ADDR")
        .env_remove("MODELGATE_CTL_CA")
        .env_remove("MODELGATE_CTL_CERT")
        .env_remove("MODELGATE_CTL_KEY")
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn ctl_speaks_tls_and_mtls_to_the_control_port() {
    let (pki, db) = (Pki::new("control"), tempfile::tempdir().unwrap());
    let (mg, operator) = mtls_control_port(&pki, db.path()).await;
    let https = format!("https://{}", mg.control_addr);
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let args = |extra: &[&str]| {
        let mut a: Vec<String> = vec!["--addr".into(), https.clone()];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let (ca, cert, key) = (
        path(&pki.ca_path()),
        path(&operator.cert),
        path(&operator.key),
    );

    // CA, certificate and key: served.
    let (code, out) = ctl(args(&[
        "--ca",
        &ca,
        "--cert",
        &cert,
        "--key",
        &key,
        "models",
        "register",
        "iris",
        "--endpoint",
        "http://127.0.0.1:9",
    ]))
    .await;
    assert_eq!(code, 0, "{out}");
    let (code, out) = ctl(args(&[
        "--ca", &ca, "--cert", &cert, "--key", &key, "models", "list",
    ]))
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("iris"), "{out}");

    // No client certificate: the port requires one.
    let (code, out) = ctl(args(&["--ca", &ca, "models", "list"])).await;
    assert_eq!(code, 3, "{out}");
    // The reason is the server's alert (CertificateRequired) or, when the server hangs up
    // before the alert is read, a broken pipe.
    assert!(
        out.contains("cannot reach modelgate's control port"),
        "{out}"
    );
    // The system roots do not know the test CA.
    let (code, out) = ctl(args(&["--cert", &cert, "--key", &key, "models", "list"])).await;
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("invalid peer certificate: UnknownIssuer"),
        "{out}"
    );
    // A certificate for another name.
    let (code, out) = ctl(args(&[
        "--ca",
        &ca,
        "--cert",
        &cert,
        "--key",
        &key,
        "--server-name",
        "elsewhere.example",
        "models",
        "list",
    ]))
    .await;
    assert_eq!(code, 3, "{out}");

    // Usage errors name the flag and exit 2 before anything is sent.
    let (code, out) = ctl(args(&["--ca", "/nonexistent/ca.pem", "models", "list"])).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--ca /nonexistent/ca.pem"), "{out}");
    let (code, out) = ctl(args(&[
        "--ca", &key, "--cert", &cert, "--key", &ca, "models", "list",
    ]))
    .await;
    assert_ne!(code, 0, "{out}");
    let (code, out) = ctl(args(&["--cert", &cert, "models", "list"])).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--key"), "{out}");
    let (code, out) = ctl(vec![
        "--addr".into(),
        format!("http://{}", mg.control_addr),
        "--ca".into(),
        ca.clone(),
        "models".into(),
        "list".into(),
    ])
    .await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("need an https:// --addr"), "{out}");
    mg.shutdown().await;
}

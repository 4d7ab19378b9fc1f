//! TLS on the agent's listeners, as users run it: the real binary given a
//! certificate (by flags, its variables or its config file) serves both
//! protocols over TLS to the clients users have (tritonclient, `requests`,
//! tonic), refuses plaintext, asks for client certificates when given a
//! client CA, and refuses at start what cannot work (a listener off
//! loopback without TLS, a key that is not the certificate's, a missing
//! file), in one line.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgefleet_pki::CertificateAuthority;
use edgefleet_proto::inference as pb;
use edgefleet_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use edgefleet_test_support::{KillOnDrop, testdata};
use support::*;

/// Certificates as an operator would hand them to the agent, in files: a
/// CA, the agent's certificate from it (for localhost and 127.0.0.1), a
/// client certificate from it, and one from another CA.
struct Certificates {
    dir: tempfile::TempDir,
    ca_pem: String,
}

impl Certificates {
    fn new() -> Certificates {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = CertificateAuthority::generate().unwrap();
        let server = ca
            .issue_server_certificate(&[], Duration::from_secs(3600))
            .unwrap();
        let certificates = Certificates {
            dir,
            ca_pem: ca.certificate_pem().to_string(),
        };
        certificates.write("ca.crt", ca.certificate_pem(), 0o644);
        certificates.write("agent.crt", &server.certificate_pem, 0o644);
        certificates.write("agent.key", &server.key_pem, 0o600);
        let (other_ca, _) = CertificateAuthority::generate().unwrap();
        for (name, ca) in [("client", &ca), ("stranger", &other_ca)] {
            let key = edgefleet_pki::generate_device_key().unwrap();
            let csr = edgefleet_pki::device_csr(&key, name).unwrap();
            let cert = ca
                .sign_device_csr(&csr, name, Duration::from_secs(3600))
                .unwrap();
            certificates.write(&format!("{name}.crt"), &cert.certificate_pem, 0o644);
            certificates.write(&format!("{name}.key"), &key, 0o600);
        }
        certificates
    }

    fn write(&self, name: &str, contents: &str, mode: u32) {
        let path = self.path(name);
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }

    fn pem(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap()
    }
}

/// A repository with the MLP fixture as `mlp`.
fn mlp_repository() -> Repo {
    let repo = Repo::new();
    repo.add("mlp", 1, "mlp");
    repo
}

/// `serve` of `repo` on tract and ephemeral loopback ports, over TLS with
/// the agent's certificate and key of `certificates`.
fn serving_tls(repo: &Repo, certificates: &Certificates) -> Vec<String> {
    let repository = repo.path().to_str().unwrap();
    [
        "serve",
        "--runtime",
        "tract",
        "--model-repository",
        repository,
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .into_iter()
    .chain(["--tls-cert".into(), certificates.arg("agent.crt")])
    .chain(["--tls-key".into(), certificates.arg("agent.key")])
    .collect()
}

/// The agent started with `args` (and `env`), once its models are loaded:
/// the process, its gRPC and HTTP addresses, and the log lines up to then.
fn start_agent(
    args: &[impl AsRef<std::ffi::OsStr>],
    env: &[(&str, &str)],
) -> (KillOnDrop, String, String, Vec<String>) {
    let (child, grpc, http, lines, _) = start_agent_logging(args, env);
    (child, grpc, http, lines)
}

/// [`start_agent`], with the receiver of the log lines that follow.
fn start_agent_logging(
    args: &[impl AsRef<std::ffi::OsStr>],
    env: &[(&str, &str)],
) -> (
    KillOnDrop,
    String,
    String,
    Vec<String>,
    std::sync::mpsc::Receiver<String>,
) {
    let mut command = agent_bin();
    command.args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    let (child, rx) = spawn_command_logging(command);
    let child = KillOnDrop(child);
    let mut lines = Vec::new();
    let mut addresses = None;
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("the agent did not load its models; its log:\n{lines:#?}"));
        if line.contains("edgefleet-agent listening") {
            let address = |key: &str| {
                let start = line.find(key).unwrap() + key.len();
                line[start..].split_whitespace().next().unwrap().to_string()
            };
            addresses = Some((address("grpc="), address("http=")));
        }
        let done = line.contains("initial model load done");
        lines.push(line);
        if done {
            break;
        }
    }
    let (grpc, http) = addresses.expect("a listening line before the models loaded");
    (child, grpc, http, lines, rx)
}

/// The port of `addr` on 127.0.0.1, where a client finds a listener bound to
/// any address, under the name the agent's certificate holds.
fn local(addr: &str) -> String {
    let port = addr.rsplit(':').next().unwrap();
    format!("127.0.0.1:{port}")
}

/// `tls_clients.py` against the agent, trusting `ca`, presenting `client`
/// (a name of [`Certificates`]) if given: its output, and whether it passed.
fn python_clients(
    certificates: &Certificates,
    grpc: &str,
    http: &str,
    client: Option<&str>,
    expect_refused: bool,
) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/tls_clients.py");
    let mut command = std::process::Command::new("python3");
    command
        .arg(script)
        .args(["--http", http, "--grpc", grpc])
        .args(["--ca", &certificates.arg("ca.crt")])
        .arg("--cases")
        .arg(testdata().join("cases"))
        .args(["--model", "mlp"]);
    if let Some(name) = client {
        command
            .args(["--cert", &certificates.arg(&format!("{name}.crt"))])
            .args(["--key", &certificates.arg(&format!("{name}.key"))]);
    }
    if expect_refused {
        command.arg("--expect-refused");
    }
    let output = command.output().expect("python3 runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// A gRPC client over TLS trusting the test CA, presenting `client` if given.
async fn grpc_over_tls(
    certificates: &Certificates,
    grpc: &str,
    client: Option<&str>,
) -> Result<GrpcInferenceServiceClient<tonic::transport::Channel>, String> {
    grpc_trusting(&certificates.ca_pem, certificates, grpc, client).await
}

/// [`grpc_over_tls`] trusting the CA `ca_pem`.
async fn grpc_trusting(
    ca_pem: &str,
    certificates: &Certificates,
    grpc: &str,
    client: Option<&str>,
) -> Result<GrpcInferenceServiceClient<tonic::transport::Channel>, String> {
    let config = match client {
        None => edgefleet_pki::ca_client_tls_config(ca_pem),
        Some(name) => edgefleet_pki::mtls_client_tls_config(
            ca_pem,
            &certificates.pem(&format!("{name}.crt")),
            &certificates.pem(&format!("{name}.key")),
        ),
    }
    .unwrap();
    let channel =
        edgefleet_pki::connect_tls(&format!("https://{grpc}"), config, Duration::from_secs(10))
            .await
            .map_err(|err| edgefleet_pki::error_chain(&err))?;
    Ok(GrpcInferenceServiceClient::new(channel))
}

/// Whether a `ServerLive` call through `client` is answered live.
async fn live(
    client: Result<GrpcInferenceServiceClient<tonic::transport::Channel>, String>,
) -> Result<(), String> {
    let mut client = client?;
    let answer = client
        .server_live(pb::ServerLiveRequest {})
        .await
        .map_err(|status| format!("{status:?}"))?;
    assert!(answer.into_inner().live);
    Ok(())
}

/// Given a certificate and key in its config file, the agent serves TLS on
/// both listeners, one of them off loopback: tritonclient (HTTP and gRPC),
/// `requests` (which offers only HTTP/1.1) and tonic get answers, each
/// checked against onnxruntime's; plaintext gets none. The key file, left
/// readable by others, is warned about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_certificate_both_listeners_serve_tls_and_refuse_plaintext() {
    let certificates = Certificates::new();
    std::fs::set_permissions(
        certificates.path("agent.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let repo = mlp_repository();
    let config = certificates.path("agent.toml");
    std::fs::write(
        &config,
        format!(
            "model_repository = \"{}\"\nruntime = \"tract\"\ngrpc_addr = \"0.0.0.0:0\"\nhttp_addr = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            repo.path().display(),
            certificates.arg("agent.crt"),
            certificates.arg("agent.key"),
        ),
    )
    .unwrap();
    let (_agent, grpc, http, log) =
        start_agent(&["serve", "--config", config.to_str().unwrap()], &[]);
    let grpc = local(&grpc);
    let listening = log.iter().find(|line| line.contains("listening")).unwrap();
    assert!(listening.contains("tls=on"), "{listening}");
    assert!(
        log.iter()
            .any(|line| line.contains("WARN") && line.contains("is readable by other users")),
        "no warning about the key file's mode in {log:#?}"
    );

    let (passed, output) = python_clients(&certificates, &grpc, &http, None, false);
    assert!(passed, "{output}");
    for client in ["tritonclient HTTP", "tritonclient gRPC", "requests"] {
        assert!(output.contains(&format!("checked {client}")), "{output}");
    }
    live(grpc_over_tls(&certificates, &grpc, None).await)
        .await
        .unwrap();

    // Plaintext, on either listener, gets no answer.
    let plain_http = reqwest::Client::new()
        .get(format!("http://{http}/v2/health/live"))
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    assert!(
        plain_http.is_err(),
        "plaintext HTTP answered: {plain_http:?}"
    );
    let plain_grpc = async {
        let mut client = GrpcInferenceServiceClient::connect(format!("http://{grpc}"))
            .await
            .map_err(|err| err.to_string())?;
        client
            .server_live(pb::ServerLiveRequest {})
            .await
            .map_err(|status| status.to_string())
    };
    let plain_grpc = tokio::time::timeout(Duration::from_secs(10), plain_grpc)
        .await
        .expect("a plaintext gRPC call is refused, not left hanging");
    assert!(
        plain_grpc.is_err(),
        "plaintext gRPC answered: {plain_grpc:?}"
    );
}

/// With a client CA (here from its environment variable) the agent serves
/// only clients that present a certificate from that CA: the Python clients
/// and tonic with one are answered; without one, or with one from another
/// CA, they are refused at the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_client_ca_only_clients_with_its_certificates_are_served() {
    let certificates = Certificates::new();
    let repo = mlp_repository();
    let client_ca = certificates.arg("ca.crt");
    let (_agent, grpc, http, log) = start_agent(
        &serving_tls(&repo, &certificates),
        &[("EDGEFLEET_AGENT_TLS_CLIENT_CA", &client_ca)],
    );
    let listening = log.iter().find(|line| line.contains("listening")).unwrap();
    assert!(listening.contains("tls=mutual"), "{listening}");
    assert!(
        !log.iter()
            .any(|line| line.contains("is readable by other users")),
        "a 0600 key warned about: {log:#?}"
    );

    let (passed, output) = python_clients(&certificates, &grpc, &http, Some("client"), false);
    assert!(passed, "{output}");
    for client in ["tritonclient HTTP", "tritonclient gRPC", "requests"] {
        assert!(output.contains(&format!("checked {client}")), "{output}");
    }
    for presented in [None, Some("stranger")] {
        let (passed, output) = python_clients(&certificates, &grpc, &http, presented, true);
        assert!(passed, "{presented:?}: {output}");
        for client in ["tritonclient HTTP", "tritonclient gRPC", "requests"] {
            assert!(
                output.contains(&format!("refused {client}")),
                "{presented:?}: {output}"
            );
        }
    }
    live(grpc_over_tls(&certificates, &grpc, Some("client")).await)
        .await
        .unwrap();
    for presented in [None, Some("stranger")] {
        let refused = live(grpc_over_tls(&certificates, &grpc, presented).await).await;
        assert!(refused.is_err(), "{presented:?} was served");
    }
}

/// A certificate renewed in its files (as cert-manager or certbot renew
/// one) is served to new connections within seconds, with no restart; a
/// key written before its certificate (the two do not match yet) is logged
/// as an error and the certificate before keeps serving until the new one
/// is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_renewed_in_its_files_is_served_without_a_restart() {
    let certificates = Certificates::new();
    let repo = mlp_repository();
    let (_agent, grpc, _http, _log, rx) =
        start_agent_logging(&serving_tls(&repo, &certificates), &[]);
    let old_ca = certificates.ca_pem.clone();
    live(grpc_trusting(&old_ca, &certificates, &grpc, None).await)
        .await
        .unwrap();

    let (new_ca, _) = CertificateAuthority::generate().unwrap();
    let renewed = new_ca
        .issue_server_certificate(&[], Duration::from_secs(3600))
        .unwrap();
    certificates.write("agent.key", &renewed.key_pem, 0o600);
    let line = wait_for_line(&rx, "cannot reload the TLS files");
    assert!(line.contains("the key is not the certificate's"), "{line}");
    live(grpc_trusting(&old_ca, &certificates, &grpc, None).await)
        .await
        .expect("the certificate before still serves");

    certificates.write("agent.crt", &renewed.certificate_pem, 0o644);
    wait_for_line(&rx, "reloaded the TLS certificate");
    live(grpc_trusting(new_ca.certificate_pem(), &certificates, &grpc, None).await)
        .await
        .expect("the renewed certificate serves");
    let old = live(grpc_trusting(&old_ca, &certificates, &grpc, None).await).await;
    assert!(old.is_err(), "the replaced certificate still served");
}

/// What cannot work is refused at start, before anything listens, with one
/// line that says what and how to fix it: a listener off loopback without
/// TLS, half a certificate setting, a file that is missing or not what it
/// should be, a key that is not the certificate's, and the setting TLS
/// replaced.
#[test]
fn tls_settings_that_cannot_work_are_refused_at_start_in_one_line() {
    let certificates = Certificates::new();
    let repo = mlp_repository();
    let (cert, key, ca) = (
        certificates.arg("agent.crt"),
        certificates.arg("agent.key"),
        certificates.arg("ca.crt"),
    );
    let missing = certificates.arg("missing.crt");
    let other_key = certificates.arg("client.key");
    let old_config = certificates.path("old.toml");
    std::fs::write(&old_config, "allow_plaintext_network = true\n").unwrap();
    let old_config = old_config.to_str().unwrap().to_string();
    let cases: Vec<(Vec<&str>, &[&str])> = vec![
        (
            vec!["--grpc-addr", "0.0.0.0:0"],
            &[
                "grpc_addr 0.0.0.0:0 is off loopback",
                "--tls-cert",
                "--tls-key",
            ],
        ),
        (
            vec!["--http-addr", "[::]:0"],
            &["http_addr [::]:0 is off loopback", "--tls-cert"],
        ),
        (
            vec!["--grpc-addr", "0.0.0.0:0", "--tls-cert", &cert],
            &["--tls-cert needs --tls-key"],
        ),
        (vec!["--tls-key", &key], &["--tls-key needs --tls-cert"]),
        (
            vec!["--tls-client-ca", &ca],
            &["--tls-client-ca needs --tls-cert and --tls-key"],
        ),
        (
            vec!["--tls-cert", &missing, "--tls-key", &key],
            &["cannot read tls_cert", "missing.crt", "No such file"],
        ),
        (
            vec!["--tls-cert", &key, "--tls-key", &key],
            &[
                "cannot serve TLS with",
                "the certificate: ",
                "no CERTIFICATE",
            ],
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", &cert],
            &["cannot serve TLS with", "the key: ", "PRIVATE KEY"],
        ),
        (
            vec!["--tls-cert", &cert, "--tls-key", &other_key],
            &[
                "cannot serve TLS with",
                "agent.crt",
                "client.key",
                "the key is not the certificate's",
            ],
        ),
        (
            vec![
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--tls-client-ca",
                &key,
            ],
            &["cannot serve TLS with", "CERTIFICATE"],
        ),
        (vec!["--config", &old_config], &["allow_plaintext_network"]),
    ];
    for (extra, words) in cases {
        let mut args = vec![
            "serve",
            "--runtime",
            "tract",
            "--model-repository",
            repo.path().to_str().unwrap(),
        ];
        for flag in ["--grpc-addr", "--http-addr"] {
            if !extra.contains(&flag) {
                args.extend([flag, "127.0.0.1:0"]);
            }
        }
        args.extend(&extra);
        let out = agent_bin()
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map(KillOnDrop)
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut out = out;
        while out.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = out.kill();
        let status = out.wait().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(out.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert!(
            status.code().is_some_and(|code| code != 0),
            "{extra:?} should be refused, got {status:?}: {stderr}"
        );
        assert_eq!(
            stderr.lines().count(),
            1,
            "{extra:?}: not one line:\n{stderr}"
        );
        for word in words {
            assert!(
                stderr.contains(word),
                "{extra:?}: missing '{word}' in:\n{stderr}"
            );
        }
        assert!(
            !stderr.contains("PRIVATE KEY-----"),
            "key material in: {stderr}"
        );
    }
}

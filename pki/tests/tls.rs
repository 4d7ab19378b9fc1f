//! Real TLS over loopback: a tonic health server behind `tls_incoming` and
//! `agent_server_tls_config`, and the fleet's client configurations.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use edgefleet_pki::{
    CertificateAuthority, CertificateInfo, IssuedKeyPair, PkiError, agent_server_tls_config,
    ca_client_tls_config, connect_tls, crypto_provider, device_csr, generate_device_key,
    mtls_client_tls_config, peer_certificate_info, peer_device_id, pinned_client_tls_config,
    rejected_client_certificate_alert, tls_incoming,
};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

const DAY: Duration = Duration::from_secs(24 * 3600);
const TIMEOUT: Duration = Duration::from_secs(5);

type Seen = Arc<Mutex<Vec<(Option<String>, Option<CertificateInfo>)>>>;

struct Fixture {
    _dir: tempfile::TempDir,
    ca: CertificateAuthority,
    port: u16,
    seen: Seen,
}

impl Fixture {
    async fn start() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (ca, created) = CertificateAuthority::load_or_create(dir.path()).unwrap();
        assert!(created);
        let server_cert = ca.issue_server_certificate(&[], DAY).unwrap();
        let config = agent_server_tls_config(&server_cert, ca.certificate_pem()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Seen = Arc::default();
        let recorder = seen.clone();
        let service = HealthServer::with_interceptor(
            HealthService::from_health_reporter(HealthReporter::new()),
            move |request: tonic::Request<()>| {
                recorder
                    .lock()
                    .unwrap()
                    .push((peer_device_id(&request), peer_certificate_info(&request)));
                Ok(request)
            },
        );
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tls_incoming(listener, config)),
        );
        Fixture {
            _dir: dir,
            ca,
            port,
            seen,
        }
    }

    fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    fn device(&self, id: &str) -> (String, String) {
        let key = generate_device_key().unwrap();
        let csr = device_csr(&key, "some-host").unwrap();
        let cert = self.ca.sign_device_csr(&csr, id, DAY).unwrap();
        (cert.certificate_pem, key)
    }

    fn seen(&self) -> Vec<(Option<String>, Option<CertificateInfo>)> {
        self.seen.lock().unwrap().clone()
    }
}

async fn check(channel: Channel) -> Result<(), tonic::Status> {
    let response = tokio::time::timeout(
        TIMEOUT,
        HealthClient::new(channel).check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .expect("RPC timed out")?;
    assert_eq!(response.into_inner().status, 1, "SERVING");
    Ok(())
}

/// A client certificate from a different CA (with its own key).
fn foreign_device(id: &str) -> (String, String) {
    let (other_ca, _) = CertificateAuthority::generate().unwrap();
    let key = generate_device_key().unwrap();
    let csr = device_csr(&key, "h").unwrap();
    (
        other_ca
            .sign_device_csr(&csr, id, DAY)
            .unwrap()
            .certificate_pem,
        key,
    )
}

/// Either `connect_tls` or the first RPC must fail (with TLS 1.3 the server
/// rejects a client certificate after the client's handshake completed).
async fn assert_rejected(fixture: &Fixture, config: Arc<rustls::ClientConfig>, alert: &str) {
    let found = match connect_tls(&fixture.url(), config, TIMEOUT).await {
        Err(e) => {
            assert!(matches!(e, PkiError::Connect { .. }), "{e}");
            rejected_client_certificate_alert(&e)
        }
        Ok(channel) => {
            // The RPC fails on the server's TLS alert.
            let status = check(channel).await.unwrap_err();
            rejected_client_certificate_alert(&status)
        }
    };
    assert_eq!(found.as_deref(), Some(alert));
}

/// The raw TLS view: a TLS 1.2 handshake fails outright; with TLS 1.3 the
/// server's alert arrives on the first read.
async fn assert_handshake_rejected(fixture: &Fixture, cert_pem: &str, key_pem: &str) {
    use rustls_pki_types::pem::PemObject;
    let base = mtls_client_tls_config(fixture.ca.certificate_pem(), cert_pem, key_pem).unwrap();

    // Same roots and client certificate, TLS 1.2 only.
    let provider = crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(
            fixture.ca.certificate_der().to_vec(),
        ))
        .unwrap();
    let chain = rustls_pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let mut tls12 = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    tls12.alpn_protocols = base.alpn_protocols.clone();
    let tcp = TcpStream::connect(("127.0.0.1", fixture.port))
        .await
        .unwrap();
    let result = tokio_rustls::TlsConnector::from(Arc::new(tls12))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await;
    let err = result.expect_err("the TLS 1.2 handshake must fail");
    assert!(err.to_string().contains("alert"), "{err}");

    let tcp = TcpStream::connect(("127.0.0.1", fixture.port))
        .await
        .unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(base)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS 1.3: the client's side of the handshake completes");
    // Send the HTTP/2 preface as a real client would, then read.
    let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(TIMEOUT, stream.read(&mut buf))
        .await
        .expect("the server must answer or close");
    let err = read.expect_err("the server must reject the certificate with an alert");
    assert!(err.to_string().contains("alert"), "{err}");
}

#[tokio::test]
async fn mtls_client_is_identified_by_its_device_id() {
    let fixture = Fixture::start().await;
    let (cert, key) = fixture.device("dev-42");
    let config = mtls_client_tls_config(fixture.ca.certificate_pem(), &cert, &key).unwrap();
    let channel = connect_tls(&fixture.url(), config.clone(), TIMEOUT)
        .await
        .unwrap();
    check(channel).await.unwrap();
    // By IP too: the server certificate names 127.0.0.1.
    let channel = connect_tls(
        &format!("https://127.0.0.1:{}", fixture.port),
        config,
        TIMEOUT,
    )
    .await
    .unwrap();
    check(channel).await.unwrap();

    let seen = fixture.seen();
    assert_eq!(seen.len(), 2);
    let expected = edgefleet_pki::certificate_info_pem(&cert).unwrap();
    for (device_id, info) in seen {
        assert_eq!(device_id.as_deref(), Some("dev-42"));
        assert_eq!(info.as_ref(), Some(&expected));
    }
}

#[tokio::test]
async fn pinned_client_with_the_right_fingerprint_connects_without_identity() {
    let fixture = Fixture::start().await;
    let config = pinned_client_tls_config(&fixture.ca.fingerprint().to_uppercase()).unwrap();
    let channel = connect_tls(&fixture.url(), config, TIMEOUT).await.unwrap();
    check(channel).await.unwrap();
    assert_eq!(fixture.seen(), vec![(None, None)]);
}

#[tokio::test]
async fn pinned_client_with_a_wrong_fingerprint_fails_clearly() {
    let fixture = Fixture::start().await;
    let (other_ca, _) = CertificateAuthority::generate().unwrap();
    for fingerprint in [other_ca.fingerprint(), "ab".repeat(32)] {
        let config = pinned_client_tls_config(&fingerprint).unwrap();
        let err = connect_tls(&fixture.url(), config, TIMEOUT)
            .await
            .unwrap_err();
        match &err {
            PkiError::CaFingerprintMismatch { server, expected } => {
                assert_eq!(server, &format!("localhost:{}", fixture.port));
                assert_eq!(expected, &fingerprint);
            }
            other => panic!("expected a fingerprint mismatch, got {other}"),
        }
        let message = err.to_string();
        assert!(
            message.contains("certificate did not match the join token's CA fingerprint"),
            "{message}"
        );
        assert!(message.contains("localhost"), "{message}");
        assert_eq!(rejected_client_certificate_alert(&err), None);
    }
    assert!(pinned_client_tls_config("abc").is_err());
    assert!(fixture.seen().is_empty());
}

#[test]
fn pinned_verifier_checks_chain_name_and_validity() {
    use rustls::client::danger::ServerCertVerifier;
    use rustls_pki_types::{CertificateDer, UnixTime};

    let (ca, _) = CertificateAuthority::generate().unwrap();
    let provider = crypto_provider();
    let verifier =
        edgefleet_pki::PinnedCaVerifier::new(&ca.fingerprint(), provider.clone()).unwrap();
    let server = ca
        .issue_server_certificate(&["cp.example.com".into()], DAY)
        .unwrap();
    let leaf = {
        use rustls_pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(server.certificate_pem.as_bytes()).unwrap()
    };
    let ca_der = CertificateDer::from(ca.certificate_der().to_vec());
    let name = |n: &str| ServerName::try_from(n.to_string()).unwrap();
    let now = UnixTime::now();

    for ok in ["cp.example.com", "localhost", "127.0.0.1"] {
        verifier
            .verify_server_cert(&leaf, std::slice::from_ref(&ca_der), &name(ok), &[], now)
            .unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    // The pinned CA does not vouch for other names.
    let err = verifier
        .verify_server_cert(
            &leaf,
            std::slice::from_ref(&ca_der),
            &name("evil.example"),
            &[],
            now,
        )
        .unwrap_err();
    assert!(matches!(err, rustls::Error::InvalidCertificate(_)), "{err}");
    // Nor outside the validity period.
    let later = UnixTime::since_unix_epoch(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            + 2 * DAY,
    );
    let err = verifier
        .verify_server_cert(
            &leaf,
            std::slice::from_ref(&ca_der),
            &name("localhost"),
            &[],
            later,
        )
        .unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    // Without the CA among the presented certificates there is nothing to pin.
    let err = verifier
        .verify_server_cert(&leaf, &[], &name("localhost"), &[], now)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("did not match the join token's CA fingerprint"),
        "{err}"
    );
    // A server presenting the pinned CA but a leaf from another CA fails.
    let (other, _) = CertificateAuthority::generate().unwrap();
    let foreign = other.issue_server_certificate(&[], DAY).unwrap();
    let foreign_leaf = {
        use rustls_pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(foreign.certificate_pem.as_bytes()).unwrap()
    };
    assert!(
        verifier
            .verify_server_cert(
                &foreign_leaf,
                std::slice::from_ref(&ca_der),
                &name("localhost"),
                &[],
                now
            )
            .is_err()
    );
}

#[tokio::test]
async fn client_trusting_another_ca_fails_the_handshake() {
    let fixture = Fixture::start().await;
    let (other, _) = CertificateAuthority::generate().unwrap();
    let wrong_ca = ca_client_tls_config(other.certificate_pem()).unwrap();
    let err = connect_tls(&fixture.url(), wrong_ca, TIMEOUT)
        .await
        .unwrap_err();
    assert!(matches!(err, PkiError::UntrustedServer { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("the server's certificate is not from the CA this client trusts"),
        "{err}"
    );
    assert!(err.to_string().contains("localhost"), "{err}");
}

#[tokio::test]
async fn client_without_certificate_connects_and_has_no_device_id() {
    let fixture = Fixture::start().await;
    let config = ca_client_tls_config(fixture.ca.certificate_pem()).unwrap();
    let channel = connect_tls(&fixture.url(), config, TIMEOUT).await.unwrap();
    check(channel.clone()).await.unwrap();
    check(channel).await.unwrap();
    assert_eq!(fixture.seen(), vec![(None, None), (None, None)]);
}

#[tokio::test]
async fn certificate_from_another_ca_is_rejected_at_handshake() {
    let fixture = Fixture::start().await;
    let (cert, key) = foreign_device("dev-1");
    assert_handshake_rejected(&fixture, &cert, &key).await;
    let config = mtls_client_tls_config(fixture.ca.certificate_pem(), &cert, &key).unwrap();
    assert_rejected(&fixture, config, "DecryptError").await;
    assert!(fixture.seen().is_empty());
}

#[tokio::test]
async fn expired_device_certificate_is_rejected_at_handshake() {
    let fixture = Fixture::start().await;
    let key = generate_device_key().unwrap();
    let csr = device_csr(&key, "h").unwrap();
    let now = SystemTime::now();
    let expired = fixture
        .ca
        .sign_device_csr_with_validity(&csr, "dev-old", now - 3 * DAY, now - DAY)
        .unwrap();
    assert_handshake_rejected(&fixture, &expired.certificate_pem, &key).await;
    let config =
        mtls_client_tls_config(fixture.ca.certificate_pem(), &expired.certificate_pem, &key)
            .unwrap();
    assert_rejected(&fixture, config, "CertificateExpired").await;
    assert!(fixture.seen().is_empty());

    // The same key with a valid certificate is accepted.
    let valid = fixture.ca.sign_device_csr(&csr, "dev-old", DAY).unwrap();
    let config =
        mtls_client_tls_config(fixture.ca.certificate_pem(), &valid.certificate_pem, &key).unwrap();
    check(connect_tls(&fixture.url(), config, TIMEOUT).await.unwrap())
        .await
        .unwrap();
    assert_eq!(fixture.seen()[0].0.as_deref(), Some("dev-old"));
}

#[tokio::test]
async fn stalled_and_bad_clients_do_not_block_others() {
    let fixture = Fixture::start().await;
    // Connections that never complete a handshake, and one that sends garbage.
    let mut stalled = Vec::new();
    for _ in 0..3 {
        stalled.push(
            TcpStream::connect(("127.0.0.1", fixture.port))
                .await
                .unwrap(),
        );
    }
    let mut garbage = TcpStream::connect(("127.0.0.1", fixture.port))
        .await
        .unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();

    let (cert, key) = fixture.device("dev-7");
    let config = mtls_client_tls_config(fixture.ca.certificate_pem(), &cert, &key).unwrap();
    // Far less than the 10 s handshake timeout the stalled ones get.
    let started = std::time::Instant::now();
    let channel = connect_tls(&fixture.url(), config, Duration::from_secs(2))
        .await
        .unwrap();
    check(channel).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(fixture.seen()[0].0.as_deref(), Some("dev-7"));
    drop(stalled);
}

#[tokio::test]
async fn connection_failures_name_the_server() {
    // A port with nothing listening.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let (ca, _) = CertificateAuthority::generate().unwrap();
    let config = ca_client_tls_config(ca.certificate_pem()).unwrap();
    // How a TLS client trusting `ca` fails against this machine's `port`.
    let refusal = |port: u16, timeout: Duration| {
        let config = config.clone();
        async move {
            connect_tls(&format!("https://127.0.0.1:{port}"), config, timeout)
                .await
                .unwrap_err()
        }
    };
    let err = refusal(port, TIMEOUT).await;
    assert!(matches!(err, PkiError::Connect { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );

    // A server that accepts TCP but never speaks TLS: the timeout applies.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let _keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let err = refusal(silent_port, Duration::from_millis(300)).await;
    assert!(err.to_string().contains("timed out"), "{err}");

    // A plaintext server (it answers the ClientHello with an HTTP/1.1 error,
    // as hyper does): named as not TLS.
    let plaintext = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plaintext_port = plaintext.local_addr().unwrap().port();
    let _answer = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = plaintext.accept().await {
            let mut hello = [0u8; 512];
            let _ = s.read(&mut hello).await;
            let _ = s
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
    });
    let err = refusal(plaintext_port, TIMEOUT).await;
    assert!(matches!(err, PkiError::NotTls { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("127.0.0.1:{plaintext_port}")),
        "{err}"
    );

    for bad in [
        "http://localhost:1",
        "localhost:1",
        "https://",
        "https://h:1/path",
    ] {
        let err = connect_tls(bad, config.clone(), TIMEOUT).await.unwrap_err();
        assert!(matches!(err, PkiError::InvalidUrl { .. }), "{bad}: {err}");
    }
}

#[test]
fn server_config_rejects_mismatched_key() {
    let (ca, _) = CertificateAuthority::generate().unwrap();
    let a = ca.issue_server_certificate(&[], DAY).unwrap();
    let b = ca.issue_server_certificate(&[], DAY).unwrap();
    let mixed = IssuedKeyPair {
        certificate_pem: a.certificate_pem.clone(),
        key_pem: b.key_pem.clone(),
    };
    assert!(agent_server_tls_config(&mixed, ca.certificate_pem()).is_err());
    assert!(edgefleet_pki::operator_server_tls_config(&mixed).is_err());
    assert!(agent_server_tls_config(&a, "not pem").is_err());
    assert!(edgefleet_pki::operator_server_tls_config(&a).is_ok());
}

/// The key exchange group `client` and `server` agree on, in a handshake
/// in memory.
fn negotiated_group(
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
) -> rustls::NamedGroup {
    let (client, server) = edgefleet_test_support::handshake_in_memory(client, server, "localhost");
    let group = client.negotiated_key_exchange_group().unwrap().name();
    assert_eq!(
        server.negotiated_key_exchange_group().unwrap().name(),
        group
    );
    group
}

/// The fleet's clients and servers agree on X25519: rustls 0.23.48's ring
/// provider lists P-384 first, which ring computes with generic bignum code
/// (a handshake took five times the CPU). A client that offers only P-384
/// or P-256 is still served, on its group.
#[test]
fn handshakes_use_x25519_and_other_groups_are_still_served() {
    let fixture_dir = tempfile::tempdir().unwrap();
    let (ca, _) = CertificateAuthority::load_or_create(fixture_dir.path()).unwrap();
    let server_cert = ca.issue_server_certificate(&[], DAY).unwrap();
    let agent_listener = agent_server_tls_config(&server_cert, ca.certificate_pem()).unwrap();
    let operator_listener = edgefleet_pki::operator_server_tls_config(&server_cert).unwrap();
    let inference_listener = edgefleet_pki::listener_tls_config(
        &server_cert.certificate_pem,
        &server_cert.key_pem,
        None,
        &[edgefleet_pki::ALPN_H2],
    )
    .unwrap();
    let key = generate_device_key().unwrap();
    let device = ca
        .sign_device_csr(&device_csr(&key, "host").unwrap(), "dev-1", DAY)
        .unwrap();
    let mtls = mtls_client_tls_config(ca.certificate_pem(), &device.certificate_pem, &key).unwrap();
    let pinned = pinned_client_tls_config(&ca.fingerprint()).unwrap();
    let operator = ca_client_tls_config(ca.certificate_pem()).unwrap();
    for (client, server) in [
        (&mtls, &agent_listener),
        (&pinned, &agent_listener),
        (&operator, &operator_listener),
        (&operator, &inference_listener),
    ] {
        assert_eq!(
            negotiated_group(client.clone(), server.clone()),
            rustls::NamedGroup::X25519
        );
    }
    #[allow(deprecated)]
    for (group, name) in [
        (
            rustls::crypto::ring::kx_group::SECP384R1,
            rustls::NamedGroup::secp384r1,
        ),
        (
            rustls::crypto::ring::kx_group::SECP256R1,
            rustls::NamedGroup::secp256r1,
        ),
    ] {
        let only_that = edgefleet_test_support::client_offering(
            &crypto_provider(),
            &[group],
            ca.certificate_der(),
        );
        assert_eq!(
            negotiated_group(only_that, inference_listener.clone()),
            name
        );
    }
}

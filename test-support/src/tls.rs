//! TLS handshakes between two rustls configs in memory, with no sockets:
//! what the configs agree on, and what a handshake costs in CPU alone.

use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ConnectionCommon, ServerConfig, ServerConnection};

/// Runs a handshake between `client` (connecting to `server_name`) and
/// `server`, each side's flight handed to the other whole; panics if it
/// fails. The two connections, handshake done.
pub fn handshake_in_memory(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    server_name: &str,
) -> (ClientConnection, ServerConnection) {
    let name = ServerName::try_from(server_name.to_string()).expect("a valid server name");
    let mut client = ClientConnection::new(client, name).expect("a client connection");
    let mut server = ServerConnection::new(server).expect("a server connection");
    let mut flight = Vec::new();
    while client.is_handshaking() || server.is_handshaking() {
        send_flight(&mut client, &mut server, &mut flight);
        send_flight(&mut server, &mut client, &mut flight);
    }
    (client, server)
}

/// Hands everything `from` has to write to `to` through `flight`, and has
/// `to` process it; panics if `to` refuses it.
fn send_flight<A, B>(
    from: &mut ConnectionCommon<A>,
    to: &mut ConnectionCommon<B>,
    flight: &mut Vec<u8>,
) {
    flight.clear();
    while from.wants_write() {
        from.write_tls(flight).expect("writes to memory");
    }
    let mut incoming = &flight[..];
    while !incoming.is_empty() {
        to.read_tls(&mut incoming).expect("reads from memory");
    }
    to.process_new_packets()
        .expect("the other side takes the flight");
}

/// A client config on `provider` with its key exchange groups set to
/// `groups` (in that order of preference), trusting the CA certificate
/// `ca_der`, presenting no certificate, resuming no session: each handshake
/// does the whole key exchange.
pub fn client_offering(
    provider: &rustls::crypto::CryptoProvider,
    groups: &[&'static dyn rustls::crypto::SupportedKxGroup],
    ca_der: &[u8],
) -> Arc<ClientConfig> {
    let mut provider = provider.clone();
    provider.kx_groups = groups.to_vec();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca_der.to_vec()))
        .expect("a CA certificate");
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .expect("the provider's protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

//! The control plane's server certificate, which all three listeners
//! present: issued by the fleet CA at each start and again whenever a third
//! of its lifetime is left, so a server that runs for longer than one
//! certificate lives never presents an expired one (agents, the CLI and
//! Prometheus trust the CA, not the certificate, so a renewal needs nothing
//! of them). New connections get the current certificate; open ones keep
//! the one they were accepted with.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use edgefleet_pki::CertificateAuthority;
use prometheus_client::metrics::gauge::Gauge;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::state::{ControlPlane, now_ms};

/// How often, at the most, the certificate's time left is read off the wall
/// clock (and a failed renewal tried again); a tenth of the certificate's
/// lifetime when that is shorter.
const CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// The shortest lifetime a server certificate may have: certificates count
/// time in whole seconds, and a shorter one would be renewed all the time.
pub const MIN_VALIDITY: Duration = Duration::from_secs(5);

/// The three listeners' TLS configs, all with the current certificate.
#[derive(Debug)]
pub struct ServerTls {
    /// The current certificate's configs, swapped whole at each renewal.
    current: ArcSwap<Configs>,
    /// The certificate's extra subject alternative names (`--server-names`).
    server_names: Vec<String>,
    /// Each certificate's lifetime.
    validity: Duration,
    /// Set to the current certificate's expiry, in Unix seconds
    /// (`edgefleet_server_certificate_expiration_timestamp_seconds`).
    expiration: Gauge,
}

/// One certificate's configs, one a listener.
#[derive(Debug)]
struct Configs {
    /// Mutual TLS (a client certificate optional, for `Enroll`), ALPN `h2`;
    /// presents the CA's certificate too, which joining agents pin.
    agent: Arc<ServerConfig>,
    /// The operator API: no client certificate, ALPN `h2`.
    operator: Arc<ServerConfig>,
    /// `/metrics` and `/healthz`: ALPN `h2` and `http/1.1` (clients that
    /// speak only HTTP/1.1, Python's urllib3, offer only that).
    http: Arc<ServerConfig>,
    /// The certificate's `notAfter`, Unix milliseconds.
    not_after_unix_ms: i64,
}

impl Configs {
    fn issue(
        ca: &CertificateAuthority,
        server_names: &[String],
        validity: Duration,
    ) -> anyhow::Result<Configs> {
        let identity = ca
            .issue_server_certificate(server_names, validity)
            .context("cannot issue the server certificate")?;
        Ok(Configs {
            agent: edgefleet_pki::agent_server_tls_config(&identity, ca.certificate_pem())?,
            operator: edgefleet_pki::operator_server_tls_config(&identity)?,
            http: edgefleet_pki::listener_tls_config(
                &identity.certificate_pem,
                &identity.key_pem,
                None,
                &[edgefleet_pki::ALPN_H2, edgefleet_pki::ALPN_HTTP11],
            )?,
            not_after_unix_ms: edgefleet_pki::certificate_info_pem(&identity.certificate_pem)?
                .not_after_unix_ms,
        })
    }
}

impl ServerTls {
    /// Issues the first certificate; `expiration` is set to its expiry and
    /// to each renewal's.
    pub fn issue(
        ca: &CertificateAuthority,
        server_names: &[String],
        validity: Duration,
        expiration: Gauge,
    ) -> anyhow::Result<ServerTls> {
        let configs = Configs::issue(ca, server_names, validity)?;
        expiration.set(configs.not_after_unix_ms.div_euclid(1000));
        Ok(ServerTls {
            current: ArcSwap::from_pointee(configs),
            server_names: server_names.to_vec(),
            validity,
            expiration,
        })
    }

    /// Issues a new certificate and hands it to new connections.
    pub fn renew(&self, ca: &CertificateAuthority) -> anyhow::Result<()> {
        let configs = Configs::issue(ca, &self.server_names, self.validity)?;
        self.expiration
            .set(configs.not_after_unix_ms.div_euclid(1000));
        self.current.store(Arc::new(configs));
        Ok(())
    }

    pub fn agent(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.load().agent)
    }

    pub fn operator(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.load().operator)
    }

    pub fn http(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.load().http)
    }

    /// How long from `now_unix_ms` until the current certificate is due
    /// for renewal: when a third of its lifetime is left, as agents renew
    /// theirs. Zero when it is due.
    pub fn until_renewal(&self, now_unix_ms: i64) -> Duration {
        let third_ms = i64::try_from(self.validity.as_millis() / 3).unwrap_or(i64::MAX);
        let due = self
            .current
            .load()
            .not_after_unix_ms
            .saturating_sub(third_ms);
        Duration::from_millis(u64::try_from(due.saturating_sub(now_unix_ms)).unwrap_or(0))
    }
}

/// A TLS listener that hands each connection the config `current` gives
/// at that moment: the latest certificate.
pub fn tls_incoming(
    listener: TcpListener,
    tls: &Arc<ServerTls>,
    current: fn(&ServerTls) -> Arc<ServerConfig>,
) -> edgefleet_pki::TlsIncoming {
    let tls = Arc::clone(tls);
    edgefleet_pki::tls_incoming_from(
        listener,
        move || current(&tls),
        edgefleet_pki::DEFAULT_HANDSHAKE_TIMEOUT,
    )
}

/// SIGHUP, which asks for a renewal at once, as `systemctl reload` or
/// `kill -HUP` asks a daemon to act again on what it read at start: the
/// new certificate names the machine's host name as it is now, say.
/// Installed before the server serves, so from then on the signal no longer
/// ends the process (its default disposition).
pub struct RenewOnHangup {
    #[cfg(unix)]
    hangups: Option<tokio::signal::unix::Signal>,
}

impl RenewOnHangup {
    /// Installs the handler; without one (logged), renewals come on their
    /// schedule only.
    pub fn install() -> RenewOnHangup {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let hangups = signal(SignalKind::hangup())
                .map_err(|err| {
                    tracing::warn!(error = %err, "cannot handle SIGHUP; the server certificate is renewed on its schedule only")
                })
                .ok();
            RenewOnHangup { hangups }
        }
        #[cfg(not(unix))]
        RenewOnHangup {}
    }

    /// Resolves at the next SIGHUP; never without a handler.
    async fn asked(&mut self) {
        #[cfg(unix)]
        if let Some(hangups) = &mut self.hangups
            && hangups.recv().await.is_some()
        {
            return;
        }
        std::future::pending().await
    }
}

/// Renews the server certificate whenever a third of its lifetime is left,
/// and at each SIGHUP, until `shutdown`. The time left is read off the
/// wall clock at least every [`CHECK_INTERVAL`]: a machine that was
/// suspended, or whose clock was set forward, renews within that long
/// (a timer alone counts neither). A renewal that fails is logged and tried
/// again at the next check, the current certificate served meanwhile.
pub async fn renew_server_certificate(
    tls: Arc<ServerTls>,
    cp: Arc<ControlPlane>,
    mut hangup: RenewOnHangup,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let check_interval = CHECK_INTERVAL.min(tls.validity / 10);
    let mut failed = false;
    loop {
        let wait = if failed {
            check_interval
        } else {
            tls.until_renewal(now_ms()).min(check_interval)
        };
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(wait) => {
                if !tls.until_renewal(now_ms()).is_zero() {
                    continue;
                }
            }
            () = hangup.asked() => {
                tracing::info!("SIGHUP: renewing the server certificate now");
            }
        }
        match tls.renew(&cp.ca) {
            Ok(()) => {
                tracing::info!(
                    valid_for = %humantime::format_duration(tls.validity),
                    "renewed the server certificate"
                );
                failed = false;
            }
            Err(err) => {
                tracing::warn!(
                    error = %edgefleet_pki::error_chain(err.as_ref()),
                    "cannot renew the server certificate; serving the current one and trying again"
                );
                failed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_MS: i64 = 24 * 3600 * 1000;

    /// The renewal is due when a third of the certificate's lifetime is
    /// left by the wall clock, however long the process's timers say has
    /// passed: 60 days into a 90-day certificate, or at once once the clock
    /// shows it past that (after a suspend, or the clock set forward).
    #[test]
    fn a_renewal_is_due_when_a_third_of_the_lifetime_is_left_by_the_wall_clock() {
        let (ca, _) = CertificateAuthority::generate().unwrap();
        let validity = Duration::from_secs(90 * 24 * 3600);
        let tls = ServerTls::issue(&ca, &[], validity, Gauge::default()).unwrap();
        let issued = now_ms();
        let left = tls.until_renewal(issued);
        // Certificates count whole seconds.
        let sixty_days = Duration::from_millis(60 * DAY_MS as u64);
        assert!(
            left <= sixty_days && left >= sixty_days - Duration::from_secs(2),
            "{left:?}"
        );
        assert!(!tls.until_renewal(issued + 59 * DAY_MS).is_zero());
        assert!(tls.until_renewal(issued + 60 * DAY_MS).is_zero());
        assert!(tls.until_renewal(issued + 400 * DAY_MS).is_zero());
        // A renewal starts the count again.
        tls.renew(&ca).unwrap();
        assert!(tls.until_renewal(now_ms()) >= sixty_days - Duration::from_secs(2));
    }
}

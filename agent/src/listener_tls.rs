//! TLS for the agent's two listeners, from a certificate, its key and an
//! optional client CA in files, which are watched: a certificate renewed in
//! place (as cert-manager, step-ca or certbot renew them) is served to new
//! connections within [`TLS_FILES_POLL_INTERVAL`], or at once on SIGHUP,
//! with no restart (a restart would reload every model). Open connections
//! keep the one they were accepted with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

/// How often the certificate, key and client CA files are checked for a
/// change.
pub const TLS_FILES_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Where the listeners' TLS comes from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate, PEM, leaf first, then any intermediates.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// With it, clients must present a certificate that chains to it.
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsFilesError {
    #[error("cannot read {setting} {}: {source}", path.display())]
    Read {
        setting: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot serve TLS with {} and {}: {source}", cert.display(), key.display())]
    Invalid {
        cert: PathBuf,
        key: PathBuf,
        source: edgefleet_pki::PkiError,
    },
}

/// The listeners' current TLS configs, and the files they came from. Clones
/// share them.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    files: TlsFiles,
    /// ALPN `h2`.
    grpc: ArcSwap<rustls::ServerConfig>,
    /// ALPN `h2` and `http/1.1`: clients that only speak HTTP/1.1 (Python's
    /// urllib3) offer only that.
    http: ArcSwap<rustls::ServerConfig>,
    /// The files as last read, to tell when one changes.
    stamps: Mutex<Vec<Option<FileStamp>>>,
}

/// What tells that a file was written anew (or replaced, as a Kubernetes
/// secret's symlink is).
type FileStamp = (SystemTime, u64, u64);

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len(), metadata.ino()))
}

impl ListenerTls {
    /// Reads the files and builds both configs; any problem is an error
    /// that names the file. A key file others can read is warned about.
    pub fn load(files: TlsFiles) -> Result<ListenerTls, TlsFilesError> {
        let stamps = stamps(&files);
        let (grpc, http) = configs(&files)?;
        edgefleet_pki::warn_if_key_readable_by_others(&files.key, "the TLS key file");
        Ok(ListenerTls {
            inner: Arc::new(Inner {
                files,
                grpc: ArcSwap::new(grpc),
                http: ArcSwap::new(http),
                stamps: Mutex::new(stamps),
            }),
        })
    }

    pub fn files(&self) -> &TlsFiles {
        &self.inner.files
    }

    /// Whether clients must present a certificate (mutual TLS).
    pub fn client_certificates_required(&self) -> bool {
        self.inner.files.client_ca.is_some()
    }

    /// The gRPC listener's config as it is now.
    pub fn grpc_config(&self) -> Arc<rustls::ServerConfig> {
        self.inner.grpc.load_full()
    }

    /// The HTTP listener's config as it is now.
    pub fn http_config(&self) -> Arc<rustls::ServerConfig> {
        self.inner.http.load_full()
    }

    /// Reads the files again if one of them changed since they were last
    /// read: `Ok(true)` when new connections now get what they hold. On an
    /// error (a file half written, a key that is not the new
    /// certificate's) the configs in use stay, and the files are tried
    /// again when one changes again.
    pub fn reload_if_changed(&self) -> Result<bool, TlsFilesError> {
        let files = &self.inner.files;
        let now = stamps(files);
        {
            let mut last = self.inner.stamps.lock().unwrap_or_else(|e| e.into_inner());
            if *last == now {
                return Ok(false);
            }
            *last = now;
        }
        let (grpc, http) = configs(files)?;
        self.inner.grpc.store(grpc);
        self.inner.http.store(http);
        Ok(true)
    }
}

fn stamps(files: &TlsFiles) -> Vec<Option<FileStamp>> {
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|path| stamp(path))
    .collect()
}

type Configs = (Arc<rustls::ServerConfig>, Arc<rustls::ServerConfig>);

fn configs(files: &TlsFiles) -> Result<Configs, TlsFilesError> {
    let read = |setting: &'static str, path: &Path| {
        std::fs::read_to_string(path).map_err(|source| TlsFilesError::Read {
            setting,
            path: path.to_path_buf(),
            source,
        })
    };
    let cert_pem = read("tls_cert", &files.cert)?;
    let key_pem = read("tls_key", &files.key)?;
    let client_ca_pem = match &files.client_ca {
        Some(path) => Some(read("tls_client_ca", path)?),
        None => None,
    };
    let config = |alpn: &[&[u8]]| {
        edgefleet_pki::listener_tls_config(&cert_pem, &key_pem, client_ca_pem.as_deref(), alpn)
            .map_err(|source| TlsFilesError::Invalid {
                cert: files.cert.clone(),
                key: files.key.clone(),
                source,
            })
    };
    Ok((
        config(&[edgefleet_pki::ALPN_H2])?,
        config(&[edgefleet_pki::ALPN_H2, edgefleet_pki::ALPN_HTTP11])?,
    ))
}

/// Checks the files every `interval`, and whenever `check_now` asks, until
/// `shutdown`; logs each reload and each failed one.
pub async fn watch_files(
    tls: ListenerTls,
    interval: Duration,
    shutdown: CancellationToken,
    mut check_now: crate::server::CheckNow,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
            () = crate::server::asked(&mut check_now) => {}
        }
        let reloading = tls.clone();
        match tokio::task::spawn_blocking(move || reloading.reload_if_changed()).await {
            Ok(Ok(true)) => tracing::info!(
                cert = %tls.files().cert.display(),
                "reloaded the TLS certificate: new connections get it"
            ),
            Ok(Ok(false)) => {}
            Ok(Err(err)) => tracing::error!(
                error = %err,
                "cannot reload the TLS files; new connections keep getting the certificate loaded before"
            ),
            Err(err) => tracing::error!(error = %err, "the TLS file check panicked"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a certificate for localhost from `ca` and its key as `dir`'s
    /// `agent.crt` and `agent.key`.
    fn write_pair(ca: &edgefleet_pki::CertificateAuthority, dir: &Path) {
        let pair = ca
            .issue_server_certificate(&[], Duration::from_secs(3600))
            .unwrap();
        std::fs::write(dir.join("agent.crt"), &pair.certificate_pem).unwrap();
        std::fs::write(dir.join("agent.key"), &pair.key_pem).unwrap();
    }

    /// SIGHUP's [`crate::server::CheckNow`]: files renewed in place are read
    /// as soon as a check is asked for, where the poll would have waited its
    /// whole interval (an hour here).
    #[tokio::test]
    async fn a_check_asked_for_reads_renewed_files_without_waiting_for_the_poll() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = edgefleet_pki::CertificateAuthority::generate().unwrap();
        write_pair(&ca, dir.path());
        let tls = ListenerTls::load(TlsFiles {
            cert: dir.path().join("agent.crt"),
            key: dir.path().join("agent.key"),
            client_ca: None,
        })
        .unwrap();
        let first = tls.grpc_config();
        let (ask, check_now) = tokio::sync::watch::channel(());
        let shutdown = CancellationToken::new();
        let watcher = tokio::spawn(watch_files(
            tls.clone(),
            Duration::from_secs(3600),
            shutdown.clone(),
            check_now,
        ));
        write_pair(&ca, dir.path());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            Arc::ptr_eq(&tls.grpc_config(), &first),
            "the renewed files were read before a check was asked for"
        );
        ask.send_replace(());
        let asked = std::time::Instant::now();
        while Arc::ptr_eq(&tls.grpc_config(), &first) {
            assert!(
                asked.elapsed() < Duration::from_secs(10),
                "the renewed files were not read within 10 s of the check asked for"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!Arc::ptr_eq(&tls.http_config(), &first));
        shutdown.cancel();
        watcher.await.unwrap();
    }
}

//! `edgefleet-agent enroll`: trade a join token and a CSR for the device's
//! certificate. The key is generated here and never leaves the device; the
//! server is trusted through the CA fingerprint inside the join token.

use std::time::Duration;

use anyhow::Context;
use edgefleet_pki::JoinTokenSecret;
use edgefleet_proto::edgefleet::v1 as pb;
use pb::agent_service_client::AgentServiceClient;

use super::state::{Enrollment, Identity, StateDir};

/// What `enroll` needs.
#[derive(Debug, Clone)]
pub struct EnrollOptions {
    /// `https://host:port` of the control plane's agent listener.
    pub server_url: String,
    pub token: String,
    pub state_dir: std::path::PathBuf,
    /// Enroll again even though the state dir already holds an enrollment.
    pub force: bool,
    pub connect_timeout: Duration,
}

/// Checks a server URL: `https://host:port` (a bare `host:port` gets https).
pub fn normalize_server_url(url: &str) -> anyhow::Result<String> {
    let url = url.trim().trim_end_matches('/');
    let url = if url.contains("://") {
        url.to_string()
    } else {
        format!("https://{url}")
    };
    if !url.starts_with("https://") {
        anyhow::bail!("the server URL {url:?} must use https:// (agents always use TLS)");
    }
    let rest = &url["https://".len()..];
    if rest.is_empty() || rest.contains('/') {
        anyhow::bail!("the server URL {url:?} must look like https://host:port");
    }
    Ok(url)
}

fn hostname() -> String {
    hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

/// Creates the state dir (0700) if it does not exist yet.
fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// Enrolls the device; returns its enrollment record.
pub async fn enroll(
    options: &EnrollOptions,
    inventory: pb::Inventory,
) -> anyhow::Result<Enrollment> {
    let state = StateDir::new(&options.state_dir);
    create_private_dir(&options.state_dir)?;
    // Not beside a running agent (nor another enrollment): it would swap the
    // identity the running one holds its session with.
    let _agent_lock = state.lock_agent()?;
    if state.is_enrolled() && !options.force {
        let (enrollment, _) = state.load()?;
        anyhow::bail!(
            "{} is already enrolled as device {} with {}; pass --force to enroll again",
            options.state_dir.display(),
            enrollment.device_id,
            enrollment.server_url
        );
    }
    let server_url = normalize_server_url(&options.server_url)?;
    let token = JoinTokenSecret::parse(options.token.trim())?;
    let key_pem = edgefleet_pki::generate_device_key()?;
    let csr_pem = edgefleet_pki::device_csr(&key_pem, &hostname())?;
    let tls = edgefleet_pki::pinned_client_tls_config(&token.ca_fingerprint)?;
    let channel = edgefleet_pki::connect_tls(&server_url, tls, options.connect_timeout)
        .await
        .with_context(|| format!("cannot reach the control plane at {server_url}"))?;
    let response = AgentServiceClient::new(channel)
        .enroll(pb::EnrollRequest {
            join_token: options.token.trim().to_string(),
            csr_pem,
            inventory: Some(inventory),
        })
        .await
        .map_err(|status| {
            anyhow::anyhow!(
                "the control plane refused the enrollment: {}",
                status.message()
            )
        })?
        .into_inner();
    // The CA we were given must be the one the token pinned.
    let ca_fingerprint = edgefleet_pki::fingerprint_pem(&response.ca_certificate_pem)?;
    if ca_fingerprint != token.ca_fingerprint {
        anyhow::bail!(
            "the control plane answered with a CA that is not the one the join token names"
        );
    }
    let info = edgefleet_pki::certificate_info_pem(&response.certificate_pem)?;
    if info.common_name != response.device_id {
        anyhow::bail!(
            "the issued certificate names {:?}, not device {:?}",
            info.common_name,
            response.device_id
        );
    }
    // A new device from here on: nothing the state dir holds for the one it
    // was enrolled as before may be taken for this one's. Cleared before
    // the new enrollment is saved, so a crash in between leaves the old
    // enrollment (without its queue), never the new one with the old data.
    let forgotten = state
        .forget_previous_device()
        .context("cannot clear the previous enrollment's state")?;
    if forgotten.telemetry_batches > 0 {
        tracing::warn!(
            dropped = forgotten.telemetry_batches,
            "deleted the telemetry batches the previous enrollment had not uploaded: they cannot be uploaded as the new device's"
        );
    }
    if forgotten.desired_state {
        tracing::info!("forgot the previous enrollment's desired state");
    }
    let enrollment = Enrollment {
        device_id: response.device_id,
        server_url,
        labels: response.labels.into_iter().collect(),
        enrolled_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default(),
    };
    let identity = Identity {
        key_pem,
        certificate_pem: response.certificate_pem,
        ca_pem: response.ca_certificate_pem,
    };
    state.save_enrollment(&enrollment, &identity)?;
    if !response.release_public_key.is_empty() {
        state
            .save_release_key(&response.release_public_key)
            .context("cannot store the fleet's release key")?;
    }
    Ok(enrollment)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_are_normalized_to_https() {
        assert_eq!(normalize_server_url("cp:7443").unwrap(), "https://cp:7443");
        assert_eq!(
            normalize_server_url("https://cp:7443/").unwrap(),
            "https://cp:7443"
        );
        assert!(normalize_server_url("http://cp:7443").is_err());
        assert!(normalize_server_url("https://cp:7443/x").is_err());
    }
}

//! The agent's state directory in managed mode:
//!
//! ```text
//! STATE_DIR/
//!   identity/device.key      the device's private key (0600; never leaves the device)
//!   identity/device.crt      its certificate, issued by the fleet CA
//!   identity/ca.crt          the fleet CA
//!   identity/enrollment.json device id, server URL, labels
//!   identity/release.pub     the fleet's release key (raw Ed25519, 32 bytes)
//!   models/                  the model cache (a Triton-layout repository)
//!   blobs/<sha256>           downloaded model blobs, verified (`.partial`: in progress)
//!   desired.pb               the latest DesiredState (protobuf), for restarts
//!   telemetry/               the store-and-forward queue
//!   agent.lock               locked (flock) by the one agent process serving or
//!                            enrolling this state dir, for as long as it does
//!   identity.lock            locked (flock) while the identity files are
//!                            written or read
//! ```
//!
//! The two lock files are empty and never deleted (deleting a lock file
//! others may have open would let two holders lock two different files).
//! The locks are advisory `flock`s: the kernel drops them when their holder
//! exits, however it exits, so a crash never leaves the state dir locked.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Enrollment {
    pub device_id: String,
    /// The control plane's agent URL, `https://host:port`.
    pub server_url: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub enrolled_unix_ms: u64,
}

/// What [`StateDir::forget_previous_device`] cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForgottenDevice {
    /// A desired state was persisted.
    pub desired_state: bool,
    /// Telemetry batches that were waiting to be uploaded.
    pub telemetry_batches: usize,
}

/// The device's TLS identity.
#[derive(Debug, Clone)]
pub struct Identity {
    pub key_pem: String,
    pub certificate_pem: String,
    pub ca_pem: String,
}

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

/// Locked for as long as one agent process serves or enrolls a state dir.
const AGENT_LOCK_FILE: &str = "agent.lock";
/// Locked while the identity files are written or read.
const IDENTITY_LOCK_FILE: &str = "identity.lock";

/// The exclusive claim of one process on a state dir
/// ([`StateDir::lock_agent`]); released when dropped or when the process
/// exits.
#[derive(Debug)]
pub struct AgentLock {
    _file: File,
}

/// Held while the identity files are written or read: the in-process
/// mutex orders this process's threads, the file lock other processes
/// (an `flock` is held per open file, so it would order the threads too;
/// the mutex keeps them from all waiting in the kernel).
struct IdentityGuard {
    _file: File,
    _threads: std::sync::MutexGuard<'static, ()>,
}

impl StateDir {
    pub fn new(root: &Path) -> StateDir {
        StateDir {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn identity_dir(&self) -> PathBuf {
        self.root.join("identity")
    }

    pub fn models_dir(&self) -> PathBuf {
        self.root.join("models")
    }

    pub fn telemetry_dir(&self) -> PathBuf {
        self.root.join("telemetry")
    }

    /// Downloaded model blobs, by SHA-256.
    pub fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs")
    }

    /// The latest desired state (encoded protobuf).
    pub fn desired_path(&self) -> PathBuf {
        self.root.join("desired.pb")
    }

    pub fn release_key_path(&self) -> PathBuf {
        self.identity_dir().join("release.pub")
    }

    /// Stores the fleet's release key (raw Ed25519 public key, 32 bytes).
    /// Returns whether it changed.
    pub fn save_release_key(&self, key: &[u8]) -> anyhow::Result<bool> {
        if key.len() != 32 {
            anyhow::bail!(
                "the release key is {} bytes, not the 32 of an Ed25519 public key",
                key.len()
            );
        }
        if self.release_key()?.as_deref() == Some(key) {
            return Ok(false);
        }
        std::fs::create_dir_all(self.identity_dir())
            .with_context(|| format!("cannot create {}", self.identity_dir().display()))?;
        edgefleet_pki::write_private_file(&self.release_key_path(), key)?;
        Ok(true)
    }

    /// The fleet's release key, if the agent has one.
    pub fn release_key(&self) -> anyhow::Result<Option<Vec<u8>>> {
        let path = self.release_key_path();
        match std::fs::read(&path) {
            Ok(key) if key.len() == 32 => Ok(Some(key)),
            Ok(key) => anyhow::bail!(
                "{} holds {} bytes, not a 32-byte Ed25519 key",
                path.display(),
                key.len()
            ),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    fn enrollment_path(&self) -> PathBuf {
        self.identity_dir().join("enrollment.json")
    }

    fn key_path(&self) -> PathBuf {
        self.identity_dir().join("device.key")
    }

    fn certificate_path(&self) -> PathBuf {
        self.identity_dir().join("device.crt")
    }

    fn ca_path(&self) -> PathBuf {
        self.identity_dir().join("ca.crt")
    }

    pub fn is_enrolled(&self) -> bool {
        self.enrollment_path().exists()
    }

    /// The clear error of a state dir that holds no enrollment.
    pub fn check_enrolled(&self) -> anyhow::Result<()> {
        if !self.is_enrolled() {
            anyhow::bail!(
                "{} holds no enrollment: run `edgefleet-agent enroll --server URL --token TOKEN --state-dir {}` first",
                self.root.display(),
                self.root.display()
            );
        }
        Ok(())
    }

    /// Claims the state dir for this process (`STATE_DIR/agent.lock`,
    /// exclusive), or fails at once with a clear error if another process
    /// holds it: two agents serving one state dir would share its telemetry
    /// queue, model cache and identity. `run` holds it for the process's
    /// lifetime, `enroll` while it enrolls. The state dir must exist.
    pub fn lock_agent(&self) -> anyhow::Result<AgentLock> {
        let path = self.root.join(AGENT_LOCK_FILE);
        let file = open_lock_file(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(AgentLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "another edgefleet-agent holds {} ({} is locked): stop it first, or give this one a state dir of its own",
                self.root.display(),
                path.display()
            ),
            Err(std::fs::TryLockError::Error(err)) => {
                Err(err).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
    }

    /// Takes the identity files for the caller: waits for other threads of
    /// this process, then for other processes.
    fn lock_identity_files(&self) -> anyhow::Result<IdentityGuard> {
        let threads = IDENTITY_FILES
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let path = self.root.join(IDENTITY_LOCK_FILE);
        let file = open_lock_file(&path)?;
        file.lock()
            .with_context(|| format!("cannot lock {}", path.display()))?;
        Ok(IdentityGuard {
            _file: file,
            _threads: threads,
        })
    }

    /// Creates the directories (0700).
    pub fn create(&self) -> anyhow::Result<()> {
        for dir in [
            self.root.clone(),
            self.identity_dir(),
            self.models_dir(),
            self.telemetry_dir(),
            self.blobs_dir(),
        ] {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                    .with_context(|| format!("cannot restrict {}", dir.display()))?;
            }
        }
        Ok(())
    }

    /// Clears what the state dir holds for the device it was enrolled as
    /// before, ahead of a new enrollment (`enroll --force`): the persisted
    /// desired state (its generations are the old device's: the new
    /// device's start again at 1 and would be ignored as older), the blob
    /// cache and partial downloads, the fleet's release key (the new fleet
    /// sends its own), and the telemetry queue (the old device's batches
    /// must not be uploaded as the new device's; its numbering starts again
    /// at 1). The model cache stays: the models serve on, and a model the
    /// new device is sent again is found there, not downloaded.
    pub fn forget_previous_device(&self) -> anyhow::Result<ForgottenDevice> {
        let remove_file = |path: PathBuf| match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(err) => Err(err).with_context(|| format!("cannot delete {}", path.display())),
        };
        let desired_state = remove_file(self.desired_path())?;
        remove_file(self.release_key_path())?;
        match std::fs::remove_dir_all(self.blobs_dir()) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(err)
                    .with_context(|| format!("cannot delete {}", self.blobs_dir().display()));
            }
        }
        let telemetry_batches = if self.telemetry_dir().exists() {
            crate::telemetry::Outbox::open(
                self.telemetry_dir(),
                crate::telemetry::DEFAULT_OUTBOX_CAP_BYTES,
            )?
            .discard_all()?
        } else {
            0
        };
        Ok(ForgottenDevice {
            desired_state,
            telemetry_batches,
        })
    }

    /// Stores a fresh enrollment: identity first, the enrollment record last,
    /// so a crash midway leaves an unenrolled state dir.
    pub fn save_enrollment(
        &self,
        enrollment: &Enrollment,
        identity: &Identity,
    ) -> anyhow::Result<()> {
        self.create()?;
        self.save_identity(identity)?;
        let json = serde_json::to_vec_pretty(enrollment)?;
        edgefleet_pki::write_private_file(&self.enrollment_path(), &json)?;
        Ok(())
    }

    /// Replaces the key and certificate (renewal). Writes `*.next` files
    /// first and renames them, so a crash never pairs a key with another
    /// key's certificate: [`StateDir::load`] finishes an interrupted swap.
    pub fn save_identity(&self, identity: &Identity) -> anyhow::Result<()> {
        let _identity = self.lock_identity_files()?;
        let next_key = self.key_path().with_extension("key.next");
        let next_cert = self.certificate_path().with_extension("crt.next");
        edgefleet_pki::write_private_file(&self.ca_path(), identity.ca_pem.as_bytes())?;
        edgefleet_pki::write_private_file(&next_key, identity.key_pem.as_bytes())?;
        edgefleet_pki::write_private_file(&next_cert, identity.certificate_pem.as_bytes())?;
        self.finish_identity_swap()
    }

    fn finish_identity_swap(&self) -> anyhow::Result<()> {
        let next_key = self.key_path().with_extension("key.next");
        let next_cert = self.certificate_path().with_extension("crt.next");
        if next_key.exists() && next_cert.exists() {
            std::fs::rename(&next_key, self.key_path()).context("cannot install the new key")?;
            std::fs::rename(&next_cert, self.certificate_path())
                .context("cannot install the new certificate")?;
        } else if next_cert.exists() {
            // The key was renamed; the certificate was not yet.
            std::fs::rename(&next_cert, self.certificate_path())
                .context("cannot install the new certificate")?;
        } else if next_key.exists() {
            // The certificate never got written: this renewal did not happen.
            let _ = std::fs::remove_file(&next_key);
        }
        Ok(())
    }

    /// Reads the enrollment and identity; a clear error when not enrolled.
    pub fn load(&self) -> anyhow::Result<(Enrollment, Identity)> {
        self.check_enrolled()?;
        let _identity = self.lock_identity_files()?;
        self.finish_identity_swap()?;
        let read = |path: PathBuf| {
            std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))
        };
        let enrollment: Enrollment = serde_json::from_str(&read(self.enrollment_path())?)
            .with_context(|| format!("{} is corrupt", self.enrollment_path().display()))?;
        let identity = Identity {
            key_pem: read(self.key_path())?,
            certificate_pem: read(self.certificate_path())?,
            ca_pem: read(self.ca_path())?,
        };
        Ok((enrollment, identity))
    }
}

/// Held (with `identity.lock`) while the identity files are written or
/// read: a `load` on one task (a model download), or in another process,
/// must not see a renewal half-written (only `device.key.next`), take it for
/// one a crash interrupted and undo it while the renewal goes on to install
/// its certificate beside the old key.
static IDENTITY_FILES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Opens (creating it, 0600) a lock file. Never truncated or deleted.
fn open_lock_file(path: &Path) -> anyhow::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn identity(tag: &str) -> Identity {
        Identity {
            key_pem: format!("key-{tag}"),
            certificate_pem: format!("cert-{tag}"),
            ca_pem: "ca".into(),
        }
    }

    #[test]
    fn enrollment_round_trips_with_private_files() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(&dir.path().join("state"));
        assert!(state.load().is_err());
        let enrollment = Enrollment {
            device_id: "dev-1".into(),
            server_url: "https://cp:7443".into(),
            labels: [("region".to_string(), "eu".to_string())].into(),
            enrolled_unix_ms: 5,
        };
        state.save_enrollment(&enrollment, &identity("a")).unwrap();
        let (loaded, id) = state.load().unwrap();
        assert_eq!(loaded, enrollment);
        assert_eq!(id.key_pem, "key-a");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(state.key_path())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    fn unlabelled_enrollment() -> Enrollment {
        Enrollment {
            device_id: "dev-1".into(),
            server_url: "https://cp:7443".into(),
            labels: Default::default(),
            enrolled_unix_ms: 5,
        }
    }

    /// Renewals on one thread while another loads the identity (as the
    /// session renews while a download reads it): every load sees a key
    /// with its own certificate, and so does the state left at the end.
    #[test]
    fn loads_during_renewals_never_pair_a_key_with_another_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        state
            .save_enrollment(&unlabelled_enrollment(), &identity("0"))
            .unwrap();
        let paired = |id: &Identity| {
            id.key_pem.strip_prefix("key-") == id.certificate_pem.strip_prefix("cert-")
        };
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let loads = scope.spawn(|| {
                let mut mismatched = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (_, id) = state.load().unwrap();
                    mismatched += usize::from(!paired(&id));
                }
                mismatched
            });
            for i in 1..=300 {
                state.save_identity(&identity(&i.to_string())).unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            assert_eq!(loads.join().unwrap(), 0, "loads saw mismatched pairs");
        });
        let (_, id) = state.load().unwrap();
        assert!(paired(&id), "{} with {}", id.key_pem, id.certificate_pem);
        assert_eq!(id.key_pem, "key-300");
    }

    /// Another process (here another open of the lock file: an `flock` is
    /// held per open file, as by another process) is renewing: it holds
    /// `identity.lock` and has written only the new key. A load waits for
    /// it instead of taking the renewal for one a crash interrupted and
    /// undoing it, which would leave the old key beside the new certificate.
    #[test]
    fn a_load_waits_for_a_renewal_under_way_in_another_process() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        state
            .save_enrollment(&unlabelled_enrollment(), &identity("a"))
            .unwrap();
        let other = open_lock_file(&dir.path().join(IDENTITY_LOCK_FILE)).unwrap();
        other.lock().unwrap();
        std::fs::write(state.key_path().with_extension("key.next"), "key-b").unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            let state = &state;
            scope.spawn(move || sender.send(state.load().map(|(_, id)| id)).unwrap());
            // A load that does not wait answers now (and has undone the
            // renewal); one that waits answers only once the lock is free,
            // whatever this wait.
            let early = receiver.recv_timeout(Duration::from_millis(500)).ok();
            // The other process finishes its renewal and lets go.
            std::fs::write(
                state.certificate_path().with_extension("crt.next"),
                "cert-b",
            )
            .unwrap();
            state.finish_identity_swap().unwrap();
            drop(other);
            let loaded = early.unwrap_or_else(|| receiver.recv().unwrap()).unwrap();
            assert_eq!(
                (loaded.key_pem.as_str(), loaded.certificate_pem.as_str()),
                ("key-b", "cert-b")
            );
        });
        let (_, id) = state.load().unwrap();
        assert_eq!(
            (id.key_pem.as_str(), id.certificate_pem.as_str()),
            ("key-b", "cert-b")
        );
    }

    /// What a state dir holds for the device it was enrolled as goes before
    /// a new enrollment; the model cache stays.
    #[test]
    fn a_new_enrollment_forgets_the_previous_devices_state() {
        use crate::telemetry::{DEFAULT_OUTBOX_CAP_BYTES, Outbox};
        use edgefleet_proto::edgefleet::v1::TelemetryBatch;

        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        // Nothing there yet (a first enrollment): nothing to forget.
        assert_eq!(
            state.forget_previous_device().unwrap(),
            ForgottenDevice {
                desired_state: false,
                telemetry_batches: 0
            }
        );
        state
            .save_enrollment(&unlabelled_enrollment(), &identity("a"))
            .unwrap();
        state.save_release_key(&[7; 32]).unwrap();
        std::fs::write(state.desired_path(), b"\x08\x05").unwrap();
        std::fs::write(state.blobs_dir().join("ab.partial"), b"part").unwrap();
        let installed = state.models_dir().join("mlp/1/model.onnx");
        std::fs::create_dir_all(installed.parent().unwrap()).unwrap();
        std::fs::write(&installed, b"onnx").unwrap();
        {
            let mut outbox = Outbox::open(state.telemetry_dir(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
            for _ in 0..3 {
                outbox.push(TelemetryBatch::default()).unwrap();
            }
            // The Welcome of a new device, then an ack.
            outbox.ack(0).unwrap();
            outbox.ack(1).unwrap();
        }

        assert_eq!(
            state.forget_previous_device().unwrap(),
            ForgottenDevice {
                desired_state: true,
                telemetry_batches: 2
            }
        );
        assert!(!state.desired_path().exists());
        assert!(!state.blobs_dir().exists());
        assert_eq!(state.release_key().unwrap(), None);
        assert!(installed.exists(), "the model cache stays");
        // The queue is empty and numbers from 1 again, at once and after a
        // reopen (its state is valid: not taken for a lost one).
        let mut outbox = Outbox::open(state.telemetry_dir(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
        assert!(outbox.is_empty());
        assert_eq!(outbox.last_sequence(), 0);
        assert_eq!(outbox.push(TelemetryBatch::default()).unwrap(), 1);
    }

    #[test]
    fn a_second_agent_on_the_same_state_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let first = state.lock_agent().unwrap();
        // Another open of the lock file, as another process's.
        let err = StateDir::new(dir.path()).lock_agent().unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("another edgefleet-agent holds")
                && text.contains(&dir.path().display().to_string()),
            "{text}"
        );
        drop(first);
        let _again = state.lock_agent().unwrap();
    }

    #[test]
    fn an_interrupted_renewal_is_finished_or_undone() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        state
            .save_enrollment(&unlabelled_enrollment(), &identity("a"))
            .unwrap();
        // Crash after writing only the new key: the old pair stays.
        std::fs::write(state.key_path().with_extension("key.next"), "key-b").unwrap();
        let (_, id) = state.load().unwrap();
        assert_eq!(
            (id.key_pem.as_str(), id.certificate_pem.as_str()),
            ("key-a", "cert-a")
        );
        // Crash after renaming the key but not the certificate: finish it.
        std::fs::write(state.key_path(), "key-c").unwrap();
        std::fs::write(
            state.certificate_path().with_extension("crt.next"),
            "cert-c",
        )
        .unwrap();
        let (_, id) = state.load().unwrap();
        assert_eq!(
            (id.key_pem.as_str(), id.certificate_pem.as_str()),
            ("key-c", "cert-c")
        );
    }
}

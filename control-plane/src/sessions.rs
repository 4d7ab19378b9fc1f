//! The agent sessions this replica holds: one per device. A new session of a
//! device replaces the older one (which ends with ABORTED); revoking a device
//! ends its session with PERMISSION_DENIED, and its blob downloads in
//! progress too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use edgefleet_proto::edgefleet::v1::ControlMessage;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// What goes down a session stream.
pub type Outbound = mpsc::Sender<Result<ControlMessage, Status>>;

#[derive(Debug)]
struct Entry {
    id: u64,
    outbound: Outbound,
    cancel: CancellationToken,
    poke: Arc<Notify>,
    sent_generation: Arc<AtomicU64>,
}

/// A session's `sent_generation` before it has sent a desired state.
pub const NOTHING_SENT: u64 = u64::MAX;

#[derive(Debug, Default)]
pub struct Sessions {
    next_id: AtomicU64,
    live: Mutex<HashMap<String, Entry>>,
    downloads: Arc<Downloads>,
    /// The sessions' tasks: a stopping server waits for them (each ends
    /// with a write, its device's last-seen time) before the writers they
    /// write through are dropped with the runtime.
    pub tasks: tokio_util::task::TaskTracker,
}

/// Blob downloads in progress on this replica, by device: a revocation
/// cancels them.
#[derive(Debug, Default)]
struct Downloads {
    next_id: AtomicU64,
    live: Mutex<HashMap<String, HashMap<u64, CancellationToken>>>,
}

/// A registered download; unregisters itself when dropped (the download's
/// stream owns it).
#[derive(Debug)]
pub struct DownloadGuard {
    downloads: Arc<Downloads>,
    device_id: String,
    id: u64,
    /// Cancelled when the device is revoked.
    pub revoked: CancellationToken,
}

impl DownloadGuard {
    pub fn device_id(&self) -> &str {
        &self.device_id
    }
}

impl Drop for DownloadGuard {
    fn drop(&mut self) {
        let mut live = self
            .downloads
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(device) = live.get_mut(&self.device_id) {
            device.remove(&self.id);
            if device.is_empty() {
                live.remove(&self.device_id);
            }
        }
    }
}

/// A registered session; unregisters itself when dropped.
#[derive(Debug)]
pub struct SessionGuard<'a> {
    sessions: &'a Sessions,
    device_id: String,
    id: u64,
    pub cancel: CancellationToken,
    /// Woken when the device's desired state changed (and once at
    /// registration: the session sends its desired state first thing).
    pub poke: Arc<Notify>,
    /// The generation of the desired state the session sent last
    /// ([`NOTHING_SENT`] before the first): what
    /// [`Sessions::sent_generations`] compares with the database's.
    pub sent_generation: Arc<AtomicU64>,
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        let mut live = self.sessions.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.get(&self.device_id).is_some_and(|e| e.id == self.id) {
            live.remove(&self.device_id);
        }
    }
}

impl Sessions {
    /// Registers the session of `device_id`, ending any older one.
    pub fn register(&self, device_id: &str, outbound: Outbound) -> SessionGuard<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        let poke = Arc::new(Notify::new());
        poke.notify_one();
        let sent_generation = Arc::new(AtomicU64::new(NOTHING_SENT));
        let previous = self.live.lock().unwrap_or_else(|e| e.into_inner()).insert(
            device_id.to_string(),
            Entry {
                id,
                outbound,
                cancel: cancel.clone(),
                poke: Arc::clone(&poke),
                sent_generation: Arc::clone(&sent_generation),
            },
        );
        if let Some(previous) = previous {
            end(
                previous,
                Status::aborted("a newer session of this device replaced this one"),
            );
        }
        SessionGuard {
            sessions: self,
            device_id: device_id.to_string(),
            id,
            cancel,
            poke,
            sent_generation,
        }
    }

    /// Each session's device and the generation of the desired state it
    /// sent last ([`NOTHING_SENT`] before the first).
    pub fn sent_generations(&self) -> Vec<(String, u64)> {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(device, entry)| {
                (
                    device.clone(),
                    entry.sent_generation.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// Tells the device's session (if this replica holds it) to resend its
    /// desired state.
    pub fn poke(&self, device_id: &str) {
        if let Some(entry) = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(device_id)
        {
            entry.poke.notify_one();
        }
    }

    /// Registers a blob download of `device_id`, so that revoking the device
    /// ends it ([`Sessions::revoke`]).
    pub fn register_download(&self, device_id: &str) -> DownloadGuard {
        let id = self.downloads.next_id.fetch_add(1, Ordering::Relaxed);
        let revoked = CancellationToken::new();
        self.downloads
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(device_id.to_string())
            .or_default()
            .insert(id, revoked.clone());
        DownloadGuard {
            downloads: Arc::clone(&self.downloads),
            device_id: device_id.to_string(),
            id,
            revoked,
        }
    }

    /// Ends what a revoked device holds on this replica: its session, with
    /// PERMISSION_DENIED, and its blob downloads in progress. True if it
    /// had a session here.
    pub fn revoke(&self, device_id: &str) -> bool {
        let downloads = self
            .downloads
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(device_id);
        for revoked in downloads.into_iter().flat_map(HashMap::into_values) {
            revoked.cancel();
        }
        self.end(
            device_id,
            Status::permission_denied(format!("device {device_id} has been revoked")),
        )
    }

    /// Ends the device's session, if this replica holds one, with `status`.
    pub fn end(&self, device_id: &str, status: Status) -> bool {
        let entry = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(device_id);
        match entry {
            Some(entry) => {
                end(entry, status);
                true
            }
            None => false,
        }
    }

    /// Ends every session (server shutdown), so no long-lived stream holds
    /// the listener's graceful shutdown open.
    pub fn end_all(&self, status: Status) {
        let entries: Vec<Entry> = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, entry)| entry)
            .collect();
        for entry in entries {
            end(entry, status.clone());
        }
    }

    pub fn is_online(&self, device_id: &str) -> bool {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(device_id)
    }

    pub fn count(&self) -> usize {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

fn end(entry: Entry, status: Status) {
    // The stream ends with this status; if the buffer is full the cancel
    // still stops the session loop, which drops the stream.
    let _ = entry.outbound.try_send(Err(status));
    entry.cancel.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_session_replaces_the_old_one() {
        let sessions = Sessions::default();
        let (tx1, mut rx1) = mpsc::channel(4);
        let first = sessions.register("d", tx1);
        let (tx2, _rx2) = mpsc::channel(4);
        let second = sessions.register("d", tx2);
        assert!(first.cancel.is_cancelled());
        let status = rx1.recv().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Aborted);
        drop(first);
        assert!(
            sessions.is_online("d"),
            "dropping the replaced session must not unregister the new one"
        );
        drop(second);
        assert!(!sessions.is_online("d"));
    }

    #[tokio::test]
    async fn revoking_a_device_ends_its_session_and_its_downloads_only() {
        let sessions = Sessions::default();
        let (tx, mut rx) = mpsc::channel(4);
        let guard = sessions.register("d", tx);
        let first = sessions.register_download("d");
        let second = sessions.register_download("d");
        let other = sessions.register_download("e");
        drop(second);
        assert!(sessions.revoke("d"));
        assert!(guard.cancel.is_cancelled());
        assert!(first.revoked.is_cancelled());
        assert!(!other.revoked.is_cancelled());
        assert_eq!(
            rx.recv().await.unwrap().unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        // A download without a session is ended all the same.
        let later = sessions.register_download("e");
        assert!(!sessions.revoke("e"));
        assert!(other.revoked.is_cancelled() && later.revoked.is_cancelled());
        drop((first, other, later));
        assert!(sessions.downloads.live.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn ending_a_session_sends_the_status() {
        let sessions = Sessions::default();
        let (tx, mut rx) = mpsc::channel(4);
        let guard = sessions.register("d", tx);
        assert!(sessions.end("d", Status::permission_denied("revoked")));
        assert!(guard.cancel.is_cancelled());
        assert_eq!(
            rx.recv().await.unwrap().unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert!(!sessions.end("d", Status::permission_denied("revoked")));
    }
}

//! Group commit of telemetry: sessions hand batches to one dispatcher task,
//! which stores whatever has queued up in one transaction. Under load many
//! devices' batches share a commit; when idle a batch is written at once. A
//! grouped upload (`TelemetryUpload`) enters the queue as one item, so its
//! batches always share a transaction.
//!
//! Up to [`WRITERS`] groups are in flight at a time, so the next group's
//! statements run while the previous one waits for its commit to reach the
//! disk (on PostgreSQL a commit is an fsync of the WAL, milliseconds on this
//! class of machine). The stores keep concurrent calls correct: a (device,
//! sequence) is stored once, and device totals add up whatever the order.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::store::{Store, TelemetryRecord};

/// Most batches stored in one transaction (a single upload larger than this
/// is still stored whole, in one).
pub const MAX_GROUP: usize = 500;

/// Groups being stored at the same time: two, so one group's commit (an
/// fsync) overlaps the next group's statements. More would only add lock
/// waits: the stores serialize the device-row updates of a group.
pub const WRITERS: usize = 2;

/// Telemetry one session may hold in memory, received and not yet stored
/// (as decoded: [`TelemetryRecord::approx_bytes`]), before it stops reading
/// from its device until some is stored. A message may be small on the wire
/// and large decoded (a histogram bucket is a byte or two as a varint and
/// eight in memory): without a bound, a device could fill the server's
/// memory faster than the store drains it.
pub const SESSION_PENDING_BYTES: usize = 32 * 1024 * 1024;
/// The same bound for all the sessions of this replica together (sessions
/// replaced by a reconnect drain what they hold, so a device reconnecting
/// over and over is bounded here).
pub const REPLICA_PENDING_BYTES: usize = 256 * 1024 * 1024;

/// Per batch: `true` if new, `false` if it was a duplicate.
type Reply = oneshot::Sender<Result<Vec<bool>, String>>;

/// Handle to the writer task.
#[derive(Debug, Clone)]
pub struct Ingester {
    queue: mpsc::Sender<(Vec<TelemetryRecord>, Reply)>,
    /// What sessions hold for it (see [`SESSION_PENDING_BYTES`]).
    pub pending: PendingTelemetry,
}

/// Telemetry held in memory between a session receiving it and the store
/// committing it, per session and for the replica, against their limits.
#[derive(Debug, Clone)]
pub struct PendingTelemetry {
    replica: Arc<ReplicaHeld>,
    session_limit: usize,
    replica_limit: usize,
}

#[derive(Debug, Default)]
struct ReplicaHeld {
    bytes: AtomicUsize,
    /// Woken whenever held bytes are given back: a session that stopped for
    /// the replica's limit reads again as soon as there is room.
    released: tokio::sync::Notify,
}

/// Bytes a session holds for the store; given back when dropped (stored,
/// failed, or the session gone).
#[derive(Debug)]
pub struct HeldTelemetry {
    session: Arc<AtomicUsize>,
    replica: Arc<ReplicaHeld>,
    bytes: usize,
}

impl Drop for HeldTelemetry {
    fn drop(&mut self) {
        self.session.fetch_sub(self.bytes, Ordering::Relaxed);
        self.replica.bytes.fetch_sub(self.bytes, Ordering::Relaxed);
        self.replica.released.notify_waiters();
    }
}

impl PendingTelemetry {
    pub fn new(session_limit: usize, replica_limit: usize) -> PendingTelemetry {
        PendingTelemetry {
            replica: Arc::default(),
            session_limit,
            replica_limit,
        }
    }

    /// Whether a session holding `session` bytes may read another message.
    pub fn may_receive(&self, session: &AtomicUsize) -> bool {
        session.load(Ordering::Relaxed) < self.session_limit
            && self.replica_bytes() < self.replica_limit
    }

    /// Resolves the next time any session gives held bytes back.
    pub async fn released(&self) {
        self.replica.released.notified().await;
    }

    /// Counts `bytes` a session received as held, until the result drops.
    pub fn hold(&self, session: &Arc<AtomicUsize>, bytes: usize) -> HeldTelemetry {
        session.fetch_add(bytes, Ordering::Relaxed);
        self.replica.bytes.fetch_add(bytes, Ordering::Relaxed);
        HeldTelemetry {
            session: Arc::clone(session),
            replica: Arc::clone(&self.replica),
            bytes,
        }
    }

    /// Bytes all sessions of this replica hold.
    pub fn replica_bytes(&self) -> usize {
        self.replica.bytes.load(Ordering::Relaxed)
    }
}

impl Ingester {
    pub fn start(store: Arc<dyn Store>, metrics: Arc<crate::metrics::ServerMetrics>) -> Ingester {
        let (queue, receiver) = mpsc::channel(MAX_GROUP * 8);
        tokio::spawn(dispatch_loop(store, receiver, metrics));
        Ingester {
            queue,
            pending: PendingTelemetry::new(SESSION_PENDING_BYTES, REPLICA_PENDING_BYTES),
        }
    }

    /// Stores one batch; `Ok(true)` if new, `Ok(false)` if it was a
    /// duplicate. Resolves once it is committed.
    pub async fn store(&self, record: TelemetryRecord) -> Result<bool, String> {
        let stored = self.store_all(vec![record]).await?;
        Ok(stored.first().copied().unwrap_or(false))
    }

    /// Stores several batches in one transaction; per batch `true` if new,
    /// `false` if it was a duplicate. Resolves once they are committed.
    pub async fn store_all(&self, records: Vec<TelemetryRecord>) -> Result<Vec<bool>, String> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        fn stopped<E>(_: E) -> String {
            tracing::error!("cannot store telemetry: the telemetry writer has stopped");
            "the telemetry writer has stopped".to_string()
        }
        let (reply, done) = oneshot::channel();
        self.queue.send((records, reply)).await.map_err(stopped)?;
        done.await.map_err(stopped)?
    }
}

/// Forms a group as soon as a writer is free (so under load the queue fills
/// up and groups grow to [`MAX_GROUP`]) and stores it on a task of its own.
async fn dispatch_loop(
    store: Arc<dyn Store>,
    mut receiver: mpsc::Receiver<(Vec<TelemetryRecord>, Reply)>,
    metrics: Arc<crate::metrics::ServerMetrics>,
) {
    let writers = Arc::new(Semaphore::new(WRITERS));
    loop {
        // The semaphore is never closed.
        let Ok(writer) = Arc::clone(&writers).acquire_owned().await else {
            break;
        };
        let Some((group, reply)) = receiver.recv().await else {
            break;
        };
        let mut records = Vec::with_capacity(MAX_GROUP.max(group.len()));
        // Each waiting sender and how many of `records` are its own.
        let mut replies: Vec<(Reply, usize)> = Vec::new();
        replies.push((reply, group.len()));
        records.extend(group);
        while records.len() < MAX_GROUP {
            match receiver.try_recv() {
                Ok((group, reply)) => {
                    replies.push((reply, group.len()));
                    records.extend(group);
                }
                Err(_) => break,
            }
        }
        let store = Arc::clone(&store);
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            write_group(&*store, &records, replies, &metrics).await;
            drop(writer);
        });
    }
}

async fn write_group(
    store: &dyn Store,
    records: &[TelemetryRecord],
    replies: Vec<(Reply, usize)>,
    metrics: &crate::metrics::ServerMetrics,
) {
    match store.ingest_telemetry(records).await {
        Ok(stored) => {
            let mut stored = stored.into_iter();
            for (reply, n) in replies {
                let news: Vec<bool> = stored.by_ref().take(n).collect();
                for &new in &news {
                    if new {
                        metrics.telemetry_batches.inc();
                    } else {
                        metrics.telemetry_duplicates.inc();
                    }
                }
                let _ = reply.send(Ok(news));
            }
        }
        Err(err) => {
            tracing::error!(error = %err, batches = records.len(), "cannot store telemetry; agents will resend");
            let message = format!("cannot store telemetry: {err}");
            for (reply, _) in replies {
                let _ = reply.send(Err(message.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{JoinToken, NewDevice, TelemetryRecord};

    /// A session holding its limit stops reading until something it holds
    /// is stored; all sessions together stop at the replica's limit; what
    /// is given back opens them again.
    #[test]
    fn sessions_stop_reading_at_their_limit_and_the_replicas() {
        let pending = PendingTelemetry::new(100, 250);
        let (a, b, c) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let first = pending.hold(&a, 60);
        assert!(pending.may_receive(&a));
        let second = pending.hold(&a, 60);
        assert!(!pending.may_receive(&a), "a holds 120 of its 100");
        assert!(pending.may_receive(&b));
        drop(first);
        assert!(pending.may_receive(&a), "a holds 60 again");
        let held_b = pending.hold(&b, 99);
        let held_c = pending.hold(&c, 99);
        assert_eq!(pending.replica_bytes(), 258);
        assert!(!pending.may_receive(&c), "the replica holds 258 of its 250");
        assert!(!pending.may_receive(&Arc::new(AtomicUsize::new(0))));
        drop(second);
        assert!(pending.may_receive(&c));
        drop((held_b, held_c));
        assert_eq!(pending.replica_bytes(), 0);
        assert_eq!(a.load(Ordering::Relaxed), 0);
    }

    /// A session waiting for room is woken when another gives bytes back.
    #[tokio::test]
    async fn giving_bytes_back_wakes_a_session_waiting_for_room() {
        let pending = PendingTelemetry::new(100, 100);
        let other = Arc::new(AtomicUsize::new(0));
        let held = pending.hold(&other, 150);
        let waiting = pending.clone();
        let woken = tokio::spawn(async move { waiting.released().await });
        tokio::task::yield_now().await;
        assert!(!woken.is_finished());
        drop(held);
        tokio::time::timeout(std::time::Duration::from_secs(5), woken)
            .await
            .expect("woken")
            .unwrap();
        assert!(pending.may_receive(&AtomicUsize::new(0)));
    }

    /// A message small on the wire can be large decoded: a histogram of
    /// zero counts is a byte per bucket encoded and eight in memory. The
    /// estimate sees the eight.
    #[test]
    fn a_record_counts_what_it_holds_decoded() {
        use edgefleet_proto::edgefleet::v1::LogHistogram;
        let sample = |buckets: usize| crate::store::ModelSample {
            name: "m".into(),
            latency_us: LogHistogram {
                counts: vec![0; buckets],
                ..Default::default()
            },
            ..Default::default()
        };
        let record = |buckets: usize| TelemetryRecord {
            device_id: "d".into(),
            models: vec![sample(buckets); 16],
            ..Default::default()
        };
        let small = record(10).approx_bytes();
        let large = record(4096).approx_bytes();
        assert!(large >= 16 * 4096 * 8, "{large}");
        assert!(small < 16 * 1024, "{small}");
    }

    /// Many sessions at once, each sending every batch twice: with groups
    /// stored concurrently, each batch is stored once, reported new exactly
    /// once, and the device totals add up. (SQLite here; the store tests run
    /// concurrent calls on PostgreSQL too.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_senders_store_each_batch_once() {
        const DEVICES: usize = 40;
        const BATCHES: u64 = 30;
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::sqlite::open_file(&dir.path().join("edgefleet.db"))
            .await
            .unwrap();
        let token = JoinToken {
            id: "t".into(),
            secret_hash: "h".into(),
            labels: Default::default(),
            created_at: 0,
            expires_at: i64::MAX,
            uses_left: DEVICES as u32,
            created_by: "test".into(),
            revoked_at: None,
        };
        store.insert_join_token(&token).await.unwrap();
        for d in 0..DEVICES {
            let device = NewDevice {
                id: format!("d{d}"),
                inventory: Default::default(),
                enrolled_at: 1,
                certificate_serial: format!("{d:x}"),
                certificate_expires_at: i64::MAX,
            };
            store
                .enroll_device("t", "h", &device)
                .await
                .unwrap()
                .unwrap();
        }
        let ingester = Ingester::start(Arc::clone(&store), crate::metrics::ServerMetrics::new());
        let mut senders = tokio::task::JoinSet::new();
        for d in 0..DEVICES {
            for copy in 0..2 {
                let ingester = ingester.clone();
                senders.spawn(async move {
                    let mut new = 0;
                    for sequence in 1..=BATCHES {
                        let record = TelemetryRecord {
                            device_id: format!("d{d}"),
                            sequence,
                            received_at: sequence as i64 * 10_000 + copy,
                            start_at: sequence as i64 * 10_000,
                            end_at: sequence as i64 * 10_000 + 10_000,
                            models: vec![crate::store::ModelSample {
                                name: "m".into(),
                                version: 1,
                                requests: 1,
                                ..Default::default()
                            }],
                            ..Default::default()
                        };
                        if ingester.store(record).await.unwrap() {
                            new += 1;
                        }
                    }
                    new
                });
            }
        }
        let mut new = 0;
        while let Some(done) = senders.join_next().await {
            new += done.unwrap();
        }
        assert_eq!(
            new,
            DEVICES as u64 * BATCHES,
            "each batch reported new once"
        );
        for d in 0..DEVICES {
            let id = format!("d{d}");
            let sequences = store.telemetry_sequences(&id).await.unwrap();
            assert_eq!(sequences, (1..=BATCHES).collect::<Vec<_>>());
            let device = store.device(&id).await.unwrap().unwrap();
            assert_eq!(
                (device.requests_total, device.last_sequence),
                (BATCHES, BATCHES)
            );
        }
    }
}

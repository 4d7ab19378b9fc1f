//! Group commit for the activation steps devices report. A rollout's devices
//! report each step (DOWNLOADING, VERIFYING, ACTIVE, …) at about the same
//! time; a transaction per report queued them all for the store's writer
//! (SQLite has one connection, and every commit is an fsync). One task
//! stores, in one transaction, every report that queued while the previous
//! group was being written, up to [`MAX_GROUP`].

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::store::Store;
use crate::store::registry::ActivationRecord;

/// Most reports in one transaction.
pub const MAX_GROUP: usize = 256;

type Reply = oneshot::Sender<Result<(), String>>;

/// Handle to the writer task.
#[derive(Debug, Clone)]
pub struct ActivationWriter {
    queue: mpsc::Sender<(ActivationRecord, Reply)>,
}

impl ActivationWriter {
    /// Starts the writer task on the current runtime.
    pub fn start(store: Arc<dyn Store>) -> ActivationWriter {
        let (queue, receiver) = mpsc::channel(MAX_GROUP * 4);
        tokio::spawn(write_loop(store, receiver));
        ActivationWriter { queue }
    }

    /// Stores one report; resolves once it is committed (with the rest of
    /// its group), or with the store's error if the group could not be.
    pub async fn record(&self, record: ActivationRecord) -> Result<(), String> {
        fn stopped<E>(_: E) -> String {
            tracing::error!("cannot store an activation step: the activation writer has stopped");
            "the activation writer has stopped".to_string()
        }
        let (reply, done) = oneshot::channel();
        self.queue.send((record, reply)).await.map_err(stopped)?;
        done.await.map_err(stopped)?
    }
}

/// Takes what has queued, stores it, answers every sender; until every
/// handle is gone.
async fn write_loop(
    store: Arc<dyn Store>,
    mut receiver: mpsc::Receiver<(ActivationRecord, Reply)>,
) {
    let mut queued = Vec::with_capacity(MAX_GROUP);
    while receiver.recv_many(&mut queued, MAX_GROUP).await > 0 {
        let (records, replies): (Vec<ActivationRecord>, Vec<Reply>) = queued.drain(..).unzip();
        let stored = store
            .record_activations(&records)
            .await
            .map_err(|err| err.to_string());
        for reply in replies {
            // A sender whose session ended meanwhile no longer waits.
            let _ = reply.send(stored.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(device: usize) -> ActivationRecord {
        ActivationRecord {
            device_id: format!("dev-{device:04}"),
            name: "m".into(),
            version: 1,
            stage: "ACTIVE".into(),
            reason: String::new(),
            at: 1_700_000_000_000,
            generation: 1,
            reported_ms: 1_700_000_000_000,
        }
    }

    /// Reports sent at once from many sessions are each answered once
    /// stored, and all of them are.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_sent_together_are_all_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::open(None, dir.path()).await.unwrap();
        let writer = ActivationWriter::start(Arc::clone(&store));
        let devices = MAX_GROUP * 2 + 7;
        let sent: Vec<_> = (0..devices)
            .map(|device| {
                let writer = writer.clone();
                tokio::spawn(async move { writer.record(report(device)).await })
            })
            .collect();
        for answer in sent {
            answer.await.unwrap().unwrap();
        }
        let stored = store.activations("m", 1).await.unwrap();
        assert_eq!(stored, (0..devices).map(report).collect::<Vec<_>>());
    }

    /// A group the store cannot commit answers each of its senders with
    /// the store's error; the writer keeps going.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_group_answers_every_sender_with_the_error() {
        use sqlx::Connection as _;
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::open(None, dir.path()).await.unwrap();
        let writer = ActivationWriter::start(Arc::clone(&store));
        writer.record(report(0)).await.unwrap();
        let url = format!("sqlite://{}", dir.path().join("edgefleet.db").display());
        let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query("ALTER TABLE activations RENAME TO moved")
            .execute(&mut db)
            .await
            .unwrap();
        let sent: Vec<_> = (1..40)
            .map(|device| {
                let writer = writer.clone();
                tokio::spawn(async move { writer.record(report(device)).await })
            })
            .collect();
        for answer in sent {
            let error = answer.await.unwrap().unwrap_err();
            assert!(error.contains("activations"), "{error}");
        }
        sqlx::query("ALTER TABLE moved RENAME TO activations")
            .execute(&mut db)
            .await
            .unwrap();
        writer.record(report(40)).await.unwrap();
        let stored = store.activations("m", 1).await.unwrap();
        assert_eq!(stored, [report(0), report(40)]);
    }
}

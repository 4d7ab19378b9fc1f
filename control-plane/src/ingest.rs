//! Group commit of telemetry: sessions hand batches to one dispatcher task,
//! which stores whatever has queued up in one transaction. Under load many
//! devices' batches share a commit; when idle a batch is written at once.
//!
//! Up to [`WRITERS`] groups are in flight at a time, so the next group's
//! statements run while the previous one waits for its commit to reach the
//! disk (on PostgreSQL a commit is an fsync of the WAL, milliseconds on this
//! class of machine). The stores keep concurrent calls correct: a (device,
//! sequence) is stored once, and device totals add up whatever the order.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::store::{Store, TelemetryRecord};

/// Most batches stored in one transaction.
pub const MAX_GROUP: usize = 500;

/// Groups being stored at the same time: two, so one group's commit (an
/// fsync) overlaps the next group's statements. More would only add lock
/// waits: the stores serialize the device-row updates of a group.
pub const WRITERS: usize = 2;

type Reply = oneshot::Sender<Result<bool, String>>;

/// Handle to the writer task.
#[derive(Debug, Clone)]
pub struct Ingester {
    queue: mpsc::Sender<(TelemetryRecord, Reply)>,
}

impl Ingester {
    pub fn start(store: Arc<dyn Store>, metrics: Arc<crate::metrics::ServerMetrics>) -> Ingester {
        let (queue, receiver) = mpsc::channel(MAX_GROUP * 8);
        tokio::spawn(dispatch_loop(store, receiver, metrics));
        Ingester { queue }
    }

    /// Stores one batch; `Ok(true)` if new, `Ok(false)` if it was a
    /// duplicate. Resolves once it is committed.
    pub async fn store(&self, record: TelemetryRecord) -> Result<bool, String> {
        let (reply, done) = oneshot::channel();
        self.queue
            .send((record, reply))
            .await
            .map_err(|_| "the telemetry writer has stopped".to_string())?;
        done.await
            .map_err(|_| "the telemetry writer has stopped".to_string())?
    }
}

/// Forms a group as soon as a writer is free (so under load the queue fills
/// up and groups grow to [`MAX_GROUP`]) and stores it on a task of its own.
async fn dispatch_loop(
    store: Arc<dyn Store>,
    mut receiver: mpsc::Receiver<(TelemetryRecord, Reply)>,
    metrics: Arc<crate::metrics::ServerMetrics>,
) {
    let writers = Arc::new(Semaphore::new(WRITERS));
    loop {
        // The semaphore is never closed.
        let Ok(writer) = Arc::clone(&writers).acquire_owned().await else {
            break;
        };
        let Some((record, reply)) = receiver.recv().await else {
            break;
        };
        let mut records = Vec::with_capacity(MAX_GROUP);
        let mut replies = Vec::with_capacity(MAX_GROUP);
        records.push(record);
        replies.push(reply);
        while records.len() < MAX_GROUP {
            match receiver.try_recv() {
                Ok((record, reply)) => {
                    records.push(record);
                    replies.push(reply);
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
    replies: Vec<Reply>,
    metrics: &crate::metrics::ServerMetrics,
) {
    match store.ingest_telemetry(records).await {
        Ok(stored) => {
            for (reply, new) in replies.into_iter().zip(stored) {
                if new {
                    metrics.telemetry_batches.inc();
                } else {
                    metrics.telemetry_duplicates.inc();
                }
                let _ = reply.send(Ok(new));
            }
        }
        Err(err) => {
            tracing::error!(error = %err, batches = records.len(), "cannot store telemetry; agents will resend");
            let message = format!("cannot store telemetry: {err}");
            for reply in replies {
                let _ = reply.send(Err(message.clone()));
            }
        }
    }
}

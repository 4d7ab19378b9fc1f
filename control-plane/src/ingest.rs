//! Group commit of telemetry: sessions hand batches to one writer task, which
//! stores whatever has queued up in one transaction. Under load many devices'
//! batches share a commit; when idle a batch is written at once.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::store::{Store, TelemetryRecord};

/// Most batches stored in one transaction.
pub const MAX_GROUP: usize = 500;

type Reply = oneshot::Sender<Result<bool, String>>;

/// Handle to the writer task.
#[derive(Debug, Clone)]
pub struct Ingester {
    queue: mpsc::Sender<(TelemetryRecord, Reply)>,
}

impl Ingester {
    pub fn start(store: Arc<dyn Store>, metrics: Arc<crate::metrics::ServerMetrics>) -> Ingester {
        let (queue, receiver) = mpsc::channel(MAX_GROUP * 8);
        tokio::spawn(write_loop(store, receiver, metrics));
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

async fn write_loop(
    store: Arc<dyn Store>,
    mut receiver: mpsc::Receiver<(TelemetryRecord, Reply)>,
    metrics: Arc<crate::metrics::ServerMetrics>,
) {
    let mut records = Vec::with_capacity(MAX_GROUP);
    let mut replies = Vec::with_capacity(MAX_GROUP);
    while let Some((record, reply)) = receiver.recv().await {
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
        match store.ingest_telemetry(&records).await {
            Ok(stored) => {
                for (reply, new) in replies.drain(..).zip(stored) {
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
                for reply in replies.drain(..) {
                    let _ = reply.send(Err(message.clone()));
                }
            }
        }
        records.clear();
        replies.clear();
    }
}

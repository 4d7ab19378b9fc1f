//! Group commit of telemetry: sessions hand batches to one writer task, which
//! stores whatever has queued up in one transaction. Under load many devices'
//! batches share a commit; when idle a batch is written at once. A grouped
//! upload (`TelemetryUpload`) enters the queue as one item, so its batches
//! always share a transaction.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::store::{Store, TelemetryRecord};

/// Most batches stored in one transaction (a single upload larger than this
/// is still stored whole, in one).
pub const MAX_GROUP: usize = 500;

/// Per batch: `true` if new, `false` if it was a duplicate.
type Reply = oneshot::Sender<Result<Vec<bool>, String>>;

/// Handle to the writer task.
#[derive(Debug, Clone)]
pub struct Ingester {
    queue: mpsc::Sender<(Vec<TelemetryRecord>, Reply)>,
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
        let stored = self.store_all(vec![record]).await?;
        Ok(stored.first().copied().unwrap_or(false))
    }

    /// Stores several batches in one transaction; per batch `true` if new,
    /// `false` if it was a duplicate. Resolves once they are committed.
    pub async fn store_all(&self, records: Vec<TelemetryRecord>) -> Result<Vec<bool>, String> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, done) = oneshot::channel();
        self.queue
            .send((records, reply))
            .await
            .map_err(|_| "the telemetry writer has stopped".to_string())?;
        done.await
            .map_err(|_| "the telemetry writer has stopped".to_string())?
    }
}

async fn write_loop(
    store: Arc<dyn Store>,
    mut receiver: mpsc::Receiver<(Vec<TelemetryRecord>, Reply)>,
    metrics: Arc<crate::metrics::ServerMetrics>,
) {
    let mut records = Vec::with_capacity(MAX_GROUP);
    // Each waiting sender and how many of `records` are its own.
    let mut replies: Vec<(Reply, usize)> = Vec::new();
    while let Some((group, reply)) = receiver.recv().await {
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
        match store.ingest_telemetry(&records).await {
            Ok(stored) => {
                let mut stored = stored.into_iter();
                for (reply, n) in replies.drain(..) {
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
                for (reply, _) in replies.drain(..) {
                    let _ = reply.send(Err(message.clone()));
                }
            }
        }
        records.clear();
    }
}

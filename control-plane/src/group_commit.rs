//! Group commit for writes many sessions make at about the same time: a
//! rollout's devices report each activation step (DOWNLOADING, VERIFYING,
//! ACTIVE, …) together, every device's heartbeat moves its last-seen
//! time, and a restarted control plane has every device's Hello at once.
//! A transaction per write queued them all for the store's writer (SQLite
//! has one connection, and every commit is an fsync). One task per
//! kind of write stores, in one transaction, every item that queued while
//! the previous group was being written, up to [`MAX_GROUP`], and answers
//! each sender once its item is committed.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::metrics::{KindLabels, ServerMetrics};
use crate::store::registry::ActivationRecord;
use crate::store::{HelloRecord, Store, StoreError};

/// Most items in one transaction.
pub const MAX_GROUP: usize = 256;

type Reply = oneshot::Sender<Result<(), String>>;

/// Handle to one writer task.
#[derive(Debug)]
pub struct GroupCommit<T> {
    what: &'static str,
    queue: mpsc::Sender<(T, Reply)>,
}

impl<T> Clone for GroupCommit<T> {
    fn clone(&self) -> Self {
        GroupCommit {
            what: self.what,
            queue: self.queue.clone(),
        }
    }
}

impl<T: Send + 'static> GroupCommit<T> {
    /// Starts the writer task on the current runtime: `write` stores a
    /// group in `store` (all or none). `what` names the items in errors;
    /// `kind`, in the `group_commit_*` metrics.
    pub fn start<W, F>(
        what: &'static str,
        kind: &'static str,
        store: &Arc<dyn Store>,
        metrics: &Arc<ServerMetrics>,
        write: W,
    ) -> GroupCommit<T>
    where
        W: Fn(Arc<dyn Store>, Vec<T>) -> F + Send + 'static,
        F: Future<Output = Result<(), StoreError>> + Send + 'static,
    {
        let (queue, receiver) = mpsc::channel(MAX_GROUP * 4);
        let labels = KindLabels { kind: kind.into() };
        tokio::spawn(write_loop(
            Arc::clone(store),
            write,
            receiver,
            Arc::clone(metrics),
            labels,
        ));
        GroupCommit { what, queue }
    }

    /// Stores one item; resolves once it is committed (with the rest of
    /// its group), or with the store's error if the group could not be.
    pub async fn submit(&self, item: T) -> Result<(), String> {
        let stopped = || {
            tracing::error!("cannot store {}: their writer has stopped", self.what);
            format!("the writer of {} has stopped", self.what)
        };
        let (reply, done) = oneshot::channel();
        self.queue
            .send((item, reply))
            .await
            .map_err(|_| stopped())?;
        done.await.map_err(|_| stopped())?
    }
}

/// Takes what has queued, stores it, answers every sender; until every
/// handle is gone.
async fn write_loop<T, W, F>(
    store: Arc<dyn Store>,
    write: W,
    mut receiver: mpsc::Receiver<(T, Reply)>,
    metrics: Arc<ServerMetrics>,
    labels: KindLabels,
) where
    W: Fn(Arc<dyn Store>, Vec<T>) -> F,
    F: Future<Output = Result<(), StoreError>>,
{
    let mut queued = Vec::with_capacity(MAX_GROUP);
    while receiver.recv_many(&mut queued, MAX_GROUP).await > 0 {
        let (items, replies): (Vec<T>, Vec<Reply>) = queued.drain(..).unzip();
        let count = items.len();
        let started = std::time::Instant::now();
        let stored = write(Arc::clone(&store), items)
            .await
            .map_err(|err| err.to_string());
        metrics
            .group_commit_seconds
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        if stored.is_ok() {
            metrics
                .group_commit_items
                .get_or_create(&labels)
                .observe(count as f64);
        } else {
            metrics.group_commit_failures.get_or_create(&labels).inc();
        }
        for reply in replies {
            // A sender whose session ended meanwhile no longer waits.
            let _ = reply.send(stored.clone());
        }
    }
}

/// The writers of a control plane's grouped writes.
#[derive(Debug, Clone)]
pub struct GroupWriters {
    /// Activation steps devices report (`record_activations`).
    pub activations: GroupCommit<ActivationRecord>,
    /// Devices' last-seen times (`touch_devices`): (device id, unix ms).
    pub touches: GroupCommit<(String, i64)>,
    /// What devices say of themselves as their sessions open, and as their
    /// models change (`record_hellos`): a control plane that restarts has
    /// every device's Hello at once.
    pub hellos: GroupCommit<HelloRecord>,
}

impl GroupWriters {
    pub fn start(store: &Arc<dyn Store>, metrics: &Arc<ServerMetrics>) -> GroupWriters {
        GroupWriters {
            activations: GroupCommit::start(
                "activation steps",
                "activation",
                store,
                metrics,
                |store, records: Vec<_>| async move { store.record_activations(&records).await },
            ),
            touches: GroupCommit::start(
                "last-seen times",
                "last_seen",
                store,
                metrics,
                |store, touches: Vec<_>| async move { store.touch_devices(&touches).await },
            ),
            hellos: GroupCommit::start(
                "Hellos",
                "hello",
                store,
                metrics,
                |store, hellos: Vec<_>| async move { store.record_hellos(&hellos).await },
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample `name{kind="activation"}` in `/metrics`.
    fn sample(metrics: &ServerMetrics, name: &str) -> f64 {
        metrics.sample(&format!("{name}{{kind=\"activation\"}}"))
    }

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
    /// stored, and all of them are, in fewer transactions than reports
    /// (the metrics count them).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_sent_together_are_all_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::open(None, dir.path()).await.unwrap();
        let metrics = ServerMetrics::new();
        let writers = GroupWriters::start(&store, &metrics);
        let devices = MAX_GROUP * 2 + 7;
        let sent: Vec<_> = (0..devices)
            .map(|device| {
                let writer = writers.activations.clone();
                tokio::spawn(async move { writer.submit(report(device)).await })
            })
            .collect();
        for answer in sent {
            answer.await.unwrap().unwrap();
        }
        let stored = store.activations("m", 1).await.unwrap();
        assert_eq!(stored, (0..devices).map(report).collect::<Vec<_>>());
        let items = "edgefleet_server_group_commit_items";
        assert_eq!(sample(&metrics, &format!("{items}_sum")), devices as f64);
        let groups = sample(&metrics, &format!("{items}_count"));
        assert!(groups < devices as f64, "{groups} transactions");
    }

    /// A group the store cannot commit answers each of its senders with
    /// the store's error; the writer keeps going.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_group_answers_every_sender_with_the_error() {
        use sqlx::Connection as _;
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::open(None, dir.path()).await.unwrap();
        let metrics = ServerMetrics::new();
        let writers = GroupWriters::start(&store, &metrics);
        writers.activations.submit(report(0)).await.unwrap();
        let url = format!("sqlite://{}", dir.path().join("edgefleet.db").display());
        let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query("ALTER TABLE activations RENAME TO moved")
            .execute(&mut db)
            .await
            .unwrap();
        let sent: Vec<_> = (1..40)
            .map(|device| {
                let writer = writers.activations.clone();
                tokio::spawn(async move { writer.submit(report(device)).await })
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
        writers.activations.submit(report(40)).await.unwrap();
        let stored = store.activations("m", 1).await.unwrap();
        assert_eq!(stored, [report(0), report(40)]);
        assert!(sample(&metrics, "edgefleet_server_group_commit_failures_total") >= 1.0);
        assert_eq!(
            sample(&metrics, "edgefleet_server_group_commit_items_sum"),
            2.0
        );
    }
}

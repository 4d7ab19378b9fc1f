//! Waiting for a condition no event announces (a row in a database, a file
//! on disk, a server that answers), with a deadline so a test that never
//! sees it fails instead of hanging.

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` until it returns Some, or panics after `timeout` naming
/// `what`. For tests that drive other processes from a plain thread.
pub fn eventually<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Polls `check` until it is true, failing the test after `timeout`. For
/// async tests: it sleeps on tokio's timer, leaving the runtime (and an
/// in-process server on it) to run meanwhile.
pub async fn assert_eventually<F, Fut>(timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

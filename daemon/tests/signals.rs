//! Real signals sent to this test process with `kill`: without the
//! handlers, SIGTERM and SIGINT would kill it.

use std::time::Duration;

use edgefleet_daemon::ShutdownSignals;
use tokio_util::sync::CancellationToken;

fn send_to_self(signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &std::process::id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {signal} failed: {status}");
}

#[tokio::test]
async fn a_sigterm_that_arrives_before_anyone_waits_is_delivered_by_the_next_recv() {
    let mut signals = ShutdownSignals::install().unwrap();
    // Nobody is waiting yet, as while a daemon is still starting.
    send_to_self("-TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    tokio::time::timeout(Duration::from_secs(10), signals.recv())
        .await
        .expect("the SIGTERM sent before recv was delivered");
}

#[tokio::test]
async fn sigint_cancels_the_shutdown_token_then_logs() {
    let signals = ShutdownSignals::install().unwrap();
    let shutdown = CancellationToken::new();
    let (logged_tx, logged) = tokio::sync::oneshot::channel();
    let token = shutdown.clone();
    signals.cancel_on_signal(shutdown.clone(), move || {
        // The daemon's log line comes after the token is cancelled.
        let _ = logged_tx.send(token.is_cancelled());
    });
    assert!(!shutdown.is_cancelled());
    send_to_self("-INT");
    tokio::time::timeout(Duration::from_secs(10), shutdown.cancelled())
        .await
        .expect("SIGINT cancelled the token");
    let cancelled_before_log = tokio::time::timeout(Duration::from_secs(10), logged)
        .await
        .expect("the log callback ran")
        .unwrap();
    assert!(
        cancelled_before_log,
        "the token was cancelled before the log line"
    );
}

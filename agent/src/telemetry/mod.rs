//! On-device telemetry: what the agent reports to the control plane.
//!
//! - [`TelemetryRecorder`]: per model version interval counters (requests,
//!   errors, latency and batch-size histograms, queue depth) and events,
//!   recorded by the serving path ([`crate::service`], [`crate::model_worker`],
//!   [`crate::model_registry`]). Always present and bounded, drained or not.
//! - [`DeviceProbe`]: CPU, memory, temperature, battery, uptime, agent RSS.
//! - [`collect_inventory`]: what the device is (for enrollment and Hello).
//! - [`Outbox`]: the on-disk store-and-forward queue of batches, with
//!   durable sequence numbers and a byte cap.
//! - [`TelemetryCollector`]: one batch per interval, from the above, into
//!   the outbox.
//!
//! A session to the control plane uses them like this (all blocking calls
//! on `spawn_blocking`):
//! 1. `TelemetryCollector::open(state_dir, agent.telemetry().clone(), config, runtime)`.
//! 2. Hello: `inventory = collect_inventory(runtimes)`,
//!    `last_sequence = collector.outbox().last_sequence()`.
//! 3. Welcome: `collector.outbox_mut().ack(welcome.acked_sequence)` (also
//!    lifts the counter if the server knows higher numbers) and
//!    `collector.set_interval(secs)` when the suggestion is not 0.
//! 4. Send the backlog in order: `outbox_mut().pending_after(cursor, N)`
//!    until empty, moving `cursor` to the last sequence sent.
//! 5. Every `collector.interval()`: `collector.tick(SystemTime::now())`, then
//!    send what `pending_after(cursor, N)` returns (ticks continue while
//!    disconnected: the outbox keeps the batches).
//! 6. TelemetryAck: `outbox_mut().ack(seq)`.

mod collector;
mod inventory;
mod outbox;
mod probe;
mod recorder;

pub use collector::{
    DEFAULT_TELEMETRY_INTERVAL, OUTBOX_SUBDIR, TelemetryCollector, TelemetryConfig,
};
pub use inventory::{collect_inventory, collect_inventory_at};
pub use outbox::{DEFAULT_OUTBOX_CAP_BYTES, Outbox, OutboxError};
pub use probe::{DeviceProbe, agent_anonymous_bytes, agent_rss_bytes};
pub use recorder::{
    DEFAULT_EVENT_CAP, MAX_EVENT_MESSAGE_BYTES, TelemetryRecorder, VersionTelemetry, unix_ms,
};

/// `text` cut to at most `max` bytes, on a character boundary: free text
/// (an error chain, a child process's output) sized for the control plane,
/// which refuses longer messages.
pub fn cut_text(text: &str, max: usize) -> String {
    let mut cut = text.len().min(max);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text[..cut].to_string()
}

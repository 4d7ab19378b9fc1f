//! What edgefleet's binaries share at start and stop:
//!
//! - [`parse_args`]: the command line, an error in it on one line (all
//!   three binaries, the `edgefleet` CLI too);
//! - [`init_logging`]: logs on stderr, filtered by `EDGEFLEET_LOG`, that
//!   never panic when nobody reads them any more;
//! - [`report`]: the final error line, written the same way;
//! - [`load_toml_config`]: a TOML config file, its parse error on one line;
//! - [`ShutdownSignals`]: SIGTERM and SIGINT handlers installed before
//!   anything is served, so a signal is never lost to the default
//!   disposition (killed, no clean shutdown) nor to a task not yet running;
//! - `http::serve_http` (feature `http`): an HTTP listener that times out
//!   clients that stall (the agent's and the control plane's).

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

mod args;
pub use args::{error_line, parse_args};
#[cfg(feature = "http")]
pub mod http;

#[cfg(feature = "progress")]
pub use indicatif::ProgressBar;

/// Progress of work counted in bytes (an upload, a copy) on stderr: bytes,
/// rate, ETA. Hidden when stderr is not a terminal (logs, pipes, tests) or
/// when `hidden`.
#[cfg(feature = "progress")]
pub fn byte_progress_bar(size: u64, hidden: bool) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if hidden || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(size);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// The environment variable holding the log filter (`info` when unset or
/// malformed), e.g. `EDGEFLEET_LOG=debug` or `EDGEFLEET_LOG=edgefleet_agent=debug,info`.
pub const LOG_FILTER_VAR: &str = "EDGEFLEET_LOG";

/// Sends `tracing` output to stderr, with colours only on a terminal.
///
/// A line that cannot be written (whoever read stderr has gone: a log
/// collector restarting, a closed terminal) is dropped. By default the
/// subscriber would report it with `eprintln!`, which panics on the same
/// broken pipe, and the panicking task (the one handling SIGTERM, say)
/// would stop doing its work.
pub fn init_logging() {
    init_logging_at("info");
}

/// [`init_logging`] with another filter for when `EDGEFLEET_LOG` is unset
/// or malformed (the benchmarks: `error`).
pub fn init_logging_at(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(LOG_FILTER_VAR)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .log_internal_errors(false)
        .init();
}

/// Writes one line to stderr; unlike `eprintln!`, does not panic when
/// stderr is gone.
pub fn report(message: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "{message}");
}

/// The TOML config file at `path`; an error that cannot be read or parsed
/// is one line naming the file (a parse error by [`parse_error_line`]).
pub fn load_toml_config<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).map_err(|err| {
        anyhow::anyhow!(
            "invalid config file {}: {}",
            path.display(),
            parse_error_line(&text, err.message(), err.span().map(|span| span.start))
        )
    })
}

/// A config file's parse error as one line: where, `line L, column C: `
/// (1-based, from the byte offset `at` into `text`), then the parser's
/// message, instead of the multi-line snippet TOML parsers print.
pub fn parse_error_line(text: &str, message: &str, at: Option<usize>) -> String {
    let message = message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let Some(before) = at.and_then(|at| text.get(..at)) else {
        return message;
    };
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    format!("line {line}, column {column}: {message}")
}

/// The signals that stop a daemon: SIGTERM (systemd, Kubernetes, `kill`)
/// and SIGINT (Ctrl-C).
///
/// Handlers are installed by [`ShutdownSignals::install`], before the
/// daemon starts serving: a signal that arrives while it starts is kept
/// and delivered by the next [`recv`](ShutdownSignals::recv), instead of
/// killing the process outright (the default disposition) or waiting for a
/// task that has not been polled yet.
pub struct ShutdownSignals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Installs the handlers. Must run inside a tokio runtime with signals
    /// enabled.
    pub fn install() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                terminate: signal(SignalKind::terminate())?,
                interrupt: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Waits for the next SIGTERM or SIGINT (one that arrived since
    /// [`install`](Self::install) returns at once).
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }

    /// Spawns a task that cancels `shutdown` on the next signal, then calls
    /// `log` (the daemon's "shutting down" line, logged from its own crate so
    /// a filter on that crate keeps it). Cancelling comes first: nothing
    /// after the signal (a log line that cannot be written, say) may keep the
    /// process serving.
    pub fn cancel_on_signal(
        mut self,
        shutdown: CancellationToken,
        log: impl FnOnce() + Send + 'static,
    ) {
        tokio::spawn(async move {
            self.recv().await;
            shutdown.cancel();
            log();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::parse_error_line;

    #[test]
    fn a_parse_error_is_one_line_with_its_line_and_column() {
        let text = "a = 1\nbé = = 2\n";
        let at = text.find("= 2").unwrap();
        assert_eq!(
            parse_error_line(text, "invalid string\nexpected `\"`\n", Some(at)),
            "line 2, column 6: invalid string; expected `\"`"
        );
        assert_eq!(
            parse_error_line(text, "oops", Some(0)),
            "line 1, column 1: oops"
        );
        assert_eq!(parse_error_line(text, "oops", None), "oops");
        // An offset past the end (or inside a character) names no place.
        assert_eq!(parse_error_line(text, "oops", Some(999)), "oops");
        assert_eq!(parse_error_line(text, "oops", Some(8)), "oops");
    }
}

//! `edgefleet rollouts …`: thin commands over `RolloutService`.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use edgefleet_proto::edgefleet::v1 as pb;
use indicatif::{ProgressBar, ProgressStyle};
use pb::rollout_service_client::RolloutServiceClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::pages::{PageSize, all_pages};
use crate::{Cli, Output, authorized, channel, format_time, print_json, status_error};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnFailure {
    Rollback,
    Pause,
}

#[derive(Debug, Subcommand)]
pub enum RolloutsCommand {
    /// Start rolling NAME@VERSION out to the devices the selector picks.
    Create {
        /// NAME@VERSION (NAME alone: the highest version).
        #[arg(long)]
        model: String,
        /// Devices carrying all these labels: k=v,k2=v2 (empty: every device).
        #[arg(long, default_value = "")]
        selector: String,
        /// Cumulative waves: percentages or counts, e.g. 1%,10%,50%,100% or 1,5,20.
        #[arg(long, default_value = "100%")]
        waves: String,
        /// Time each finished wave must stay healthy before the next starts.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        soak: Duration,
        /// A started device that reports nothing this long (offline, gone) counts as failed; 0s: wait for ever.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        activation_timeout: Duration,
        /// Devices updating at once (0: no limit).
        #[arg(long, default_value_t = 0)]
        max_concurrent: u32,
        /// Gate: most errors per request of the new version, e.g. 0.05 (0: off).
        #[arg(long, default_value_t = 0.0)]
        max_error_rate: f64,
        /// Gate: most p95 latency increase over the previous version, e.g. 0.2 for +20% (0: off).
        #[arg(long, default_value_t = 0.0)]
        max_p95_regression: f64,
        /// Gate: most failed activations, a count (3) or a percent (10%) (0: off).
        #[arg(long, default_value = "0")]
        max_failed: String,
        /// Devices that must have reported before a gate is judged.
        #[arg(long, default_value_t = 1)]
        min_devices: u32,
        /// What a failed gate does.
        #[arg(long, value_enum, default_value = "rollback")]
        on_failure: OnFailure,
        /// Then watch it until it ends (exit status as `watch`).
        #[arg(long)]
        watch: bool,
    },
    /// One rollout, with its devices and events.
    Get { id: String },
    /// Rollouts, newest first.
    List {
        /// Only rollouts of this model.
        #[arg(long)]
        model: Option<String>,
        #[command(flatten)]
        pages: PageSize,
    },
    /// A rollout's devices (all, or those in one state), read a page at a time.
    Devices {
        id: String,
        /// Only devices in this state.
        #[arg(long, value_parser = ["waiting", "updating", "active", "failed", "rolling_back", "rolled_back", "left"])]
        state: Option<String>,
        #[command(flatten)]
        pages: PageSize,
    },
    /// Stop starting devices; what is updating finishes.
    Pause { id: String },
    /// Continue a paused rollout.
    Resume { id: String },
    /// Stop where it is: devices keep what they have (those already sent the new version still install it).
    Abort { id: String },
    /// Return every device it touched to its previous version (a device that had none keeps the new one, unmanaged).
    Rollback { id: String },
    /// Follow a rollout live; exits 0 if it succeeds (every device active), 1 otherwise.
    Watch { id: String },
}

fn parse_waves(text: &str) -> anyhow::Result<Vec<pb::Wave>> {
    text.split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .map(|w| {
            let size = if let Some(percent) = w.strip_suffix('%') {
                let p: f64 = percent
                    .parse()
                    .with_context(|| format!("wave {w:?} is not a percentage"))?;
                if !(p > 0.0 && p <= 100.0) {
                    bail!("wave {w:?} must be in (0%, 100%]");
                }
                pb::wave::Size::Percent(p)
            } else {
                let c: u32 = w
                    .parse()
                    .with_context(|| format!("wave {w:?} is neither a count nor a percentage"))?;
                if c == 0 {
                    bail!("wave {w:?} must be at least 1 device");
                }
                pb::wave::Size::Count(c)
            };
            Ok(pb::Wave { size: Some(size) })
        })
        .collect()
}

fn parse_model(text: &str) -> anyhow::Result<(String, u64)> {
    match text.split_once('@') {
        Some((name, version)) => Ok((
            name.to_string(),
            version
                .parse()
                .with_context(|| format!("{text:?}: the version after @ must be a number"))?,
        )),
        None => Ok((text.to_string(), 0)),
    }
}

fn parse_max_failed(text: &str) -> anyhow::Result<(u32, f64)> {
    match text.strip_suffix('%') {
        Some(p) => Ok((
            0,
            p.parse()
                .with_context(|| format!("--max-failed {text:?} is not a percentage"))?,
        )),
        None => Ok((
            text.parse()
                .with_context(|| format!("--max-failed {text:?} is not a count or a percentage"))?,
            0.0,
        )),
    }
}

fn wave_text(wave: &pb::Wave) -> String {
    match wave.size {
        Some(pb::wave::Size::Percent(p)) => format!("{p}%"),
        Some(pb::wave::Size::Count(c)) => c.to_string(),
        None => "?".into(),
    }
}

fn rollout_device_json(d: &pb::RolloutDevice) -> Value {
    json!({
        "device_id": d.device_id, "wave": d.wave, "state": d.state,
        "previous_version": d.previous_version, "reason": d.reason,
        "updated_unix_ms": d.updated_unix_ms,
    })
}

/// Devices of a rollout as a table.
fn devices_table(devices: &[pb::RolloutDevice]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_header(["DEVICE", "WAVE", "STATE", "PREVIOUS", "REASON"]);
    for d in devices {
        table.add_row([
            d.device_id.clone(),
            d.wave.to_string(),
            d.state.clone(),
            d.previous_version.to_string(),
            d.reason.clone(),
        ]);
    }
    table
}

/// One row per rollout, as the other list commands print theirs (a header
/// even when there is none).
fn rollouts_table(rollouts: &[pb::Rollout]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header([
        "ID", "MODEL", "STATE", "WAVE", "ACTIVE", "UPDATING", "WAITING", "FAILED", "SELECTOR",
        "CREATED", "REASON",
    ]);
    for r in rollouts {
        let c = r.counts.unwrap_or_default();
        table.add_row([
            r.id.clone(),
            format!("{}@{}", r.model, r.version),
            r.state.clone(),
            format!("{}/{}", r.current_wave, r.waves.len().max(1)),
            c.active.to_string(),
            c.updating.to_string(),
            c.waiting.to_string(),
            c.failed.to_string(),
            r.selector.clone(),
            format_time(r.created_unix_ms),
            r.reason.clone(),
        ]);
    }
    table
}

fn rollout_json(r: &pb::Rollout) -> Value {
    let counts = r.counts.unwrap_or_default();
    let gates = r.gates.unwrap_or_default();
    json!({
        "id": r.id,
        "model": r.model,
        "version": r.version,
        "selector": r.selector,
        "waves": r.waves.iter().map(wave_text).collect::<Vec<_>>(),
        "soak_seconds": r.soak_seconds,
        "activation_timeout_seconds": r.activation_timeout_seconds,
        "max_concurrent": r.max_concurrent,
        "gates": {
            "max_error_rate": gates.max_error_rate,
            "max_p95_latency_regression": gates.max_p95_latency_regression,
            "max_failed_activations": gates.max_failed_activations,
            "max_failed_activations_percent": gates.max_failed_activations_percent,
            "min_devices_reporting": gates.min_devices_reporting,
        },
        "on_failure": if r.on_failure == pb::FailurePolicy::Pause as i32 { "pause" } else { "rollback" },
        "state": r.state,
        "current_wave": r.current_wave,
        "counts": {
            "targeted": counts.targeted, "waiting": counts.waiting, "updating": counts.updating,
            "active": counts.active, "failed": counts.failed, "rolled_back": counts.rolled_back,
        },
        "reason": r.reason,
        "created_by": r.created_by,
        "created_unix_ms": r.created_unix_ms,
        "updated_unix_ms": r.updated_unix_ms,
        "devices": r.devices.iter().map(rollout_device_json).collect::<Vec<_>>(),
        "events": r.events.iter().map(|e| json!({
            "unix_ms": e.unix_ms, "actor": e.actor, "action": e.action, "message": e.message,
        })).collect::<Vec<_>>(),
    })
}

fn summary(r: &pb::Rollout) -> String {
    let c = r.counts.unwrap_or_default();
    format!(
        "{} {}@{} {} wave {}/{}: {} active, {} updating, {} waiting, {} failed, {} rolled back",
        r.id,
        r.model,
        r.version,
        r.state,
        r.current_wave,
        r.waves.len().max(1),
        c.active,
        c.updating,
        c.waiting,
        c.failed,
        c.rolled_back
    )
}

fn print_rollout(r: &pb::Rollout) -> anyhow::Result<()> {
    outln!("{}", summary(r));
    if !r.reason.is_empty() {
        outln!("reason: {}", r.reason);
    }
    if !r.devices.is_empty() {
        outln!("{}", devices_table(&r.devices));
    }
    for e in &r.events {
        outln!(
            "{}  {:<20} {:<12} {}",
            format_time(e.unix_ms),
            e.actor,
            e.action,
            e.message
        );
    }
    Ok(())
}

async fn client(cli: &Cli) -> anyhow::Result<RolloutServiceClient<Channel>> {
    Ok(RolloutServiceClient::new(channel(cli).await?)
        .max_decoding_message_size(crate::MAX_ANSWER_BYTES))
}

/// Follows a rollout to its end; Ok(true) if it succeeded.
async fn watch(cli: &Cli, id: &str) -> anyhow::Result<bool> {
    // Its state and counts at each change, not every device again (the
    // JSON lines too: `rollouts get` has the devices and events).
    let request = authorized(
        cli,
        pb::RolloutRef {
            id: id.to_string(),
            view: pb::RolloutView::Basic.into(),
        },
    )?;
    let mut stream = client(cli)
        .await?
        .watch_rollout(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let bar = (cli.output == Output::Table && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} devices  {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        });
    let mut last = None;
    while let Some(rollout) = stream.message().await.map_err(status_error)? {
        let counts = rollout.counts.unwrap_or_default();
        match (&bar, cli.output) {
            (_, Output::Json) => outln!("{}", rollout_json(&rollout)),
            (Some(bar), _) => {
                bar.set_length(u64::from(counts.targeted));
                bar.set_position(u64::from(
                    counts.active + counts.failed + counts.rolled_back,
                ));
                bar.set_message(format!(
                    "{} wave {}/{}",
                    rollout.state,
                    rollout.current_wave,
                    rollout.waves.len().max(1)
                ));
            }
            (None, _) => eprintln!("{}", summary(&rollout)),
        }
        last = Some(rollout);
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let Some(last) = last else {
        bail!("the server ended the watch without a rollout");
    };
    if cli.output == Output::Table {
        outln!("{}", summary(&last));
        if !last.reason.is_empty() {
            outln!("reason: {}", last.reason);
        }
    }
    Ok(last.state == "succeeded")
}

pub async fn run(cli: &Cli, command: &RolloutsCommand) -> anyhow::Result<()> {
    let show = |rollout: &pb::Rollout| -> anyhow::Result<()> {
        match cli.output {
            Output::Json => print_json(&rollout_json(rollout)),
            Output::Table => print_rollout(rollout),
        }
    };
    match command {
        RolloutsCommand::Create {
            model,
            selector,
            waves,
            soak,
            activation_timeout,
            max_concurrent,
            max_error_rate,
            max_p95_regression,
            max_failed,
            min_devices,
            on_failure,
            watch: then_watch,
        } => {
            let (name, version) = parse_model(model)?;
            let waves = parse_waves(waves)?;
            let (max_failed_count, max_failed_percent) = parse_max_failed(max_failed)?;
            let request = authorized(
                cli,
                pb::CreateRolloutRequest {
                    model: name,
                    version,
                    selector: selector.clone(),
                    waves,
                    soak_seconds: soak.as_secs(),
                    activation_timeout_seconds: activation_timeout.as_secs(),
                    max_concurrent: *max_concurrent,
                    gates: Some(pb::Gates {
                        max_error_rate: *max_error_rate,
                        max_p95_latency_regression: *max_p95_regression,
                        max_failed_activations: max_failed_count,
                        max_failed_activations_percent: max_failed_percent,
                        min_devices_reporting: *min_devices,
                    }),
                    on_failure: match on_failure {
                        OnFailure::Rollback => pb::FailurePolicy::Rollback,
                        OnFailure::Pause => pb::FailurePolicy::Pause,
                    } as i32,
                },
            )?;
            let rollout = client(cli)
                .await?
                .create_rollout(request)
                .await
                .map_err(status_error)?
                .into_inner();
            if *then_watch {
                if cli.output == Output::Table {
                    outln!("{}", rollout.id);
                }
                if !watch(cli, &rollout.id).await? {
                    bail!("rollout {} did not succeed", rollout.id);
                }
            } else {
                show(&rollout)?;
            }
        }
        RolloutsCommand::Get { id } => {
            let request = authorized(
                cli,
                pb::RolloutRef {
                    id: id.clone(),
                    view: pb::RolloutView::Full.into(),
                },
            )?;
            let rollout = client(cli)
                .await?
                .get_rollout(request)
                .await
                .map_err(status_error)?
                .into_inner();
            show(&rollout)?;
        }
        RolloutsCommand::Devices { id, state, pages } => {
            let rollouts_client = client(cli).await?;
            let devices = all_pages(|page_token| {
                let mut client = rollouts_client.clone();
                let request = authorized(
                    cli,
                    pb::ListRolloutDevicesRequest {
                        rollout_id: id.clone(),
                        state: state.clone().unwrap_or_default(),
                        page_size: pages.page_size,
                        page_token,
                    },
                );
                async move {
                    let page = client
                        .list_rollout_devices(request?)
                        .await
                        .map_err(status_error)?
                        .into_inner();
                    Ok((page.devices, page.next_page_token))
                }
            })
            .await?;
            match cli.output {
                Output::Json => print_json(&Value::Array(
                    devices.iter().map(rollout_device_json).collect(),
                ))?,
                Output::Table => outln!("{}", devices_table(&devices)),
            }
        }
        RolloutsCommand::List { model, pages } => {
            let rollouts_client = client(cli).await?;
            let rollouts = all_pages(|page_token| {
                let mut client = rollouts_client.clone();
                let request = authorized(
                    cli,
                    pb::ListRolloutsRequest {
                        model: model.clone().unwrap_or_default(),
                        page_size: pages.page_size,
                        page_token,
                    },
                );
                async move {
                    let page = client
                        .list_rollouts(request?)
                        .await
                        .map_err(status_error)?
                        .into_inner();
                    Ok((page.rollouts, page.next_page_token))
                }
            })
            .await?;
            match cli.output {
                Output::Json => {
                    print_json(&Value::Array(rollouts.iter().map(rollout_json).collect()))?
                }
                Output::Table => outln!("{}", rollouts_table(&rollouts)),
            }
        }
        RolloutsCommand::Pause { id }
        | RolloutsCommand::Resume { id }
        | RolloutsCommand::Abort { id }
        | RolloutsCommand::Rollback { id } => {
            // The rollout as it stands after the action, without its devices
            // and events (thousands of rows): `rollouts get` shows those.
            let request = authorized(
                cli,
                pb::RolloutRef {
                    id: id.clone(),
                    view: pb::RolloutView::Basic.into(),
                },
            )?;
            let mut client = client(cli).await?;
            let rollout = match command {
                RolloutsCommand::Pause { .. } => client.pause_rollout(request).await,
                RolloutsCommand::Resume { .. } => client.resume_rollout(request).await,
                RolloutsCommand::Abort { .. } => client.abort_rollout(request).await,
                _ => client.rollback_rollout(request).await,
            }
            .map_err(status_error)?
            .into_inner();
            show(&rollout)?;
        }
        RolloutsCommand::Watch { id } => {
            if !watch(cli, id).await? {
                bail!("rollout {id} did not succeed");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_parse_as_percentages_or_counts() {
        let waves = parse_waves("1%,10%,100%").unwrap();
        assert_eq!(waves.len(), 3);
        assert_eq!(waves[0].size, Some(pb::wave::Size::Percent(1.0)));
        let counts = parse_waves("1, 5").unwrap();
        assert_eq!(counts[1].size, Some(pb::wave::Size::Count(5)));
        assert!(parse_waves("0%").is_err());
        assert!(parse_waves("150%").is_err());
        assert!(parse_waves("x").is_err());
        assert!(parse_waves("0").is_err());
    }

    #[test]
    fn model_and_max_failed_parse() {
        assert_eq!(parse_model("m@3").unwrap(), ("m".into(), 3));
        assert_eq!(parse_model("m").unwrap(), ("m".into(), 0));
        assert!(parse_model("m@x").is_err());
        assert_eq!(parse_max_failed("3").unwrap(), (3, 0.0));
        assert_eq!(parse_max_failed("10%").unwrap(), (0, 10.0));
        assert!(parse_max_failed("many").is_err());
    }
}

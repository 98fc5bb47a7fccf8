//! `fieldgate-sim`: simulated Modbus TCP devices for demos, end-to-end tests and benchmarks.
//!
//! Serves N devices on ports P..P+N-1 (register map: the `fieldgate_sim` library), or prints the
//! gateway `devices:` list that reads them (`--print-devices`).

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use clap::Parser;
use fieldgate_crds::GatewayDevice;
use fieldgate_sim::{self as sim, Fault, SimDevice};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Simulated Modbus TCP devices.
#[derive(Debug, Parser)]
#[command(name = "fieldgate-sim", version)]
struct Args {
    /// Number of devices.
    #[arg(long, env = "FIELDGATE_SIM_DEVICES", default_value_t = 1)]
    devices: u16,
    /// Port of the first device; device i listens on base-port + i.
    #[arg(long, env = "FIELDGATE_SIM_BASE_PORT", default_value_t = 5020)]
    base_port: u16,
    /// Address to listen on (and to name in `--print-devices`).
    #[arg(long, env = "FIELDGATE_SIM_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Holding registers after the fixed map, per device (for big devices).
    #[arg(long, env = "FIELDGATE_SIM_EXTRA_REGISTERS", default_value_t = 0)]
    extra_registers: u16,
    /// Make a device misbehave: INDEX=none|timeout|exception|garbage|reset. Repeatable.
    #[arg(long = "fault", value_name = "INDEX=KIND", value_parser = parse_fault)]
    faults: Vec<(u16, Fault)>,
    /// Accept one connection per device at a time, like many PLCs: a second one is closed.
    #[arg(long, env = "FIELDGATE_SIM_SINGLE_CONNECTION")]
    single_connection: bool,
    /// Print the gateway `devices:` list reading the simulated devices, then exit.
    #[arg(long)]
    print_devices: bool,
    /// Poll interval in `--print-devices`.
    #[arg(long, default_value = "1s")]
    poll_interval: fieldgate_crds::HumanDuration,
    /// Namespace in `--print-devices`.
    #[arg(long, default_value = "default")]
    namespace: String,
}

fn parse_fault(text: &str) -> Result<(u16, Fault), String> {
    let (index, kind) = text.split_once('=').ok_or_else(|| format!("{text:?} is not INDEX=KIND"))?;
    let index = index.trim().parse().map_err(|e| format!("device index {index:?}: {e}"))?;
    let fault = kind.parse().map_err(|e: sim::UnknownFault| e.to_string())?;
    Ok((index, fault))
}

#[derive(Serialize)]
struct Devices {
    devices: Vec<GatewayDevice>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    let last_port = u32::from(args.base_port) + u32::from(args.devices) - 1;
    let Ok(last_port) = u16::try_from(last_port) else {
        bail!("ports {}..={last_port} exceed 65535", args.base_port);
    };
    let faults: BTreeMap<u16, Fault> = args.faults.iter().copied().collect();
    if let Some(index) = faults.keys().find(|&&i| i >= args.devices) {
        bail!("--fault {index}=...: there are only {} devices", args.devices);
    }
    // Ports and indices agree: device i on base-port + i.
    let ports = (0..args.devices).map(|i| (i, args.base_port + i));

    if args.print_devices {
        let devices = ports
            .map(|(i, port)| {
                sim::gateway_device(
                    &args.namespace,
                    &format!("sim-{i:04}"),
                    &args.host,
                    port,
                    &args.poll_interval,
                    args.extra_registers,
                )
            })
            .collect();
        print!("{}", serde_saphyr::to_string(&Devices { devices })?);
        return Ok(());
    }

    let cancel = CancellationToken::new();
    let mut servers = JoinSet::new();
    for (i, port) in ports {
        let listener = TcpListener::bind((args.host.as_str(), port))
            .await
            .with_context(|| format!("listening on {}:{port}", args.host))?;
        let fault = faults.get(&i).copied().unwrap_or_default();
        let mut device = SimDevice::new(u32::from(i), args.extra_registers).with_fault(fault);
        if args.single_connection {
            device = device.with_single_connection();
        }
        if fault != Fault::None {
            tracing::info!(device = i, port, %fault, "simulated device misbehaves");
        }
        servers.spawn(sim::serve(listener, device, cancel.clone()));
    }
    println!("fieldgate-sim: {} devices on {}:{}-{last_port}", args.devices, args.host, args.base_port);

    tokio::select! {
        () = shutdown_signal() => tracing::info!("stopping"),
        Some(ended) = servers.join_next() => {
            cancel.cancel();
            ended.context("a simulated device panicked")?.context("a simulated device stopped")?;
        }
    }
    cancel.cancel();
    while let Some(ended) = servers.join_next().await {
        ended.context("a simulated device panicked")??;
    }
    Ok(())
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGTERM; stopping on SIGINT only");
                tokio::signal::ctrl_c().await.ok();
            }
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await.ok();
}

//! `fieldgate-operator`: the controller (`run`) and the offline tools (`render`, `crds`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fieldgate_operator::{app, offline, telemetry};

#[derive(Parser)]
#[command(name = "fieldgate-operator", version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
    /// Log format.
    #[arg(long, global = true, env = "FIELDGATE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller against the cluster of the kubeconfig (or in-cluster config).
    Run(Box<app::Args>),
    /// Render manifests offline: print what each gateway node would get, and every verdict.
    /// Exits 2 when an object is refused.
    Render(offline::RenderArgs),
    /// Print the CustomResourceDefinitions of fieldgate.io/v1alpha1 as YAML.
    Crds,
}

fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    match args.command {
        Command::Run(run) => {
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            if run.worker_threads > 0 {
                runtime.worker_threads(run.worker_threads);
            }
            let runtime = runtime.enable_all().build()?;
            runtime.block_on(async {
                // Inside the runtime: the OTLP exporter (when configured) runs on it.
                let telemetry = telemetry::init(&args.log_format);
                let result = app::run(*run).await;
                telemetry.shutdown(std::time::Duration::from_secs(3)).await;
                result
            })?;
        }
        Command::Render(r) => {
            let (report, all_ok) = offline::run(&r)?;
            print!("{report}");
            if !all_ok {
                return Ok(ExitCode::from(2));
            }
        }
        Command::Crds => {
            for (_, yaml) in fieldgate_crds::crd_yaml()? {
                print!("---\n{yaml}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

//! `fieldgate-operator`: the controller (`run`) and the offline tools (`render`, `crds`, `bench`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fieldgate_operator::{app, bench, offline};

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
    Run(app::Args),
    /// Render manifests offline: print what each gateway node would get, and every verdict.
    /// Exits 2 when an object is refused.
    Render(offline::RenderArgs),
    /// Print the CustomResourceDefinitions of fieldgate.io/v1alpha1 as YAML.
    Crds,
    /// Measure render time and memory on a synthetic world.
    Bench(bench::BenchArgs),
}

fn init_logs(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    match args.command {
        Command::Run(run) => {
            init_logs(&args.log_format);
            tokio::runtime::Runtime::new()?.block_on(app::run(run))?;
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
        Command::Bench(b) => print!("{}", bench::run(&b)?),
    }
    Ok(ExitCode::SUCCESS)
}

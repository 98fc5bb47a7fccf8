use std::process::ExitCode;

use clap::Parser;
use fieldgate_gateway::app::{self, Args};
use fieldgate_gateway::telemetry;

fn main() -> ExitCode {
    let args = Args::parse();
    // One TLS provider for every rustls user (the Kubernetes client, MQTT over TLS).
    let _ = rustls::crypto::ring::default_provider().install_default();
    // RUST_LOG filters (default `info`); the filter can be changed at run time (/api/v1).
    let logs = telemetry::init_logs(&args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fieldgate-gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(app::run(args, Some(logs))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fieldgate-gateway: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

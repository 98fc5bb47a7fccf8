//! `fieldgate-bench-operator`: the operator's render time and memory on a synthetic world
//! (10,000 Devices over 100 nodes by default), or with `--cold-start` the operator binary
//! against a mocked API server, from start to every ConfigMap applied.

use clap::Parser;
use fieldgate_tests::operator_bench::{self, BenchArgs, cold_start};

#[derive(Parser)]
#[command(name = "fieldgate-bench-operator", about)]
struct Args {
    #[command(flatten)]
    bench: BenchArgs,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.bench.cold_start {
        print!("{}", cold_start::run(&args.bench)?);
    } else {
        print!("{}", operator_bench::run(&args.bench)?);
    }
    Ok(())
}

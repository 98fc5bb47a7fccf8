//! `fieldgate-operator`: for now, the offline tools (the controller follows).

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "fieldgate-operator", version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions of fieldgate.io/v1alpha1 as YAML.
    Crds,
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Crds => {
            for (_, yaml) in fieldgate_crds::crd_yaml()? {
                print!("---\n{yaml}");
            }
        }
    }
    Ok(())
}

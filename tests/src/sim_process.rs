//! The `fieldgate-sim` process the benchmarks poll: N devices on consecutive free ports.

use std::process::{Child, Command, Stdio};

use anyhow::{Result, bail};

/// `n` consecutive free ports on 127.0.0.1 (the first of them).
pub fn free_consecutive_ports(n: u16) -> Result<u16> {
    for _ in 0..200 {
        let base = 20_000 + (rand::random::<u16>() % 20_000);
        if (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return Ok(base);
        }
    }
    bail!("no {n} consecutive free ports")
}

/// A running `fieldgate-sim`, killed on drop.
pub struct SimProcess(Child);

impl SimProcess {
    /// Starts `devices` devices from port `base` with `extra` extra registers, plus `args`.
    pub fn start(devices: u16, base: u16, extra: u16, args: &[&str]) -> Result<Self> {
        let child = Command::new(crate::gateway::workspace_binary("fieldgate-sim", "FIELDGATE_SIM_BIN")?)
            .args(["--devices", &devices.to_string(), "--base-port", &base.to_string()])
            .args(["--extra-registers", &extra.to_string()])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Self(child))
    }

    /// How the simulator ended, if it did.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().ok().flatten()
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

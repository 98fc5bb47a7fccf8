//! Third-party Modbus peers: a pymodbus server (from the project's `.venv`) on a serial port,
//! RTU over TCP or Modbus TCP, and `socat` pseudo-terminal pairs standing in for a serial line.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::process::Proc;
use crate::{file_tail, find_executable, free_port, wait_until, workspace_root};

const SERVER: &str = r#"
import asyncio, json, sys, logging
from pymodbus.datastore import ModbusSequentialDataBlock, ModbusDeviceContext, ModbusServerContext
from pymodbus.server import StartAsyncSerialServer, StartAsyncTcpServer
from pymodbus import FramerType
mode, where, units = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
def dev(values):
    # pymodbus 3.16 refuses blocks at address 0: block address 1 is wire address 0.
    return ModbusDeviceContext(hr=ModbusSequentialDataBlock(1, values + [0] * 100),
                               co=ModbusSequentialDataBlock(1, [False] * 100))
ctx = ModbusServerContext(devices={int(u): dev(v) for u, v in units.items()}, single=False)
if mode == "serial":
    asyncio.run(StartAsyncSerialServer(ctx, port=where, framer=FramerType.RTU, baudrate=9600))
elif mode == "rtu-tcp":
    asyncio.run(StartAsyncTcpServer(ctx, address=("127.0.0.1", int(where)), framer=FramerType.RTU))
else:
    asyncio.run(StartAsyncTcpServer(ctx, address=("127.0.0.1", int(where)), framer=FramerType.SOCKET))
"#;

/// The project's Python (with pymodbus): env `FIELDGATE_PYTHON`, else `.venv/bin/python`.
pub fn python() -> Result<PathBuf> {
    find_executable("FIELDGATE_PYTHON", &[workspace_root().join(".venv/bin/python")], "python3")
}

/// How a pymodbus server is reached.
#[derive(Clone, Debug)]
pub enum Transport {
    /// RTU on this serial device.
    Serial(PathBuf),
    /// RTU frames over TCP on this port.
    RtuOverTcp(u16),
    /// Modbus TCP on this port.
    Tcp(u16),
}

/// A pymodbus server process with holding registers per unit. Killed on drop.
pub struct PyModbus {
    dir: TempDir,
    /// Where it listens.
    pub transport: Transport,
    _proc: Proc,
}

impl PyModbus {
    /// Starts a server; `units` maps a unit id to its first holding registers (wire address 0..).
    pub async fn start(transport: Transport, units: &[(u8, Vec<u16>)]) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("fieldgate-pymodbus-").tempdir()?;
        let script = dir.path().join("server.py");
        std::fs::write(&script, SERVER)?;
        let units: serde_json::Map<String, serde_json::Value> =
            units.iter().map(|(u, v)| (u.to_string(), serde_json::json!(v))).collect();
        let (mode, whereto) = match &transport {
            Transport::Serial(p) => ("serial", p.display().to_string()),
            Transport::RtuOverTcp(port) => ("rtu-tcp", port.to_string()),
            Transport::Tcp(port) => ("tcp", port.to_string()),
        };
        let mut cmd = Command::new(python()?);
        cmd.arg(&script).arg(mode).arg(&whereto).arg(serde_json::Value::Object(units).to_string());
        let proc = Proc::spawn("pymodbus", cmd, &dir.path().join("stdout"), &dir.path().join("stderr"))?;
        let server = Self { dir, transport, _proc: proc };
        if let Transport::RtuOverTcp(port) | Transport::Tcp(port) = server.transport {
            wait_until("pymodbus to listen", Duration::from_secs(30), || async move {
                Ok(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok().then_some(()))
            })
            .await
            .with_context(|| server.log())?;
        }
        Ok(server)
    }

    /// A TCP server (Modbus TCP or RTU over TCP) on a free port.
    pub async fn start_tcp(rtu: bool, units: &[(u8, Vec<u16>)]) -> Result<Self> {
        let port = free_port()?;
        Self::start(if rtu { Transport::RtuOverTcp(port) } else { Transport::Tcp(port) }, units).await
    }

    /// The port of a TCP server.
    pub fn port(&self) -> Option<u16> {
        match self.transport {
            Transport::RtuOverTcp(p) | Transport::Tcp(p) => Some(p),
            Transport::Serial(_) => None,
        }
    }

    /// Its output.
    pub fn log(&self) -> String {
        format!("--- pymodbus ---\n{}", file_tail(&self.dir.path().join("stderr"), 30))
    }
}

/// `socat` connecting two pseudo-terminals: a serial line with two ends. Killed on drop.
pub struct PtyPair {
    dir: TempDir,
    _proc: Proc,
}

impl PtyPair {
    /// Starts `socat` and waits for both ends to exist.
    pub async fn start() -> Result<Self> {
        let socat = find_executable("FIELDGATE_SOCAT", &[PathBuf::from("/usr/bin/socat")], "socat")?;
        let dir = tempfile::Builder::new().prefix("fieldgate-pty-").tempdir()?;
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mut cmd = Command::new(socat);
        cmd.arg(format!("pty,raw,echo=0,link={}", a.display())).arg(format!("pty,raw,echo=0,link={}", b.display()));
        let proc = Proc::spawn("socat", cmd, &dir.path().join("stdout"), &dir.path().join("stderr"))?;
        let pair = Self { dir, _proc: proc };
        let r = wait_until("socat's pseudo-terminals", Duration::from_secs(20), || {
            let ok = a.exists() && b.exists();
            async move { Ok(ok.then_some(())) }
        })
        .await;
        if let Err(e) = r {
            bail!("{e:#}\n{}", file_tail(&pair.dir.path().join("stderr"), 20));
        }
        Ok(pair)
    }

    /// One end (the gateway's).
    pub fn a(&self) -> PathBuf {
        self.dir.path().join("a")
    }

    /// The other end (the device's).
    pub fn b(&self) -> PathBuf {
        self.dir.path().join("b")
    }

    /// The directory holding both links.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

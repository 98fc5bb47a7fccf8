//! `mosquitto`, the stand-in cloud broker, on free ports with persistence in a temp dir.
//!
//! The plain listener (`url()`) is always anonymous: the test's [`crate::CloudSubscriber`] uses
//! it. With [`MosquittoOptions::tls`] or [`MosquittoOptions::password`] a second listener
//! (`secure_url()`) carries those requirements (`per_listener_settings true`).

use std::fmt::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::certs::TestPki;
use crate::process::Proc;
use crate::{file_tail, find_executable, free_port, running_as_root, wait_until};

/// How long mosquitto may take to start on a busy machine.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long mosquitto may take to write its persistence file and exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// TLS files of the secure listener.
#[derive(Clone, Debug)]
pub struct MosquittoTls {
    /// The PKI: the broker uses `server_cert`/`server_key` and trusts `ca_cert`.
    pub pki: TestPki,
    /// Whether clients must present a certificate signed by the CA.
    pub require_certificate: bool,
}

/// Optional second listener settings.
#[derive(Clone, Debug, Default)]
pub struct MosquittoOptions {
    /// TLS on the secure listener.
    pub tls: Option<MosquittoTls>,
    /// Username and password required on the secure listener (needs `mosquitto_passwd`).
    pub password: Option<(String, String)>,
    /// An ACL file's lines (mosquitto `acl_file` syntax, such as `topic deny a/b`), applied to
    /// every client.
    pub acl: Option<Vec<String>>,
    /// Bridges to other brokers: each a `(name, address, topic line)` such as
    /// `("cloud", "127.0.0.1:1883", "bench/# out 1")`.
    pub bridges: Vec<(String, String, String)>,
}

/// A mosquitto process. Killed on drop.
#[derive(Debug)]
pub struct Mosquitto {
    // First: dropped (killed) before the temp dir is removed.
    proc: Option<Proc>,
    dir: TempDir,
    port: u16,
    secure: Option<(u16, bool)>,
    binary: PathBuf,
}

/// The mosquitto binary: env `FIELDGATE_MOSQUITTO`, else `/usr/sbin/mosquitto`, else `PATH`.
pub fn mosquitto_binary() -> Result<PathBuf> {
    find_executable("FIELDGATE_MOSQUITTO", &[PathBuf::from("/usr/sbin/mosquitto")], "mosquitto")
}

/// `mosquitto_passwd` (env `FIELDGATE_MOSQUITTO_PASSWD`, `/usr/bin`, `PATH`; Debian package
/// mosquitto).
pub fn mosquitto_passwd_binary() -> Result<PathBuf> {
    find_executable("FIELDGATE_MOSQUITTO_PASSWD", &[PathBuf::from("/usr/bin/mosquitto_passwd")], "mosquitto_passwd")
}

impl Mosquitto {
    /// Starts a broker with one anonymous plain listener.
    pub async fn start() -> Result<Self> {
        Self::start_with(MosquittoOptions::default()).await
    }

    /// Starts a broker with a plain anonymous listener and, when options ask for it, a secure
    /// listener with TLS and/or a password file.
    pub async fn start_with(options: MosquittoOptions) -> Result<Self> {
        let dir = crate::temp_dir("fieldgate-mosquitto-")?;
        let d = dir.path();
        let port = free_port()?;
        let secure_port = if options.tls.is_some() || options.password.is_some() { Some(free_port()?) } else { None };
        let mut conf = String::new();
        if running_as_root() {
            // Debian's mosquitto drops to user `mosquitto` when started as root, and then cannot
            // write our temp dir.
            conf.push_str("user root\n");
        }
        writeln!(conf, "persistence true")?;
        writeln!(conf, "persistence_location {}/", d.display())?;
        // 0 is "unlimited", but mosquitto 2.0.11 with it drops an MQTT 5 client's connection
        // right after answering a publish its ACL denies (PUBACK 0x87, then a reset that can
        // swallow the acknowledgements before it); a large limit does not.
        if options.acl.is_some() {
            writeln!(conf, "max_queued_messages 10000000")?;
        } else {
            writeln!(conf, "max_queued_messages 0")?;
        }
        writeln!(conf, "max_queued_bytes 0")?;
        writeln!(conf, "max_inflight_messages 0")?;
        writeln!(conf, "set_tcp_nodelay true")?;
        writeln!(conf, "log_dest file {}", d.join("mosquitto.log").display())?;
        for t in ["error", "warning", "notice", "information", "subscribe"] {
            writeln!(conf, "log_type {t}")?;
        }
        writeln!(conf, "connection_messages true")?;
        writeln!(conf, "log_timestamp_format %H:%M:%S")?;
        if secure_port.is_some() {
            writeln!(conf, "per_listener_settings true")?;
        }
        if let Some(lines) = &options.acl {
            let file = d.join("acl");
            std::fs::write(&file, lines.join("\n") + "\n")?;
            writeln!(conf, "acl_file {}", file.display())?;
        }
        writeln!(conf, "\nlistener {port} 127.0.0.1")?;
        writeln!(conf, "allow_anonymous true")?;
        if let Some(sport) = secure_port {
            writeln!(conf, "\nlistener {sport} 127.0.0.1")?;
            if let Some(tls) = &options.tls {
                std::fs::write(d.join("ca.crt"), &tls.pki.ca_cert)?;
                std::fs::write(d.join("server.crt"), &tls.pki.server_cert)?;
                std::fs::write(d.join("server.key"), &tls.pki.server_key)?;
                writeln!(conf, "cafile {}", d.join("ca.crt").display())?;
                writeln!(conf, "certfile {}", d.join("server.crt").display())?;
                writeln!(conf, "keyfile {}", d.join("server.key").display())?;
                writeln!(conf, "require_certificate {}", tls.require_certificate)?;
            }
            match &options.password {
                Some((user, password)) => {
                    let passwd = mosquitto_passwd_binary()?;
                    let file = d.join("passwd");
                    let out = Command::new(&passwd)
                        .arg("-b")
                        .arg("-c")
                        .arg(&file)
                        .arg(user)
                        .arg(password)
                        .output()
                        .with_context(|| format!("running {}", passwd.display()))?;
                    if !out.status.success() {
                        bail!("mosquitto_passwd failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
                    }
                    writeln!(conf, "allow_anonymous false")?;
                    writeln!(conf, "password_file {}", file.display())?;
                }
                None => writeln!(conf, "allow_anonymous true")?,
            }
        }
        for (name, address, topic) in &options.bridges {
            writeln!(conf, "\nconnection {name}\naddress {address}\ntopic {topic}\ncleansession true")?;
        }
        std::fs::write(d.join("mosquitto.conf"), conf)?;
        let mut m = Self {
            dir,
            port,
            secure: secure_port.map(|p| (p, options.tls.is_some())),
            binary: mosquitto_binary()?,
            proc: None,
        };
        m.start_again().await?;
        Ok(m)
    }

    /// `mqtt://127.0.0.1:PORT` of the plain anonymous listener.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The broker's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// The plain listener's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of the secure listener (`mqtts://` with TLS, else `mqtt://`), if configured.
    pub fn secure_url(&self) -> Option<String> {
        self.secure.map(|(port, tls)| format!("{}://127.0.0.1:{port}", if tls { "mqtts" } else { "mqtt" }))
    }

    /// The temp dir holding config, persistence and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of the broker log.
    pub fn log_tail(&self) -> String {
        file_tail(&self.dir.path().join("mosquitto.log"), 40)
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| matches!(p.try_status(), Ok(None)))
    }

    /// SIGTERM and wait for the exit, so the persistence file (with queued messages of
    /// persistent sessions) is written.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.terminate(STOP_TIMEOUT).await.with_context(|| format!("stopping mosquitto\n{}", self.log_tail()))?;
        }
        Ok(())
    }

    /// SIGKILL: whatever was not saved is gone.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.kill()?;
        }
        Ok(())
    }

    /// Starts the broker (again) with the same ports, config and persistence.
    pub async fn start_again(&mut self) -> Result<()> {
        self.kill()?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("-c").arg(self.dir.path().join("mosquitto.conf"));
        let d = self.dir.path().to_path_buf();
        self.proc = Some(Proc::spawn("mosquitto", cmd, &d.join("mosquitto.stdout"), &d.join("mosquitto.stderr"))?);
        let mut ports = vec![self.port];
        if let Some((p, _)) = self.secure {
            ports.push(p);
        }
        let proc = &mut self.proc;
        let ready = wait_until("mosquitto to accept connections", STARTUP_TIMEOUT, || {
            let exited = proc.as_mut().map(|p| p.try_status());
            let ready = ports.iter().all(|p| TcpStream::connect(("127.0.0.1", *p)).is_ok());
            async move {
                if let Some(Ok(Some(status))) = exited {
                    return Ok(Some(Err(anyhow::anyhow!("mosquitto exited: {status}"))));
                }
                Ok(ready.then_some(Ok(())))
            }
        })
        .await
        .and_then(|inner| inner);
        if let Err(e) = ready {
            bail!(
                "mosquitto did not start ({e:#})\n--- config ---\n{}\n--- log ---\n{}\n--- stderr ---\n{}",
                std::fs::read_to_string(d.join("mosquitto.conf")).unwrap_or_default(),
                self.log_tail(),
                file_tail(&d.join("mosquitto.stderr"), 20)
            );
        }
        Ok(())
    }
}

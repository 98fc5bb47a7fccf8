//! `fieldgate-demo`: the whole data path live on one machine, checked end to end.
//!
//! It starts `nats-server` (JetStream on disk, fsync on every write), a `mosquitto` standing in
//! for the cloud, N simulated Modbus TCP devices (in this process, so it knows how many
//! readings each served) and the gateway, then shows once a second, per device: readings the
//! device served, distinct readings the cloud received (decoded with the published schema,
//! `fieldgate.v1.Reading`, JSON or protobuf, and checked against the simulator's register
//! map), the difference still on its way, and the latest values; and the gateway's own
//! counters from `/api/v1/status` (accepted, delivered, buffered, dropped by reason).
//!
//! Key `d` (or `--outage-at`) stops the cloud broker for `--outage`: the view shows the
//! buffer fill and drain, then says whether every reading the devices served reached the
//! cloud. `q`, Ctrl-C or `--run-for` end the demo with the same check over the whole run.
//!
//! If any process it started exits, the demo stops everything and exits with status 1,
//! showing that process's log (the gateway's error, for an invalid setting).

mod cloud;
mod gateway_api;
mod processes;
mod view;

use std::collections::HashSet;
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use fieldgate_sim::SimDevice;
use tokio::net::TcpListener;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cloud::{Cloud, Wire};
use crate::gateway_api::GatewayApi;
use crate::processes::Processes;
use crate::view::{Frame, Outage};

/// The live demo of the Fieldgate data path.
#[derive(Debug, Parser)]
#[command(name = "fieldgate-demo", version)]
struct Args {
    /// Simulated Modbus TCP devices.
    #[arg(long, default_value_t = 10)]
    devices: u32,
    /// How often the gateway polls each device.
    #[arg(long, default_value = "1s")]
    poll_interval: fieldgate_crds::values::HumanDuration,
    /// The uplink's encoding, written into the gateway's config as given: `json` or `protobuf`
    /// (the view decodes these two; the compact forms and Sparkplug B are refused, see
    /// docs/encodings.md for their consumers).
    #[arg(long, default_value = "json")]
    encoding: String,
    /// MQTT protocol version of the uplink: 5 or 3.
    #[arg(long, default_value_t = 5)]
    mqtt_version: u8,
    /// The gateway binary.
    #[arg(long)]
    gateway: PathBuf,
    /// The nats-server binary (2.10 or newer).
    #[arg(long)]
    nats_server: PathBuf,
    /// The mosquitto binary.
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    mosquitto: PathBuf,
    /// Where configs, stores and logs go (emptied first).
    #[arg(long, default_value = ".demo")]
    work_dir: PathBuf,
    /// How long the cloud broker stays down in an outage.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    outage: Duration,
    /// Start an outage this long after the gateway is ready (key `d` starts one any time).
    #[arg(long, value_parser = humantime::parse_duration)]
    outage_at: Option<Duration>,
    /// End the demo this long after the gateway is ready (else at `q` or Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    run_for: Option<Duration>,
}

/// How long the final check waits for the cloud to receive every served reading.
const FINAL_CHECK: Duration = Duration::from_secs(60);
/// How long the readings of an outage may take to drain before they count as lost.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);
const CLOUD: &str = "cloud mosquitto";

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(run(args)) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("\ndemo: {e:#}");
            1
        }
    };
    // A blocked read of the terminal would hold the runtime's shutdown: leave at once.
    std::process::exit(code)
}

/// One simulated device served by this process.
struct Device {
    name: String,
    key: String,
    port: u16,
    sim: SimDevice,
}

/// Everything the demo started and watches.
struct Demo {
    args: Args,
    wire: Wire,
    work: PathBuf,
    procs: Processes,
    mqtt_port: u16,
    devices: Vec<Device>,
    api: GatewayApi,
    status_url: String,
    token: String,
    outage: Outage,
    verdicts: Vec<String>,
    lost: bool,
    started: Instant,
}

/// Encodings the gateway supports but the view cannot decode: refused rather than shown wrong.
/// Anything else is handed to the gateway as given, so a misspelt one gets the gateway's error.
const NOT_VIEWABLE: [&str; 3] = ["jsonCompact", "protobufCompact", "sparkplugB"];

async fn run(args: Args) -> Result<bool> {
    if NOT_VIEWABLE.contains(&args.encoding.as_str()) {
        bail!(
            "--encoding {}: the gateway supports it, but this demo's view decodes only json and protobuf \
             (docs/encodings.md shows how a consumer decodes the compact forms and Sparkplug B)",
            args.encoding
        );
    }
    let wire = if args.encoding == "protobuf" { Wire::Protobuf } else { Wire::Json };
    let work = prepare_work_dir(&args.work_dir)?;
    let ports = free_ports(3)?;
    let (nats_port, mqtt_port, mgmt_port) = (ports[0], ports[1], ports[2]);
    let token = format!("{:032x}", rand::random::<u128>());
    let mgmt = SocketAddr::from(([127, 0, 0, 1], mgmt_port));
    let mut demo = Demo {
        wire,
        work,
        procs: Processes::default(),
        mqtt_port,
        devices: Vec::new(),
        api: GatewayApi::new(mgmt, token.clone()),
        status_url: format!("http://{mgmt}/status"),
        token,
        outage: Outage::None,
        verdicts: Vec::new(),
        lost: false,
        started: Instant::now(),
        args,
    };
    let stop_devices = CancellationToken::new();
    let outcome = demo.run(nats_port, mgmt, &stop_devices).await;
    println!("demo: stopping (the gateway first, so it finishes its deliveries)");
    demo.procs.stop_all().await;
    stop_devices.cancel();
    println!("demo: stopped everything it started; configs and logs are in {}", demo.work.display());
    outcome
}

impl Demo {
    async fn run(&mut self, nats_port: u16, mgmt: SocketAddr, stop_devices: &CancellationToken) -> Result<bool> {
        self.start_nats(nats_port).await?;
        self.start_cloud_broker().await?;
        self.start_devices(stop_devices).await?;
        let schema = fieldgate_sim::simulated_points(0);
        let cloud = Cloud::start(self.mqtt_port, self.wire, schema).await?;
        self.start_gateway(nats_port, mgmt)?;
        println!(
            "demo: {} simulated devices polled every {}; nats-server :{nats_port}, cloud mosquitto :{}, gateway {mgmt}",
            self.devices.len(),
            self.args.poll_interval,
            self.mqtt_port
        );
        println!("demo: waiting for the gateway to be ready (logs: {})", self.work.join("gateway.log").display());
        self.wait_ready().await?;
        self.watch(&cloud).await?;
        self.final_check(&cloud).await
    }

    async fn start_nats(&mut self, port: u16) -> Result<()> {
        let dir = self.work.join("nats");
        let conf = dir.join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {:?}, sync_interval: always }}\n",
                dir.join("store").display().to_string()
            ),
        )?;
        let mut cmd = Command::new(&self.args.nats_server);
        // One Go scheduler thread, as the chart runs it (`nats.goMaxProcs`).
        cmd.arg("-c").arg(&conf).env("GOMAXPROCS", "1");
        self.procs.spawn("nats-server", cmd, &dir.join("log"))?;
        self.wait_port(port, "nats-server").await
    }

    async fn start_cloud_broker(&mut self) -> Result<()> {
        let dir = self.work.join("mosquitto");
        let conf = dir.join("mosquitto.conf");
        let mut text = format!(
            "listener {} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 0\nmax_queued_messages 0\n\
             persistence true\npersistence_location {}/\n",
            self.mqtt_port,
            dir.display()
        );
        if running_as_root() {
            text.push_str("user root\n");
        }
        std::fs::write(&conf, text)?;
        let mut cmd = Command::new(&self.args.mosquitto);
        cmd.arg("-c").arg(&conf);
        self.procs.spawn(CLOUD, cmd, &dir.join("log"))?;
        self.wait_port(self.mqtt_port, CLOUD).await
    }

    async fn start_devices(&mut self, stop: &CancellationToken) -> Result<()> {
        for i in 0..self.args.devices {
            let listener = TcpListener::bind("127.0.0.1:0").await.context("binding a simulated device's port")?;
            let sim = SimDevice::new(i, 0);
            let name = format!("sim-{i:02}");
            let port = listener.local_addr()?.port();
            tokio::spawn(fieldgate_sim::serve(listener, sim.clone(), stop.clone()));
            self.devices.push(Device { key: format!("default/{name}"), name, port, sim });
        }
        Ok(())
    }

    fn start_gateway(&mut self, nats_port: u16, mgmt: SocketAddr) -> Result<()> {
        let devices: Vec<_> = self
            .devices
            .iter()
            .map(|d| {
                fieldgate_sim::gateway_device("default", &d.name, "127.0.0.1", d.port, &self.args.poll_interval, 0)
            })
            .collect();
        let devices = serde_saphyr::to_string(&serde_json::json!({ "devices": devices }))?;
        let encoding = serde_json::Value::from(self.args.encoding.as_str());
        let config = format!(
            "apiVersion: fieldgate.io/v1alpha1\nkind: GatewayConfig\nversion: demo\n{devices}uplinks:\n\
             - name: cloud\n  encoding: {encoding}\n  mqtt: {{url: \"mqtt://127.0.0.1:{}\", protocolVersion: {}}}\n\
             \x20 buffer: {{maxBytes: 256Mi, maxAge: 24h, onFull: dropOldest}}\n",
            self.mqtt_port, self.args.mqtt_version
        );
        let config_path = self.work.join("gateway.yaml");
        std::fs::write(&config_path, config)?;
        let token_path = self.work.join("api-token");
        std::fs::write(&token_path, &self.token)?;
        let mut cmd = Command::new(&self.args.gateway);
        cmd.arg("--config")
            .arg(&config_path)
            .arg("--nats-url")
            .arg(format!("nats://127.0.0.1:{nats_port}"))
            .arg("--listen")
            .arg(mgmt.to_string())
            .arg("--secrets-dir")
            .arg(self.work.join("secrets"))
            .arg("--node")
            .arg("demo-node")
            .arg("--api-token-file")
            .arg(&token_path)
            .env("NO_COLOR", "1");
        self.procs.spawn("the gateway", cmd, &self.work.join("gateway.log"))
    }

    /// Fails with the process's log as soon as any started process exits.
    fn check_processes(&mut self) -> Result<()> {
        match self.procs.check() {
            Some(exited) => Err(anyhow!("{exited}")),
            None => Ok(()),
        }
    }

    async fn wait_port(&mut self, port: u16, what: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.check_processes()?;
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{what} does not listen on 127.0.0.1:{port} after 30 s (see {})", self.work.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            self.check_processes()?;
            if self.api.ready().await {
                self.started = Instant::now();
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = processes::tail(&self.work.join("gateway.log"), 15);
                bail!("the gateway is not ready after 120 s; the end of its log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The live view, until `q`, Ctrl-C, SIGTERM or `--run-for`.
    async fn watch(&mut self, cloud: &Cloud) -> Result<()> {
        let tty = std::io::stdout().is_terminal();
        let mut keys = key_presses();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut outage_at = self.args.outage_at.map(|d| self.started + d);
        let run_until = self.args.run_for.map(|d| self.started + d);
        let mut frames = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                Some(key) = keys.recv() => match key {
                    b'd' | b'D' => self.begin_outage().await?,
                    b'q' | b'Q' => return Ok(()),
                    _ => {}
                },
                _ = tokio::signal::ctrl_c() => return Ok(()),
                _ = term.recv() => return Ok(()),
            }
            self.check_processes()?;
            if outage_at.is_some_and(|t| Instant::now() >= t) {
                outage_at = None;
                self.begin_outage().await?;
            }
            let frame = self.frame(cloud).await;
            self.advance_outage(&frame).await?;
            if tty {
                print!("{}", view::screen(&frame, &self.status_line(), &self.verdicts, self.args.outage));
            } else if frames.is_multiple_of(5) {
                println!("{}", view::line(&frame));
            }
            frames += 1;
            if run_until.is_some_and(|t| Instant::now() >= t) {
                return Ok(());
            }
        }
    }

    fn status_line(&self) -> String {
        format!(
            "status page {} (any user name, password {}) · logs {}",
            self.status_url,
            self.token,
            self.work.display()
        )
    }

    /// What the devices served, the cloud received and the gateway reports, now.
    async fn frame(&self, cloud: &Cloud) -> Frame {
        let seen = cloud.seen();
        let served = self.devices.iter().map(|d| (d.key.clone(), d.sim.polls_served())).collect();
        let gateway = self.api.status().await.map_err(|e| format!("{e:#}"));
        Frame {
            elapsed: self.started.elapsed(),
            devices: self.devices.len(),
            poll_interval: self.args.poll_interval.to_string(),
            encoding: self.args.encoding.clone(),
            mqtt_version: self.args.mqtt_version,
            served,
            seen,
            gateway,
            outage: self.outage.clone(),
        }
    }

    /// Stops the cloud broker for `--outage` (key `d`).
    async fn begin_outage(&mut self) -> Result<()> {
        if matches!(self.outage, Outage::Down { .. }) {
            return Ok(());
        }
        self.procs.stop(CLOUD).await?;
        let now = Instant::now();
        self.outage = Outage::Down { since: now, until: now + self.args.outage, peak_backlog: 0 };
        self.say(format!(
            "cloud broker stopped for {}: readings wait in the JetStream buffer",
            humantime::format_duration(self.args.outage)
        ));
        Ok(())
    }

    /// Brings the broker back when the outage ends, then waits until every device's served
    /// readings reached the cloud and says so (or counts what did not arrive).
    async fn advance_outage(&mut self, frame: &Frame) -> Result<()> {
        let backlog = frame.backlog();
        match &mut self.outage {
            Outage::None => {}
            Outage::Down { since, until, peak_backlog } => {
                *peak_backlog = (*peak_backlog).max(backlog.unwrap_or(0));
                if Instant::now() >= *until {
                    let (down_for, peak) = (since.elapsed(), *peak_backlog);
                    self.start_cloud_broker().await?;
                    self.outage = Outage::Draining {
                        since: Instant::now(),
                        down_for,
                        peak_backlog: peak,
                        caught_up: HashSet::new(),
                    };
                    self.say("cloud broker back: the buffer drains".to_string());
                }
            }
            Outage::Draining { since, down_for, peak_backlog, caught_up } => {
                *peak_backlog = (*peak_backlog).max(backlog.unwrap_or(0));
                caught_up.extend(frame.caught_up());
                let (down_for, peak) = (*down_for, *peak_backlog);
                if caught_up.len() == frame.served.len() && backlog == Some(0) {
                    self.outage = Outage::None;
                    self.say(format!(
                        "after {} without the cloud: up to {peak} readings waited in the buffer; every reading \
                         the devices served has reached the cloud — nothing lost",
                        humantime::format_duration(Duration::from_secs(down_for.as_secs()))
                    ));
                } else if since.elapsed() > DRAIN_LIMIT {
                    let missing = frame.missing_total();
                    self.outage = Outage::None;
                    self.lost = true;
                    self.say(format!(
                        "LOST: {} s after the outage {missing} served readings have not reached the cloud",
                        DRAIN_LIMIT.as_secs()
                    ));
                }
            }
        }
        Ok(())
    }

    fn say(&mut self, verdict: String) {
        let line = format!("[{:>5.0}s] {verdict}", self.started.elapsed().as_secs_f64());
        if !std::io::stdout().is_terminal() {
            println!("demo: {line}");
        }
        self.verdicts.push(line);
    }

    /// The check over the whole run: every reading the devices served reached the cloud
    /// (each device seen with nothing on its way at some moment), every message decoded and
    /// matched the register map.
    async fn final_check(&mut self, cloud: &Cloud) -> Result<bool> {
        if matches!(self.outage, Outage::Down { .. }) {
            self.start_cloud_broker().await?;
        }
        println!("\ndemo: checking that every reading the devices served reached the cloud ...");
        let deadline = Instant::now() + FINAL_CHECK;
        let mut caught_up = HashSet::new();
        let frame = loop {
            self.check_processes()?;
            let frame = self.frame(cloud).await;
            caught_up.extend(frame.caught_up());
            if caught_up.len() == self.devices.len() || Instant::now() >= deadline {
                break frame;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let summary = view::summary(&frame);
        let mut ok = !self.lost;
        println!("demo: {summary}");
        if caught_up.len() < self.devices.len() {
            println!("demo: LOST: {} served readings never reached the cloud", frame.missing_total());
            ok = false;
        }
        if frame.seen.undecodable > 0 || frame.bad_values() > 0 {
            println!(
                "demo: WRONG: {} messages did not decode, {} readings did not match the register map ({})",
                frame.seen.undecodable,
                frame.bad_values(),
                frame.last_problem().unwrap_or_default()
            );
            ok = false;
        }
        if ok {
            println!(
                "demo: nothing lost: every reading the devices served reached the cloud, decoded with the published \
                 schema and matching the register map"
            );
        }
        Ok(ok)
    }
}

/// Bytes typed on the terminal (none when stdin is not one).
fn key_presses() -> mpsc::Receiver<u8> {
    let (tx, rx) = mpsc::channel(16);
    if std::io::stdin().is_terminal() {
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt as _;
            let mut stdin = tokio::io::stdin();
            let mut byte = [0u8; 1];
            while let Ok(1) = stdin.read(&mut byte).await {
                if tx.send(byte[0]).await.is_err() {
                    break;
                }
            }
        });
    }
    rx
}

fn prepare_work_dir(dir: &Path) -> Result<PathBuf> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    for sub in ["nats", "mosquitto", "secrets"] {
        std::fs::create_dir_all(dir.join(sub)).with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    Ok(std::fs::canonicalize(dir)?)
}

/// `n` distinct ports of 127.0.0.1 that nothing listened on a moment ago.
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("finding free ports")?;
    Ok(listeners.iter().filter_map(|l| l.local_addr().ok()).map(|a| a.port()).collect())
}

/// Whether this process runs as root (mosquitto then needs `user root` to write its store).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|rest| rest.split_whitespace().nth(1).map(|euid| euid == "0"))
            .unwrap_or(false)
    })
}

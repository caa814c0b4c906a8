//! `floorgate fleet keygen|push`: the cloud side of signed remote configuration.
//!
//! `keygen` makes the ed25519 key pair; `push` signs a TOML file (see
//! [`crate::uplink::remote::signing_message`]), publishes it on `config/set` of one gateway or of a
//! group (canary members first, on their own topics) and waits for each gateway's retained
//! `config/state` answer for that version.

use super::Failure;
use crate::uplink::remote::ConfigSet;
use crate::uplink::tls;
use base64::Engine as _;
use rand::Rng as _;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Filter, Packet, PubAckReason, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

/// `fleet` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(super) enum Command {
    /// Make the ed25519 key pair that signs remote configuration: PATH (private, mode 0600) and
    /// PATH.pub (public); prints the `uplink.config_public_key` line for the gateways.
    Keygen(KeygenArgs),
    /// Sign a TOML file and push it to one gateway or to a group (canary members first), then
    /// wait for each gateway's outcome. Exit 0 only when every target applied it.
    Push(Box<PushArgs>),
}

/// Arguments of `fleet keygen`.
#[derive(Debug, clap::Args)]
pub(super) struct KeygenArgs {
    /// Where to write the private key; the public key goes to PATH.pub.
    path: PathBuf,
    /// Overwrite existing key files.
    #[arg(long)]
    force: bool,
}

/// Arguments of `fleet push`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["gateway", "group"])))]
pub(super) struct PushArgs {
    /// Broker URL, `mqtts://host:port` (`mqtt://` only with --allow-plaintext).
    #[arg(long, value_name = "URL")]
    broker: String,
    /// CA bundle that signed the broker's certificate (default: the system roots).
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Client certificate (mTLS).
    #[arg(long, value_name = "FILE", requires = "key_file")]
    cert_file: Option<PathBuf>,
    /// Client private key (mTLS); must not be readable by group or others.
    #[arg(long, value_name = "FILE", requires = "cert_file")]
    key_file: Option<PathBuf>,
    /// MQTT user name.
    #[arg(long, value_name = "USER")]
    username: Option<String>,
    /// File holding the MQTT password (mode 0600).
    #[arg(long, value_name = "FILE", requires = "username")]
    password_file: Option<PathBuf>,
    /// Allow `mqtt://` (no TLS) on a trusted network.
    #[arg(long)]
    allow_plaintext: bool,
    /// Signing key written by `floorgate fleet keygen` (mode 0600).
    #[arg(long, value_name = "PATH")]
    key: PathBuf,
    /// Push to this one gateway.
    #[arg(long, value_name = "ID")]
    gateway: Option<String>,
    /// Push to this group (`floorgate/{site}/groups/{group}/config/set`).
    #[arg(long, value_name = "NAME", requires = "members")]
    group: Option<String>,
    /// The group's members (from the cloud's inventory), comma-separated; the first --canary of
    /// them are the canaries.
    #[arg(long, value_name = "ID,...", value_delimiter = ',', requires = "group")]
    members: Vec<String>,
    /// Site of the gateways (topics `floorgate/{site}/...`).
    #[arg(long, value_name = "SITE")]
    site: Option<String>,
    /// Gateway topic prefix when the gateways use a non-default `uplink.topic_prefix`
    /// (`{site}` and `{gateway}` are replaced).
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "floorgate/{site}/{gateway}"
    )]
    topic_prefix: String,
    /// Configuration version; gateways apply only versions newer than their own.
    #[arg(long = "version", value_name = "N")]
    config_version: u64,
    /// The configuration to push.
    file: PathBuf,
    /// Push to the first N members on their own topics first; only when all of them applied the
    /// version, push to the group topic for the rest.
    #[arg(long, value_name = "N", requires = "group")]
    canary: Option<usize>,
    /// How long to wait for the outcomes of each stage (the canaries, then the rest).
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub(super) async fn run(c: Command) -> Result<(), Failure> {
    match c {
        Command::Keygen(a) => keygen(&a),
        Command::Push(a) => push(*a).await,
    }
}

// ---------------------------------------------------------------------------------------------
// keygen
// ---------------------------------------------------------------------------------------------

fn pub_path(path: &Path) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(".pub");
    PathBuf::from(s)
}

fn keygen(a: &KeygenArgs) -> Result<(), Failure> {
    let public_path = pub_path(&a.path);
    if !a.force {
        for p in [&a.path, &public_path] {
            if p.exists() {
                return Err(Failure::new(format!(
                    "{} already exists; use --force to overwrite it",
                    p.display()
                )));
            }
        }
    }
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill(&mut seed);
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let b64 = base64::engine::general_purpose::STANDARD;
    let private_text = format!("{}\n", b64.encode(seed));
    let public_b64 = b64.encode(key.verifying_key().to_bytes());
    write_atomic(&a.path, private_text.as_bytes(), 0o600, a.force)?;
    write_atomic(
        &public_path,
        format!("{public_b64}\n").as_bytes(),
        0o644,
        a.force,
    )?;
    eprintln!(
        "wrote private key {} (mode 0600; keep it in the cloud) and public key {}",
        a.path.display(),
        public_path.display()
    );
    eprintln!("put this line in the [uplink] section of every gateway's configuration:");
    println!("config_public_key = \"{public_b64}\"");
    Ok(())
}

/// Writes a file through a temporary file in the same directory (created 0600), sets `mode`,
/// then renames it into place (refusing to replace an existing file unless `overwrite`).
fn write_atomic(path: &Path, data: &[u8], mode: u32, overwrite: bool) -> Result<(), Failure> {
    use std::os::unix::fs::PermissionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let fail = |e: &dyn std::fmt::Display| Failure::new(format!("{}: {e}", path.display()));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| fail(&e))?;
    tmp.write_all(data).map_err(|e| fail(&e))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| fail(&e))?;
    tmp.as_file().sync_all().map_err(|e| fail(&e))?;
    if overwrite {
        tmp.persist(path).map_err(|e| fail(&e.error))?;
    } else {
        tmp.persist_noclobber(path).map_err(|e| fail(&e.error))?;
    }
    Ok(())
}

/// Reads a signing key written by `keygen`, refusing one that group or others can read.
fn load_signing_key(path: &Path) -> Result<ed25519_dalek::SigningKey, Failure> {
    tls::check_secret_permissions(path).map_err(Failure::new)?;
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::new(format!("cannot read signing key {}: {e}", path.display())))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| Failure::new(format!("signing key {}: not base64: {e}", path.display())))?;
    let seed = <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
        Failure::new(format!(
            "signing key {}: {} bytes, expected a 32-byte ed25519 seed (made by `floorgate fleet keygen`)",
            path.display(),
            bytes.len()
        ))
    })?;
    Ok(ed25519_dalek::SigningKey::from_bytes(&seed))
}

// ---------------------------------------------------------------------------------------------
// push: targets and outcomes
// ---------------------------------------------------------------------------------------------

/// What became of one target gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Applied,
    Rejected,
    RolledBack,
    Timeout,
    Skipped,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Applied => "applied",
            Status::Rejected => "rejected",
            Status::RolledBack => "rolled_back",
            Status::Timeout => "timeout",
            Status::Skipped => "skipped",
        }
    }
}

/// One target gateway and its topics.
#[derive(Debug)]
struct Target {
    id: String,
    set_topic: String,
    state_topic: String,
    status_topic: String,
    canary: bool,
    /// The configuration was published to a topic this gateway follows.
    pushed: bool,
    outcome: Option<(Status, Option<String>)>,
    /// `state` of the gateway's retained `status` message, if any was seen.
    presence: Option<String>,
}

fn check_topic_level(what: &str, s: &str) -> Result<(), Failure> {
    if s.is_empty() || s.contains(['/', '+', '#', '\0']) {
        return Err(Failure::new(format!(
            "{what} {s:?} must be non-empty and contain none of / + #"
        )));
    }
    Ok(())
}

/// Resolves `--topic-prefix` for one gateway.
fn gateway_prefix(template: &str, site: Option<&str>, gateway: &str) -> Result<String, Failure> {
    if template.contains("{site}") && site.is_none() {
        return Err(Failure::new(
            "--site is required (the topic prefix contains {site})",
        ));
    }
    Ok(template
        .replace("{site}", site.unwrap_or_default())
        .replace("{gateway}", gateway))
}

impl Target {
    /// Records a timeout (unless an outcome is already known), with the gateway's last status.
    fn time_out(&mut self, why: &str) {
        if self.outcome.is_none() {
            let presence = match self.presence.as_deref() {
                Some(p) => format!("gateway status: {p}"),
                None => "gateway status unknown".to_string(),
            };
            self.outcome = Some((Status::Timeout, Some(format!("{why} ({presence})"))));
        }
    }
}

/// The plan of a push: targets in order, the group topic (if any) and the canary count.
#[derive(Debug)]
struct Plan {
    targets: Vec<Target>,
    group_topic: Option<String>,
    canaries: usize,
}

fn plan(a: &PushArgs) -> Result<Plan, Failure> {
    if let Some(site) = &a.site {
        check_topic_level("--site", site)?;
    }
    let target = |id: &str, canary: bool| -> Result<Target, Failure> {
        check_topic_level("gateway id", id)?;
        let prefix = gateway_prefix(&a.topic_prefix, a.site.as_deref(), id)?;
        Ok(Target {
            id: id.to_string(),
            set_topic: format!("{prefix}/config/set"),
            state_topic: format!("{prefix}/config/state"),
            status_topic: format!("{prefix}/status"),
            canary,
            pushed: false,
            outcome: None,
            presence: None,
        })
    };
    if let Some(gw) = &a.gateway {
        return Ok(Plan {
            targets: vec![target(gw, false)?],
            group_topic: None,
            canaries: 0,
        });
    }
    let group = a
        .group
        .as_deref()
        .ok_or_else(|| Failure::new("give --gateway ID or --group NAME --members ID,..."))?;
    check_topic_level("--group", group)?;
    let site = a
        .site
        .as_deref()
        .ok_or_else(|| Failure::new("--site is required with --group"))?;
    let members: Vec<&str> = a
        .members
        .iter()
        .map(|m| m.trim())
        .filter(|m| !m.is_empty())
        .collect();
    if members.is_empty() {
        return Err(Failure::new("--members lists no gateway"));
    }
    let mut seen = BTreeSet::new();
    for m in &members {
        if !seen.insert(*m) {
            return Err(Failure::new(format!("--members lists {m} twice")));
        }
    }
    if members.len() > 1 && !a.topic_prefix.contains("{gateway}") {
        return Err(Failure::new(
            "--topic-prefix must contain {gateway} when pushing to a group",
        ));
    }
    let canaries = match a.canary {
        None => 0,
        Some(0) => return Err(Failure::new("--canary must be at least 1")),
        Some(n) if n > members.len() => {
            return Err(Failure::new(format!(
                "--canary {n} but --members lists only {} gateways",
                members.len()
            )))
        }
        Some(n) => n,
    };
    let targets = members
        .iter()
        .enumerate()
        .map(|(i, m)| target(m, i < canaries))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Plan {
        targets,
        group_topic: Some(format!("floorgate/{site}/groups/{group}/config/set")),
        canaries,
    })
}

// ---------------------------------------------------------------------------------------------
// push: the MQTT session
// ---------------------------------------------------------------------------------------------

/// Parses `mqtts://host:port` (port defaults to 8883, or 1883 for `mqtt://`).
fn parse_broker(url: &str, allow_plaintext: bool) -> Result<(String, u16, bool), Failure> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        if !allow_plaintext {
            return Err(Failure::new(
                "plaintext mqtt:// is refused: use mqtts://, or --allow-plaintext on a trusted network",
            ));
        }
        (false, rest)
    } else {
        return Err(Failure::new(format!(
            "--broker {url:?} must start with mqtts://"
        )));
    };
    let rest = rest.trim_end_matches('/');
    let default_port = if tls { 8883 } else { 1883 };
    let bad_port = || Failure::new(format!("bad port in --broker {url:?}"));
    let (host, port) = if let Some(r) = rest.strip_prefix('[') {
        let (h, after) = r.split_once(']').ok_or_else(bad_port)?;
        match after.strip_prefix(':') {
            Some(p) => (h, p.parse::<u16>().map_err(|_| bad_port())?),
            None if after.is_empty() => (h, default_port),
            None => return Err(bad_port()),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad_port())?),
            None => (rest, default_port),
        }
    };
    if host.is_empty() {
        return Err(Failure::new(format!("--broker {url:?} has no host")));
    }
    Ok((host.to_string(), port, tls))
}

fn mqtt_options(a: &PushArgs) -> Result<MqttOptions, Failure> {
    let (host, port, use_tls) = parse_broker(&a.broker, a.allow_plaintext)?;
    let client_id = format!("floorgate-fleet-{:016x}", rand::thread_rng().gen::<u64>());
    let mut o = MqttOptions::new(client_id, host.clone(), port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_start(true);
    o.set_max_packet_size(Some(8 << 20));
    o.set_connection_timeout(10);
    if use_tls {
        let u = crate::config::Uplink {
            host,
            port,
            tls: true,
            ca_file: a.ca_file.clone(),
            cert_file: a.cert_file.clone(),
            key_file: a.key_file.clone(),
            username: a.username.clone(),
            password_file: a.password_file.clone(),
            topic_prefix: String::new(),
            keep_alive: Duration::from_secs(30),
            max_batch: 1,
            max_inflight: 1,
            reconnect_max: Duration::from_secs(1),
            config_public_key: None,
            config_window: std::time::Duration::from_secs(60),
        };
        let cfg = tls::client_config(&u).map_err(Failure::new)?;
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(cfg)));
    }
    if let Some(user) = &a.username {
        let password = match &a.password_file {
            Some(p) => crate::uplink::read_password(p).map_err(Failure::new)?,
            None => String::new(),
        };
        o.set_credentials(user.clone(), password);
    }
    Ok(o)
}

/// The pusher's MQTT session: drives the event loop and records every `config/state` and
/// `status` message of the targets as it goes by.
struct Session {
    client: AsyncClient,
    eventloop: EventLoop,
    broker: String,
    plan: Plan,
    version: u64,
    /// Topic → index of the target.
    by_state_topic: HashMap<String, usize>,
    by_status_topic: HashMap<String, usize>,
    subscribed: bool,
    /// The connection was re-established after the first one: retained messages delivered on
    /// the new subscription may be answers that arrived in between.
    reconnected: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("plan", &self.plan)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// Tells when the caller must stop waiting on the event loop.
enum Step {
    ConnAck,
    SubAck(Vec<SubscribeReasonCode>),
    PubAck(PubAckReason),
    Other,
    Deadline,
}

impl Session {
    fn new(opts: MqttOptions, plan: Plan, version: u64) -> Session {
        let (host, port) = opts.broker_address();
        let broker = format!("{host}:{port}");
        let (client, eventloop) = AsyncClient::new(opts, 16);
        let by_state_topic = plan
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| (t.state_topic.clone(), i))
            .collect();
        let by_status_topic = plan
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| (t.status_topic.clone(), i))
            .collect();
        Session {
            client,
            eventloop,
            broker,
            plan,
            version,
            by_state_topic,
            by_status_topic,
            subscribed: false,
            reconnected: false,
        }
    }

    fn filters(&self) -> Vec<Filter> {
        self.plan
            .targets
            .iter()
            .flat_map(|t| {
                [
                    Filter::new(t.state_topic.clone(), QoS::AtLeastOnce),
                    Filter::new(t.status_topic.clone(), QoS::AtLeastOnce),
                ]
            })
            .collect()
    }

    /// Polls the event loop once (or until `deadline`). Connection errors fail unless
    /// `tolerate_disconnect`, in which case the next poll reconnects and re-subscribes.
    async fn step(
        &mut self,
        deadline: Instant,
        tolerate_disconnect: bool,
    ) -> Result<Step, Failure> {
        let ev = match tokio::time::timeout_at(deadline, self.eventloop.poll()).await {
            Err(_) => return Ok(Step::Deadline),
            Ok(ev) => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if ack.code != ConnectReturnCode::Success {
                    return Err(Failure::new(format!(
                        "broker refused the connection: {:?}",
                        ack.code
                    )));
                }
                if self.subscribed {
                    // Clean start: a reconnect needs the subscription again.
                    self.reconnected = true;
                    let filters = self.filters();
                    self.client
                        .try_subscribe_many(filters)
                        .map_err(|e| Failure::new(format!("subscribe: {e}")))?;
                }
                Ok(Step::ConnAck)
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                self.record(&topic, &p.payload, p.retain);
                Ok(Step::Other)
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => Ok(Step::SubAck(ack.return_codes)),
            Ok(Event::Incoming(Packet::PubAck(ack))) => Ok(Step::PubAck(ack.reason)),
            Ok(Event::Incoming(_)) => Ok(Step::Other),
            Ok(Event::Outgoing(_)) => Ok(Step::Other),
            Err(e) if tolerate_disconnect => {
                tracing::warn!(error = %crate::uplink::describe(&e), "connection lost; reconnecting");
                tokio::time::sleep_until(
                    (Instant::now() + Duration::from_millis(500)).min(deadline),
                )
                .await;
                Ok(Step::Other)
            }
            Err(e) => Err(Failure::new(format!(
                "broker {}: {}",
                self.client_broker(),
                crate::uplink::describe(&e)
            ))),
        }
    }

    fn client_broker(&self) -> &str {
        &self.broker
    }

    /// Records a `config/state` answer (for the pushed version, final statuses only) or a
    /// `status` announcement of a target.
    fn record(&mut self, topic: &str, payload: &[u8], retain: bool) {
        let v: Value = match serde_json::from_slice(payload) {
            Ok(v) => v,
            Err(_) => {
                tracing::debug!(topic, "ignoring a message that is not JSON");
                return;
            }
        };
        if let Some(&i) = self.by_status_topic.get(topic) {
            if let Some(state) = v.get("state").and_then(Value::as_str) {
                self.plan.targets[i].presence = Some(state.to_string());
            }
            return;
        }
        let Some(&i) = self.by_state_topic.get(topic) else {
            return;
        };
        let t = &mut self.plan.targets[i];
        // Retained states delivered with the first subscription predate this push; answers to it
        // arrive live (retain flag cleared), or retained again after a reconnect.
        if !t.pushed || t.outcome.is_some() || (retain && !self.reconnected) {
            return;
        }
        if v.get("version").and_then(Value::as_u64) != Some(self.version) {
            return;
        }
        let status = match v.get("status").and_then(Value::as_str) {
            Some("applied") => Status::Applied,
            Some("rejected") => Status::Rejected,
            Some("rolled_back") => Status::RolledBack,
            _ => return,
        };
        let error = match v.get("error") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => Some(other.to_string()),
        };
        tracing::info!(gateway = %t.id, status = status.as_str(), "outcome");
        t.outcome = Some((status, error));
    }

    async fn connect(&mut self, deadline: Instant) -> Result<(), Failure> {
        loop {
            match self.step(deadline, false).await? {
                Step::ConnAck => return Ok(()),
                Step::Deadline => {
                    return Err(Failure::new(format!(
                        "broker {}: no CONNACK in time",
                        self.client_broker()
                    )))
                }
                _ => {}
            }
        }
    }

    async fn subscribe(&mut self, deadline: Instant) -> Result<(), Failure> {
        let filters = self.filters();
        self.client
            .subscribe_many(filters)
            .await
            .map_err(|e| Failure::new(format!("subscribe: {e}")))?;
        loop {
            match self.step(deadline, false).await? {
                Step::SubAck(codes) => {
                    if let Some(bad) = codes
                        .iter()
                        .find(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                    {
                        return Err(Failure::new(format!(
                            "broker refused the subscription to the config/state topics: {bad:?}"
                        )));
                    }
                    self.subscribed = true;
                    return Ok(());
                }
                Step::Deadline => return Err(Failure::new("no SUBACK in time")),
                _ => {}
            }
        }
    }

    /// Publishes the payload (QoS 1, not retained) and waits for the broker's PUBACK. `false`
    /// when the broker says nobody is subscribed to `topic`: no gateway will ever see it.
    async fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        deadline: Instant,
    ) -> Result<bool, Failure> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .map_err(|e| Failure::new(format!("publish to {topic}: {e}")))?;
        loop {
            match self.step(deadline, false).await? {
                Step::PubAck(reason) => {
                    return match reason {
                        PubAckReason::Success => {
                            tracing::info!(topic, version = self.version, "published");
                            Ok(true)
                        }
                        PubAckReason::NoMatchingSubscribers => {
                            tracing::warn!(
                                topic,
                                "published, but no client is subscribed to it (gateway offline?)"
                            );
                            Ok(false)
                        }
                        other => Err(Failure::new(format!(
                            "broker refused the publish to {topic}: {other:?}"
                        ))),
                    };
                }
                Step::Deadline => {
                    return Err(Failure::new(format!("no PUBACK for {topic} in time")))
                }
                _ => {}
            }
        }
    }

    /// Waits until every target in `idx` has an outcome or `deadline` passes; the ones without
    /// an outcome then time out.
    async fn wait(&mut self, idx: &[usize], deadline: Instant, timeout: Duration) {
        while idx.iter().any(|&i| self.plan.targets[i].outcome.is_none()) {
            match self.step(deadline, true).await {
                Ok(Step::Deadline) => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e.message, "while waiting for outcomes");
                    tokio::time::sleep_until(
                        (Instant::now() + Duration::from_millis(500)).min(deadline),
                    )
                    .await;
                }
            }
        }
        for &i in idx {
            let why = format!(
                "no answer for version {} within {}",
                self.version,
                humantime::format_duration(timeout)
            );
            self.plan.targets[i].time_out(&why);
        }
    }

    async fn disconnect(&mut self) {
        let _ = self.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while self.eventloop.poll().await.is_ok() {}
        })
        .await;
    }
}

/// Publishes to each target's own topic; marks it pushed first (its answer can come at once).
async fn push_own(
    s: &mut Session,
    idx: &[usize],
    payload: &[u8],
    deadline: Instant,
) -> Result<(), Failure> {
    for &i in idx {
        s.plan.targets[i].pushed = true;
        let topic = s.plan.targets[i].set_topic.clone();
        if !s.publish(&topic, payload, deadline).await? {
            not_delivered(s, &[i], &topic);
        }
    }
    Ok(())
}

/// The broker had no subscriber for `topic`: these targets cannot answer, so they time out now
/// instead of at the deadline.
fn not_delivered(s: &mut Session, idx: &[usize], topic: &str) {
    for &i in idx {
        s.plan.targets[i].time_out(&format!(
            "not delivered: no client is subscribed to {topic}"
        ));
    }
}

async fn push(a: PushArgs) -> Result<(), Failure> {
    let plan = plan(&a)?;
    let key = load_signing_key(&a.key)?;
    let text = std::fs::read_to_string(&a.file)
        .map_err(|e| Failure::new(format!("cannot read {}: {e}", a.file.display())))?;
    if let Err(e) = text.parse::<toml::Table>() {
        return Err(Failure::new(format!(
            "{}: not valid TOML: {}",
            a.file.display(),
            e.message()
        )));
    }
    let set = ConfigSet::signed(&key, a.config_version, &text);
    let payload = serde_json::to_vec(&set).map_err(Failure::new)?;

    let opts = mqtt_options(&a)?;
    let mut s = Session::new(opts, plan, a.config_version);
    let setup = Instant::now() + Duration::from_secs(15);
    s.connect(setup).await?;
    s.subscribe(setup).await?;

    let n = s.plan.targets.len();
    let canaries: Vec<usize> = (0..s.plan.canaries).collect();
    let rest: Vec<usize> = (s.plan.canaries..n).collect();
    let mut canary_failed = false;
    if !canaries.is_empty() {
        let deadline = Instant::now() + a.timeout;
        push_own(&mut s, &canaries, &payload, deadline).await?;
        s.wait(&canaries, deadline, a.timeout).await;
        canary_failed = canaries
            .iter()
            .any(|&i| !matches!(s.plan.targets[i].outcome, Some((Status::Applied, _))));
    }
    if canary_failed {
        for &i in &rest {
            s.plan.targets[i].outcome = Some((
                Status::Skipped,
                Some("not pushed: a canary did not apply the version".into()),
            ));
        }
    } else if !rest.is_empty() {
        let deadline = Instant::now() + a.timeout;
        match s.plan.group_topic.clone() {
            Some(group_topic) => {
                for &i in &rest {
                    s.plan.targets[i].pushed = true;
                }
                if !s.publish(&group_topic, &payload, deadline).await? {
                    not_delivered(&mut s, &rest, &group_topic);
                }
            }
            None => push_own(&mut s, &rest, &payload, deadline).await?,
        }
        s.wait(&rest, deadline, a.timeout).await;
    }
    s.disconnect().await;

    let results: Vec<(&Target, Status, Option<&str>)> = s
        .plan
        .targets
        .iter()
        .map(|t| match &t.outcome {
            Some((st, e)) => (t, *st, e.as_deref()),
            None => (t, Status::Timeout, None),
        })
        .collect();
    let failed = results
        .iter()
        .filter(|(_, st, _)| *st != Status::Applied)
        .count();
    if a.json {
        let list: Vec<Value> = results
            .iter()
            .map(|(t, st, e)| {
                json!({"gateway": t.id, "canary": t.canary, "status": st.as_str(), "error": e})
            })
            .collect();
        let target = match (&a.gateway, &a.group) {
            (Some(g), _) => json!({"gateway": g}),
            (None, Some(g)) => json!({"group": g, "canary": s.plan.canaries}),
            (None, None) => Value::Null,
        };
        println!(
            "{}",
            json!({"version": a.config_version, "target": target, "ok": failed == 0, "results": list})
        );
    } else {
        let w = results
            .iter()
            .map(|(t, _, _)| t.id.len())
            .max()
            .unwrap_or(0)
            .max("GATEWAY".len());
        println!("{:<w$}  {:<11}  ERROR", "GATEWAY", "STATUS");
        for (t, st, e) in &results {
            println!("{:<w$}  {:<11}  {}", t.id, st.as_str(), e.unwrap_or("-"));
        }
    }
    if failed == 0 {
        Ok(())
    } else {
        Err(Failure::new(format!(
            "{failed} of {} gateways did not apply version {}",
            results.len(),
            a.config_version
        )))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(subcommand)]
        c: Command,
    }

    fn push_args(args: &[&str]) -> PushArgs {
        let mut v = vec![
            "t",
            "push",
            "--broker",
            "mqtts://h:1",
            "--key",
            "k",
            "--version",
            "3",
        ];
        v.extend_from_slice(args);
        v.push("f.toml");
        match T::try_parse_from(v).unwrap().c {
            Command::Push(a) => *a,
            Command::Keygen(_) => unreachable!(),
        }
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        T::command().debug_assert();
    }

    #[test]
    fn plans_gateway_and_group_topics() {
        let p = plan(&push_args(&["--site", "north", "--gateway", "gw-1"])).unwrap();
        assert_eq!(p.targets[0].set_topic, "floorgate/north/gw-1/config/set");
        assert_eq!(
            p.targets[0].state_topic,
            "floorgate/north/gw-1/config/state"
        );
        assert_eq!(p.group_topic, None);

        let p = plan(&push_args(&[
            "--site",
            "north",
            "--group",
            "floor2",
            "--members",
            "a,b,c",
            "--canary",
            "1",
        ]))
        .unwrap();
        assert_eq!(p.canaries, 1);
        assert_eq!(
            p.group_topic.as_deref(),
            Some("floorgate/north/groups/floor2/config/set")
        );
        assert!(p.targets[0].canary && !p.targets[1].canary);
        assert_eq!(p.targets[2].set_topic, "floorgate/north/c/config/set");

        let p = plan(&push_args(&[
            "--topic-prefix",
            "acme/{gateway}",
            "--gateway",
            "gw-1",
        ]))
        .unwrap();
        assert_eq!(p.targets[0].state_topic, "acme/gw-1/config/state");
    }

    #[test]
    fn refuses_bad_plans() {
        assert!(plan(&push_args(&["--gateway", "gw-1"])).is_err()); // no --site
        assert!(plan(&push_args(&["--site", "s", "--gateway", "a/b"])).is_err());
        assert!(plan(&push_args(&[
            "--site",
            "s",
            "--group",
            "g",
            "--members",
            "a,a"
        ]))
        .is_err());
        assert!(plan(&push_args(&[
            "--site",
            "s",
            "--group",
            "g",
            "--members",
            "a,b",
            "--canary",
            "3"
        ]))
        .is_err());
        assert!(T::try_parse_from([
            "t",
            "push",
            "--broker",
            "mqtts://h",
            "--key",
            "k",
            "--version",
            "1",
            "--gateway",
            "a",
            "--group",
            "g",
            "--members",
            "a",
            "f"
        ])
        .is_err());
        assert!(T::try_parse_from([
            "t",
            "push",
            "--broker",
            "mqtts://h",
            "--key",
            "k",
            "--version",
            "1",
            "--group",
            "g",
            "f"
        ])
        .is_err());
    }

    #[test]
    fn parses_broker_urls() {
        assert_eq!(
            parse_broker("mqtts://broker.example:8884", false).unwrap(),
            ("broker.example".into(), 8884, true)
        );
        assert_eq!(
            parse_broker("mqtts://broker.example", false).unwrap(),
            ("broker.example".into(), 8883, true)
        );
        assert_eq!(
            parse_broker("mqtts://[::1]:8884", false).unwrap(),
            ("::1".into(), 8884, true)
        );
        assert_eq!(
            parse_broker("mqtts://[::1]", false).unwrap(),
            ("::1".into(), 8883, true)
        );
        assert!(parse_broker("mqtts://h:x", false).is_err());
        assert!(parse_broker("mqtts://:8883", false).is_err());
        assert!(parse_broker("mqtt://h:1883", false).is_err());
        assert!(parse_broker("mqtt://h:1883", true).is_ok());
        assert!(parse_broker("http://h", false).is_err());
    }
}

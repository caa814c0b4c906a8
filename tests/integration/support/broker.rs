//! Test support: a real mosquitto broker (mTLS or plaintext) with generated PKI, plus MQTT 5 subscriber/publisher helpers.
//!
//! Quick tour:
//! - [`Pki::generate`] makes a test CA, a server cert (SANs `localhost`, `127.0.0.1`), a client
//!   cert (CN `gw-test`) and an unrelated second CA ([`Pki::other_ca`]); more certs via
//!   [`Pki::issue_client`], [`Pki::issue_server`], [`Pki::issue_server_expired`].
//! - [`Broker::start_tls`] / [`Broker::start_plain`] / [`Broker::builder`] spawn `mosquitto` on
//!   `127.0.0.1:<free port>` and return once it accepts connections. [`Broker::stop`] and
//!   [`Broker::restart`] (same port, same config) are for outage tests; `Drop` kills it.
//! - [`subscribe`] returns a [`Subscriber`] (MQTT 5, QoS 1, SUBACK already received, re-subscribes
//!   after broker restarts); [`publish`] sends one QoS 1 message and returns the PUBACK.
//!
//! Mosquitto 2.0.11 notes: with `require_certificate true` + `use_identity_as_username true`
//! the certificate CN becomes the username, so `allow_anonymous false` works (clients without a
//! certificate fail the TLS handshake). A QoS 1 PUBLISH denied by the ACL is answered with a
//! PUBACK carrying reason 0x87 (`PubAckReason::NotAuthorized`) for MQTT 5 clients.

#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rumqttc::v5::mqttbytes::v5::{Packet, PubAck, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::{mpsc, oneshot, watch};

/// Host every test broker listens on.
pub const BROKER_HOST: &str = "127.0.0.1";
/// How long [`Broker`] start/restart waits for mosquitto to accept connections.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// How long the MQTT helpers wait for CONNACK/SUBACK/PUBACK.
const MQTT_DEADLINE: Duration = Duration::from_secs(10);

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A process-unique suffix (`<pid>-<nanos>-<counter>`), for client ids and file names.
pub fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    format!("{}-{nanos}-{n}", std::process::id())
}

/// A unique MQTT client id such as `sub-1234-56789-0`.
pub fn unique_client_id(prefix: &str) -> String {
    format!("{prefix}-{}", unique_suffix())
}

// ---------------------------------------------------------------------------------------------
// PKI
// ---------------------------------------------------------------------------------------------

/// Test certificates, all written as PEM files into `dir` (private keys with mode 0600).
pub struct Pki {
    pub dir: tempfile::TempDir,
    /// The test CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// The test CA private key (PKCS#8 PEM).
    pub ca_key_pem: String,
    /// Server cert signed by the test CA, SANs `localhost` and `127.0.0.1`.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Client cert signed by the test CA, CN `gw-test`.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
    other_ca_cert: PathBuf,
    other_ca: rcgen::Certificate,
    other_ca_key: KeyPair,
}

/// CN of the default client certificate ([`Pki::client_cert`]).
pub const CLIENT_CN: &str = "gw-test";

impl Pki {
    /// Generates the CA, server and client certificates (and an unrelated second CA).
    pub fn generate() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("floorgate-pki-")
            .tempdir()
            .expect("create PKI temp dir");
        let (ca, ca_key) = make_ca("floorgate test CA");
        let ca_cert = dir.path().join("ca.pem");
        write_file(&ca_cert, &ca.pem());
        let (other_ca, other_ca_key) = make_ca("unrelated test CA");
        let other_ca_cert = dir.path().join("other-ca.pem");
        write_file(&other_ca_cert, &other_ca.pem());
        let ca_key_pem = ca_key.serialize_pem();
        write_key(&dir.path().join("ca.key"), &ca_key_pem);

        let mut pki = Pki {
            ca_cert,
            ca_key_pem,
            server_cert: PathBuf::new(),
            server_key: PathBuf::new(),
            client_cert: PathBuf::new(),
            client_key: PathBuf::new(),
            ca,
            ca_key,
            other_ca_cert,
            other_ca,
            other_ca_key,
            dir,
        };
        let (server_cert, server_key) = pki.write_leaf(
            "server",
            leaf_params(
                "localhost",
                &["localhost", "127.0.0.1"],
                Leaf::Server,
                None,
                None,
            ),
            false,
        );
        let (client_cert, client_key) = pki.write_leaf(
            "client",
            leaf_params(CLIENT_CN, &[], Leaf::Client, None, None),
            false,
        );
        pki.server_cert = server_cert;
        pki.server_key = server_key;
        pki.client_cert = client_cert;
        pki.client_key = client_key;
        pki
    }

    /// Issues a client certificate signed by the test CA. `not_after = None` means "far future";
    /// a time in the past gives an expired certificate (`not_before` is 1975).
    pub fn issue_client(&self, cn: &str, not_after: Option<SystemTime>) -> (PathBuf, PathBuf) {
        self.write_leaf(
            cn,
            leaf_params(cn, &[], Leaf::Client, None, not_after),
            false,
        )
    }

    /// Issues a client certificate signed by the unrelated CA (the broker must reject it).
    pub fn issue_client_other_ca(&self, cn: &str) -> (PathBuf, PathBuf) {
        self.write_leaf(cn, leaf_params(cn, &[], Leaf::Client, None, None), true)
    }

    /// Issues a server certificate signed by the test CA with the given SANs (DNS names or IPs).
    pub fn issue_server(
        &self,
        sans: &[&str],
        not_before: Option<SystemTime>,
        not_after: Option<SystemTime>,
    ) -> (PathBuf, PathBuf) {
        let cn = sans.first().copied().unwrap_or("server");
        self.write_leaf(
            "server",
            leaf_params(cn, sans, Leaf::Server, not_before, not_after),
            false,
        )
    }

    /// A server cert/key (SANs `localhost`, `127.0.0.1`) that expired yesterday.
    pub fn issue_server_expired(&self) -> (PathBuf, PathBuf) {
        let now = SystemTime::now();
        self.issue_server(
            &["localhost", "127.0.0.1"],
            Some(now - Duration::from_secs(30 * 86_400)),
            Some(now - Duration::from_secs(86_400)),
        )
    }

    /// PEM file of a second CA that signed nothing the broker uses (for wrong-CA tests).
    pub fn other_ca(&self) -> PathBuf {
        self.other_ca_cert.clone()
    }

    fn write_leaf(&self, stem: &str, params: CertificateParams, other: bool) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("generate leaf key");
        let (issuer, issuer_key) = if other {
            (&self.other_ca, &self.other_ca_key)
        } else {
            (&self.ca, &self.ca_key)
        };
        let cert = params
            .signed_by(&key, issuer, issuer_key)
            .expect("sign leaf certificate");
        let stem: String = stem
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
        let cert_path = self.dir.path().join(format!("{stem}-{n}.pem"));
        let key_path = self.dir.path().join(format!("{stem}-{n}.key"));
        write_file(&cert_path, &cert.pem());
        write_key(&key_path, &key.serialize_pem());
        (cert_path, key_path)
    }
}

fn make_ca(cn: &str) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().expect("generate CA key");
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "floorgate tests");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).expect("self-sign CA certificate");
    (cert, key)
}

#[derive(Clone, Copy)]
enum Leaf {
    Server,
    Client,
}

fn leaf_params(
    cn: &str,
    sans: &[&str],
    kind: Leaf,
    not_before: Option<SystemTime>,
    not_after: Option<SystemTime>,
) -> CertificateParams {
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(sans).expect("valid subject alt names");
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![match kind {
        Leaf::Server => ExtendedKeyUsagePurpose::ServerAuth,
        Leaf::Client => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    if let Some(t) = not_before {
        params.not_before = t.into();
    }
    if let Some(t) = not_after {
        params.not_after = t.into();
    }
    params
}

fn write_file(path: &Path, contents: &str) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Writes a private key with mode 0600.
fn write_key(path: &Path, contents: &str) {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .expect("chmod 0600 key file");
    f.write_all(contents.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn copy_key(from: &Path, to: &Path) {
    let pem = fs::read_to_string(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display()));
    write_key(to, &pem);
}

// ---------------------------------------------------------------------------------------------
// Broker
// ---------------------------------------------------------------------------------------------

/// TLS material of a running TLS broker, copied into the broker's own temp dir (so the broker
/// outlives the [`Pki`] it was started from). The client cert/key is what [`subscribe`] and
/// [`publish`] use (CN `floorgate-test-helper`, not the gateway's `gw-test`).
#[derive(Clone, Debug)]
pub struct BrokerTls {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// CN of the certificate used by the [`subscribe`]/[`publish`] helpers on TLS brokers.
pub const HELPER_CN: &str = "floorgate-test-helper";

/// Configures a broker before starting it. See [`Broker::builder`].
#[derive(Default)]
pub struct BrokerBuilder {
    tls: Option<(PathBuf, PathBuf, PathBuf, PathBuf, PathBuf)>,
    server_override: Option<(PathBuf, PathBuf)>,
    deny: Vec<(Option<String>, String)>,
    extra: Vec<String>,
}

impl BrokerBuilder {
    /// mTLS listener: CA, server cert/key from `pki`; clients must present a cert from the CA.
    pub fn tls(mut self, pki: &Pki) -> Self {
        let (helper_cert, helper_key) = pki.issue_client(HELPER_CN, None);
        self.tls = Some((
            pki.ca_cert.clone(),
            pki.server_cert.clone(),
            pki.server_key.clone(),
            helper_cert,
            helper_key,
        ));
        self
    }

    /// Serve this cert/key instead of `pki.server_cert` (e.g. [`Pki::issue_server_expired`]).
    pub fn server_cert(mut self, cert: &Path, key: &Path) -> Self {
        self.server_override = Some((cert.to_path_buf(), key.to_path_buf()));
        self
    }

    /// Deny publishing to (and receiving from) `pattern` (MQTT filter, `+`/`#` allowed) for all
    /// clients; everything else stays allowed. Uses mosquitto's ACL `deny` keyword.
    pub fn deny_publish(mut self, pattern: &str) -> Self {
        self.deny.push((None, pattern.to_string()));
        self
    }

    /// Like [`deny_publish`](Self::deny_publish) but only for clients whose username (the cert
    /// CN on TLS brokers, e.g. [`CLIENT_CN`]) is `username`.
    pub fn deny_publish_for(mut self, username: &str, pattern: &str) -> Self {
        self.deny
            .push((Some(username.to_string()), pattern.to_string()));
        self
    }

    /// Appends a raw line to the generated mosquitto.conf (global section, before `listener`).
    pub fn conf_line(mut self, line: &str) -> Self {
        self.extra.push(line.to_string());
        self
    }

    /// Writes the config, starts mosquitto on a free port and waits until it accepts connections.
    pub fn start(self) -> Broker {
        let dir = tempfile::Builder::new()
            .prefix("floorgate-mosquitto-")
            .tempdir()
            .expect("create broker temp dir");
        let d = dir.path();
        let tls = self
            .tls
            .map(|(ca, server_cert, server_key, client_cert, client_key)| {
                let (server_cert, server_key) =
                    self.server_override.unwrap_or((server_cert, server_key));
                let t = BrokerTls {
                    ca_cert: d.join("ca.pem"),
                    server_cert: d.join("server.pem"),
                    server_key: d.join("server.key"),
                    client_cert: d.join("helper.pem"),
                    client_key: d.join("helper.key"),
                };
                fs::copy(&ca, &t.ca_cert).expect("copy CA cert");
                fs::copy(&server_cert, &t.server_cert).expect("copy server cert");
                copy_key(&server_key, &t.server_key);
                fs::copy(&client_cert, &t.client_cert).expect("copy helper client cert");
                copy_key(&client_key, &t.client_key);
                t
            });
        let acl_path = if self.deny.is_empty() {
            None
        } else {
            let p = d.join("acl");
            write_file(&p, &acl_text(&self.deny));
            Some(p)
        };
        let mut broker = Broker {
            port: 0,
            tls,
            conf_path: d.join("mosquitto.conf"),
            log_path: d.join("mosquitto.log"),
            acl_path,
            extra: self.extra,
            child: None,
            dir,
        };
        broker.first_start();
        broker
    }
}

/// ACL file: anonymous block first, then `pattern` lines (apply to every user), then per-user
/// blocks. mosquitto checks `deny` entries before grants.
fn acl_text(deny: &[(Option<String>, String)]) -> String {
    let mut s = String::from(
        "# generated by floorgate test support\n# anonymous clients\ntopic readwrite #\n",
    );
    for (_, p) in deny.iter().filter(|(u, _)| u.is_none()) {
        s.push_str(&format!("topic deny {p}\n"));
    }
    s.push_str("# every authenticated user\npattern readwrite #\n");
    for (_, p) in deny.iter().filter(|(u, _)| u.is_none()) {
        s.push_str(&format!("pattern deny {p}\n"));
    }
    for (user, p) in deny.iter().filter_map(|(u, p)| u.as_ref().map(|u| (u, p))) {
        s.push_str(&format!("user {user}\ntopic deny {p}\n"));
    }
    s
}

/// A running mosquitto process. Killed on drop.
pub struct Broker {
    /// Port on 127.0.0.1 ([`BROKER_HOST`]); stays the same across [`Broker::restart`].
    pub port: u16,
    /// `Some` for TLS brokers.
    pub tls: Option<BrokerTls>,
    /// Broker temp dir (config, log, copies of the TLS files).
    pub dir: tempfile::TempDir,
    pub conf_path: PathBuf,
    /// mosquitto's stderr (`log_type all`), appended across restarts.
    pub log_path: PathBuf,
    acl_path: Option<PathBuf>,
    extra: Vec<String>,
    child: Option<Child>,
}

enum StartError {
    AddrInUse,
    Other(String),
}

impl Broker {
    /// Starts configuring a broker (plaintext + anonymous unless `.tls(..)` is called).
    pub fn builder() -> BrokerBuilder {
        BrokerBuilder::default()
    }

    /// mTLS broker: `require_certificate true`, `use_identity_as_username true`,
    /// `allow_anonymous false`.
    pub fn start_tls(pki: &Pki) -> Broker {
        Broker::builder().tls(pki).start()
    }

    /// Plaintext broker with `allow_anonymous true`.
    pub fn start_plain() -> Broker {
        Broker::builder().start()
    }

    /// `host:port`, e.g. `127.0.0.1:41234`.
    pub fn addr(&self) -> String {
        format!("{BROKER_HOST}:{}", self.port)
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Process id of the running mosquitto.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the mosquitto process is currently running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Everything mosquitto logged so far (all restarts).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Kills mosquitto (SIGKILL) and waits for it. No-op if already stopped.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops (if running) and starts mosquitto again on the same port with the same config.
    /// Retries while the port is still busy, up to 10 s.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            match self.spawn_and_wait(deadline) {
                Ok(()) => return,
                Err(StartError::AddrInUse) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(StartError::AddrInUse) => {
                    panic!(
                        "mosquitto restart: port {} still in use\n{}",
                        self.port,
                        self.log()
                    )
                }
                Err(StartError::Other(e)) => {
                    panic!("mosquitto restart failed: {e}\n--- log ---\n{}", self.log())
                }
            }
        }
    }

    fn first_start(&mut self) {
        const ATTEMPTS: usize = 5;
        for _ in 0..ATTEMPTS {
            self.port = free_port();
            self.write_conf();
            match self.spawn_and_wait(Instant::now() + START_DEADLINE) {
                Ok(()) => return,
                // Someone grabbed the port between our probe and mosquitto's bind: new port.
                Err(StartError::AddrInUse) => continue,
                Err(StartError::Other(e)) => {
                    panic!(
                        "mosquitto failed to start: {e}\n--- log ---\n{}",
                        self.log()
                    )
                }
            }
        }
        panic!(
            "mosquitto: no free port after {ATTEMPTS} attempts\n--- log ---\n{}",
            self.log()
        );
    }

    fn write_conf(&self) {
        let mut c = String::from("# generated by floorgate test support\n");
        // As root, mosquitto drops privileges to `mosquitto`/`nobody`, which could not read the
        // 0600 keys in our 0700 temp dir; `user root` keeps it as root. Ignored when non-root.
        c.push_str("user root\n");
        c.push_str("persistence false\n");
        c.push_str("log_dest stderr\nlog_type all\nlog_timestamp true\nconnection_messages true\n");
        c.push_str(if self.tls.is_some() {
            "allow_anonymous false\n"
        } else {
            "allow_anonymous true\n"
        });
        if let Some(acl) = &self.acl_path {
            c.push_str(&format!("acl_file {}\n", acl.display()));
        }
        for line in &self.extra {
            c.push_str(line);
            c.push('\n');
        }
        c.push_str(&format!("listener {} {BROKER_HOST}\n", self.port));
        if let Some(t) = &self.tls {
            c.push_str(&format!(
                "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\n",
                t.ca_cert.display(),
                t.server_cert.display(),
                t.server_key.display()
            ));
        }
        write_file(&self.conf_path, &c);
    }

    fn spawn_and_wait(&mut self, deadline: Instant) -> Result<(), StartError> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open mosquitto log");
        let _ = writeln!(
            log,
            "=== floorgate test support: starting mosquitto on port {} ===",
            self.port
        );
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&self.conf_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .map_err(|e| StartError::Other(format!("spawn {}: {e}", mosquitto_bin().display())))?;
        self.child = Some(child);
        let addr: SocketAddr = self.addr().parse().expect("valid socket address");
        loop {
            let exited: Option<ExitStatus> = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok())
                .flatten();
            if let Some(status) = exited {
                self.child = None;
                let new_log = read_from(&self.log_path, log_start);
                return Err(if new_log.contains("Address already in use") {
                    StartError::AddrInUse
                } else {
                    StartError::Other(format!("mosquitto exited early with {status}"))
                });
            }
            // "mosquitto version X running" is logged once all listeners are bound; the TCP probe
            // makes sure it is really us on that port.
            if read_from(&self.log_path, log_start).contains(" running")
                && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.stop();
                return Err(StartError::Other(format!(
                    "not accepting connections on {addr} within {START_DEADLINE:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn mosquitto_bin() -> PathBuf {
    if let Ok(p) = std::env::var("MOSQUITTO_BIN") {
        return PathBuf::from(p);
    }
    for p in [
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
        "/usr/bin/mosquitto",
    ] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("mosquitto")
}

fn free_port() -> u16 {
    let l = TcpListener::bind((BROKER_HOST, 0)).expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(path) {
        if f.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = f.read_to_string(&mut s);
        }
    }
    s
}

// ---------------------------------------------------------------------------------------------
// MQTT 5 clients
// ---------------------------------------------------------------------------------------------

fn read_certs(path: &Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    rustls_pemfile::certs(&mut BufReader::new(f))
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("parse certs in {}: {e}", path.display()))
}

fn read_key(path: &Path) -> rustls::pki_types::PrivateKeyDer<'static> {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    rustls_pemfile::private_key(&mut BufReader::new(f))
        .unwrap_or_else(|e| panic!("parse key in {}: {e}", path.display()))
        .unwrap_or_else(|| panic!("no private key in {}", path.display()))
}

/// rustls client config (ring provider) trusting `ca` and, if given, presenting `client` cert/key.
pub fn tls_client_config(ca: &Path, client: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(ca) {
        roots.add(cert).expect("add CA to root store");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports default protocol versions")
    .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(read_certs(cert), read_key(key))
            .expect("valid client cert/key"),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// MQTT 5 options for `broker` with an explicit TLS config (`None` = plaintext TCP).
pub fn mqtt_options_with(
    broker: &Broker,
    client_id: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> MqttOptions {
    let mut opts = MqttOptions::new(client_id, BROKER_HOST, broker.port);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_clean_start(true);
    if let Some(cfg) = tls {
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(cfg)));
    }
    opts
}

/// MQTT 5 options for `broker`: plaintext for plain brokers, mTLS with the helper cert for TLS.
pub fn mqtt_options(broker: &Broker, client_id: &str) -> MqttOptions {
    let tls = broker
        .tls
        .as_ref()
        .map(|t| tls_client_config(&t.ca_cert, Some((&t.client_cert, &t.client_key))));
    mqtt_options_with(broker, client_id, tls)
}

/// Connects with `opts` and waits for a successful CONNACK. `Err` carries the rumqttc error
/// (TLS handshake failure, refused CONNACK, I/O error, timeout). Disconnects on success.
pub async fn try_connect(opts: MqttOptions) -> Result<(), String> {
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    let res = tokio::time::timeout(MQTT_DEADLINE, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(format!("{e:?}")),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("timed out waiting for CONNACK".to_string()));
    if res.is_ok() {
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    }
    res
}

/// Publishes one QoS 1 message through a fresh MQTT 5 connection and returns the broker's
/// PUBACK (check `.reason`, e.g. `PubAckReason::NotAuthorized` for ACL denials; see
/// [`puback_accepted`] — with no subscriber mosquitto answers `NoMatchingSubscribers`).
/// Panics if no PUBACK arrives within 10 s.
pub async fn publish(
    broker: &Broker,
    topic: &str,
    payload: impl Into<Vec<u8>>,
    retain: bool,
) -> PubAck {
    let (client, mut eventloop) =
        AsyncClient::new(mqtt_options(broker, &unique_client_id("pub")), 10);
    client
        .publish(topic, QoS::AtLeastOnce, retain, payload.into())
        .await
        .expect("queue publish");
    let ack = tokio::time::timeout(MQTT_DEADLINE, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(ack))) => return ack,
                Ok(_) => {}
                Err(e) => panic!("publish to {topic} on {}: {e:?}", broker.addr()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no PUBACK for {topic} from {} within {MQTT_DEADLINE:?}",
            broker.addr()
        )
    });
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
    ack
}

/// True for PUBACK reasons meaning "accepted": `Success` (0x00) and `NoMatchingSubscribers`
/// (0x10, which mosquitto sends to MQTT 5 clients when nobody is subscribed).
pub fn puback_accepted(ack: &PubAck) -> bool {
    matches!(
        ack.reason,
        PubAckReason::Success | PubAckReason::NoMatchingSubscribers
    )
}

/// A message as received: (topic, payload, retain flag).
pub type Message = (String, Vec<u8>, bool);

/// An MQTT 5 subscriber whose session is driven by a background task. After a broker restart it
/// reconnects and re-subscribes by itself (use [`Subscriber::wait_resubscribed`] to sync on that).
pub struct Subscriber {
    pub client: AsyncClient,
    pub client_id: String,
    rx: mpsc::UnboundedReceiver<Message>,
    /// (number of successful SUBACKs so far, currently subscribed?)
    subscribed: watch::Receiver<(u64, bool)>,
    seen_subacks: u64,
    task: tokio::task::JoinHandle<()>,
}

/// Connects an MQTT 5 client to `broker` (mTLS helper cert for TLS brokers), subscribes to
/// `topic` with QoS 1 and returns once the SUBACK arrived. Panics on failure or after 10 s.
pub async fn subscribe(broker: &Broker, topic: &str) -> Subscriber {
    let client_id = unique_client_id("sub");
    let opts = mqtt_options(broker, &client_id);
    subscribe_with(opts, topic).await
}

/// Like [`subscribe`] but with caller-built options.
pub async fn subscribe_with(opts: MqttOptions, topic: &str) -> Subscriber {
    let client_id = opts.client_id();
    let (client, eventloop) = AsyncClient::new(opts, 100);
    let (tx, rx) = mpsc::unbounded_channel();
    let (sub_tx, subscribed) = watch::channel((0u64, false));
    let (first_tx, first_rx) = oneshot::channel();
    let task = tokio::spawn(drive_subscriber(
        client.clone(),
        eventloop,
        topic.to_string(),
        tx,
        sub_tx,
        first_tx,
    ));
    match tokio::time::timeout(MQTT_DEADLINE, first_rx).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => panic!("subscriber {client_id} on {topic}: {e}"),
        Ok(Err(_)) => panic!("subscriber {client_id}: background task ended"),
        Err(_) => panic!("subscriber {client_id}: no SUBACK for {topic} within {MQTT_DEADLINE:?}"),
    }
    Subscriber {
        client,
        client_id,
        rx,
        subscribed,
        seen_subacks: 1,
        task,
    }
}

async fn drive_subscriber(
    client: AsyncClient,
    mut eventloop: EventLoop,
    topic: String,
    tx: mpsc::UnboundedSender<Message>,
    subscribed: watch::Sender<(u64, bool)>,
    first: oneshot::Sender<Result<(), String>>,
) {
    let mut first = Some(first);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                subscribed.send_modify(|s| s.1 = false);
                // clean_start + persistence false: every (re)connect needs a fresh SUBSCRIBE.
                if let Err(e) = client.try_subscribe(topic.clone(), QoS::AtLeastOnce) {
                    if let Some(f) = first.take() {
                        let _ = f.send(Err(format!("subscribe request: {e:?}")));
                        return;
                    }
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let ok = ack
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_)));
                if let Some(f) = first.take() {
                    let res = if ok {
                        Ok(())
                    } else {
                        Err(format!("SUBACK refused: {:?}", ack.return_codes))
                    };
                    let failed = res.is_err();
                    let _ = f.send(res);
                    if failed {
                        return;
                    }
                }
                subscribed.send_modify(|s| {
                    if ok {
                        s.0 += 1;
                    }
                    s.1 = ok;
                });
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let msg = (
                    String::from_utf8_lossy(&p.topic).into_owned(),
                    p.payload.to_vec(),
                    p.retain,
                );
                let _ = tx.send(msg);
            }
            Ok(_) => {}
            Err(e) => {
                subscribed.send_modify(|s| s.1 = false);
                if let Some(f) = first.take() {
                    let _ = f.send(Err(format!("connection error: {e:?}")));
                    return;
                }
                // Broker down (outage test): rumqttc reconnects on the next poll.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl Subscriber {
    /// Next message, or `None` after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Message> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// The topics of everything that arrives within `window`.
    pub async fn topics_within(&mut self, window: Duration) -> Vec<String> {
        self.collect_until(window, |_| false)
            .await
            .into_iter()
            .map(|m| m.0)
            .collect()
    }

    /// Collects messages until `pred(&collected)` is true or `timeout` passes; returns what was
    /// collected either way (check it with `pred` again if the distinction matters).
    pub async fn collect_until(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&[(String, Vec<u8>)]) -> bool,
    ) -> Vec<(String, Vec<u8>)> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut got: Vec<(String, Vec<u8>)> = Vec::new();
        while !pred(&got) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some((topic, payload, _retain))) => got.push((topic, payload)),
                Ok(None) | Err(_) => break,
            }
        }
        got
    }

    /// Messages already received and not yet consumed.
    pub fn drain(&mut self) -> Vec<Message> {
        let mut v = Vec::new();
        while let Ok(m) = self.rx.try_recv() {
            v.push(m);
        }
        v
    }

    /// After a broker outage: waits until the subscriber has reconnected and received a new
    /// SUBACK (one more than at the previous call / at creation). `false` on timeout.
    pub async fn wait_resubscribed(&mut self, timeout: Duration) -> bool {
        let seen = self.seen_subacks;
        let res =
            tokio::time::timeout(timeout, self.subscribed.wait_for(|s| s.0 > seen && s.1)).await;
        match res {
            Ok(Ok(state)) => {
                self.seen_subacks = state.0;
                true
            }
            _ => false,
        }
    }

    /// Whether the current connection is up and subscribed.
    pub fn is_subscribed(&self) -> bool {
        self.subscribed.borrow().1
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
        self.task.abort();
    }
}

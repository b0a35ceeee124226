//! Test harness: a chain CA and certificates made for the test, node
//! processes (the real `chainsight` binary) on 127.0.0.1 ephemeral ports with
//! sled directories in temp dirs, and clients speaking real gRPC over mTLS.

#![allow(dead_code)]

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chainsight::certs::{ChainCa, LeafOptions};
use chainsight::config::TlsFiles;
use chainsight::pb;
use tonic::transport::Channel;

/// A temp directory with a chain CA and certificates issued from it.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub ca: ChainCa,
}

impl TestEnv {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = ChainCa::generate("test chain CA").expect("CA");
        ca.write(&dir.path().join("certs")).expect("write CA");
        TestEnv { dir, ca }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn certs_dir(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// Issues a normal server+client certificate for `name`.
    pub fn issue(&self, name: &str) -> TlsFiles {
        self.issue_with(name, &LeafOptions::default())
    }

    /// Issues a certificate for `name` with the given options.
    pub fn issue_with(&self, name: &str, opts: &LeafOptions) -> TlsFiles {
        let issued = self.ca.issue(name, opts).expect("issue");
        self.write_files(name, &issued.cert_pem, &issued.key_pem)
    }

    /// Writes a certificate and key under certs/ and returns TLS files using this CA.
    pub fn write_files(&self, file_name: &str, cert_pem: &str, key_pem: &str) -> TlsFiles {
        let dir = self.certs_dir();
        chainsight::certs::write_pair(&dir, file_name, cert_pem, key_pem).expect("write pair");
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{file_name}.pem")),
            key: dir.join(format!("{file_name}.key")),
            handshake_timeout_secs: 5,
            crls: Vec::new(),
            watch_secs: 10,
        }
    }

    /// Writes `<id>/node.toml` for a node with this CA and the given extra
    /// TOML (e.g. a `[roles]` table), issuing the node's certificate. The
    /// node listens on an ephemeral port.
    pub fn node_config(&self, id: &str, extra: &str) -> PathBuf {
        self.node_config_on(id, 0, extra)
    }

    /// A free port on 127.0.0.1, for nodes whose address others must know
    /// before they start (and that keep it across restarts).
    pub fn reserve_port(&self) -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port()
    }

    /// As [`Self::node_config`], listening on `port` (0 = ephemeral).
    pub fn node_config_on(&self, id: &str, port: u16, extra: &str) -> PathBuf {
        self.issue(id);
        let dir = self.path().join(id);
        std::fs::create_dir_all(&dir).expect("node dir");
        let certs = self.certs_dir();
        let toml = format!(
            "id = \"{id}\"\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"data\"\n\
             [tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\nhandshake_timeout_secs = 3\n{extra}\n",
            ca = certs.join("ca.pem").display(),
            cert = certs.join(format!("{id}.pem")).display(),
            key = certs.join(format!("{id}.key")).display(),
        );
        let path = dir.join("node.toml");
        std::fs::write(&path, toml).expect("write node.toml");
        path
    }

    /// Starts a node process from `<id>/node.toml`.
    pub fn start(&self, id: &str) -> NodeProc {
        NodeProc::spawn(id, self.path().join(id))
    }

    /// A retailer node whose publisher is `retailer-eshop`.
    pub fn retailer(&self) -> NodeProc {
        self.node_config(
            "retailer",
            "[roles]\npublishers = [\"retailer-eshop\"]\nanalysts = [\"analyst\"]\n",
        );
        self.issue("retailer-eshop");
        self.start("retailer")
    }
}

/// A running (or stopped) node process.
pub struct NodeProc {
    pub id: String,
    pub dir: PathBuf,
    pub addr: SocketAddr,
    child: Option<Child>,
}

impl NodeProc {
    fn spawn(id: &str, dir: PathBuf) -> NodeProc {
        let mut proc = NodeProc {
            id: id.to_string(),
            dir,
            addr: "127.0.0.1:0".parse().unwrap(),
            child: None,
        };
        proc.start();
        proc
    }

    /// Starts the process and waits for the line announcing its address.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "node {} already running", self.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("node.log"))
            .expect("log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_chainsight"))
            .arg("node")
            .arg("--config")
            .arg(self.dir.join("node.toml"))
            .env("RUST_LOG", "info,chainsight=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn chainsight node");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read node stdout");
        let addr = line
            .trim()
            .rsplit("listening on ")
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("node {} did not start: {line:?}\n{}", self.id, self.log()));
        self.addr = addr;
        self.child = Some(child);
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) {
        self.send_sigterm();
        self.wait_clean_exit();
    }

    /// Sends SIGTERM without waiting.
    pub fn send_sigterm(&self) {
        let child = self.child.as_ref().expect("running");
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit and asserts it exited cleanly.
    pub fn wait_clean_exit(&mut self) {
        let mut child = self.child.take().expect("running");
        let exit = wait_with_deadline(&mut child, Duration::from_secs(20));
        assert!(
            exit.success(),
            "node {} exited with {exit}\n{}",
            self.id,
            self.log()
        );
    }

    /// Sends SIGHUP (a live reload of node.toml).
    pub fn send_sighup(&self) {
        let child = self.child.as_ref().expect("running");
        let status = Command::new("kill")
            .arg("-HUP")
            .arg(child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Whether the process has exited.
    pub fn has_exited(&mut self) -> bool {
        match self.child.as_mut() {
            None => true,
            Some(c) => c.try_wait().expect("try_wait").is_some(),
        }
    }

    /// kill -9: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        let _ = child.wait();
    }

    /// Starts the node again (with the same config, so on the same port if
    /// it was configured with one).
    pub fn restart(&mut self) {
        self.start();
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The running process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Opens the node's store; the node must be stopped. A store this
    /// test opened and dropped just before may still be locked for a
    /// moment (sled's background threads close the file after the drop):
    /// the lock is waited for, up to 10 s.
    pub fn open_store(&self) -> chainsight::store::Store {
        assert!(
            self.child.is_none(),
            "stop the node before opening its store"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match chainsight::store::Store::open(&self.data_dir().join("store"), &[]) {
                Ok(store) => return store,
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("open store: {e:?}"),
            }
        }
    }

    /// A channel to this node as the holder of `files`.
    pub async fn channel(&self, files: &TlsFiles) -> Result<Channel, chainsight::tls::Error> {
        chainsight::tls::connect(&format!("https://{}", self.addr), &self.id, files).await
    }

    pub async fn ingest(&self, files: &TlsFiles) -> pb::ingest_client::IngestClient<Channel> {
        pb::ingest_client::IngestClient::new(self.channel(files).await.expect("connect"))
    }

    /// Writes a client.toml for the CLI to reach this node as the holder of
    /// `files`, in `dir`; returns its path.
    pub fn write_client_toml(&self, dir: &Path, files: &TlsFiles) -> PathBuf {
        let path = dir.join("client.toml");
        std::fs::write(
            &path,
            format!(
                "address = \"https://{}\"\nserver_name = \"{}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                self.addr,
                self.id,
                files.ca.display(),
                files.cert.display(),
                files.key.display()
            ),
        )
        .expect("write client.toml");
        path
    }

    /// The node's upstream links, asked as `files` (needs the operators role).
    pub async fn links(&self, files: &TlsFiles) -> Vec<pb::LinkStatus> {
        pb::peering_client::PeeringClient::new(self.channel(files).await.expect("connect"))
            .links(pb::LinksRequest {})
            .await
            .expect("links")
            .into_inner()
            .links
    }

    /// Polls the node's links until every one has an empty outbox and
    /// together they acknowledged at least `min_acked` events.
    pub async fn wait_drained(&self, files: &TlsFiles, min_acked: u64) -> Vec<pb::LinkStatus> {
        let start = Instant::now();
        loop {
            let links = self.links(files).await;
            let acked: u64 = links.iter().map(|l| l.acknowledged).sum();
            if links.iter().all(|l| l.backlog == 0) && acked >= min_acked {
                return links;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "node {} did not drain: {links:?}\n{}",
                self.id,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait_with_deadline(child: &mut Child, deadline: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            start.elapsed() < deadline,
            "process did not exit within {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A valid event: a purchase an hour ago of a Põlluvara product.
pub fn event(id: &str) -> pb::CustomerEvent {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    pb::CustomerEvent {
        event_id: id.to_string(),
        kind: pb::EventKind::Purchase as i32,
        occurred_at: Some(pbjson_types::Timestamp {
            seconds: now - 3600,
            nanos: 0,
        }),
        product: Some(pb::Product {
            gtin: "4740001000017".into(),
            category: "dairy".into(),
            brand: "Põlluvara".into(),
        }),
        channel: pb::Channel::Web as i32,
        stage: pb::JourneyStage::Purchase as i32,
        quantity: 1,
        customer_id: format!("cust-{id}"),
        country: "EE".into(),
        postal_code: "10115".into(),
        birth_year: 1985,
        ..Default::default()
    }
}

pub fn outcome(r: &pb::PublishResult) -> pb::PublishOutcome {
    pb::PublishOutcome::try_from(r.outcome).expect("known outcome")
}

/// Publishes and returns the per-event results.
pub async fn publish(
    client: &mut pb::ingest_client::IngestClient<Channel>,
    events: Vec<pb::CustomerEvent>,
) -> Vec<pb::PublishResult> {
    client
        .publish(pb::PublishRequest { events })
        .await
        .expect("publish")
        .into_inner()
        .results
}

/// Polls `cond` until it holds, failing after 20 seconds.
pub fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An `[[upstream]]` table for node.toml.
pub fn upstream(id: &str, port: u16, share: &str) -> String {
    format!(
        "[[upstream]]\nid = \"{id}\"\naddress = \"https://127.0.0.1:{port}\"\n[upstream.share]\n{share}\n"
    )
}

/// A `[roles]` table; each argument is `key = [..]` TOML.
pub fn roles(entries: &[&str]) -> String {
    let mut s = String::from("[roles]\noperators = [\"operator\"]\n");
    for e in entries {
        s.push_str(e);
        s.push('\n');
    }
    s
}

/// A valid event about product `gtin` of `kind` by `customer`.
pub fn event_of(id: &str, gtin: &str, kind: pb::EventKind, customer: &str) -> pb::CustomerEvent {
    let mut e = event(id);
    e.product.as_mut().unwrap().gtin = gtin.to_string();
    e.kind = kind as i32;
    e.customer_id = customer.to_string();
    e.score = match kind {
        pb::EventKind::Review => Some(4),
        pb::EventKind::Nps => Some(9),
        _ => None,
    };
    e.free_text = format!("note about {id}");
    e
}

/// Publishes `events` in requests of 500 and asserts all were accepted.
pub async fn publish_all(
    client: &mut pb::ingest_client::IngestClient<Channel>,
    events: Vec<pb::CustomerEvent>,
) {
    let mut events = events;
    while !events.is_empty() {
        let rest = events.split_off(events.len().min(500));
        let results = publish(client, std::mem::replace(&mut events, rest)).await;
        assert!(
            results
                .iter()
                .all(|r| outcome(r) == pb::PublishOutcome::Accepted),
            "{:?}",
            results
                .iter()
                .find(|r| outcome(r) != pb::PublishOutcome::Accepted)
        );
    }
}

/// A subscription to every signal after `after`, followed live or not,
/// under `name` ("" = unnamed).
pub fn subscription(after: u64, follow: bool, name: &str) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        filter: Some(pb::Filter::default()),
        after_cursor: after,
        follow,
        name: name.to_string(),
    }
}

/// Opens `request` on `node` as `as_` (a subscriber).
pub async fn subscribe(
    node: &NodeProc,
    as_: &TlsFiles,
    request: pb::SubscribeRequest,
) -> tonic::Response<tonic::Streaming<pb::Signal>> {
    pb::signals_client::SignalsClient::new(node.channel(as_).await.expect("connect"))
        .subscribe(request)
        .await
        .expect("subscribe")
}

/// (cursor, event id) of every event `node` stores, via a backfill as
/// `as_` (a subscriber).
pub async fn stored(node: &NodeProc, as_: &TlsFiles) -> Vec<(u64, String)> {
    let mut stream = subscribe(node, as_, subscription(0, false, ""))
        .await
        .into_inner();
    let mut out = Vec::new();
    while let Some(s) = stream.message().await.expect("signal") {
        if let Some(e) = s.event {
            out.push((s.cursor, e.event_id));
        }
    }
    out
}

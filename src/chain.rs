//! A local chain of `chainsight node` processes on loopback, for the demo
//! and the benchmarks: a chain CA and certificates in a temporary
//! directory, a node.toml per node on a free port, and the processes
//! themselves (started, stopped with SIGTERM, or killed when dropped, so
//! nothing is left running).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

use crate::certs::{ChainCa, LeafOptions};
use crate::config::TlsFiles;

/// Which step failed and why.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {reason}")]
pub struct Error {
    step: String,
    reason: String,
}

/// An error constructor for `step`.
pub fn err(step: &str) -> impl Fn(String) -> Error + '_ {
    move |reason| Error {
        step: step.to_string(),
        reason,
    }
}

/// One node of the chain.
#[derive(Debug, Clone, Default)]
pub struct NodeSpec {
    pub id: String,
    /// Lines of the `[roles]` table (`operators = ["operator"]` is always added).
    pub roles: Vec<String>,
    /// `(upstream id, [upstream.share] lines)`.
    pub upstreams: Vec<(String, String)>,
    /// Further TOML appended to node.toml (e.g. a `[propagation]` table).
    pub extra: String,
}

/// A chain's directory, certificates, configs and running processes.
pub struct LocalChain {
    dir: tempfile::TempDir,
    certs: PathBuf,
    ports: HashMap<String, u16>,
    running: HashMap<String, NodeProcess>,
}

impl LocalChain {
    /// Makes certificates for every node and for `clients`, and writes the configs.
    pub fn create(prefix: &str, nodes: &[NodeSpec], clients: &[&str]) -> Result<Self, Error> {
        let mut dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .map_err(|e| err("create temp dir")(e.to_string()))?;
        // CHAINSIGHT_KEEP_CHAIN=1: keep the directory (the nodes' logs and
        // data) after the run, to look inside it.
        if std::env::var_os("CHAINSIGHT_KEEP_CHAIN").is_some_and(|v| v == "1") {
            dir.disable_cleanup(true);
            tracing::info!(dir = %dir.path().display(), "keeping the chain's directory (CHAINSIGHT_KEEP_CHAIN=1)");
        }
        let certs = dir.path().join("certs");
        let ca = ChainCa::generate("chainsight local chain CA")
            .map_err(|e| err("make CA")(e.to_string()))?;
        ca.write(&certs)
            .map_err(|e| err("write CA")(e.to_string()))?;
        let names = nodes
            .iter()
            .map(|n| n.id.as_str())
            .chain(clients.iter().copied())
            .chain(["operator"]);
        for name in names {
            let issued = ca
                .issue(name, &LeafOptions::default())
                .map_err(|e| err("issue certificate")(format!("{name}: {e}")))?;
            crate::certs::write_pair(&certs, name, &issued.cert_pem, &issued.key_pem)
                .map_err(|e| err("write certificate")(e.to_string()))?;
        }
        let mut ports = HashMap::new();
        for n in nodes {
            ports.insert(n.id.clone(), free_port()?);
        }
        let chain = LocalChain {
            dir,
            certs,
            ports,
            running: HashMap::new(),
        };
        for n in nodes {
            chain.write_config(n)?;
        }
        Ok(chain)
    }

    fn write_config(&self, n: &NodeSpec) -> Result<(), Error> {
        let dir = self.node_dir(&n.id);
        std::fs::create_dir_all(&dir).map_err(|e| err("create node dir")(e.to_string()))?;
        let mut toml = format!(
            "id = \"{id}\"\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"data\"\n\n[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/{id}.pem\"\nkey = \"{c}/{id}.key\"\n\n[roles]\n{roles}\noperators = [\"operator\"]\n\n{extra}\n",
            id = n.id,
            port = self.ports[&n.id],
            c = self.certs.display(),
            roles = n.roles.join("\n"),
            extra = n.extra,
        );
        for (up, share) in &n.upstreams {
            let port = self.ports.get(up).ok_or_else(|| {
                err("write node.toml")(format!("{}: unknown upstream {up}", n.id))
            })?;
            toml.push_str(&format!(
                "[[upstream]]\nid = \"{up}\"\naddress = \"https://127.0.0.1:{port}\"\n[upstream.share]\n{share}\n\n"
            ));
        }
        // CHAINSIGHT_NODE_TOML: tables appended to every node's config, to
        // measure a setting (e.g. "[storage]\npage_cache_mib = 256").
        if let Ok(more) = std::env::var("CHAINSIGHT_NODE_TOML") {
            toml.push('\n');
            toml.push_str(&more);
            toml.push('\n');
        }
        std::fs::write(dir.join("node.toml"), toml)
            .map_err(|e| err("write node.toml")(e.to_string()))
    }

    /// The chain's working directory.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    fn node_dir(&self, id: &str) -> PathBuf {
        self.dir.path().join(id)
    }

    /// The data directory of node `id`.
    pub fn data_dir(&self, id: &str) -> PathBuf {
        self.node_dir(id).join("data")
    }

    /// Starts node `id` and waits until it listens.
    pub async fn start(&mut self, id: &str) -> Result<(), Error> {
        let proc = NodeProcess::spawn(id, &self.node_dir(id)).await?;
        self.running.insert(id.to_string(), proc);
        Ok(())
    }

    /// Stops node `id` with SIGTERM and checks it exited cleanly.
    pub async fn stop(&mut self, id: &str) -> Result<(), Error> {
        match self.running.remove(id) {
            Some(p) => p.stop().await,
            None => Ok(()),
        }
    }

    /// The process id of running node `id`.
    pub fn pid(&self, id: &str) -> Option<u32> {
        self.running.get(id).and_then(|p| p.child.id())
    }

    /// The chain's certificate directory: `ca.pem`, `ca.key` and a
    /// `<name>.pem` / `<name>.key` pair per node and client.
    pub fn certs_dir(&self) -> &Path {
        &self.certs
    }

    /// TLS files of a client identity made by [`Self::create`].
    pub fn client_files(&self, identity: &str) -> TlsFiles {
        TlsFiles {
            ca: self.certs.join("ca.pem"),
            cert: self.certs.join(format!("{identity}.pem")),
            key: self.certs.join(format!("{identity}.key")),
            handshake_timeout_secs: 10,
            crls: Vec::new(),
            watch_secs: 10,
        }
    }

    /// A channel to node `node` as `identity`.
    pub async fn channel(
        &self,
        node: &str,
        identity: &str,
    ) -> Result<tonic::transport::Channel, Error> {
        let port = self
            .ports
            .get(node)
            .ok_or_else(|| err("connect")(format!("no node {node}")))?;
        crate::tls::connect(
            &format!("https://127.0.0.1:{port}"),
            node,
            &self.client_files(identity),
        )
        .await
        .map_err(|e| err("connect")(e.to_string()))
    }

    /// What node `id` has logged so far.
    pub fn log(&self, id: &str) -> String {
        std::fs::read_to_string(self.node_dir(id).join("node.log")).unwrap_or_default()
    }

    /// Keeps the directory after the chain is dropped; returns its path.
    pub fn keep(self) -> PathBuf {
        self.dir.keep()
    }
}

/// A port free now, below Linux's default range of ephemeral ports
/// (32768-60999): a node keeps its port across a restart, and a port the
/// kernel hands out (as `bind(0)` would) can meanwhile become another
/// connection's local port, so that the restarted node could not listen
/// (seen in CI: `bench growth`'s reopen, "Address already in use").
fn free_port() -> Result<u16, Error> {
    use rand::Rng;
    let mut rng = rand::rng();
    let mut last = None;
    for _ in 0..200 {
        let port = rng.random_range(20_000..32_768);
        match std::net::TcpListener::bind(("127.0.0.1", port)) {
            Ok(_) => return Ok(port),
            Err(e) => last = Some(e),
        }
    }
    Err(err("find a free port")(format!(
        "no free port in 20000-32767 after 200 tries: {}",
        last.map_or_else(String::new, |e| e.to_string())
    )))
}

/// `CHAINSIGHT_NODE_WRAPPER`: a command line the nodes run under, split
/// at white space (no quoting), to profile them where they run: e.g.
/// `valgrind --tool=callgrind`. The wrapper must become the node (run it
/// in its own process, as valgrind does, or `exec` it): the bench reads
/// the CPU and memory of, signals and kills the process it started, so
/// a wrapper that forks (`perf record -- …`) would be measured instead,
/// and outlive a kill. Its standard output must stay the node's. Start and
/// stop may then take up to ten minutes. Unset or blank: none.
fn node_wrapper() -> Option<Vec<String>> {
    let words: Vec<String> = std::env::var("CHAINSIGHT_NODE_WRAPPER")
        .ok()?
        .split_whitespace()
        .map(str::to_string)
        .collect();
    (!words.is_empty()).then_some(words)
}

/// A node process; killed (SIGKILL) if dropped while running.
struct NodeProcess {
    id: String,
    child: tokio::process::Child,
    dir: PathBuf,
}

impl NodeProcess {
    async fn spawn(id: &str, dir: &Path) -> Result<Self, Error> {
        let exe = std::env::current_exe().map_err(|e| err("find own executable")(e.to_string()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("node.log"))
            .map_err(|e| err("create log")(e.to_string()))?;
        let wrapper = node_wrapper();
        let mut command = match &wrapper {
            Some(words) => {
                let mut c = tokio::process::Command::new(&words[0]);
                c.args(&words[1..]).arg(exe);
                c
            }
            None => tokio::process::Command::new(exe),
        };
        let mut child = command
            .arg("node")
            .arg("--config")
            .arg(dir.join("node.toml"))
            // CHAINSIGHT_NODE_LOG: the nodes' log filter (e.g. add
            // `chainsight::insights=debug` to see each query's phases).
            .env(
                "RUST_LOG",
                std::env::var("CHAINSIGHT_NODE_LOG")
                    .unwrap_or_else(|_| "info,h2=warn,hyper=warn,tower=warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| err("start node")(format!("{id}: {e}")))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| err("start node")(format!("{id}: no stdout")))?;
        let mut line = String::new();
        let mut reader = tokio::io::BufReader::new(stdout);
        let start_within = if wrapper.is_some() { 600 } else { 15 };
        tokio::time::timeout(
            Duration::from_secs(start_within),
            reader.read_line(&mut line),
        )
        .await
        .map_err(|_| {
            err("start node")(format!(
                "{id} did not start within {start_within} s; see {}",
                dir.join("node.log").display()
            ))
        })?
        .map_err(|e| err("start node")(e.to_string()))?;
        if !line.contains("listening on") {
            return Err(err("start node")(format!(
                "{id} exited: {}",
                std::fs::read_to_string(dir.join("node.log")).unwrap_or_default()
            )));
        }
        Ok(NodeProcess {
            id: id.to_string(),
            child,
            dir: dir.to_path_buf(),
        })
    }

    /// SIGTERM, then wait for a clean exit.
    async fn stop(mut self) -> Result<(), Error> {
        if let Some(pid) = self.child.id() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
                .map_err(|e| err("stop node")(format!("{}: {e}", self.id)))?;
        }
        let stop_within = if node_wrapper().is_some() { 600 } else { 20 };
        let status = tokio::time::timeout(Duration::from_secs(stop_within), self.child.wait())
            .await
            .map_err(|_| {
                err("stop node")(format!("{} did not stop within {stop_within} s", self.id))
            })?
            .map_err(|e| err("stop node")(e.to_string()))?;
        if status.success() {
            Ok(())
        } else {
            Err(err("stop node")(format!(
                "{} exited with {status}; see {}",
                self.id,
                self.dir.join("node.log").display()
            )))
        }
    }
}

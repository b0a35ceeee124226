//! The operator's side of `Admin`: `chainsight admin backup` and
//! `chainsight admin reload`, run on the node's machine with its node.toml
//! (they call the running node with its own certificate).

use std::io::BufWriter;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{bail, Context};

use crate::config::{NodeConfig, NodeConnection};
use crate::pb;
use crate::store::backup::RecordWriter;

/// A channel to the node of `config`, as the node itself.
pub async fn connect_as_node(config: &NodeConnection) -> anyhow::Result<tonic::transport::Channel> {
    let addr = local_address(config.listen)?;
    crate::tls::connect(&format!("https://{addr}"), &config.id, &config.tls)
        .await
        .with_context(|| format!("connecting to the node at {addr} (is it running?)"))
}

/// Where to reach a node listening on `listen` from its own machine.
fn local_address(listen: SocketAddr) -> anyhow::Result<SocketAddr> {
    if listen.port() == 0 {
        bail!(
            "node.toml listens on port 0 (any free port): give the node a fixed port to reach it"
        );
    }
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match listen {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Ok(addr)
}

/// What a backup wrote.
#[derive(Debug, Clone)]
pub struct BackupSummary {
    pub bytes: u64,
    pub keys: Vec<String>,
}

/// Takes a backup of the running node of `config` into `out` (which must
/// not exist): its store's snapshot, and with `include_keys` the node's
/// pseudonym key. Written to `out.partial` and renamed when complete.
pub async fn backup(
    config: &NodeConfig,
    out: &Path,
    include_keys: bool,
    progress: impl Fn(u64),
) -> anyhow::Result<BackupSummary> {
    use pb::backup_record::Record;
    if out.exists() {
        bail!("{} exists: choose a new file for the backup", out.display());
    }
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    // The file holds pseudonymised events, the audit trail and maybe the
    // pseudonym key: readable by its owner only.
    let file = crate::secret::create_private(&partial)
        .with_context(|| format!("creating {}", partial.display()))?;
    let result = async {
        let mut writer = RecordWriter::new(BufWriter::with_capacity(1 << 20, file));
        let connection = NodeConnection {
            id: config.id.clone(),
            listen: config.listen,
            tls: config.tls.clone(),
        };
        let mut client = pb::admin_client::AdminClient::new(connect_as_node(&connection).await?)
            .max_decoding_message_size(8 << 20);
        let mut stream = client
            .backup(pb::BackupRequest {})
            .await
            .context("asking the node for a backup")?
            .into_inner();
        while let Some(chunk) = stream.message().await.context("receiving the backup")? {
            writer.raw(&chunk.data)?;
            progress(writer.bytes());
        }
        let mut keys = Vec::new();
        if include_keys {
            let name = crate::anonymise::KEY_FILE;
            let path = config.data_dir.join(name);
            let content = std::fs::read(&path)
                .with_context(|| format!("reading the pseudonym key {}", path.display()))?;
            writer.record(Record::Secret(pb::BackupSecret {
                file: name.to_string(),
                content,
            }))?;
            keys.push(name.to_string());
        }
        let bytes = writer.bytes();
        let file = writer.finish()?;
        file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok::<_, anyhow::Error>(BackupSummary { bytes, keys })
    }
    .await;
    match result {
        Ok(summary) => {
            std::fs::rename(&partial, out)
                .with_context(|| format!("renaming {} to {}", partial.display(), out.display()))?;
            crate::secret::sync_parent(out);
            Ok(summary)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

/// Asks the running node of `config` to reload its node.toml.
pub async fn reload(config: &NodeConnection) -> anyhow::Result<pb::ReloadResponse> {
    let mut client = pb::admin_client::AdminClient::new(connect_as_node(config).await?);
    match client.reload(pb::ReloadRequest {}).await {
        Ok(r) => Ok(r.into_inner()),
        Err(status) if status.code() == tonic::Code::FailedPrecondition => {
            bail!("the node refused the reload: {}", status.message())
        }
        Err(status) => bail!("reload failed: {status}"),
    }
}

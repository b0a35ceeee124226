//! Live reload: SIGHUP or `Admin.Reload` re-reads node.toml and puts in
//! force what can change under running connections — roles, the link
//! agreements (`[upstream.share]`), the filter limits, and the TLS server
//! configuration for new connections (CRLs, a rotated certificate) — without
//! dropping a connection or touching an outbox. A config that does not
//! load (syntax, validation) is refused with the reason and the one in
//! force stays; sections that need a restart are reported, not applied.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use crate::config::NodeConfig;
use crate::policy::{FilterLimits, Policy};
use crate::propagate::Links;

/// What a reload put in force, and what it could not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// E.g. "roles", "filter_limit", "upstream distributor".
    pub applied: Vec<String>,
    /// Changed sections that only a restart puts in force.
    pub needs_restart: Vec<String>,
}

/// Re-reads the node's config and swaps the live parts.
pub struct Reloader {
    path: PathBuf,
    in_force: Mutex<NodeConfig>,
    policy: Policy,
    limits: FilterLimits,
    links: Arc<Links>,
    store: crate::store::Store,
    tls: crate::tls::LiveServerConfig,
    /// Digest of the TLS files (CA, certificate, key, CRLs) in force.
    tls_files: Mutex<Option<[u8; 32]>>,
}

impl Reloader {
    /// A reloader for the node started with `config`, whose live parts are
    /// `policy`, `limits` and `links` (shared with the services).
    pub fn new(
        config: NodeConfig,
        policy: Policy,
        limits: FilterLimits,
        links: Arc<Links>,
        store: crate::store::Store,
        tls: crate::tls::LiveServerConfig,
    ) -> Self {
        let tls_files = Mutex::new(tls_digest(&config.tls).ok());
        Reloader {
            path: config.source.clone(),
            in_force: Mutex::new(config),
            policy,
            limits,
            links,
            store,
            tls,
            tls_files,
        }
    }

    /// The node's config as the reloads so far have left it.
    pub fn in_force(&self) -> NodeConfig {
        self.in_force
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the config file; the refusal's reason when it does not load.
    pub fn reload(&self) -> Result<Outcome, String> {
        if self.path.as_os_str().is_empty() {
            return Err("this node's config was not read from a file".into());
        }
        // Under the lock: of two reloads at once, the later read is the
        // one left in force.
        let mut in_force = self.in_force.lock().unwrap_or_else(PoisonError::into_inner);
        let new = NodeConfig::load(&self.path).map_err(|e| e.to_string())?;
        let mut out = Outcome::default();
        // The TLS files are re-read (a rotated certificate or a new CRL
        // under the same name counts); a server config that cannot be
        // built refuses the whole reload, before anything is applied.
        if self.apply_tls(&new.tls)? {
            out.applied
                .push("tls (certificate, key and CRLs for new connections)".into());
        }
        if self.policy.replace(&new.roles) {
            out.applied.push("roles".into());
        }
        if self.limits.replace(&new.filter_limit) {
            out.applied.push("filter_limit".into());
        }
        let (changed, restart) = self.links.replace_agreements(&new.upstream, &self.store);
        out.applied
            .extend(changed.into_iter().map(|id| format!("upstream {id}")));
        out.needs_restart.extend(restart);
        // Running streams check their grounds again now.
        self.policy.reloaded();
        in_force.roles = new.roles.clone();
        in_force.filter_limit = new.filter_limit.clone();
        in_force.tls.crls = new.tls.crls.clone();
        // Everything else is read once at start.
        let differs =
            |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
        let (old, new) = (&*in_force, &new);
        for (section, changed) in [
            ("id", differs(&old.id, &new.id)),
            ("listen", differs(&old.listen, &new.listen)),
            ("data_dir", differs(&old.data_dir, &new.data_dir)),
            (
                "tls paths, handshake timeout, watch_secs (outgoing links and origin signing keep the files they started with)",
                differs(&old.tls.ca, &new.tls.ca)
                    || differs(&old.tls.cert, &new.tls.cert)
                    || differs(&old.tls.key, &new.tls.key)
                    || old.tls.handshake_timeout_secs != new.tls.handshake_timeout_secs
                    || old.tls.watch_secs != new.tls.watch_secs,
            ),
            ("privacy", differs(&old.privacy, &new.privacy)),
            ("limits", differs(&old.limits, &new.limits)),
            ("propagation", differs(&old.propagation, &new.propagation)),
            ("retention", differs(&old.retention, &new.retention)),
            ("insights", differs(&old.insights, &new.insights)),
            ("trust", differs(&old.trust, &new.trust)),
            ("dp_budget", differs(&old.dp_budget, &new.dp_budget)),
            ("log", differs(&old.log, &new.log)),
            ("storage", differs(&old.storage, &new.storage)),
            ("runtime", differs(&old.runtime, &new.runtime)),
            ("metrics", differs(&old.metrics, &new.metrics)),
            ("export", differs(&old.export, &new.export)),
        ] {
            if changed {
                out.needs_restart.push(section.to_string());
            }
        }
        Ok(out)
    }
}

impl Reloader {
    /// Re-reads the TLS files of `files` and, if they changed, puts them
    /// in force (server config for new handshakes, revoked serials for
    /// every request); whether they changed. Nothing is applied when a
    /// file does not load.
    fn apply_tls(&self, files: &crate::config::TlsFiles) -> Result<bool, String> {
        let digest = tls_digest(files).map_err(|e| format!("[tls]: {e}"))?;
        let mut tls_files = self
            .tls_files
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *tls_files == Some(digest) {
            return Ok(false);
        }
        let config = crate::tls::server_config(files).map_err(|e| format!("[tls]: {e}"))?;
        let revoked = crate::tls::revoked_serials(files).map_err(|e| format!("[tls]: {e}"))?;
        self.tls.set(config);
        self.policy.set_revoked(revoked);
        *tls_files = Some(digest);
        Ok(true)
    }

    /// Re-reads the TLS files of the config in force (not node.toml): for
    /// a CRL or certificate replaced on disk without a SIGHUP.
    pub fn reload_tls_files(&self) -> Result<bool, String> {
        let files = self
            .in_force
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .tls
            .clone();
        let changed = self.apply_tls(&files)?;
        if changed {
            self.policy.reloaded();
        }
        Ok(changed)
    }
}

/// Checks the TLS files every `every` and puts them in force when they
/// changed (a new CRL, a rotated certificate), until `token` is cancelled.
pub fn spawn_tls_watch(
    reloader: Arc<Reloader>,
    store: crate::store::Store,
    every: std::time::Duration,
    token: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    use tracing::Instrument;
    tokio::spawn(
        async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            let mut last_error = None;
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let r = reloader.clone();
                let result = tokio::task::spawn_blocking(move || r.reload_tls_files())
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
                match result {
                    Ok(false) => last_error = None,
                    Ok(true) => {
                        last_error = None;
                        let outcome = Outcome {
                            applied: vec!["tls (files changed on disk)".into()],
                            needs_restart: Vec::new(),
                        };
                        log_and_audit(&store, "tls-watch", &Ok(outcome)).await;
                    }
                    // Said once per distinct failure (a file mid-write is
                    // retried at the next tick).
                    Err(reason) if last_error.as_ref() != Some(&reason) => {
                        tracing::warn!(%reason, "a TLS file changed but does not load; the files in force stay");
                        last_error = Some(reason);
                    }
                    Err(_) => {}
                }
            }
        }
        .instrument(tracing::info_span!("tls_watch")),
    )
}

/// Reloads on every SIGHUP until `token` is cancelled, logging the outcome.
#[cfg(unix)]
pub fn spawn_on_sighup(
    reloader: Arc<Reloader>,
    store: crate::store::Store,
    token: tokio_util::sync::CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    use tracing::Instrument;
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reload with `chainsight admin reload` instead");
            return None;
        }
    };
    Some(tokio::spawn(
        async move {
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    got = hup.recv() => if got.is_none() { return },
                }
                let r = reloader.clone();
                let result = tokio::task::spawn_blocking(move || r.reload())
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
                log_and_audit(&store, "SIGHUP", &result).await;
            }
        }
        .instrument(tracing::info_span!("reload")),
    ))
}

/// Logs a reload's outcome and records it in the audit trail as done by `by`.
pub async fn log_and_audit(
    store: &crate::store::Store,
    by: &str,
    result: &Result<Outcome, String>,
) {
    let detail = match result {
        Ok(o) => {
            tracing::info!(by, applied = ?o.applied, needs_restart = ?o.needs_restart, "config reloaded");
            serde_json::json!({"action": "reload", "applied": o.applied, "needs_restart": o.needs_restart})
        }
        Err(reason) => {
            tracing::error!(by, %reason, "reload refused; the config in force stays");
            serde_json::json!({"action": "reload", "refused": reason})
        }
    };
    if let Err(e) = crate::service::audit(store, crate::audit::Kind::Admin, by, detail).await {
        tracing::warn!(error = %e, "could not record the reload in the audit trail");
    }
}

/// SHA-256 over the TLS files' names and contents.
fn tls_digest(files: &crate::config::TlsFiles) -> std::io::Result<[u8; 32]> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for path in [&files.ca, &files.cert, &files.key]
        .into_iter()
        .chain(&files.crls)
    {
        let content = std::fs::read(path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("reading {}: {e}", path.display()))
        })?;
        h.update(path.as_os_str().as_encoded_bytes());
        h.update((content.len() as u64).to_be_bytes());
        h.update(&content);
    }
    Ok(h.finalize().into())
}

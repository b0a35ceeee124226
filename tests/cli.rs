//! The command line as a user runs it: `certs init`, `node` with a bad
//! config, and `publish` of a JSON-lines file with a summary by line.

mod common;

use std::process::Command;

use common::TestEnv;

fn chainsight() -> Command {
    Command::new(env!("CARGO_BIN_EXE_chainsight"))
}

#[test]
fn certs_init_writes_ca_and_named_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let out = chainsight()
        .args(["certs", "init", "--dir"])
        .arg(dir.path())
        .args(["retailer", "retailer-eshop"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "ca.pem",
        "ca.key",
        "retailer.pem",
        "retailer.key",
        "retailer-eshop.pem",
        "retailer-eshop.key",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    let certs = chainsight::tls::load_certs(&dir.path().join("retailer-eshop.pem")).unwrap();
    assert_eq!(
        chainsight::tls::identity_of(&certs[0]).as_deref(),
        Some("retailer-eshop")
    );

    let bad = chainsight()
        .args(["certs", "init", "--dir"])
        .arg(dir.path())
        .arg("not a name")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a valid identity"));
}

/// `chainsight node` with the config at `path`, expected to refuse it:
/// what it printed on stderr.
fn node_refusal(path: &std::path::Path) -> String {
    let out = chainsight()
        .arg("node")
        .arg("--config")
        .arg(path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn node_refuses_a_bad_config_naming_the_key() {
    let env = TestEnv::new();
    let path = env.node_config("retailer", "[privacy]\nk_min = 0\n");
    let err = node_refusal(&path);
    assert!(
        err.contains("privacy.k_min") && err.contains("at least 1"),
        "{err}"
    );
    let path = env.node_config("retailer", "[runtime]\nworker_threads = 0\n");
    let err = node_refusal(&path);
    assert!(
        err.contains("runtime.worker_threads") && err.contains("at least 1"),
        "{err}"
    );

    std::fs::write(
        &path,
        "id = \"retailer\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"d\"\nbogus = 1\n",
    )
    .unwrap();
    let err = node_refusal(&path);
    assert!(err.contains("bogus"), "{err}");
}

#[test]
fn a_node_runs_the_runtime_workers_it_is_told() {
    let env = TestEnv::new();
    env.node_config("retailer", "[runtime]\nworker_threads = 3\n");
    let mut node = env.start("retailer");
    common::wait_for(|| node.log().contains("node started"), "the node's start");
    let log = node.log();
    assert!(log.contains("runtime_workers=3"), "{log}");
    node.terminate();
}

#[test]
fn publish_reports_accepted_duplicates_and_problems_by_line() {
    let env = TestEnv::new();
    let node = env.retailer();
    let eshop = env.issue("retailer-eshop");
    let client_toml = node.write_client_toml(env.path(), &eshop);
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/events.jsonl");
    let lines = std::fs::read_to_string(sample).unwrap().lines().count();

    let run = || {
        let out = chainsight()
            .args(["publish", "--quiet", "--batch-size", "7", "--config"])
            .arg(&client_toml)
            .args(["--file", sample])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, stdout) = run();
    // The sample ends with a bad GTIN, an out-of-range review score and a
    // truncated JSON line; everything before them is valid.
    assert_eq!(code, Some(2), "{stdout}");
    assert!(
        stdout.starts_with(&format!(
            "accepted {}, duplicate 0, rejected 2, malformed 1",
            lines - 3
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("line {}", lines - 2)) && stdout.contains("product.gtin"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("line {}", lines - 1)) && stdout.contains("score"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("line {lines}: not a CustomerEvent")),
        "{stdout}"
    );

    // Again: events with an id are duplicates now; the 3 without one get new ids.
    let (_, stdout) = run();
    assert!(
        stdout.starts_with(&format!(
            "accepted 3, duplicate {}, rejected 2, malformed 1",
            lines - 6
        )),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_logs_json_lines_when_asked() {
    let env = TestEnv::new();
    env.node_config(
        "retailer",
        "[roles]\npublishers = [\"retailer-eshop\"]\n[log]\nformat = \"json\"\n",
    );
    let mut node = env.start("retailer");
    let eshop = env.issue("retailer-eshop");
    let results = common::publish(&mut node.ingest(&eshop).await, vec![common::event("j-1")]).await;
    assert_eq!(
        common::outcome(&results[0]),
        chainsight::pb::PublishOutcome::Accepted
    );
    node.terminate();
    let log = node.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() > 3, "{log}");
    for l in &lines {
        assert!(l["timestamp"].is_string() && l["level"].is_string(), "{l}");
    }
    // The publish, with its fields and the RPC span carrying the caller.
    let published = lines
        .iter()
        .find(|l| l["fields"]["message"] == "published")
        .unwrap_or_else(|| panic!("no publish line: {log}"));
    assert_eq!(published["fields"]["accepted"], 1);
    assert_eq!(published["span"]["peer"], "retailer-eshop", "{published}");
}

/// The demo chain's configs in examples/chain load and fit together: every
/// upstream is a node of the chain that lists the sender as downstream.
#[test]
fn the_example_chain_configs_load_and_fit_together() {
    use chainsight::config::{ClientConfig, NodeConfig};
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/chain");
    // A copy with the certificates its header says to make.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    let names: Vec<String> = [
        "retailer-north",
        "retailer-south",
        "distributor",
        "dairy-maker",
        "apparel-maker",
        "retailer-north-eshop",
        "retailer-south-eshop",
        "operator",
        "analyst",
        "auditor",
        "maker-app",
    ]
    .iter()
    .map(|n| n.to_string())
    .collect();
    chainsight::certs::init(&dir.join("certs"), &names).unwrap();
    let mut nodes = std::collections::HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("client-") {
            ClientConfig::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        } else if name.ends_with(".toml") {
            let cfg = NodeConfig::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(format!("{}.toml", cfg.id), name);
            nodes.insert(cfg.id.clone(), cfg);
        }
    }
    assert_eq!(nodes.len(), 5, "two retailers, a distributor, two makers");
    for cfg in nodes.values() {
        for up in &cfg.upstream {
            let upstream = nodes
                .get(&up.id)
                .unwrap_or_else(|| panic!("{}: upstream {} is not in the chain", cfg.id, up.id));
            assert!(
                upstream.roles.downstream.contains(&cfg.id),
                "{} does not accept {} as downstream",
                up.id,
                cfg.id
            );
            assert!(up.address.ends_with(&upstream.listen.port().to_string()));
        }
    }
    assert!(dir.join("chainsight-node@.service").exists());
}

/// A node runs with mimalloc's purge delay at 100 ms unless the user set
/// one: the binary runs itself again with it set, keeping its pid (so a
/// supervisor's pid and signals still reach the node).
#[cfg(target_os = "linux")]
#[test]
fn a_node_runs_with_a_short_allocator_purge_delay_unless_one_is_set() {
    use std::io::BufRead;

    let env = TestEnv::new();
    let config = env.node_config("retailer", "");
    for (set, want) in [(None, "100"), (Some("250"), "250")] {
        let mut cmd = chainsight();
        cmd.arg("node")
            .arg("--config")
            .arg(&config)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        match set {
            Some(v) => cmd.env("MIMALLOC_PURGE_DELAY", v),
            None => cmd.env_remove("MIMALLOC_PURGE_DELAY"),
        };
        let mut child = cmd.spawn().unwrap();
        // The node prints its address once it listens: by then it runs as
        // it will stay.
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("listening"), "{line}");
        let environ = std::fs::read(format!("/proc/{}/environ", child.id())).unwrap();
        let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        let wanted = format!("MIMALLOC_PURGE_DELAY={want}");
        assert!(
            vars.contains(&wanted.as_bytes()),
            "{wanted} not in the node's environment (set: {set:?})"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// The store's background threads (rollup checkpointer, id packer) run at
/// the node's own priority: sled frees replaced pages only once no thread
/// is inside one of its operations, and a niced thread preempted there on
/// busy CPUs held that back for long enough to make the node's memory jump
/// by 100-190 MiB (README, Performance, session 28).
#[cfg(target_os = "linux")]
#[test]
fn the_stores_background_threads_run_at_the_nodes_priority() {
    let env = TestEnv::new();
    env.node_config("retailer", "");
    let node = env.start("retailer");
    // The node logs "node started" once its store (and the store's
    // threads) runs.
    common::wait_for(
        || node.log().contains("node started"),
        "the node's store to open",
    );
    let pid = node.pid();
    // The nice value (field 19 of proc_pid_stat(5); after the command name
    // in parentheses, the fields start at 3) of each thread, by name.
    let nice_of = |dir: &std::path::Path| -> Option<i32> {
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        let (_, after) = stat.rsplit_once(')')?;
        after.split_whitespace().nth(16)?.parse().ok()
    };
    let mut nice = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if let Some(n) = nice_of(&dir) {
            nice.insert(comm.trim().to_string(), n);
        }
    }
    // The node's own priority (that of its main thread): the tests may run
    // niced as a whole.
    let own = nice_of(std::path::Path::new(&format!("/proc/{pid}/task/{pid}"))).unwrap();
    for thread in [
        "rollup-checkpoi",
        "rollup-folder",
        "id-packer",
        "store-writer",
    ] {
        assert_eq!(nice.get(thread), Some(&own), "{thread}: {nice:?}");
    }
}

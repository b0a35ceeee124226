//! The benchmark suite (issue 8) in quick mode: every scenario runs the
//! real `chainsight bench <scenario> --quick --json FILE` against real node
//! processes, its counts add up (events sent = acknowledged = stored), and
//! the JSON it writes parses into the suite's figures. No test asserts a
//! speed: the figures are printed, not judged.

use std::process::Command;

use chainsight::bench::suite::Figures;

fn run_quick(scenario: &str) -> Vec<Figures> {
    run_quick_with(scenario, &[])
}

/// [`run_quick`] with more environment variables for the bench.
fn run_quick_with(scenario: &str, env: &[(&str, &std::ffi::OsStr)]) -> Vec<Figures> {
    run_quick_args(scenario, env, &[])
}

/// [`run_quick_with`] with more arguments for the bench.
fn run_quick_args(
    scenario: &str,
    env: &[(&str, &std::ffi::OsStr)],
    args: &[&std::ffi::OsStr],
) -> Vec<Figures> {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("figures.json");
    let out = Command::new(env!("CARGO_BIN_EXE_chainsight"))
        .args(["bench", scenario, "--quick", "--json"])
        .arg(&json)
        .args(args)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "bench {scenario} --quick failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&json).unwrap();
    let figures: Vec<Figures> = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{scenario}: the JSON does not parse as figures: {e}\n{text}"));
    assert!(!figures.is_empty(), "{scenario}: no figures");
    for f in &figures {
        assert_eq!(f.scenario, scenario);
        assert_eq!(f.system, "chainsight");
        assert!(f.events_sent > 0, "{scenario}: nothing sent: {f:?}");
        assert!(
            f.counts_add_up(),
            "{scenario}: sent {}, acknowledged {}, stored {}",
            f.events_sent,
            f.events_acknowledged,
            f.events_stored
        );
        assert!(f.events_per_s > 0.0 && f.seconds > 0.0, "{f:?}");
        assert!(!f.machine.is_empty());
        assert!(f.parameters.is_object(), "{f:?}");
    }
    assert!(
        stdout.contains(&format!("{scenario} / chainsight")),
        "the human summary names the scenario"
    );
    figures
}

#[test]
fn ingest_counts_add_up_and_reports_cpu_memory_and_disk() {
    let f = &run_quick("ingest")[0];
    assert_eq!(f.events_sent, 2_000);
    let latency = f.latency.as_ref().expect("batch acknowledgement latency");
    assert_eq!(latency.samples, 40, "2,000 events in batches of 50");
    assert!(f.peak_rss_bytes > 0 && f.disk_bytes > 0, "{f:?}");
    assert!(f.cpu_seconds_per_million_events > 0.0, "{f:?}");
    let mean = f.extra["payload_bytes_mean"];
    assert!((250.0..=350.0).contains(&mean), "payloads of {mean} bytes");
}

#[test]
fn latency_times_every_request_both_ways() {
    for via in ["publish-stream", "publish"] {
        let f = &run_quick_args("latency", &[], &["--via".as_ref(), via.as_ref()])[0];
        assert_eq!(f.parameters["via"], via.replace('-', "_"), "{via}");
        assert_eq!(f.events_sent, 100, "{via}");
        assert_eq!(f.events_acknowledged, 100, "{via}");
        assert_eq!(f.events_stored, 100, "{via}");
        let l = f.latency.as_ref().unwrap();
        assert_eq!(l.samples, 100, "{via}");
        assert!(l.p50_us <= l.p90_us && l.p90_us <= l.p99_us && l.p99_us <= l.max_us);
    }
}

/// `CHAINSIGHT_NODE_WRAPPER` (for profilers): split at white space, it
/// runs each node, which gets the node's command line after its words.
#[test]
fn nodes_run_under_the_wrapper_command() {
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen");
    let script = dir.path().join("wrapper.sh");
    std::fs::write(
        &script,
        format!(
            "printf '%s\\n' \"$*\" >> '{}'\nexec \"$@\"\n",
            seen.display()
        ),
    )
    .unwrap();
    let command = format!("/bin/sh {}", script.display());
    let f = &run_quick_with(
        "latency",
        &[("CHAINSIGHT_NODE_WRAPPER", std::ffi::OsStr::new(&command))],
    )[0];
    assert_eq!(f.events_sent, 100);
    let seen = std::fs::read_to_string(&seen).expect("the wrapper ran");
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(lines.len(), 1, "one node, started once: {seen}");
    let node = format!("{} node --config ", env!("CARGO_BIN_EXE_chainsight"));
    assert!(lines[0].starts_with(&node), "{seen}");
}

#[test]
fn propagate_delivers_every_event_at_the_third_node() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples.txt");
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let f = &run_quick_args(
        "propagate",
        &[],
        &["--samples".as_ref(), samples.as_os_str()],
    )[0];
    let after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let latency = f.latency.as_ref().unwrap();
    assert!(latency.samples > 0);
    // `--samples`: one line per event of the timed phase, each when the
    // retailer acknowledged it (within the run) and its latency.
    let lines = std::fs::read_to_string(&samples).expect("--samples writes its file");
    let rows: Vec<(f64, f64)> = lines
        .lines()
        .map(|l| {
            let mut p = l.split(' ').map(|x| x.parse::<f64>().expect(l));
            (p.next().expect(l), p.next().expect(l))
        })
        .collect();
    assert_eq!(rows.len(), latency.samples, "one line per sample");
    for (at, ms) in &rows {
        assert!(
            *at > before && *at < after,
            "{at} outside {before}..{after}"
        );
        assert!(
            *ms >= 0.0 && *ms <= latency.max_us as f64 / 1e3 + 0.001,
            "{ms} ms"
        );
    }
    assert_eq!(f.extra["backlog_events"], 2_000.0);
    assert!(f.extra["drain_events_per_s"] > 0.0);
    // The flow's rate leaves out the wait before the first arrival, which
    // is part of the whole drain.
    let (whole, first) = (
        f.extra["drain_seconds"],
        f.extra["drain_first_arrival_seconds"],
    );
    assert!(first > 0.0 && first < whole, "{first} of {whole} s");
    assert!(f.extra["drain_flow_events_per_s"] >= f.extra["drain_events_per_s"]);
}

#[test]
fn fanout_delivers_every_event_to_every_subscriber() {
    let figures = run_quick("fanout");
    let ks: Vec<f64> = figures.iter().map(|f| f.extra["subscribers"]).collect();
    assert_eq!(ks, [0.0, 1.0, 4.0]);
    for f in &figures {
        let k = f.extra["subscribers"];
        assert_eq!(
            f.extra["delivered_events"],
            k * f.events_sent as f64,
            "{f:?}"
        );
        if k > 0.0 {
            assert!(f.latency.as_ref().unwrap().samples > 0);
            assert!(f.extra.contains_key("ingest_vs_no_subscribers"));
        }
    }
}

#[test]
fn growth_measures_each_size_and_the_reopen() {
    let figures = run_quick("growth");
    let sizes: Vec<f64> = figures.iter().map(|f| f.extra["stored_events"]).collect();
    assert_eq!(sizes, [2_000.0, 5_000.0]);
    for f in &figures {
        assert!(f.extra["reopen_s"] > 0.0);
        assert!(f.extra["disk_bytes_per_event"] > 0.0);
        assert!(f.extra["payload_bytes_per_event"] > 0.0);
    }
}

#[test]
fn query_reports_the_feed_latency_per_size() {
    let f = &run_quick("query")[0];
    assert_eq!(f.events_stored, 20_000);
    assert_eq!(f.latency.as_ref().unwrap().samples, 5);
    assert!(f.extra["rows"] > 0.0);
    // The cold first query is reported apart from the timed ones.
    assert!(f.extra["first_query_us"] > 0.0, "{f:?}");
}

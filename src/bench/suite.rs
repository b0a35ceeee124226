//! What every scenario of the benchmark suite (issue 8) reports, for
//! chainsight and for the NATS JetStream peer alike, and the measurements
//! they share: the seeded payloads, CPU time and peak RSS of the server
//! processes (from `/proc`), and disk bytes of their data directories.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::Percentiles;
use crate::pb;
use crate::workload::Workload;

/// The figures of one scenario run against one system; `--json FILE`
/// writes a list of these.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Figures {
    /// `ingest`, `latency`, `propagate`, `fanout`, `query`, `growth`.
    pub scenario: String,
    /// `chainsight` or `nats`.
    pub system: String,
    /// The scenario's settings, as given.
    pub parameters: serde_json::Value,
    pub machine: String,
    /// Events offered (published) by the clients.
    pub events_sent: u64,
    /// Events whose publish the server acknowledged.
    pub events_acknowledged: u64,
    /// Events found stored at the end (at the last node, for propagate).
    pub events_stored: u64,
    /// Wall-clock seconds of the measured phase.
    pub seconds: f64,
    /// The scenario's throughput: acknowledged (or delivered) events per second.
    pub events_per_s: f64,
    /// The scenario's latency, microseconds (absent where it measures none).
    pub latency: Option<Percentiles>,
    /// CPU seconds (user + system) the server processes spent in the
    /// measured phase, per million events.
    pub cpu_seconds_per_million_events: f64,
    /// Largest peak resident set size among the server processes (VmHWM).
    pub peak_rss_bytes: u64,
    /// Bytes in the servers' data directories at the end.
    pub disk_bytes: u64,
    /// Further figures by name (e.g. `drain_events_per_s`, `reopen_s`).
    pub extra: BTreeMap<String, f64>,
}

impl Figures {
    /// Figures with the counts and rates still to be filled in.
    pub fn new(scenario: &str, system: &str, parameters: &impl serde::Serialize) -> Self {
        Figures {
            scenario: scenario.to_string(),
            system: system.to_string(),
            parameters: serde_json::to_value(parameters).unwrap_or(serde_json::Value::Null),
            machine: super::machine(),
            events_sent: 0,
            events_acknowledged: 0,
            events_stored: 0,
            seconds: 0.0,
            events_per_s: 0.0,
            latency: None,
            cpu_seconds_per_million_events: 0.0,
            peak_rss_bytes: 0,
            disk_bytes: 0,
            extra: BTreeMap::new(),
        }
    }

    /// Sent, acknowledged and stored agree (what the quick-mode test asks).
    pub fn counts_add_up(&self) -> bool {
        self.events_sent == self.events_acknowledged
            && self.events_acknowledged == self.events_stored
    }

    /// One line per figure, for the human summary.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut out = format!(
            "{} / {}: {:.0} events/s over {:.2} s; sent {}, acknowledged {}, stored {}\n",
            self.scenario,
            self.system,
            self.events_per_s,
            self.seconds,
            self.events_sent,
            self.events_acknowledged,
            self.events_stored
        );
        if let Some(l) = &self.latency {
            let _ = writeln!(out, "  latency: {}", super::format_percentiles(l));
        }
        let _ = writeln!(
            out,
            "  CPU {:.2} s per million events, peak RSS {:.1} MiB, disk {:.1} MiB",
            self.cpu_seconds_per_million_events,
            self.peak_rss_bytes as f64 / (1 << 20) as f64,
            self.disk_bytes as f64 / (1 << 20) as f64
        );
        for (k, v) in &self.extra {
            let _ = writeln!(out, "  {k}: {v:.2}");
        }
        out
    }
}

/// Settings of `bench ingest` (durable ingest).
#[derive(Debug, Clone, serde::Serialize)]
pub struct IngestOptions {
    /// Events to publish in all.
    pub events: u64,
    /// Concurrent publishing streams (connections).
    pub streams: usize,
    /// Events per publish request (batch).
    pub batch: usize,
    /// Unacknowledged batches each stream may have in flight.
    pub window: usize,
    /// Seed of the payload generator.
    pub seed: u64,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            events: 200_000,
            streams: 4,
            batch: 100,
            window: 4,
            seed: 1,
        }
    }
}

/// Settings of `bench latency` (one request in flight).
#[derive(Debug, Clone, serde::Serialize)]
pub struct LatencyOptions {
    /// Requests, one event each, one at a time.
    pub events: u64,
    /// Untimed requests first.
    pub warmup: u64,
    pub seed: u64,
    /// How the requests go.
    pub via: Via,
}

/// How `bench latency` sends its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// One `Ingest.PublishStream` held open, one request on it at a time
    /// (as a publisher with a steady flow sends, and as the NATS client
    /// publishes on its connection).
    PublishStream,
    /// One unary `Ingest.Publish` call per request (a new HTTP/2 stream
    /// each: headers, message and trailers both ways).
    Publish,
}

impl Default for LatencyOptions {
    fn default() -> Self {
        LatencyOptions {
            // About 10 s: spans the rollup checkpoints, which set the tail.
            events: 15_000,
            warmup: 200,
            seed: 2,
            via: Via::PublishStream,
        }
    }
}

/// A source of customer events for a benchmark.
pub trait EventSource: Send + 'static {
    fn next_event(&mut self) -> pb::CustomerEvent;
}

impl EventSource for Workload {
    fn next_event(&mut self) -> pb::CustomerEvent {
        Workload::next_event(self)
    }
}

/// The suite's seeded generator of realistic customer events (~300 bytes
/// encoded): the workload's events with what a retailer's system also
/// sends — a campaign, the device, a store, a basket id, a referrer and a
/// sentence of free text.
pub struct Payloads {
    work: Workload,
    seed: u64,
    i: usize,
}

impl Payloads {
    pub fn new(seed: u64) -> Payloads {
        let now = crate::domain::UnixNanos::now().0 / 1_000_000_000;
        Payloads {
            work: Workload::new(seed, &format!("b{seed}"), 5_000, now),
            seed,
            i: 0,
        }
    }
}

impl EventSource for Payloads {
    fn next_event(&mut self) -> pb::CustomerEvent {
        const TEXTS: [&str; 6] = [
            "Arrived a day late but well packed; the taste is as good as last time.",
            "Would like this in a larger pack, the small one runs out too fast for a family.",
            "Colour is lighter than on the photo. Fits true to size, fabric feels durable.",
            "Switched from another brand because of the lower sugar content; kids like it.",
            "The lid does not close properly after a few uses, please improve the hinge.",
            "Great value, but the store was out of stock twice this month.",
        ];
        const CAMPAIGNS: [&str; 4] = [
            "spring-sale-2026",
            "loyalty-weekly",
            "newsletter-11",
            "none",
        ];
        const DEVICES: [&str; 3] = ["android-app", "ios-app", "desktop-web"];
        const REFERRERS: [&str; 3] = ["search:organic", "email:newsletter", "social:paid"];
        let (seed, i) = (self.seed as usize, self.i);
        self.i += 1;
        let pick = |k: usize, m: usize| seed.wrapping_mul(31).wrapping_add(i.wrapping_mul(k)) % m;
        let mut ev = self.work.next_event();
        let attrs = &mut ev.attributes;
        attrs.insert(
            "campaign".into(),
            CAMPAIGNS[pick(7, CAMPAIGNS.len())].into(),
        );
        attrs.insert("device".into(), DEVICES[pick(3, DEVICES.len())].into());
        attrs.insert("store".into(), format!("store-{:03}", pick(13, 240)));
        attrs.insert(
            "basket".into(),
            format!("bk-{:08x}", pick(2_654_435_761, 1 << 30)),
        );
        attrs.insert(
            "referrer".into(),
            REFERRERS[pick(11, REFERRERS.len())].into(),
        );
        if ev.free_text.is_empty() {
            ev.free_text = TEXTS[pick(5, TEXTS.len())].into();
        }
        ev
    }
}

/// `n` events of [`Payloads`] with `seed`: the same for every system and
/// run with the same seed.
pub fn payloads(seed: u64, n: usize) -> Vec<pb::CustomerEvent> {
    let mut gen = Payloads::new(seed);
    (0..n).map(|_| gen.next_event()).collect()
}

/// Mean protobuf-encoded size of `events`, bytes.
pub fn mean_encoded_len(events: &[pb::CustomerEvent]) -> f64 {
    if events.is_empty() {
        return 0.0;
    }
    let total: usize = events.iter().map(prost::Message::encoded_len).sum();
    total as f64 / events.len() as f64
}

/// CPU time and peak RSS of a process, read from `/proc/<pid>`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcSample {
    /// User + system CPU seconds so far.
    pub cpu_seconds: f64,
    /// Peak resident set size so far (VmHWM), bytes.
    pub peak_rss_bytes: u64,
    /// Resident set size now (VmRSS), bytes.
    pub rss_bytes: u64,
}

impl ProcSample {
    /// The process's figures now; zero where `/proc` cannot be read.
    pub fn read(pid: u32) -> ProcSample {
        // /proc reports CPU times in USER_HZ ticks, 100 per second on Linux.
        const TICKS: f64 = 100.0;
        let cpu_seconds = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                // Fields after the command name, which may contain spaces.
                let rest = &s[s.rfind(')')? + 2..];
                let f: Vec<&str> = rest.split_whitespace().collect();
                let utime: f64 = f.get(11)?.parse().ok()?;
                let stime: f64 = f.get(12)?.parse().ok()?;
                Some((utime + stime) / TICKS)
            })
            .unwrap_or(0.0);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kib = |field: &str| {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .map_or(0, |k| k * 1024)
        };
        ProcSample {
            cpu_seconds,
            peak_rss_bytes: kib("VmHWM:"),
            rss_bytes: kib("VmRSS:"),
        }
    }
}

/// CPU used by a set of server processes over a measured phase.
#[derive(Debug, Clone)]
pub struct CpuMeter {
    start: Vec<(u32, f64)>,
}

impl CpuMeter {
    /// Starts measuring `pids`.
    pub fn start(pids: &[u32]) -> CpuMeter {
        CpuMeter {
            start: pids
                .iter()
                .map(|&p| (p, ProcSample::read(p).cpu_seconds))
                .collect(),
        }
    }

    /// CPU seconds spent since [`Self::start`], and the largest peak RSS.
    pub fn stop(&self) -> (f64, u64) {
        let mut cpu = 0.0;
        let mut rss = 0;
        for &(pid, before) in &self.start {
            let now = ProcSample::read(pid);
            cpu += (now.cpu_seconds - before).max(0.0);
            rss = rss.max(now.peak_rss_bytes);
        }
        (cpu, rss)
    }

    /// Fills `figures`' CPU per million events (of `events`) and peak RSS.
    pub fn finish(&self, figures: &mut Figures, events: u64) {
        let (cpu, rss) = self.stop();
        figures.cpu_seconds_per_million_events = if events == 0 {
            0.0
        } else {
            cpu * 1e6 / events as f64
        };
        figures.peak_rss_bytes = rss;
    }
}

/// Waits until process `pid` is idle — under 5 % of one CPU in every half
/// second for 6 s on end, i.e. it has finished the background work of what
/// came before (rollup checkpoints, sled's flushes) — or `max` has passed.
/// Returns how long it waited and whether it became idle. (6 s: well past
/// the second after the last event when the rollup lanes settle, so the
/// deltas still waiting are merged first. Half a second alone let `bench
/// query` time its queries beside the last checkpoints of the load once
/// these got fast.)
pub async fn wait_idle(pid: u32, max: std::time::Duration) -> (std::time::Duration, bool) {
    const WINDOW: std::time::Duration = std::time::Duration::from_millis(500);
    const QUIET: std::time::Duration = std::time::Duration::from_secs(6);
    let started = std::time::Instant::now();
    let mut before = ProcSample::read(pid).cpu_seconds;
    let mut quiet = std::time::Duration::ZERO;
    while started.elapsed() < max {
        tokio::time::sleep(WINDOW).await;
        let now = ProcSample::read(pid).cpu_seconds;
        if now - before < 0.05 * WINDOW.as_secs_f64() {
            quiet += WINDOW;
            if quiet >= QUIET {
                return (started.elapsed(), true);
            }
        } else {
            quiet = std::time::Duration::ZERO;
        }
        before = now;
    }
    (started.elapsed(), false)
}

/// Waits until the file system holding `dir` has written back its dirty
/// pages (`sync -f`), so that timed work after a bulk load does not run
/// beside the kernel's writeback of it. Logs how long that took; a failure
/// to run `sync` is logged and otherwise ignored (the figures then include
/// the writeback).
pub async fn write_back(dir: &Path) {
    let dirty = || {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("Dirty:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .map_or(0, |kib| kib / 1024)
    };
    let before = dirty();
    let started = std::time::Instant::now();
    match tokio::process::Command::new("sync")
        .arg("-f")
        .arg(dir)
        .status()
        .await
    {
        Ok(s) if s.success() => tracing::info!(
            dirty_mib = before,
            took = ?started.elapsed(),
            "written back the load's dirty pages"
        ),
        Ok(s) => tracing::warn!(%s, "sync -f failed; timing beside the kernel's writeback"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot run sync; timing beside the kernel's writeback")
        }
    }
}

/// Bytes of the files under `dir` (0 where it does not exist).
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// Writes `figures` as a JSON list to `path`.
pub fn write_json(figures: &[Figures], path: &Path) -> Result<(), super::Error> {
    let json = serde_json::to_string_pretty(figures)
        .map_err(|e| super::err("write JSON")(e.to_string()))?;
    std::fs::write(path, json)
        .map_err(|e| super::err("write JSON")(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_seeded_and_about_300_bytes() {
        let a = payloads(7, 500);
        let b = payloads(7, 500);
        assert_eq!(
            a.iter().map(|e| &e.event_id).collect::<Vec<_>>(),
            b.iter().map(|e| &e.event_id).collect::<Vec<_>>()
        );
        let mean = mean_encoded_len(&a);
        assert!((250.0..=350.0).contains(&mean), "mean {mean} bytes");
    }

    #[test]
    fn this_process_has_cpu_time_and_a_peak_rss() {
        let s = ProcSample::read(std::process::id());
        assert!(s.peak_rss_bytes > 0, "{s:?}");
        let meter = CpuMeter::start(&[std::process::id()]);
        let mut x = 0u64;
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_millis(300) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let (cpu, _) = meter.stop();
        assert!(cpu > 0.1, "spent {cpu} s");
    }
}

//! `chainsight demo` end to end: five node processes, every check passing,
//! nothing left running.

use std::process::Command;

#[test]
fn demo_runs_the_chain_and_every_check_passes() {
    let out = Command::new(env!("CARGO_BIN_EXE_chainsight"))
        .args(["demo", "--events", "400"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("FAILED"), "{stdout}");
    assert_eq!(stdout.matches("[ok]").count(), 6, "{stdout}");
    assert!(stdout.contains("retailer-north -> distributor"), "{stdout}");
    assert!(stdout.contains("stopped every node cleanly"), "{stdout}");
}

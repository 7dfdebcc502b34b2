//! `deploy/local/cluster` starts a registry, agents on their own loopback addresses and an
//! example service beside each, and stops everything it started on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_cluster_starts_answers_and_stops_cleanly() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // Ports base..base+70 must be free: take the kernel's pick and round it down.
    let base = (signpost_e2e::free_port() / 100 * 100).clamp(20_000, 60_000);
    let mut child = Command::new(root.join("deploy/local/cluster"))
        // The binaries this test run built already (a build of its own would unify features
        // differently and compile much of the workspace again).
        .args(["--agents", "2", "--base-port", &base.to_string(), "--bin-dir"])
        .arg(signpost_e2e::binary("signpost-bench").parent().expect("the binaries' folder"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start deploy/local/cluster");
    let stdout = child.stdout.take().expect("stdout");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut output = Vec::new();
    let deadline = Instant::now() + signpost_e2e::patience(Duration::from_secs(600));
    while !output.iter().any(|l: &String| l == "cluster: ready") {
        match lines_rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => output.push(line),
            Err(_) => {
                assert!(Instant::now() < deadline, "the cluster did not get ready:\n{}", output.join("\n"));
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("the cluster script exited with {status}:\n{}", output.join("\n"));
                }
            }
        }
    }
    let text = output.join("\n");
    let agent = format!("http://127.0.0.11:{}", base + 11);
    assert!(text.contains(&agent), "it prints where agent-1 listens:\n{text}");
    signpost_e2e::eventually("agent-1 answers both example instances as passing", Duration::from_secs(30), || async {
        let body: Value = reqwest::get(format!("{agent}/v1/services/example")).await.ok()?.json().await.ok()?;
        let instances = body["instances"].as_array()?;
        (instances.len() == 2 && instances.iter().all(|i| i["health"] == "passing")).then_some(())
    })
    .await;
    signpost_e2e::signal(child.id(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        assert!(Instant::now() < deadline, "the cluster did not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "stopped cleanly: {status}");
    // Nothing it started still answers.
    assert!(reqwest::get(format!("{agent}/healthz")).await.is_err(), "agent-1 is gone");
    assert!(reqwest::get(format!("http://127.0.0.1:{base}/healthz")).await.is_err(), "the registry is gone");
}

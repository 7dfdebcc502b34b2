//! The agent's data folder full, then read-only, under a running agent: a registry (SQLite)
//! and an agent whose `data_dir` is a tiny tmpfs. The agent saves its cache once; the tmpfs
//! is filled, then remounted read-only, while instances are registered. What must hold
//! (docs/operations.md, "What happens in each failure"):
//! - the agent keeps answering lookups, new instances included;
//! - no temporary file is left in the folder, and the file saved before stays intact and
//!   loadable: restarted with the registry down, the agent serves that older catalog;
//! - failed saves are retried with a back-off and warned about a bounded number of times,
//!   and counted on `/metrics`;
//! - once there is room again the agent saves the new catalog and says so at info.
//!
//! Needs root (it mounts a tmpfs); without it the test says so and checks nothing else.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use signpost_agent::persist;
use signpost_e2e::{Agent, AgentBuilder, Registry, RegistryBuilder, eventually, free_port};

/// The saved cache's file name and the filler's, the only files the folder may hold (with the
/// node key).
const CACHE_FILE: &str = "catalog-cache.bin";
const FILLER: &str = "filler";
/// The agent's signing key, written at its first start (signpost_agent::node_key).
const NODE_KEY: &str = "node.key";
/// Failed saves to wait for while the folder is full: with a back-off from 1 s that is at
/// least 1 + 2 + 4 = 7 seconds of failing (one every second would be seven warnings).
const FAILURES_TO_WATCH: f64 = 4.0;
/// Most warnings about saving in that time: one per cause (full, then read-only).
const MAX_WARNINGS_PER_CAUSE: usize = 1;

/// A tmpfs mounted on a folder of its own, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::Builder::new().prefix("signpost-disk-full-").tempdir().map_err(|e| e.to_string())?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !output.status.success() {
            return Err(format!("mount -t tmpfs failed (not root?): {}", String::from_utf8_lossy(&output.stderr).trim()));
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a filler file until the file system has no room left.
    fn fill(&self) {
        let mut file = std::fs::File::create(self.path().join(FILLER)).expect("create the filler");
        let chunk = [0xa5u8; 4096];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "filling stopped for another reason: {e}");
                    break;
                }
            }
        }
        // The last page of a file is all a write may still find room in; a new file finds none.
        let probe = std::fs::write(self.path().join("probe"), [1u8; 4096]);
        let _ = std::fs::remove_file(self.path().join("probe"));
        assert!(probe.is_err(), "the tmpfs still has room after filling");
    }

    fn remount(&self, options: &str) {
        let status = Command::new("mount").args(["-o", &format!("remount,{options}")]).arg(self.path()).status().expect("run mount");
        assert!(status.success(), "mount -o remount,{options} failed");
    }

    /// Makes it writable again and removes the filler.
    fn free(&self) {
        self.remount("rw");
        std::fs::remove_file(self.path().join(FILLER)).expect("remove the filler");
    }

    /// The names of the files in it.
    fn files(&self) -> BTreeSet<String> {
        std::fs::read_dir(self.path())
            .expect("read the data folder")
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: an agent killed a moment ago may still hold a descriptor.
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

async fn register(registry: &Registry, id: &str, port: u16) {
    let body = json!({"id": id, "service": "web", "address": "10.0.0.1", "port": port, "ttl_s": 3600});
    let response = reqwest::Client::new().post(registry.at("/v1/instances")).json(&body).send().await.expect("POST /v1/instances");
    assert!(response.status().is_success(), "registering {id}: {}", response.status());
}

fn ids(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Waits until `agent` answers exactly `expected` as the instances of `web`.
async fn answers(agent: &Agent, expected: &BTreeSet<String>) {
    eventually(&format!("{} answers {expected:?}", agent.node), Duration::from_secs(20), || async {
        let found: BTreeSet<String> = agent.lookup("web").await?.into_iter().map(|(id, _)| id).collect();
        (&found == expected).then_some(())
    })
    .await;
}

/// The instance ids of the saved cache file, if it is there and loads.
fn saved_ids(file: &Path) -> Option<BTreeSet<String>> {
    let view = persist::load(file).ok()??;
    Some(view.instances.iter().map(|i| i.id.clone()).collect())
}

/// The agent's log entries of its current run.
fn log_entries(agent: &Agent) -> Vec<Value> {
    agent.log_text().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// The warnings its current run logged about saving the cache.
fn save_warnings(agent: &Agent) -> Vec<Value> {
    log_entries(agent)
        .into_iter()
        .filter(|e| e["level"] == "WARN" && e["message"].as_str().is_some_and(|m| m.contains("save the catalog cache")))
        .collect()
}

fn assert_no_stray_files(tmpfs: &Tmpfs, when: &str) {
    let files = tmpfs.files();
    let stray: Vec<&String> = files.iter().filter(|f| *f != CACHE_FILE && *f != FILLER && *f != NODE_KEY).collect();
    assert!(
        stray.is_empty(),
        "{when}: the data folder holds {stray:?} besides the saved cache and the node key (a temporary file left behind)"
    );
}

async fn failures(agent: &Agent) -> f64 {
    agent.metric("signpost_agent_cache_save_failures_total").await.unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_then_read_only_data_folder_keeps_the_old_cache_and_the_agent_answering() {
    let tmpfs = match Tmpfs::mount("1m") {
        Ok(tmpfs) => tmpfs,
        Err(why) => {
            eprintln!("SKIPPED: no disk-full test here: {why} (docs/operations.md says so)");
            return;
        }
    };
    let mut registry = RegistryBuilder::new(None).port(free_port()).start().await;
    register(&registry, "web-1", 8001).await;
    let mut agent = AgentBuilder::new("disk-1", &[registry.url()]).data_dir(tmpfs.path()).start().await;
    answers(&agent, &ids(&["web-1"])).await;
    let file: PathBuf = tmpfs.path().join(CACHE_FILE);
    eventually("the agent saved its cache once", Duration::from_secs(20), || async {
        (saved_ids(&file)? == ids(&["web-1"])).then_some(())
    })
    .await;

    // --- full ---
    tmpfs.fill();
    let saved = std::fs::read(&file).expect("read the saved cache");
    assert_eq!(saved_ids(&file), Some(ids(&["web-1"])));
    register(&registry, "web-2", 8002).await;
    answers(&agent, &ids(&["web-1", "web-2"])).await;
    eventually("the agent fails to save into the full folder", Duration::from_secs(20), || async {
        (!save_warnings(&agent).is_empty()).then_some(())
    })
    .await;
    let first_failure = Instant::now();
    assert_no_stray_files(&tmpfs, "full");
    assert_eq!(std::fs::read(&file).expect("read the saved cache"), saved, "the saved cache changed while the folder was full");
    register(&registry, "web-3", 8003).await;
    answers(&agent, &ids(&["web-1", "web-2", "web-3"])).await;
    eventually(&format!("{FAILURES_TO_WATCH} failed saves are counted on /metrics"), Duration::from_secs(40), || async {
        (failures(&agent).await >= FAILURES_TO_WATCH).then_some(())
    })
    .await;
    let warnings = save_warnings(&agent);
    eprintln!(
        "full: {} warning(s) about saving over {:.1} s since the first failure, {} failed saves",
        warnings.len(),
        first_failure.elapsed().as_secs_f64(),
        failures(&agent).await
    );
    assert!(warnings.len() <= MAX_WARNINGS_PER_CAUSE, "warned {} times while full: {warnings:#?}", warnings.len());
    assert_eq!(agent.metric("signpost_agent_cache_save_failing").await, Some(1.0));
    assert_no_stray_files(&tmpfs, "full, after retries");
    assert_eq!(std::fs::read(&file).expect("read the saved cache"), saved, "the saved cache changed while the folder was full");

    // --- read-only ---
    tmpfs.remount("ro");
    let before = failures(&agent).await;
    register(&registry, "web-4", 8004).await;
    answers(&agent, &ids(&["web-1", "web-2", "web-3", "web-4"])).await;
    eventually("a save fails on the read-only folder", Duration::from_secs(40), || async {
        (failures(&agent).await > before).then_some(())
    })
    .await;
    let warnings = save_warnings(&agent);
    eprintln!("full then read-only: {} warning(s) about saving, {} failed saves", warnings.len(), failures(&agent).await);
    assert!(warnings.len() <= 2 * MAX_WARNINGS_PER_CAUSE, "warned {} times: {warnings:#?}", warnings.len());
    assert_no_stray_files(&tmpfs, "read-only");
    assert_eq!(std::fs::read(&file).expect("read the saved cache"), saved, "the saved cache changed while the folder was read-only");

    // --- restarted with the registry down: the old saved catalog is what it serves ---
    registry.kill();
    agent.restart().await;
    answers(&agent, &ids(&["web-1"])).await;
    eventually("the restarted agent fails to save into the read-only folder", Duration::from_secs(20), || async {
        (failures(&agent).await >= 1.0).then_some(())
    })
    .await;

    // --- room again ---
    registry.restart().await;
    tmpfs.free();
    let freed = Instant::now();
    answers(&agent, &ids(&["web-1", "web-2", "web-3", "web-4"])).await;
    eventually("the agent saves the new catalog once there is room", Duration::from_secs(60), || async {
        (saved_ids(&file)? == ids(&["web-1", "web-2", "web-3", "web-4"])).then_some(())
    })
    .await;
    let recovered = eventually("the agent says at info that it saves again", Duration::from_secs(10), || async {
        log_entries(&agent).into_iter().find(|e| e["level"] == "INFO" && e["message"] == "the catalog cache is saved again")
    })
    .await;
    eprintln!("room again: the new catalog saved within {:.1} s; {recovered}", freed.elapsed().as_secs_f64());
    assert!(recovered["failures"].as_u64().is_some_and(|n| n >= 1), "{recovered}");
    assert_eq!(agent.metric("signpost_agent_cache_save_failing").await, Some(0.0));
    assert_no_stray_files(&tmpfs, "after recovery");
    assert!(!agent.log_text().contains("panicked"), "the agent panicked");
}

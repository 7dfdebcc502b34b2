//! The saved cache: what the registry last said, written with bincode so that a restarted
//! agent answers lookups at once, before the registry or gossip do. The file is
//! `magic | format version | length | CRC-32 | bincode body`, written to a temporary file,
//! synced and renamed into place; a file that is corrupt, truncated or of another version is
//! logged and ignored. Saving streams the body from the cache's instances into the file
//! (the header is written last), so it holds no copy of the catalog. A save that fails (a
//! full or read-only disk) removes its temporary file and leaves the saved file as it was;
//! [`run`] retries it with a back-off and warns once per cause, not once per try.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use signpost_shared::model::{CheckSpec, Health, Instance, Meta};
use signpost_shared::wire::AgentInfo;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cache::{Cache, RegistryView};
use crate::metrics::Metrics;

const MAGIC: &[u8; 4] = b"SPC\0";
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 2;
/// Largest body read back (a corrupt length cannot make the agent allocate more).
const MAX_BODY: usize = 256 * 1024 * 1024;
const HEADER: usize = 4 + 4 + 8 + 4;

/// Why the saved cache could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a saved cache of this format.
    #[error("{path}: {problem}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A save failed, and its temporary file could not be removed either.
    #[error("{cause}; the temporary file {temp} could not be removed: {source}")]
    TempLeft {
        /// Why the save failed.
        cause: Box<PersistError>,
        /// The temporary file.
        temp: PathBuf,
        /// Why it could not be removed.
        source: std::io::Error,
    },
}

impl PersistError {
    /// The kind of I/O error behind it (a full disk, a read-only one), if it is one.
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        match self {
            PersistError::Io { source, .. } => Some(source.kind()),
            PersistError::Corrupt { .. } => None,
            PersistError::TempLeft { cause, .. } => cause.io_kind(),
        }
    }
}

// bincode is not self-describing: these mirror the model without serde attributes that skip
// fields, and keep times as milliseconds. What is written borrows from the cache (`…Ref`);
// bincode encodes a `&str` as a `String` and a slice as a `Vec`, so both sides read alike.
#[derive(Debug, Deserialize)]
struct Saved {
    #[allow(dead_code)] // written for people reading the file with other tools
    saved_at_ms: i64,
    confirmed_at_ms: Option<i64>,
    self_preservation: bool,
    instances: Vec<SavedInstance>,
    agents: Vec<SavedAgent>,
}

#[derive(Serialize)]
struct SavedRef<'a> {
    saved_at_ms: i64,
    confirmed_at_ms: Option<i64>,
    self_preservation: bool,
    instances: Instances<'a>,
    agents: Vec<SavedAgentRef<'a>>,
}

/// The instances, encoded one by one as they are read from the cache.
struct Instances<'a>(&'a [std::sync::Arc<Instance>]);

impl Serialize for Instances<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|i| SavedInstanceRef::from(&**i)))
    }
}

#[derive(Serialize)]
struct SavedInstanceRef<'a> {
    id: &'a str,
    service: &'a str,
    address: &'a str,
    port: u16,
    tags: &'a [String],
    meta: &'a Meta,
    weight: u32,
    zone: Option<&'a str>,
    health: &'a str,
    output: Option<&'a str>,
    maintenance_reason: Option<&'a str>,
    node: Option<&'a str>,
    check: Option<(Option<&'a str>, Option<&'a str>, u64, u64)>,
    ttl_s: u32,
    index: u64,
    times_ms: (i64, i64, i64),
}

#[derive(Serialize)]
struct SavedAgentRef<'a> {
    node: &'a str,
    gossip_addr: &'a str,
    http_addr: &'a str,
    zone: Option<&'a str>,
    alive: bool,
    times_ms: (i64, i64),
    signing_key: Option<&'a str>,
}

#[derive(Debug, Deserialize)]
struct SavedInstance {
    id: String,
    service: String,
    address: String,
    port: u16,
    tags: Vec<String>,
    meta: Meta,
    weight: u32,
    zone: Option<String>,
    health: String,
    output: Option<String>,
    maintenance_reason: Option<String>,
    node: Option<String>,
    check: Option<(Option<String>, Option<String>, u64, u64)>,
    ttl_s: u32,
    index: u64,
    times_ms: (i64, i64, i64),
}

#[derive(Debug, Deserialize)]
struct SavedAgent {
    node: String,
    gossip_addr: String,
    http_addr: String,
    zone: Option<String>,
    alive: bool,
    times_ms: (i64, i64),
    signing_key: Option<String>,
}

fn ms(time: DateTime<Utc>) -> i64 {
    time.timestamp_millis()
}

fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

impl<'a> From<&'a Instance> for SavedInstanceRef<'a> {
    fn from(i: &'a Instance) -> Self {
        SavedInstanceRef {
            id: &i.id,
            service: &i.service,
            address: &i.address,
            port: i.port,
            tags: &i.tags,
            meta: &i.meta,
            weight: i.weight,
            zone: i.zone.as_deref(),
            health: i.health.as_str(),
            output: i.output.as_deref(),
            maintenance_reason: i.maintenance_reason.as_deref(),
            node: i.node.as_deref(),
            check: i
                .check
                .as_ref()
                .map(|c| (c.http.as_deref(), c.tcp.as_deref(), c.interval.as_millis() as u64, c.timeout.as_millis() as u64)),
            ttl_s: i.ttl_s,
            index: i.index,
            times_ms: (ms(i.registered_at), ms(i.updated_at), ms(i.lease_expires_at)),
        }
    }
}

impl SavedInstance {
    fn restore(self) -> Result<Instance, String> {
        let health: Health = self.health.parse()?;
        Ok(Instance {
            id: self.id,
            service: self.service,
            address: self.address,
            port: self.port,
            tags: self.tags,
            meta: self.meta,
            weight: self.weight,
            zone: self.zone,
            health,
            output: self.output,
            maintenance_reason: self.maintenance_reason,
            node: self.node,
            check: self.check.map(|(http, tcp, interval, timeout)| CheckSpec {
                http,
                tcp,
                interval: std::time::Duration::from_millis(interval),
                timeout: std::time::Duration::from_millis(timeout),
            }),
            ttl_s: self.ttl_s,
            index: self.index,
            registered_at: time(self.times_ms.0),
            updated_at: time(self.times_ms.1),
            lease_expires_at: time(self.times_ms.2),
        })
    }
}

/// The path of the saved cache in `data_dir`.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("catalog-cache.bin")
}

/// What is saved of `view`, borrowing from it.
fn saved_ref(view: &RegistryView, saved_at_ms: i64) -> SavedRef<'_> {
    SavedRef {
        saved_at_ms,
        confirmed_at_ms: view.confirmed_at.map(ms),
        self_preservation: view.self_preservation,
        instances: Instances(&view.instances),
        agents: view
            .agents
            .iter()
            .map(|a| SavedAgentRef {
                node: &a.node,
                gossip_addr: &a.gossip_addr,
                http_addr: &a.http_addr,
                zone: a.zone.as_deref(),
                alive: a.alive,
                times_ms: (ms(a.updated_at), ms(a.lease_expires_at)),
                signing_key: a.signing_key.as_deref(),
            })
            .collect(),
    }
}

/// The temporary file `save` writes before renaming it to `file`.
pub fn temp_path(file: &Path) -> PathBuf {
    file.with_extension("bin.tmp")
}

/// Writes `view` atomically: into a temporary file, synced, then renamed over `file`. When
/// any step fails the temporary file is removed and `file` is left as it was.
pub fn save(file: &Path, view: &RegistryView) -> Result<(), PersistError> {
    let io = |source| PersistError::Io { path: file.to_path_buf(), source };
    let saved = saved_ref(view, Utc::now().timestamp_millis());
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let temp = TempFile::create(temp_path(file)).map_err(io)?;
    if let Err(cause) = write_body(&temp, &saved, file).and_then(|()| std::fs::rename(&temp.path, file).map_err(io)) {
        return match temp.remove() {
            Ok(()) => Err(cause),
            Err((temp, source)) => Err(PersistError::TempLeft { cause: Box::new(cause), temp, source }),
        };
    }
    temp.renamed();
    if let Some(dir) = file.parent()
        && let Ok(dir) = std::fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Writes the header and the body into the temporary file and syncs it.
fn write_body(temp: &TempFile, saved: &SavedRef<'_>, file: &Path) -> Result<(), PersistError> {
    let io = |source| PersistError::Io { path: file.to_path_buf(), source };
    let mut out = std::io::BufWriter::new(&temp.file);
    // The header's length and checksum are known once the body is written: a placeholder
    // first, the header at the end.
    out.write_all(&[0; HEADER]).map_err(io)?;
    let mut body = BodyWriter { out, length: 0, crc: crc32fast::Hasher::new() };
    bincode::serde::encode_into_std_write(saved, &mut body, bincode::config::standard()).map_err(|e| match e {
        bincode::error::EncodeError::Io { inner, .. } => io(inner),
        e => PersistError::Corrupt { path: file.to_path_buf(), problem: format!("cannot encode: {e}") },
    })?;
    let BodyWriter { out, length, crc } = body;
    let mut out = out.into_inner().map_err(|e| io(e.into_error()))?;
    out.seek(SeekFrom::Start(0)).map_err(io)?;
    out.write_all(&header(length, crc.finalize())).map_err(io)?;
    out.sync_all().map_err(io)
}

/// A temporary file being written: removed when dropped unless it was renamed into place,
/// so that no failure (an error or a panic) leaves a partial file behind.
struct TempFile {
    path: PathBuf,
    file: std::fs::File,
    /// Cleared once the file is renamed into place, or removed.
    pending: bool,
}

impl TempFile {
    fn create(path: PathBuf) -> std::io::Result<TempFile> {
        let file = std::fs::File::create(&path)?;
        Ok(TempFile { path, file, pending: true })
    }

    /// It is the saved file now: nothing to remove.
    fn renamed(mut self) {
        self.pending = false;
    }

    /// Removes it, or says why it could not be.
    fn remove(mut self) -> Result<(), (PathBuf, std::io::Error)> {
        self.pending = false;
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err((self.path.clone(), e)),
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.pending {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Removes a temporary file left by a save that was interrupted (the process killed
/// mid-write); true when there was one.
pub fn remove_stale_temp(file: &Path) -> std::io::Result<bool> {
    match std::fs::remove_file(temp_path(file)) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn header(length: u64, crc: u32) -> [u8; HEADER] {
    let mut header = [0; HEADER];
    header[..4].copy_from_slice(MAGIC);
    header[4..8].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[8..16].copy_from_slice(&length.to_le_bytes());
    header[16..20].copy_from_slice(&crc.to_le_bytes());
    header
}

/// Writes the body through, counting its bytes and their CRC-32 for the header.
struct BodyWriter<W> {
    out: W,
    length: u64,
    crc: crc32fast::Hasher,
}

impl<W: Write> Write for BodyWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = self.out.write(buf)?;
        self.crc.update(&buf[..written]);
        self.length += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Reads the saved cache; `Ok(None)` when there is none.
pub fn load(file: &Path) -> Result<Option<RegistryView>, PersistError> {
    let bytes = match std::fs::read(file) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(PersistError::Io { path: file.to_path_buf(), source }),
    };
    decode(&bytes).map(Some).map_err(|problem| PersistError::Corrupt { path: file.to_path_buf(), problem })
}

/// The file's bytes for `view`, saved at `saved_at` (what `save` writes, in memory).
pub fn encode(view: &RegistryView, saved_at: DateTime<Utc>) -> Result<Vec<u8>, String> {
    let body = bincode::serde::encode_to_vec(saved_ref(view, ms(saved_at)), bincode::config::standard())
        .map_err(|e| format!("cannot encode: {e}"))?;
    let mut bytes = Vec::with_capacity(HEADER + body.len());
    bytes.extend_from_slice(&header(body.len() as u64, crc32fast::hash(&body)));
    bytes.extend_from_slice(&body);
    Ok(bytes)
}

/// Reads a saved cache's bytes (the whole file), or says what is wrong with them.
pub fn decode(bytes: &[u8]) -> Result<RegistryView, String> {
    if bytes.len() < HEADER || &bytes[..4] != MAGIC {
        return Err("not a Signpost cache file".into());
    }
    let word = |range: std::ops::Range<usize>| bytes.get(range).unwrap_or_default();
    let version = u32::from_le_bytes(word(4..8).try_into().map_err(|_| "short header".to_string())?);
    if version != FORMAT_VERSION {
        return Err(format!("format version {version}; this agent reads {FORMAT_VERSION}"));
    }
    let length = u64::from_le_bytes(word(8..16).try_into().map_err(|_| "short header".to_string())?) as usize;
    let crc = u32::from_le_bytes(word(16..20).try_into().map_err(|_| "short header".to_string())?);
    let body = &bytes[HEADER..];
    if length > MAX_BODY || body.len() != length {
        return Err(format!("body is {} bytes, the header says {length}", body.len()));
    }
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch".into());
    }
    let config = bincode::config::standard().with_limit::<MAX_BODY>();
    let (saved, _): (Saved, usize) = bincode::serde::decode_from_slice(body, config).map_err(|e| format!("cannot decode: {e}"))?;
    let instances = saved.instances.into_iter().map(|i| i.restore().map(std::sync::Arc::new)).collect::<Result<Vec<_>, _>>()?;
    let agents = saved
        .agents
        .into_iter()
        .map(|a| AgentInfo {
            node: a.node,
            gossip_addr: a.gossip_addr,
            http_addr: a.http_addr,
            zone: a.zone,
            alive: a.alive,
            updated_at: time(a.times_ms.0),
            lease_expires_at: time(a.times_ms.1),
            // Evidence of life is only ever taken fresh from the registry, never from disk.
            renewed_at: None,
            // A restart during a registry outage still knows its peers' keys.
            signing_key: a.signing_key,
        })
        .collect();
    // Index 0: the feed starts with a full fetch.
    Ok(RegistryView {
        index: 0,
        epoch: 0,
        self_preservation: saved.self_preservation,
        instances,
        agents,
        confirmed_at: saved.confirmed_at_ms.map(time),
    })
}

// === The saving loop ===

/// How often the loop looks for a change to save.
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// The first retry after a failed save; each failure doubles it, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two tries while saving fails.
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// While saving keeps failing for the same cause, a warning this often (the tries between
/// are logged at debug).
pub const WARN_AGAIN_AFTER: Duration = Duration::from_secs(300);

/// Saves the registry's word when it changed, at most once a second, and once more on the
/// way out. A failed save keeps the file saved before; it is retried after 1 s, 2 s, 4 s …
/// up to [`RETRY_MAX`], warned about when it starts failing, when the cause changes and every
/// [`WARN_AGAIN_AFTER`], and counted on `/metrics`; the first save that works again is
/// logged at info.
pub async fn run(cache: Arc<Cache>, file: PathBuf, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    match remove_stale_temp(&file) {
        Ok(true) => tracing::info!(path = %temp_path(&file).display(), "removed the temporary file of an interrupted save"),
        Ok(false) => {}
        Err(e) => tracing::warn!(path = %temp_path(&file).display(), error = %e, "cannot remove the temporary file of an interrupted save"),
    }
    let mut saved_at = None;
    let mut retry = Retry::default();
    let mut ticker = tokio::time::interval(SAVE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stop = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = ticker.tick() => false,
        };
        let view = cache.registry();
        let key = (view.index, view.instances.len(), view.confirmed_at);
        // On the way out there is one last try, whatever the back-off says.
        if view.confirmed_at.is_some() && saved_at != Some(key) && (stop || retry.due(Instant::now())) {
            let target = file.clone();
            let result = match tokio::task::spawn_blocking(move || save(&target, &view)).await {
                Ok(result) => result.map_err(|e| (e.io_kind().map_or(Cause::Other, Cause::Io), e.to_string())),
                Err(e) => Err((Cause::Other, format!("the saving task failed: {e}"))),
            };
            match result {
                Ok(()) => {
                    saved_at = Some(key);
                    metrics.cache_saved();
                    if let Some(Recovered { failures, failing_for }) = retry.succeeded(Instant::now()) {
                        tracing::info!(
                            path = %file.display(),
                            failures,
                            failing_for_s = failing_for.as_secs(),
                            "the catalog cache is saved again"
                        );
                    }
                }
                Err((cause, error)) => {
                    metrics.cache_save_failed();
                    let failed = retry.failed(Instant::now(), cause);
                    let retry_in_s = failed.retry_in.as_secs();
                    let failing_for_s = failed.failing_for.as_secs();
                    match failed.log {
                        Log::First => tracing::warn!(
                            error = %error,
                            retry_in_s,
                            "cannot save the catalog cache; the file saved before is kept, lookups are unaffected, retrying with a back-off"
                        ),
                        Log::Again => tracing::warn!(
                            error = %error,
                            failures = failed.failures,
                            failing_for_s,
                            retry_in_s,
                            "still cannot save the catalog cache; the file saved before is kept"
                        ),
                        Log::Quiet => tracing::debug!(
                            error = %error,
                            failures = failed.failures,
                            failing_for_s,
                            retry_in_s,
                            "still cannot save the catalog cache"
                        ),
                    }
                }
            }
        }
        if stop {
            return;
        }
    }
}

/// What made a save fail, as far as warnings tell causes apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// An I/O error of this kind (a full disk, a read-only one, no permission).
    Io(std::io::ErrorKind),
    /// Anything else.
    Other,
}

/// How a failed save is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Log {
    /// Saving just started failing: a warning.
    First,
    /// Still failing, for another cause or long after the last warning: a warning.
    Again,
    /// Still failing as last warned: debug.
    Quiet,
}

/// What [`Retry::failed`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Failed {
    log: Log,
    /// Failures in a row, this one included.
    failures: u64,
    failing_for: Duration,
    /// When the next try is due.
    retry_in: Duration,
}

/// What [`Retry::succeeded`] reports after a run of failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Recovered {
    failures: u64,
    failing_for: Duration,
}

/// The back-off of failed saves: when to try again and whether to warn. No I/O, no clock of
/// its own.
#[derive(Debug, Default)]
struct Retry {
    failing: Option<Failing>,
}

#[derive(Debug)]
struct Failing {
    since: Instant,
    failures: u64,
    delay: Duration,
    next: Instant,
    warned_at: Instant,
    warned_cause: Cause,
}

impl Retry {
    /// Whether a save may be tried at `now`.
    fn due(&self, now: Instant) -> bool {
        self.failing.as_ref().is_none_or(|f| now >= f.next)
    }

    /// Records a failed save at `now`.
    fn failed(&mut self, now: Instant, cause: Cause) -> Failed {
        let Some(f) = &mut self.failing else {
            self.failing =
                Some(Failing { since: now, failures: 1, delay: RETRY_FIRST, next: now + RETRY_FIRST, warned_at: now, warned_cause: cause });
            return Failed { log: Log::First, failures: 1, failing_for: Duration::ZERO, retry_in: RETRY_FIRST };
        };
        f.failures += 1;
        f.delay = (f.delay * 2).min(RETRY_MAX);
        f.next = now + f.delay;
        let log = if cause != f.warned_cause || now.duration_since(f.warned_at) >= WARN_AGAIN_AFTER {
            f.warned_at = now;
            f.warned_cause = cause;
            Log::Again
        } else {
            Log::Quiet
        };
        Failed { log, failures: f.failures, failing_for: now.duration_since(f.since), retry_in: f.delay }
    }

    /// Records a save that worked; after failures, how many there were and for how long.
    fn succeeded(&mut self, now: Instant) -> Option<Recovered> {
        self.failing.take().map(|f| Recovered { failures: f.failures, failing_for: now.duration_since(f.since) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> RegistryView {
        let instance: Instance = serde_json::from_value(serde_json::json!({
            "id": "web-1", "service": "web", "address": "10.0.0.1", "port": 80, "tags": ["a"], "meta": {"k": "v"},
            "weight": 100, "zone": null, "health": "warning", "output": "slow", "maintenance_reason": null,
            "node": "n1", "check": {"tcp": "10.0.0.1:80", "interval": "1s", "timeout": "500ms"}, "ttl_s": 30, "index": 7,
            "registered_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:01Z", "lease_expires_at": "2026-01-01T00:00:31Z"
        }))
        .expect("instance");
        RegistryView {
            index: 9,
            epoch: 0,
            self_preservation: false,
            instances: vec![std::sync::Arc::new(instance)],
            agents: vec![],
            confirmed_at: Some(time(1_700_000_000_000)),
        }
    }

    #[test]
    fn round_trips() {
        let dir = tempfile::tempdir().expect("dir");
        let file = path(dir.path());
        assert!(load(&file).expect("no file is fine").is_none());
        save(&file, &view()).expect("save");
        let loaded = load(&file).expect("load").expect("some");
        assert_eq!(loaded.instances, view().instances);
        assert_eq!(loaded.confirmed_at, view().confirmed_at);
        assert_eq!(loaded.index, 0, "a restarted agent fetches everything again");
    }

    #[test]
    fn corrupt_files_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let file = path(dir.path());
        save(&file, &view()).expect("save");
        let good = std::fs::read(&file).expect("read");
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0xff;
        for (what, bytes) in [
            ("flipped", flipped),
            ("truncated", good[..good.len() / 2].to_vec()),
            ("garbage", b"hello world, not a cache".to_vec()),
            ("empty", vec![]),
        ] {
            std::fs::write(&file, bytes).expect("write");
            assert!(matches!(load(&file), Err(PersistError::Corrupt { .. })), "{what}");
        }
        let mut future = good;
        future[4] = 9;
        std::fs::write(&file, future).expect("write");
        assert!(load(&file).expect_err("version").to_string().contains("format version 9"));
    }

    #[test]
    fn a_failed_save_removes_its_temporary_file_and_keeps_the_saved_one() {
        let dir = tempfile::tempdir().expect("dir");
        let file = path(dir.path());
        save(&file, &view()).expect("save");
        let before = std::fs::read(&file).expect("read");
        // A rename onto a non-empty folder fails after the temporary file is fully written.
        let blocked = dir.path().join("blocked.bin");
        std::fs::create_dir_all(blocked.join("inside")).expect("folder");
        let error = save(&blocked, &view()).expect_err("cannot rename onto a folder");
        assert!(error.io_kind().is_some(), "{error}");
        assert!(!temp_path(&blocked).exists(), "the temporary file was left behind");
        assert_eq!(std::fs::read(&file).expect("read"), before);
        // A temporary file left by a killed process is removed at the next start.
        std::fs::write(temp_path(&file), b"partial").expect("write");
        assert!(remove_stale_temp(&file).expect("remove"));
        assert!(!remove_stale_temp(&file).expect("nothing left"));
        assert_eq!(load(&file).expect("load").expect("some").instances, view().instances);
    }

    #[test]
    fn failed_saves_back_off_and_warn_once_per_cause() {
        let full = Cause::Io(std::io::ErrorKind::StorageFull);
        let read_only = Cause::Io(std::io::ErrorKind::ReadOnlyFilesystem);
        let start = Instant::now();
        let mut retry = Retry::default();
        assert!(retry.due(start));
        let mut now = start;
        let mut logs = Vec::new();
        let mut waits = Vec::new();
        // Ten minutes of a full disk, trying whenever a try is due (the loop looks every second).
        while now < start + Duration::from_secs(600) {
            if retry.due(now) {
                let failed = retry.failed(now, full);
                logs.push(failed.log);
                waits.push(failed.retry_in.as_secs());
            }
            now += SAVE_EVERY;
        }
        assert_eq!(&waits[..7], [1, 2, 4, 8, 16, 30, 30]);
        let warnings = logs.iter().filter(|l| **l != Log::Quiet).count();
        assert_eq!(logs[0], Log::First);
        // One at the start and one reminder every five minutes, out of ~25 tries.
        assert_eq!(warnings, 2, "{logs:?}");
        assert!(logs.len() > 20, "{}", logs.len());
        // Another cause is warned about at once; the back-off goes on.
        let failed = retry.failed(now, read_only);
        assert_eq!((failed.log, failed.retry_in), (Log::Again, RETRY_MAX));
        assert_eq!(retry.failed(now + RETRY_MAX, read_only).log, Log::Quiet);
        assert!(!retry.due(now + Duration::from_secs(1)));
        let recovered = retry.succeeded(now + RETRY_MAX * 2).expect("it was failing");
        assert_eq!(recovered.failures, logs.len() as u64 + 2);
        assert!(recovered.failing_for >= Duration::from_secs(600));
        assert!(retry.due(now), "after a save that worked, the next change saves at once");
        assert_eq!(retry.succeeded(now), None, "nothing to report twice");
        assert_eq!(retry.failed(now, full).log, Log::First);
    }
}

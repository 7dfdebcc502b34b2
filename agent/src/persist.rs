//! The saved cache: what the registry last said, written with bincode so that a restarted
//! agent answers lookups at once, before the registry or gossip do. The file is
//! `magic | format version | length | CRC-32 | bincode body`, written to a temporary file,
//! synced and renamed into place; a file that is corrupt, truncated or of another version is
//! logged and ignored. Saving streams the body from the cache's instances into the file
//! (the header is written last), so it holds no copy of the catalog.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use signpost_shared::model::{CheckSpec, Health, Instance, Meta};
use signpost_shared::wire::AgentInfo;

use crate::cache::RegistryView;

const MAGIC: &[u8; 4] = b"SPC\0";
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
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
            })
            .collect(),
    }
}

/// Writes `view` atomically.
pub fn save(file: &Path, view: &RegistryView) -> Result<(), PersistError> {
    let io = |source| PersistError::Io { path: file.to_path_buf(), source };
    let saved = saved_ref(view, Utc::now().timestamp_millis());
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let temp = file.with_extension("bin.tmp");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&temp).map_err(io)?);
    // The header's length and checksum are known once the body is written: a placeholder
    // first, the header at the end.
    out.write_all(&[0; HEADER]).map_err(io)?;
    let mut body = BodyWriter { out, length: 0, crc: crc32fast::Hasher::new() };
    bincode::serde::encode_into_std_write(&saved, &mut body, bincode::config::standard()).map_err(|e| match e {
        bincode::error::EncodeError::Io { inner, .. } => io(inner),
        e => PersistError::Corrupt { path: file.to_path_buf(), problem: format!("cannot encode: {e}") },
    })?;
    let BodyWriter { out, length, crc } = body;
    let mut out = out.into_inner().map_err(|e| io(e.into_error()))?;
    out.seek(SeekFrom::Start(0)).map_err(io)?;
    out.write_all(&header(length, crc.finalize())).map_err(io)?;
    out.sync_all().map_err(io)?;
    drop(out);
    std::fs::rename(&temp, file).map_err(io)?;
    if let Some(dir) = file.parent()
        && let Ok(dir) = std::fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
    Ok(())
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
}

//! Objects applied with `sluicectl apply`, persisted in one append-only log,
//! `<state>/objects.log`: one record per apply or delete, written with one `write` and made
//! durable with one `fdatasync` before the call is answered.
//!
//! ```text
//! sluice objects log v1\n                            the file's first line
//! R <payload bytes> <hash64 of payload, hex>\n <payload> \n            one record
//!   A <Kind> <namespace|-> <name> <raw bytes>\n <raw document> \n      applied: the object's document
//!   D <Kind> <namespace|-> <name>\n                                    deleted
//! ```
//!
//! Crash safety: a record is in effect whole or not at all. A `kill -9` (or power loss) during a
//! write leaves a record that is short or fails its hash: at the next start it is cut off (that
//! apply was never answered). The log is rewritten with only what is live (a new file, fsynced,
//! renamed over the old one) once it is more than twice that size, so it stays proportional to the
//! objects, and each byte written is rewritten O(1) times.
//!
//! Objects are stored as the document the user sent (not re-serialised) and are parsed and
//! validated again at start: one that no longer passes (a stricter validation) stays in the log,
//! is reported, and keeps the source "not loaded" until it is applied again or deleted.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::{hash64, SourceStatus};
use crate::services::objects::{Kind, ObjectKey};
use crate::services::FastMap;

const MAGIC: &[u8] = b"sluice objects log v1\n";
pub const LOG_FILE: &str = "objects.log";
/// The per-object files of earlier versions (`<state>/objects/*.json`): moved into the log.
const OLD_DIR: &str = "objects";
/// The log is compacted when larger than this and than twice its live content.
const COMPACT_MIN: u64 = 1 << 20;

/// One change to write.
pub enum Entry<'a> {
    Put { key: &'a ObjectKey, raw: &'a str },
    Delete { key: &'a ObjectKey },
}

/// Where an object's latest document is in the log.
#[derive(Debug, Clone, Copy)]
pub struct Stored {
    off: u64,
    len: u32,
    hash: u64,
}

pub struct AppliedLog {
    path: PathBuf,
    /// None: the log could not be opened (applies are refused; the error is in the status).
    file: Option<File>,
    len: u64,
    live: FastMap<ObjectKey, Stored>,
    live_bytes: u64,
    /// Stored objects that did not load, and why.
    bad: BTreeMap<ObjectKey, String>,
    pub status: SourceStatus,
}

fn key_fields(k: &ObjectKey) -> String {
    format!(
        "{} {} {}",
        k.kind.name(),
        if k.namespace.is_empty() {
            "-"
        } else {
            &k.namespace
        },
        k.name
    )
}

fn parse_key(kind: &str, ns: &str, name: &str) -> Option<ObjectKey> {
    Some(ObjectKey::new(
        Kind::from_name(kind)?,
        if ns == "-" { "" } else { ns },
        name,
    ))
}

/// Splits `buf` at the first newline: (line, rest).
fn line(buf: &[u8]) -> Option<(&str, &[u8])> {
    let n = buf.iter().position(|b| *b == b'\n')?;
    Some((std::str::from_utf8(&buf[..n]).ok()?, &buf[n + 1..]))
}

impl AppliedLog {
    /// Opens (creating) the log under `state_dir` and returns it with the live objects'
    /// documents, to be parsed by the caller. A log that cannot be read makes the source
    /// unusable, not the daemon: the error is in the status.
    pub fn open(state_dir: &Path) -> (AppliedLog, Vec<(ObjectKey, String)>) {
        let mut log = AppliedLog {
            path: state_dir.join(LOG_FILE),
            file: None,
            len: 0,
            live: FastMap::default(),
            live_bytes: 0,
            bad: BTreeMap::new(),
            status: SourceStatus::new("applied objects"),
        };
        match log.load(state_dir) {
            Ok(objects) => (log, objects),
            Err(e) => {
                let msg = format!("{}: {e:#}", log.path.display());
                tracing::error!(error = %msg, "the applied objects cannot be read: they stay in the maps, applies are refused");
                log.file = None;
                log.status.set(false, Some(msg));
                (log, Vec::new())
            }
        }
    }

    fn load(&mut self, state_dir: &Path) -> Result<Vec<(ObjectKey, String)>> {
        fs::create_dir_all(state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&self.path)
            .context("opening")?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf).context("reading")?;
        if buf.is_empty() {
            file.write_all(MAGIC).context("writing the header")?;
            file.sync_all().context("fsync")?;
            fsync_dir(state_dir)?;
            buf.extend_from_slice(MAGIC);
        } else if !buf.starts_with(MAGIC) {
            bail!("not a sluice objects log (unknown first line)");
        }
        let (good_len, raws) = self.replay(&buf);
        if good_len < buf.len() {
            tracing::warn!(path = %self.path.display(), bytes = buf.len() - good_len,
                "cutting off an unfinished record (an apply interrupted before it was answered)");
            file.set_len(good_len as u64).context("truncating")?;
            file.sync_all().context("fsync")?;
        }
        file.seek(SeekFrom::End(0))?;
        self.len = good_len as u64;
        self.file = Some(file);
        let mut objects: Vec<(ObjectKey, String)> = raws
            .into_iter()
            .map(|(k, (off, len))| {
                let raw = String::from_utf8_lossy(&buf[off..off + len]).into_owned();
                (k, raw)
            })
            .collect();
        objects.sort_by(|a, b| a.0.cmp(&b.0));
        drop(buf);
        // Objects of an earlier version's per-object files join the log once.
        let old = state_dir.join(OLD_DIR);
        if old.is_dir() {
            let migrated = self.migrate(&old)?;
            for (k, raw) in migrated {
                objects.retain(|(o, _)| *o != k);
                objects.push((k, raw));
            }
        }
        Ok(objects)
    }

    /// Reads records; returns the length of the good prefix and the live documents' places.
    fn replay(&mut self, buf: &[u8]) -> (usize, FastMap<ObjectKey, (usize, usize)>) {
        let mut at = MAGIC.len();
        let mut places: FastMap<ObjectKey, (usize, usize)> = FastMap::default();
        self.live.clear();
        self.live_bytes = 0;
        while at < buf.len() {
            let Some((header, rest)) = line(&buf[at..]) else {
                break;
            };
            let mut f = header.split(' ');
            let (Some("R"), Some(len), Some(check), None) =
                (f.next(), f.next(), f.next(), f.next())
            else {
                break;
            };
            let (Ok(len), Ok(check)) = (len.parse::<usize>(), u64::from_str_radix(check, 16))
            else {
                break;
            };
            if rest.len() < len + 1 || rest[len] != b'\n' {
                break;
            }
            let payload = &rest[..len];
            if hash64(payload) != check {
                break;
            }
            let payload_at = at + header.len() + 1;
            if let Err(e) = self.replay_record(payload, payload_at, &mut places) {
                // A record that passed its hash was written by us: this is a bug, not a crash.
                tracing::error!(error = %e, offset = at, "a record of the objects log does not parse; reading stops there");
                self.status
                    .set(false, Some(format!("{}: {e}", self.path.display())));
                break;
            }
            at = payload_at + len + 1;
        }
        (at.min(buf.len()), places)
    }

    fn replay_record(
        &mut self,
        mut p: &[u8],
        base: usize,
        places: &mut FastMap<ObjectKey, (usize, usize)>,
    ) -> Result<()> {
        let start = p.len();
        while !p.is_empty() {
            let (l, rest) = line(p).context("an entry without its newline")?;
            let f: Vec<&str> = l.split(' ').collect();
            match f.as_slice() {
                ["A", kind, ns, name, len] => {
                    let key = parse_key(kind, ns, name).context("an unknown kind")?;
                    let len: usize = len.parse().context("a bad length")?;
                    if rest.len() < len + 1 || rest[len] != b'\n' {
                        bail!("a document running past its record");
                    }
                    let off = base + (start - rest.len());
                    let raw = &rest[..len];
                    self.set_live(
                        key.clone(),
                        Stored {
                            off: off as u64,
                            len: len as u32,
                            hash: hash64(raw),
                        },
                    );
                    places.insert(key, (off, len));
                    p = &rest[len + 1..];
                }
                ["D", kind, ns, name] => {
                    let key = parse_key(kind, ns, name).context("an unknown kind")?;
                    self.set_dead(&key);
                    places.remove(&key);
                    p = rest;
                }
                _ => bail!("an unknown entry {l:?}"),
            }
        }
        Ok(())
    }

    fn set_live(&mut self, key: ObjectKey, s: Stored) {
        self.live_bytes += s.len as u64;
        if let Some(old) = self.live.insert(key, s) {
            self.live_bytes -= old.len as u64;
        }
    }

    fn set_dead(&mut self, key: &ObjectKey) {
        if let Some(old) = self.live.remove(key) {
            self.live_bytes -= old.len as u64;
        }
    }

    /// Moves `<state>/objects/*.json` into the log (one record), then removes the directory.
    fn migrate(&mut self, old: &Path) -> Result<Vec<(ObjectKey, String)>> {
        let mut found = Vec::new();
        for e in fs::read_dir(old).with_context(|| format!("reading {}", old.display()))? {
            let path = e?.path();
            if path.extension().and_then(|x| x.to_str()) != Some("json") {
                continue; // an unfinished write of the old store
            }
            let text = fs::read_to_string(&path)?;
            let v: serde_json::Value = match serde_json::from_str(&text) {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "an old stored object is not JSON; dropped");
                    continue;
                }
            };
            let s = |p: &str| v.pointer(p).and_then(|x| x.as_str()).unwrap_or("");
            let kind = Kind::from_name(s("/kind"));
            let Some(kind) = kind else {
                tracing::error!(file = %path.display(), "an old stored object of unknown kind; dropped");
                continue;
            };
            let namespace = match kind {
                Kind::Node => "",
                _ => Some(s("/metadata/namespace"))
                    .filter(|n| !n.is_empty())
                    .unwrap_or("default"),
            };
            let key = ObjectKey::new(kind, namespace, s("/metadata/name"));
            found.push((key, v.to_string()));
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        let entries: Vec<Entry> = found
            .iter()
            .map(|(key, raw)| Entry::Put { key, raw })
            .collect();
        self.append(&entries)?;
        fs::remove_dir_all(old).with_context(|| format!("removing {}", old.display()))?;
        if let Some(parent) = old.parent() {
            fsync_dir(parent)?;
        }
        tracing::info!(objects = found.len(), from = %old.display(), "moved stored objects into the objects log");
        Ok(found)
    }

    /// Whether the log holds `key` (loaded or not).
    pub fn holds(&self, key: &ObjectKey) -> bool {
        self.live.contains_key(key)
    }

    /// Whether `raw` is exactly what the log holds for `key` (re-applying it writes nothing).
    pub fn holds_same(&self, key: &ObjectKey, raw: &str) -> bool {
        self.live
            .get(key)
            .is_some_and(|s| s.len as usize == raw.len() && s.hash == hash64(raw.as_bytes()))
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Records the outcome of loading the stored objects (the ones that failed, with why).
    pub fn loaded(&mut self, bad: BTreeMap<ObjectKey, String>) {
        self.bad = bad;
        self.refresh_status();
    }

    fn refresh_status(&mut self) {
        if self.file.is_none() {
            return;
        }
        self.status.objects = self.live.len() - self.bad.len();
        let error = self.bad.iter().next().map(|(k, e)| {
            format!(
                "{k} is stored but does not load ({} such): {e}",
                self.bad.len()
            )
        });
        self.status.set(self.bad.is_empty(), error);
    }

    /// The log's length now (to [`AppliedLog::rollback`] to).
    pub fn mark(&self) -> u64 {
        self.len
    }

    /// Appends one record with `entries` and makes it durable. On error nothing of it is in
    /// effect (the file is cut back).
    pub fn append(&mut self, entries: &[Entry]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let Some(file) = self.file.as_mut() else {
            bail!(
                "the applied objects log is not usable: {}",
                self.status.last_error
            );
        };
        let mut payload = Vec::new();
        let mut placed: Vec<(usize, usize)> = Vec::with_capacity(entries.len());
        for e in entries {
            match e {
                Entry::Put { key, raw } => {
                    writeln!(payload, "A {} {}", key_fields(key), raw.len())?;
                    placed.push((payload.len(), raw.len()));
                    payload.extend_from_slice(raw.as_bytes());
                    payload.push(b'\n');
                }
                Entry::Delete { key } => {
                    writeln!(payload, "D {}", key_fields(key))?;
                    placed.push((0, 0));
                }
            }
        }
        let header = format!("R {} {:016x}\n", payload.len(), hash64(&payload));
        let mut record = Vec::with_capacity(header.len() + payload.len() + 1);
        record.extend_from_slice(header.as_bytes());
        record.extend_from_slice(&payload);
        record.push(b'\n');
        drop(payload);
        let start = self.len;
        let written = file
            .write_all(&record)
            .and_then(|()| file.sync_data())
            .with_context(|| format!("writing {}", self.path.display()));
        if let Err(e) = written {
            let _ = file.set_len(start);
            let _ = file.sync_data();
            return Err(e);
        }
        self.len = start + record.len() as u64;
        let base = start + header.len() as u64;
        for (e, (off, len)) in entries.iter().zip(placed) {
            match e {
                Entry::Put { key, raw } => {
                    self.bad.remove(key);
                    self.set_live(
                        (*key).clone(),
                        Stored {
                            off: base + off as u64,
                            len: len as u32,
                            hash: hash64(raw.as_bytes()),
                        },
                    );
                }
                Entry::Delete { key } => {
                    self.bad.remove(key);
                    self.set_dead(key);
                }
            }
        }
        self.refresh_status();
        Ok(())
    }

    /// Undoes the appends since `mark` (their change was not applied after all).
    pub fn rollback(&mut self, mark: u64, undo: &[(ObjectKey, Option<Stored>)]) -> Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        file.set_len(mark)
            .and_then(|()| file.sync_data())
            .with_context(|| format!("cutting back {}", self.path.display()))?;
        self.len = mark;
        for (key, prev) in undo {
            match prev {
                Some(s) => self.set_live(key.clone(), *s),
                None => self.set_dead(key),
            }
        }
        self.refresh_status();
        Ok(())
    }

    /// What the log holds for `keys` now (for [`AppliedLog::rollback`]).
    pub fn snapshot(
        &self,
        keys: impl IntoIterator<Item = ObjectKey>,
    ) -> Vec<(ObjectKey, Option<Stored>)> {
        keys.into_iter()
            .map(|k| {
                let s = self.live.get(&k).copied();
                (k, s)
            })
            .collect()
    }

    /// Rewrites the log with only its live objects when it has grown to more than twice them.
    pub fn maybe_compact(&mut self) -> Result<()> {
        if self.file.is_none()
            || self.len < COMPACT_MIN
            || self.len < 2 * (self.live_bytes + MAGIC.len() as u64)
        {
            return Ok(());
        }
        let t = std::time::Instant::now();
        let before = self.len;
        let file = self.file.as_ref().expect("checked");
        let mut keys: Vec<(&ObjectKey, &Stored)> = self.live.iter().collect();
        keys.sort_by(|a, b| a.0.cmp(b.0));
        let mut payload = Vec::with_capacity(self.live_bytes as usize + 64 * keys.len());
        let mut placed = Vec::with_capacity(keys.len());
        for (k, s) in &keys {
            writeln!(payload, "A {} {}", key_fields(k), s.len)?;
            let at = payload.len();
            payload.resize(at + s.len as usize, 0);
            file.read_exact_at(&mut payload[at..], s.off)
                .context("reading a live object")?;
            payload.push(b'\n');
            placed.push(((*k).clone(), at, s.len, s.hash));
        }
        let tmp = self.path.with_extension("log.tmp");
        let mut out = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        out.write_all(MAGIC)?;
        let mut len = MAGIC.len() as u64;
        if !keys.is_empty() {
            let header = format!("R {} {:016x}\n", payload.len(), hash64(&payload));
            out.write_all(header.as_bytes())?;
            out.write_all(&payload)?;
            out.write_all(b"\n")?;
            let base = len + header.len() as u64;
            len = base + payload.len() as u64 + 1;
            for (k, at, l, h) in placed {
                self.live.insert(
                    k,
                    Stored {
                        off: base + at as u64,
                        len: l,
                        hash: h,
                    },
                );
            }
        }
        out.sync_all().context("fsync")?;
        drop(out);
        fs::rename(&tmp, &self.path).context("renaming the compacted log")?;
        if let Some(dir) = self.path.parent() {
            fsync_dir(dir)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&self.path)
            .context("reopening")?;
        file.seek(SeekFrom::End(0))?;
        self.file = Some(file);
        self.len = len;
        tracing::info!(
            before,
            after = len,
            objects = self.live.len(),
            ms = t.elapsed().as_millis() as u64,
            "compacted the objects log"
        );
        Ok(())
    }
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ObjectKey {
        ObjectKey::new(Kind::Service, "default", name)
    }

    fn live(dir: &Path) -> Vec<(String, String)> {
        let (log, objs) = AppliedLog::open(dir);
        assert!(log.status.last_error.is_empty(), "{:?}", log.status);
        objs.into_iter()
            .map(|(k, raw)| (k.name.to_string(), raw))
            .collect()
    }

    #[test]
    fn applies_and_deletes_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, objs) = AppliedLog::open(dir.path());
        assert!(objs.is_empty());
        let (a, b) = (key("a"), key("b"));
        log.append(&[
            Entry::Put {
                key: &a,
                raw: "doc a\nwith lines",
            },
            Entry::Put {
                key: &b,
                raw: "doc b",
            },
        ])
        .unwrap();
        log.append(&[Entry::Delete { key: &a }]).unwrap();
        log.append(&[Entry::Put {
            key: &b,
            raw: "doc b v2",
        }])
        .unwrap();
        assert!(log.holds_same(&b, "doc b v2") && !log.holds_same(&b, "doc b"));
        assert!(!log.holds(&a));
        assert_eq!(live(dir.path()), [("b".into(), "doc b v2".into())]);
    }

    #[test]
    fn a_record_cut_anywhere_is_dropped_whole_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = AppliedLog::open(dir.path());
        let (a, b, c) = (key("a"), key("b"), key("c"));
        log.append(&[Entry::Put { key: &a, raw: "A" }]).unwrap();
        let good = fs::read(dir.path().join(LOG_FILE)).unwrap();
        log.append(&[
            Entry::Put { key: &b, raw: "B" },
            Entry::Put { key: &c, raw: "C" },
        ])
        .unwrap();
        let full = fs::read(dir.path().join(LOG_FILE)).unwrap();
        drop(log);
        // Every prefix of the second record (a kill -9 during its write): only a survives.
        for cut in good.len()..full.len() {
            fs::write(dir.path().join(LOG_FILE), &full[..cut]).unwrap();
            assert_eq!(live(dir.path()), [("a".into(), "A".into())], "cut at {cut}");
            assert_eq!(
                fs::read(dir.path().join(LOG_FILE)).unwrap(),
                good,
                "the torn tail is cut off"
            );
        }
        // A flipped byte inside the record (lost sector): also dropped.
        let mut bad = full.clone();
        let n = bad.len() - 3;
        bad[n] ^= 1;
        fs::write(dir.path().join(LOG_FILE), &bad).unwrap();
        assert_eq!(live(dir.path()).len(), 1);
        fs::write(dir.path().join(LOG_FILE), &full).unwrap();
        assert_eq!(live(dir.path()).len(), 3);
    }

    #[test]
    fn rollback_undoes_an_append() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = AppliedLog::open(dir.path());
        let a = key("a");
        log.append(&[Entry::Put { key: &a, raw: "v1" }]).unwrap();
        let mark = log.mark();
        let undo = log.snapshot([a.clone()]);
        log.append(&[Entry::Put { key: &a, raw: "v2" }]).unwrap();
        log.rollback(mark, &undo).unwrap();
        assert!(log.holds_same(&a, "v1"));
        assert_eq!(live(dir.path()), [("a".into(), "v1".into())]);
    }

    #[test]
    fn compaction_keeps_only_live_objects() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = AppliedLog::open(dir.path());
        let keys: Vec<ObjectKey> = (0..100).map(|i| key(&format!("s{i}"))).collect();
        let big = "x".repeat(10_000);
        for round in 0..3 {
            let raws: Vec<String> = keys
                .iter()
                .map(|k| format!("{round} {} {big}", k.name))
                .collect();
            let entries: Vec<Entry> = keys
                .iter()
                .zip(&raws)
                .map(|(key, raw)| Entry::Put { key, raw })
                .collect();
            log.append(&entries).unwrap();
            log.maybe_compact().unwrap();
        }
        let size = fs::metadata(dir.path().join(LOG_FILE)).unwrap().len();
        assert!(size < 2 * 100 * 10_100 + 10_000, "compacted: {size}");
        let objs = live(dir.path());
        assert_eq!(objs.len(), 100);
        assert!(objs
            .iter()
            .all(|(n, raw)| raw.starts_with(&format!("2 {n} "))));
        // Appends after a compaction land in the new file.
        let (mut log, _) = AppliedLog::open(dir.path());
        log.append(&[Entry::Delete { key: &keys[0] }]).unwrap();
        assert_eq!(live(dir.path()).len(), 99);
    }

    #[test]
    fn old_per_object_files_move_into_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join(OLD_DIR);
        fs::create_dir_all(&old).unwrap();
        fs::write(
            old.join("Service_demo_web.json"),
            r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"web","namespace":"demo"},"spec":{"ports":[{"port":80}]}}"#,
        )
        .unwrap();
        fs::write(old.join("Service_demo_x.tmp"), "half").unwrap();
        let objs = live(dir.path());
        assert_eq!(objs.len(), 1);
        assert!(!old.exists());
        assert_eq!(live(dir.path()).len(), 1, "and stay there");
    }

    #[test]
    fn an_unreadable_log_is_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(LOG_FILE), "something else\n").unwrap();
        let (mut log, objs) = AppliedLog::open(dir.path());
        assert!(objs.is_empty());
        assert!(!log.status.loaded && log.status.last_error.contains("not a sluice objects log"));
        assert!(log.append(&[Entry::Delete { key: &key("a") }]).is_err());
    }
}

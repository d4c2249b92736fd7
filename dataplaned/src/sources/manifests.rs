//! `sluiced --manifests DIR`: every `*.yaml`/`*.yml`/`*.json` in DIR, read at start and whenever a
//! file changes (polled). A changed file is read once it has held still for one poll (a file
//! written in place must not be read half-way and drop the Services it held).
//!
//! The last version of each file that parsed is kept under `<state>/manifests.good/` (written
//! durably before it takes effect). So a file that is broken, half-written or unreadable — at a
//! poll or at start, even right after a restart — keeps serving what its last good version said:
//! - a file that stops parsing keeps its previous objects (the error is logged and in the status);
//! - at start, a file that does not parse, cannot be read, or changed in the last
//!   [`SETTLE_AT_START`] (maybe still being written) is served from its last good copy, and read
//!   again at the next polls;
//! - at start, an unreadable directory: every last good copy is served.
//!
//! The source has loaded completely when every file in the directory was read and parsed as it
//! is now; until then the daemon prunes nothing from the maps.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{hash64, SourceStatus};
use crate::services::objects::{parse, ObjectKey, Parsed};

/// At start, a file changed more recently than this may still be being written.
pub const SETTLE_AT_START: Duration = Duration::from_secs(2);
const GOOD_DIR: &str = "manifests.good";

type Fingerprint = (SystemTime, u64);

#[derive(Debug, Default)]
struct FileState {
    /// When the file was last looked at (None: not read from the directory yet).
    fp: Option<Fingerprint>,
    /// Hash of the text in effect.
    hash: u64,
    /// What the file holds in effect.
    keys: Vec<ObjectKey>,
    /// Why the file as it is now is not what is in effect (None: it is).
    problem: Option<String>,
}

/// A file's new content, to be applied by the store, then committed or rejected here.
pub struct FileUpdate {
    pub path: Arc<Path>,
    /// The file's objects now (the store takes them); None: the file is gone.
    pub objects: Option<Vec<Parsed>>,
    /// Their keys (None: the file is gone).
    keys: Option<Vec<ObjectKey>>,
    fp: Option<Fingerprint>,
    hash: u64,
    /// Text to keep as the last good copy (None: it is one already, or the file is gone).
    good_text: Option<String>,
    /// Why these objects are not the file's current content (served from the last good copy).
    problem: Option<String>,
}

pub struct ManifestsDir {
    dir: PathBuf,
    good_dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// Changed files seen at the last poll: read once they stop changing.
    unsettled: BTreeMap<PathBuf, Fingerprint>,
    /// The directory could not be listed at the last scan.
    dir_error: Option<String>,
    /// Updates handed out and not yet committed or rejected (the source is not loaded until
    /// they are in effect).
    pending: usize,
    pub status: SourceStatus,
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|x| x.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

fn fingerprint(meta: &fs::Metadata) -> Fingerprint {
    (
        meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        meta.len(),
    )
}

impl ManifestsDir {
    /// Loads every file (or its last good copy); returns the updates to apply.
    pub fn open(dir: &Path, state_dir: &Path) -> (ManifestsDir, Vec<FileUpdate>) {
        let mut m = ManifestsDir {
            dir: dir.to_owned(),
            good_dir: state_dir.join(GOOD_DIR),
            files: BTreeMap::new(),
            unsettled: BTreeMap::new(),
            dir_error: None,
            pending: 0,
            status: SourceStatus::new(format!("manifests {}", dir.display())),
        };
        if let Err(e) = fs::create_dir_all(&m.good_dir) {
            tracing::error!(dir = %m.good_dir.display(), error = %e, "cannot keep last good manifests");
        }
        let updates = m.scan(true);
        (m, updates)
    }

    fn good_copy(&self, path: &Path) -> PathBuf {
        self.good_dir
            .join(path.file_name().expect("a manifest file has a name"))
    }

    /// The file's last good copy, parsed.
    fn from_good(&mut self, path: &Path, problem: String) -> Option<FileUpdate> {
        // Whatever comes of it, the file is not in effect as it is now.
        self.files.entry(path.to_owned()).or_default().problem = Some(problem.clone());
        let text = fs::read_to_string(self.good_copy(path)).ok()?;
        let objects = match parse(&text, &format!("{} (last good copy)", path.display())) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "the last good copy of a manifest no longer parses");
                return None;
            }
        };
        tracing::warn!(file = %path.display(), problem = %problem, objects = objects.len(),
            "serving the manifest's last good version");
        Some(FileUpdate {
            path: path.into(),
            keys: Some(objects.iter().map(|o| o.key.clone()).collect()),
            objects: Some(objects),
            fp: None,
            hash: hash64(text.as_bytes()),
            good_text: None,
            problem: Some(problem),
        })
    }

    /// Re-reads files that changed and then held still for one poll.
    pub fn poll(&mut self) -> Vec<FileUpdate> {
        self.scan(false)
    }

    fn scan(&mut self, at_start: bool) -> Vec<FileUpdate> {
        let mut updates = Vec::new();
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => {
                let msg = format!("cannot read {}: {e}", self.dir.display());
                if self.dir_error.as_ref() != Some(&msg) {
                    tracing::error!(error = %msg, "manifests directory");
                }
                self.dir_error = Some(msg);
                if at_start {
                    // Serve every last good copy.
                    let copies: Vec<PathBuf> = fs::read_dir(&self.good_dir)
                        .into_iter()
                        .flatten()
                        .flatten()
                        .map(|e| self.dir.join(e.file_name()))
                        .filter(|p| is_manifest(p))
                        .collect();
                    for path in copies {
                        let problem = self.dir_error.clone().expect("set above");
                        updates.extend(self.from_good(&path, problem));
                    }
                }
                self.pending += updates.len();
                self.refresh_status();
                return updates;
            }
        };
        self.dir_error = None;
        let now = SystemTime::now();
        let mut seen = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            if !is_manifest(&path) {
                continue;
            }
            let Ok(meta) = e.metadata() else { continue };
            let fp = fingerprint(&meta);
            seen.push(path.clone());
            let known = self.files.get(&path);
            if known.is_some_and(|f| f.fp == Some(fp)) {
                self.unsettled.remove(&path);
                continue;
            }
            let recent = now
                .duration_since(fp.0)
                .map(|age| age < SETTLE_AT_START)
                .unwrap_or(true);
            let settling = if at_start {
                recent
            } else {
                self.unsettled.insert(path.clone(), fp) != Some(fp)
            };
            if settling {
                if at_start {
                    // Maybe mid-write: its last good copy until it holds still.
                    self.unsettled.insert(path.clone(), fp);
                    let problem = format!(
                        "{} changed less than {}s ago: read once it holds still",
                        path.display(),
                        SETTLE_AT_START.as_secs()
                    );
                    if let Some(u) = self.from_good(&path, problem) {
                        updates.push(u);
                        continue;
                    }
                    // No copy: read it now, it is all there is.
                } else {
                    continue;
                }
            }
            self.unsettled.remove(&path);
            updates.extend(self.read(&path, fp, at_start));
        }
        // Gone files: their objects go (and their last good copies).
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !seen.contains(p))
            .cloned()
            .collect();
        for path in gone {
            updates.push(FileUpdate {
                path: path.as_path().into(),
                objects: None,
                keys: None,
                fp: None,
                hash: 0,
                good_text: None,
                problem: None,
            });
        }
        if at_start {
            // Copies of files removed while the daemon was away.
            for e in fs::read_dir(&self.good_dir).into_iter().flatten().flatten() {
                let path = self.dir.join(e.file_name());
                if !seen.contains(&path) && !updates.iter().any(|u| *u.path == *path) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        self.unsettled.retain(|p, _| seen.contains(p));
        self.pending += updates.len();
        self.refresh_status();
        updates
    }

    /// Reads and parses one file that changed.
    fn read(&mut self, path: &Path, fp: Fingerprint, at_start: bool) -> Option<FileUpdate> {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                return self.failed(
                    path,
                    fp,
                    at_start,
                    format!("cannot read {}: {e}", path.display()),
                )
            }
        };
        let hash = hash64(text.as_bytes());
        let state = self.files.get_mut(path);
        if let Some(s) = state {
            if s.hash == hash {
                // Touched, not changed (or back to what is in effect).
                s.fp = Some(fp);
                s.problem = None;
                return None;
            }
        }
        match parse(&text, &path.display().to_string()) {
            Ok(objects) => {
                tracing::info!(file = %path.display(), objects = objects.len(), "loaded manifest");
                Some(FileUpdate {
                    path: path.into(),
                    keys: Some(objects.iter().map(|o| o.key.clone()).collect()),
                    objects: Some(objects),
                    fp: Some(fp),
                    hash,
                    good_text: Some(text),
                    problem: None,
                })
            }
            Err(e) => self.failed(path, fp, at_start, e.to_string()),
        }
    }

    fn failed(
        &mut self,
        path: &Path,
        fp: Fingerprint,
        at_start: bool,
        problem: String,
    ) -> Option<FileUpdate> {
        tracing::error!(error = %problem, "manifest not loaded; its previous objects stay");
        if at_start {
            if let Some(mut u) = self.from_good(path, problem.clone()) {
                u.fp = Some(fp); // not re-read until it changes
                return Some(u);
            }
        }
        // Remember the fingerprint so the same broken file is not parsed again every poll.
        let s = self.files.entry(path.to_owned()).or_default();
        s.fp = Some(fp);
        s.problem = Some(problem);
        self.refresh_status();
        None
    }

    /// What a file holds in effect.
    pub fn keys_of(&self, path: &Path) -> &[ObjectKey] {
        self.files
            .get(path)
            .map(|f| f.keys.as_slice())
            .unwrap_or(&[])
    }

    /// The update is in effect: remember it, and keep its text as the file's last good copy.
    pub fn commit(&mut self, u: FileUpdate) {
        self.pending = self.pending.saturating_sub(1);
        let path = u.path.to_path_buf();
        match u.keys {
            None => {
                self.files.remove(&path);
                let _ = fs::remove_file(self.good_copy(&path));
            }
            Some(keys) => {
                if let Some(text) = &u.good_text {
                    if let Err(e) = self.keep_good(&path, text) {
                        tracing::error!(file = %path.display(), error = %format!("{e:#}"),
                            "could not keep the manifest's last good copy");
                    }
                }
                let s = self.files.entry(path).or_default();
                s.fp = u.fp;
                s.hash = u.hash;
                s.keys = keys;
                s.problem = u.problem;
            }
        }
        self.refresh_status();
    }

    /// The update could not be applied (e.g. it does not fit the maps): what was in effect
    /// stays, and the file is not read again until it changes.
    pub fn reject(&mut self, u: FileUpdate, why: String) {
        self.pending = self.pending.saturating_sub(1);
        let s = self.files.entry(u.path.to_path_buf()).or_default();
        s.fp = u.fp;
        s.problem = Some(format!("{}: not applied: {why}", u.path.display()));
        self.refresh_status();
    }

    fn keep_good(&self, path: &Path, text: &str) -> anyhow::Result<()> {
        use anyhow::Context;
        let dst = self.good_copy(path);
        let tmp = dst.with_extension("tmp");
        let mut f =
            fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &dst)?;
        fs::File::open(&self.good_dir)?.sync_all()?;
        Ok(())
    }

    fn refresh_status(&mut self) {
        let problem = self
            .dir_error
            .clone()
            .or_else(|| self.files.values().find_map(|f| f.problem.clone()))
            .or_else(|| {
                self.unsettled
                    .keys()
                    .next()
                    .map(|p| format!("{} is changing: read once it holds still", p.display()))
            });
        self.status.objects = self.files.values().map(|f| f.keys.len()).sum();
        let complete = problem.is_none() && self.pending == 0;
        self.status.set(complete, problem);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
    const B: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: n2}\n";
    const BROKEN: &str =
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 99999}]}\n";

    /// Polls and commits every update (as the store would); returns how many there were.
    fn poll(m: &mut ManifestsDir) -> usize {
        let updates = m.poll();
        apply(m, updates)
    }

    fn apply(m: &mut ManifestsDir, updates: Vec<FileUpdate>) -> usize {
        let n = updates.len();
        for u in updates {
            m.commit(u);
        }
        n
    }

    fn keys(m: &ManifestsDir) -> Vec<String> {
        m.files
            .values()
            .flat_map(|f| f.keys.iter().map(|k| k.to_string()))
            .collect()
    }

    /// Makes a file look older than SETTLE_AT_START.
    fn age(path: &Path) {
        let old = SystemTime::now() - Duration::from_secs(60);
        fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(old)
            .unwrap();
    }

    #[test]
    fn files_load_change_and_a_broken_one_keeps_its_objects() {
        let (state, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        fs::write(dir.path().join("a.yaml"), A).unwrap();
        fs::write(dir.path().join("ignored.txt"), "junk").unwrap();
        age(&dir.path().join("a.yaml"));
        let (mut m, u) = ManifestsDir::open(dir.path(), state.path());
        apply(&mut m, u);
        assert_eq!(keys(&m), ["Service default/a"]);
        assert!(m.status.loaded);
        assert_eq!(poll(&mut m), 0, "nothing changed");
        fs::write(dir.path().join("a.yaml"), BROKEN).unwrap();
        assert_eq!(poll(&mut m), 0, "changing: wait a poll");
        assert_eq!(poll(&mut m), 0, "broken: nothing to apply");
        assert_eq!(keys(&m), ["Service default/a"], "previous objects stay");
        assert!(!m.status.loaded && m.status.last_error.contains("spec.ports[0].port"));
        assert!(m.status.loaded_once);
        fs::write(dir.path().join("b.json"), B).unwrap();
        assert_eq!(poll(&mut m), 0);
        assert_eq!(poll(&mut m), 1);
        fs::remove_file(dir.path().join("b.json")).unwrap();
        let u = m.poll();
        assert!(u.len() == 1 && u[0].objects.is_none());
        apply(&mut m, u);
        assert_eq!(keys(&m), ["Service default/a"]);
    }

    #[test]
    fn a_restart_with_a_broken_file_serves_its_last_good_version() {
        let (state, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = dir.path().join("a.yaml");
        fs::write(&a, A).unwrap();
        age(&a);
        let (mut m, u) = ManifestsDir::open(dir.path(), state.path());
        apply(&mut m, u);
        drop(m);
        // Broken while the daemon was away (a half-written file, say).
        fs::write(&a, &A[..A.len() - 20]).unwrap();
        age(&a);
        let (mut m, u) = ManifestsDir::open(dir.path(), state.path());
        assert_eq!(u.len(), 1);
        assert_eq!(&*u[0].objects.as_ref().unwrap()[0].key.name, "a");
        apply(&mut m, u);
        assert!(
            !m.status.loaded && !m.status.loaded_once,
            "degraded: {:?}",
            m.status
        );
        // Fixed: the source loads completely.
        fs::write(&a, A.replace("10.96.0.1", "10.96.0.2")).unwrap();
        assert_eq!(poll(&mut m), 0);
        assert_eq!(poll(&mut m), 1);
        assert!(m.status.loaded && m.status.loaded_once);
    }

    #[test]
    fn a_file_changed_just_before_start_is_served_from_its_copy_until_it_holds_still() {
        let (state, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = dir.path().join("a.yaml");
        fs::write(&a, A).unwrap();
        age(&a);
        let (mut m, u) = ManifestsDir::open(dir.path(), state.path());
        apply(&mut m, u);
        drop(m);
        // Being rewritten at the moment of the restart: parses, but is only half of it.
        fs::write(&a, "apiVersion: v1\nkind: Node\nmetadata: {name: half}\n").unwrap();
        let (mut m, u) = ManifestsDir::open(dir.path(), state.path());
        assert_eq!(
            &*u[0].objects.as_ref().unwrap()[0].key.name,
            "a",
            "the last good copy"
        );
        apply(&mut m, u);
        assert!(!m.status.loaded);
        // It held still: read.
        let u = m.poll();
        assert_eq!(u.len(), 1);
        assert_eq!(&*u[0].objects.as_ref().unwrap()[0].key.name, "half");
        apply(&mut m, u);
        assert!(m.status.loaded);
    }

    #[test]
    fn an_unreadable_directory_at_start_serves_every_last_good_copy() {
        let (state, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        fs::write(dir.path().join("a.yaml"), A).unwrap();
        fs::write(dir.path().join("b.yaml"), B).unwrap();
        age(&dir.path().join("a.yaml"));
        age(&dir.path().join("b.yaml"));
        let (mut m, u) = ManifestsDir::open(dir.path(), state.path());
        apply(&mut m, u);
        drop(m);
        let moved = dir.path().with_extension("away");
        fs::rename(dir.path(), &moved).unwrap();
        let (mut m, u) = ManifestsDir::open(dir.path(), state.path());
        assert_eq!(u.len(), 2);
        apply(&mut m, u);
        assert!(!m.status.loaded && m.status.last_error.contains("cannot read"));
        fs::rename(&moved, dir.path()).unwrap();
        // Back, unchanged: nothing to apply, and complete.
        assert_eq!(poll(&mut m), 0);
        assert_eq!(poll(&mut m), 0);
        assert!(m.status.loaded, "{:?}", m.status);
    }
}

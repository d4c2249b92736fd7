//! The objects the daemon serves, from two sources:
//! - applied (`sluicectl apply`): persisted one file per object under `<state>/objects/`, written
//!   atomically, so they survive restarts;
//! - manifests (`sluiced --manifests DIR`): every *.yaml/*.yml/*.json in DIR, re-read when a file
//!   changes. A file that stops parsing keeps its previous objects (and the error is logged).
//!
//! Where both hold the same object, the manifest wins (the directory is declared configuration).
//! A Kubernetes watch will be a third source feeding the same map.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};

use super::objects::{parse, Kind, Object, ObjectKey};

pub struct ObjectStore {
    dir: PathBuf,
    applied: BTreeMap<ObjectKey, Object>,
    manifests_dir: Option<PathBuf>,
    /// Per manifest file: its fingerprint when read, and its objects.
    manifest_files: BTreeMap<PathBuf, (Fingerprint, Vec<Object>)>,
    /// Changed files seen at the last poll: read once they stop changing (a file being written
    /// in place must not be read half-way and drop the Services it held).
    unsettled: BTreeMap<PathBuf, Fingerprint>,
}

type Fingerprint = (SystemTime, u64);

fn file_name(k: &ObjectKey) -> String {
    format!(
        "{:?}_{}_{}.json",
        k.kind,
        if k.namespace.is_empty() {
            "-"
        } else {
            &k.namespace
        },
        k.name
    )
}

impl ObjectStore {
    pub fn open(dir: &Path, manifests_dir: Option<&Path>) -> Result<ObjectStore> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut applied = BTreeMap::new();
        for e in fs::read_dir(dir)? {
            let path = e?.path();
            if path.extension().and_then(|x| x.to_str()) != Some("json") {
                let _ = fs::remove_file(&path); // an unfinished write
                continue;
            }
            let text = fs::read_to_string(&path)?;
            match parse(&text, &path.display().to_string()) {
                Ok(objs) => {
                    for o in objs {
                        applied.insert(o.key(), o);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "a stored object no longer parses; ignoring it")
                }
            }
        }
        let mut store = ObjectStore {
            dir: dir.to_owned(),
            applied,
            manifests_dir: manifests_dir.map(Path::to_owned),
            manifest_files: BTreeMap::new(),
            unsettled: BTreeMap::new(),
        };
        store.scan_manifests(false);
        Ok(store)
    }

    /// Stores `objs` (all already validated) durably; returns what each key held before, for
    /// [`ObjectStore::restore`]. Files are written first, made durable with one syncfs, then
    /// renamed into place: a crash leaves either the old or the new version of each.
    pub fn apply(&mut self, objs: Vec<Object>) -> Result<Vec<(ObjectKey, Option<Object>)>> {
        let mut staged = Vec::with_capacity(objs.len());
        for o in &objs {
            let k = o.key();
            if self.applied.get(&k) == Some(o) {
                continue; // unchanged: re-applying a big file rewrites nothing
            }
            let path = self.dir.join(file_name(&k));
            let tmp = path.with_extension("tmp");
            let mut f =
                fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
            f.write_all(o.to_json().to_string().as_bytes())?;
            staged.push((tmp, path));
        }
        let dir = fs::File::open(&self.dir)?;
        nix::unistd::syncfs(&dir).context("syncfs on the object store")?;
        for (tmp, path) in &staged {
            fs::rename(tmp, path)?;
        }
        dir.sync_all()?;
        Ok(objs
            .into_iter()
            .map(|o| {
                let k = o.key();
                let prev = self.applied.insert(k.clone(), o);
                (k, prev)
            })
            .collect())
    }

    /// Removes applied objects; returns what each removed key held, and the keys not found.
    pub fn delete(
        &mut self,
        keys: &[ObjectKey],
    ) -> Result<(Vec<(ObjectKey, Option<Object>)>, Vec<ObjectKey>)> {
        let (mut removed, mut missing) = (Vec::new(), Vec::new());
        for k in keys {
            match self.applied.remove(k) {
                Some(o) => {
                    let _ = fs::remove_file(self.dir.join(file_name(k)));
                    removed.push((k.clone(), Some(o)));
                }
                None => missing.push(k.clone()),
            }
        }
        fs::File::open(&self.dir)?.sync_all()?;
        Ok((removed, missing))
    }

    /// Puts back what `apply` or `delete` changed (`prev` as they returned it).
    pub fn restore(&mut self, prev: Vec<(ObjectKey, Option<Object>)>) -> Result<()> {
        let mut again = Vec::new();
        for (k, old) in prev {
            match old {
                Some(o) => again.push(o),
                None => {
                    self.applied.remove(&k);
                    let _ = fs::remove_file(self.dir.join(file_name(&k)));
                }
            }
        }
        self.apply(again)?;
        Ok(())
    }

    /// The objects that would be in effect with `add` applied and `remove` deleted.
    pub fn effective_with(
        &self,
        add: &[Object],
        remove: &[ObjectKey],
    ) -> BTreeMap<ObjectKey, Object> {
        let mut applied: BTreeMap<ObjectKey, &Object> =
            self.applied.iter().map(|(k, o)| (k.clone(), o)).collect();
        for k in remove {
            applied.remove(k);
        }
        for o in add {
            applied.insert(o.key(), o);
        }
        let mut out: BTreeMap<ObjectKey, Object> =
            applied.into_iter().map(|(k, o)| (k, o.clone())).collect();
        for (_, objs) in self.manifest_files.values() {
            for o in objs {
                out.insert(o.key(), o.clone());
            }
        }
        out
    }

    /// Re-reads manifest files that changed and then stayed unchanged for one poll; true if the
    /// object set changed. Writing a file by rename is atomic and is picked up at the next poll.
    pub fn reload_manifests(&mut self) -> bool {
        self.scan_manifests(true)
    }

    fn scan_manifests(&mut self, settle: bool) -> bool {
        let Some(dir) = self.manifests_dir.clone() else {
            return false;
        };
        let mut seen = Vec::new();
        let mut changed = false;
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot read the manifests directory");
                return false;
            }
        };
        for e in entries.flatten() {
            let path = e.path();
            let ext = path.extension().and_then(|x| x.to_str()).unwrap_or("");
            if !["yaml", "yml", "json"].contains(&ext) {
                continue;
            }
            let Ok(meta) = e.metadata() else { continue };
            let fp = (
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            );
            seen.push(path.clone());
            if self
                .manifest_files
                .get(&path)
                .is_some_and(|(old, _)| *old == fp)
            {
                self.unsettled.remove(&path);
                continue;
            }
            if settle && self.unsettled.insert(path.clone(), fp) != Some(fp) {
                continue; // changed since the last poll: wait until it holds still
            }
            self.unsettled.remove(&path);
            let text = match fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "cannot read manifest");
                    continue;
                }
            };
            match parse(&text, &path.display().to_string()) {
                Ok(objs) => {
                    tracing::info!(file = %path.display(), objects = objs.len(), "loaded manifest");
                    self.manifest_files.insert(path, (fp, objs));
                    changed = true;
                }
                Err(err) => {
                    tracing::error!(error = %err, "manifest not loaded; its previous objects stay");
                    // Remember the fingerprint so the same broken file is not re-parsed every poll.
                    let prev = self
                        .manifest_files
                        .remove(&path)
                        .map(|(_, o)| o)
                        .unwrap_or_default();
                    self.manifest_files.insert(path, (fp, prev));
                }
            }
        }
        let before = self.manifest_files.len();
        self.manifest_files.retain(|p, _| seen.contains(p));
        self.unsettled.retain(|p, _| seen.contains(p));
        changed | (before != self.manifest_files.len())
    }

    pub fn has_manifests(&self) -> bool {
        self.manifests_dir.is_some()
    }

    /// Every object in effect.
    pub fn effective(&self) -> BTreeMap<ObjectKey, &Object> {
        let mut out: BTreeMap<ObjectKey, &Object> =
            self.applied.iter().map(|(k, o)| (k.clone(), o)).collect();
        for (_, objs) in self.manifest_files.values() {
            for o in objs {
                out.insert(o.key(), o);
            }
        }
        out
    }

    pub fn count(&self, kind: Kind) -> usize {
        self.effective().keys().filter(|k| k.kind == kind).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
    const B: &str = "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\n";

    fn tmp(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("sluice-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        p
    }

    #[test]
    fn applied_objects_persist_and_delete() {
        let dir = tmp("persist");
        let mut s = ObjectStore::open(&dir, None).unwrap();
        s.apply(parse(&format!("{A}---\n{B}"), "t").unwrap())
            .unwrap();
        let s2 = ObjectStore::open(&dir, None).unwrap();
        assert_eq!(s2.effective().len(), 2);
        let mut s2 = s2;
        let keys: Vec<_> = parse(A, "t").unwrap().iter().map(|o| o.key()).collect();
        let (removed, missing) = s2.delete(&keys).unwrap();
        assert_eq!((removed.len(), missing.len()), (1, 0));
        assert_eq!(s2.delete(&keys).unwrap().1.len(), 1);
        assert_eq!(ObjectStore::open(&dir, None).unwrap().effective().len(), 1);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn manifests_load_change_and_keep_objects_of_a_broken_file() {
        let dir = tmp("m-state");
        let mdir = tmp("m-dir");
        fs::create_dir_all(&mdir).unwrap();
        fs::write(mdir.join("a.yaml"), A).unwrap();
        fs::write(mdir.join("ignored.txt"), "junk").unwrap();
        let mut s = ObjectStore::open(&dir, Some(&mdir)).unwrap();
        assert_eq!(s.count(Kind::Service), 1);
        assert!(!s.reload_manifests(), "nothing changed");
        fs::write(
            mdir.join("a.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 99999}]}\n",
        )
        .unwrap();
        assert!(!s.reload_manifests());
        assert!(!s.reload_manifests());
        assert_eq!(
            s.count(Kind::Service),
            1,
            "a broken file keeps its previous objects"
        );
        fs::write(
            mdir.join("b.json"),
            r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"n2"}}"#,
        )
        .unwrap();
        assert!(
            !s.reload_manifests(),
            "a changed file is read once it held still for a poll"
        );
        assert!(s.reload_manifests());
        assert_eq!(s.count(Kind::Node), 1);
        fs::remove_file(mdir.join("b.json")).unwrap();
        assert!(s.reload_manifests());
        assert_eq!(s.count(Kind::Node), 0);
        fs::remove_dir_all(dir).unwrap();
        fs::remove_dir_all(mdir).unwrap();
    }
}

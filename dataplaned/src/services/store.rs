//! The objects in effect, merged from their sources: for each key, what each source holds
//! (compact specs only), and the one in effect — a manifest wins over an applied object (the
//! directory is declared configuration), and of two manifest files naming one object the last
//! in path order wins. A change to a source becomes the list of [`Change`]s in effect, which is
//! all the model needs; a no-op (the same spec again) is no change.

use std::path::Path;
use std::sync::Arc;

use super::model::Change;
use super::objects::{ObjectKey, Spec};
use super::FastMap;

/// Which source an object comes from. Order = precedence (greater wins).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    Applied,
    /// The Kubernetes watch (`--kubeconfig`/`--master`): over objects applied by hand, under
    /// the node's manifests.
    Kubernetes,
    Manifest(Arc<Path>),
}

/// What a [`ObjectStore::stage`] replaced, to put it back.
#[derive(Debug, Default)]
pub struct Undo(Vec<(ObjectKey, Origin, Option<Arc<Spec>>)>);

#[derive(Debug, Default)]
pub struct ObjectStore {
    /// Per key: each source's spec, sorted by origin (the last is in effect).
    entries: FastMap<ObjectKey, Vec<(Origin, Arc<Spec>)>>,
}

/// Whether two specs are the same (pointer-equal or equal).
pub fn same(a: Option<&Arc<Spec>>, b: Option<&Arc<Spec>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
        (None, None) => true,
        _ => false,
    }
}

impl ObjectStore {
    /// The spec in effect for `key`.
    pub fn get(&self, key: &ObjectKey) -> Option<&Arc<Spec>> {
        self.entries.get(key).and_then(|v| v.last()).map(|(_, s)| s)
    }

    /// Whether `origin` holds `key`.
    pub fn holds(&self, origin: &Origin, key: &ObjectKey) -> bool {
        self.entries
            .get(key)
            .is_some_and(|v| v.iter().any(|(o, _)| o == origin))
    }

    /// Sets what `origin` holds for each key (None: it holds nothing any more). Returns the
    /// changes in effect, and what to give [`ObjectStore::undo`] to put everything back.
    pub fn stage(
        &mut self,
        origin: &Origin,
        ops: impl IntoIterator<Item = (ObjectKey, Option<Arc<Spec>>)>,
    ) -> (Vec<Change>, Undo) {
        let mut changes = Vec::new();
        let mut undo = Undo::default();
        for (key, spec) in ops {
            let prev = self.set(origin, &key, spec);
            if let Some(c) = prev.1 {
                changes.push(c);
            }
            undo.0.push((key, origin.clone(), prev.0));
        }
        (changes, undo)
    }

    /// Puts back what `undo` recorded; returns the changes in effect that makes.
    pub fn undo(&mut self, undo: Undo) -> Vec<Change> {
        let mut changes = Vec::new();
        for (key, origin, spec) in undo.0.into_iter().rev() {
            if let (_, Some(c)) = self.set(&origin, &key, spec) {
                changes.push(c);
            }
        }
        changes
    }

    /// Sets one layer; returns what it held and the change in effect, if any.
    fn set(
        &mut self,
        origin: &Origin,
        key: &ObjectKey,
        spec: Option<Arc<Spec>>,
    ) -> (Option<Arc<Spec>>, Option<Change>) {
        let layers = self.entries.entry(key.clone()).or_default();
        let before = layers.last().map(|(_, s)| s.clone());
        let pos = layers.binary_search_by(|(o, _)| o.cmp(origin));
        let prev = match (pos, spec) {
            (Ok(i), Some(s)) => Some(std::mem::replace(&mut layers[i].1, s)),
            (Ok(i), None) => Some(layers.remove(i).1),
            (Err(i), Some(s)) => {
                layers.insert(i, (origin.clone(), s));
                None
            }
            (Err(_), None) => None,
        };
        let after = layers.last().map(|(_, s)| s.clone());
        if layers.is_empty() {
            self.entries.remove(key);
        }
        let change = (!same(before.as_ref(), after.as_ref())).then(|| Change {
            key: key.clone(),
            old: before,
            new: after,
        });
        (prev, change)
    }

    /// Objects in effect.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::objects::{parse, Kind};

    fn spec(yaml: &str) -> (ObjectKey, Arc<Spec>) {
        let p = parse(yaml, "t").unwrap().remove(0);
        (p.key, Arc::new(p.spec))
    }

    const A1: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
    const A2: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n";

    #[test]
    fn a_manifest_wins_over_an_applied_object_and_gives_it_back() {
        let mut s = ObjectStore::default();
        let m = Origin::Manifest(Path::new("/m/a.yaml").into());
        let (k, a1) = spec(A1);
        let (_, a2) = spec(A2);
        let (c, _) = s.stage(&Origin::Applied, [(k.clone(), Some(a1.clone()))]);
        assert_eq!(c.len(), 1);
        let (c, _) = s.stage(&m, [(k.clone(), Some(a2.clone()))]);
        assert_eq!(c.len(), 1, "the manifest takes over");
        let (c, _) = s.stage(&Origin::Applied, [(k.clone(), Some(a1.clone()))]);
        assert!(
            c.is_empty(),
            "an applied object under a manifest changes nothing in effect"
        );
        let (c, _) = s.stage(&m, [(k.clone(), None)]);
        assert_eq!(c.len(), 1);
        assert_eq!(
            c[0].new.as_deref(),
            Some(&*a1),
            "the applied object is back"
        );
        assert_eq!(k.kind, Kind::Service);
    }

    #[test]
    fn the_same_spec_again_is_no_change_and_undo_puts_back() {
        let mut s = ObjectStore::default();
        let (k, a1) = spec(A1);
        let (_, a2) = spec(A2);
        s.stage(&Origin::Applied, [(k.clone(), Some(a1.clone()))]);
        let again = Arc::new((*a1).clone());
        assert!(s
            .stage(&Origin::Applied, [(k.clone(), Some(again))])
            .0
            .is_empty());
        let (c, undo) = s.stage(&Origin::Applied, [(k.clone(), Some(a2)), (k.clone(), None)]);
        assert_eq!(c.len(), 2);
        assert!(s.get(&k).is_none());
        let back = s.undo(undo);
        assert_eq!(back.last().and_then(|c| c.new.as_deref()), Some(&*a1));
        assert_eq!(s.get(&k).map(|x| &**x), Some(&*a1));
    }
}

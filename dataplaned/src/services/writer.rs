//! Desired state → BPF maps, incrementally. The writer mirrors what the maps hold and writes only
//! differences: a change to one endpoint touches that backend set's slots and its frontends'
//! counts, nothing else. Order keeps the datapath consistent at every instant: slots are written
//! before a frontend's count grows, and deleted only after it shrank.
//!
//! It talks to the maps through [`ServiceMaps`], so the diff logic is tested without a kernel.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;

use anyhow::{bail, Result};

use super::model::{Backend, Desired, FrontendKey, SetKey};

/// A frontend map value, as the writer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrontendValue {
    pub svc_id: u32,
    pub count: u32,
    pub affinity_timeout: u32,
    pub affinity: bool,
}

/// The operations the writer needs from the service maps.
pub trait ServiceMaps {
    fn frontends(&self) -> Result<Vec<(FrontendKey, FrontendValue)>>;
    /// VIPs with a marker entry ({vip, 0, 0}: fragments to them are dropped).
    fn markers(&self) -> Result<Vec<Ipv4Addr>>;
    fn slots(&self) -> Result<Vec<(u32, u32, Backend)>>;
    fn put_frontend(&mut self, k: &FrontendKey, v: &FrontendValue) -> Result<()>;
    fn delete_frontend(&mut self, k: &FrontendKey) -> Result<()>;
    fn put_marker(&mut self, vip: Ipv4Addr) -> Result<()>;
    fn delete_marker(&mut self, vip: Ipv4Addr) -> Result<()>;
    fn put_slot(&mut self, svc_id: u32, slot: u32, b: &Backend) -> Result<()>;
    fn delete_slot(&mut self, svc_id: u32, slot: u32) -> Result<()>;
    /// Deletes conntrack entries for which `keep(svc_id, backend)` is false; returns how many.
    fn purge_flows(&mut self, keep: &dyn Fn(u32, Backend) -> bool) -> Result<usize>;
    /// Deletes affinity entries for which `keep(svc_id, backend)` is false; returns how many.
    fn purge_affinity(&mut self, keep: &dyn Fn(u32, Backend) -> bool) -> Result<usize>;
    /// Zeroes a service id's packet counters (the id is being given to another backend set).
    fn reset_counters(&mut self, svc_id: u32) -> Result<()>;
}

/// What one sync wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub frontend_writes: usize,
    pub frontend_deletes: usize,
    pub slot_writes: usize,
    pub slot_deletes: usize,
    pub marker_writes: usize,
    pub flows_purged: usize,
    pub affinity_purged: usize,
}

impl SyncStats {
    pub fn map_writes(&self) -> usize {
        self.frontend_writes
            + self.frontend_deletes
            + self.slot_writes
            + self.slot_deletes
            + self.marker_writes
    }
}

pub struct Writer {
    frontends: BTreeMap<FrontendKey, FrontendValue>,
    markers: BTreeSet<Ipv4Addr>,
    slots: HashMap<u32, Vec<Backend>>,
    ids: HashMap<SetKey, u32>,
    present: HashMap<u32, BTreeSet<Backend>>,
    ready: HashMap<u32, BTreeSet<Backend>>,
    names: HashMap<u32, SetKey>,
    max_ids: u32,
    synced_once: bool,
}

impl Writer {
    /// Mirrors what the maps hold now (after a restart: what the previous daemon wrote).
    /// `max_ids` bounds service ids (the per-service counter array's size).
    pub fn load(maps: &impl ServiceMaps, max_ids: u32) -> Result<Writer> {
        let mut slots: HashMap<u32, Vec<Option<Backend>>> = HashMap::new();
        for (id, slot, b) in maps.slots()? {
            let v = slots.entry(id).or_default();
            if v.len() <= slot as usize {
                v.resize(slot as usize + 1, None);
            }
            v[slot as usize] = Some(b);
        }
        let frontends: BTreeMap<_, _> = maps.frontends()?.into_iter().collect();
        // Only slots below the frontend's count are live; a hole would be a bug of a dead writer.
        let slots = slots
            .into_iter()
            .map(|(id, v)| (id, v.into_iter().map_while(|b| b).collect::<Vec<_>>()))
            .collect();
        Ok(Writer {
            frontends,
            markers: maps.markers()?.into_iter().collect(),
            slots,
            ids: HashMap::new(),
            present: HashMap::new(),
            ready: HashMap::new(),
            names: HashMap::new(),
            max_ids,
            synced_once: false,
        })
    }

    pub fn set_id(&self, set: &SetKey) -> Option<u32> {
        self.ids.get(set).copied()
    }

    /// The backend set a service id serves.
    pub fn set_of(&self, id: u32) -> Option<&SetKey> {
        self.names.get(&id)
    }

    /// The backends in a set's slots, in slot order.
    pub fn slots_of(&self, id: u32) -> &[Backend] {
        self.slots.get(&id).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Makes the maps hold `d`.
    pub fn sync(&mut self, d: &Desired, maps: &mut impl ServiceMaps) -> Result<SyncStats> {
        let mut st = SyncStats::default();

        // 1. Ids: keep the set's id; after a restart, adopt the id its frontend already has.
        for (fk, spec) in &d.frontends {
            if self.ids.contains_key(&spec.set) {
                continue;
            }
            if let Some(fv) = self.frontends.get(fk) {
                if !self.ids.values().any(|id| *id == fv.svc_id) {
                    self.ids.insert(spec.set.clone(), fv.svc_id);
                }
            }
        }
        self.ids.retain(|set, _| d.sets.contains_key(set));
        let mut used: HashSet<u32> = self.ids.values().copied().collect();
        used.extend(self.frontends.values().map(|f| f.svc_id));
        let mut next = 0u32;
        for set in d.sets.keys() {
            if self.ids.contains_key(set) {
                continue;
            }
            while used.contains(&next) {
                next += 1;
            }
            if next >= self.max_ids {
                bail!(
                    "more than {} service ports: raise --frontends-size",
                    self.max_ids
                );
            }
            used.insert(next);
            maps.reset_counters(next)?;
            self.ids.insert(set.clone(), next);
        }
        self.names = self
            .ids
            .iter()
            .map(|(set, id)| (*id, set.clone()))
            .collect();

        // 2. Slots: minimal moves; growth is invisible until the count is raised.
        let mut shrink: Vec<(u32, u32, u32)> = Vec::new();
        let mut lost_present = false;
        let mut lost_ready = false;
        for (set, bs) in &d.sets {
            let id = self.ids[set];
            let old = self.slots.get(&id).cloned().unwrap_or_default();
            let new = plan(&old, &bs.ready);
            for (i, b) in new.iter().enumerate() {
                if old.get(i) != Some(b) {
                    maps.put_slot(id, i as u32, b)?;
                    st.slot_writes += 1;
                }
            }
            if new.len() < old.len() {
                shrink.push((id, new.len() as u32, old.len() as u32));
            }
            let ready: BTreeSet<Backend> = bs.ready.iter().copied().collect();
            if let Some(prev) = self.present.get(&id) {
                lost_present |= !prev.is_subset(&bs.present);
            }
            if let Some(prev) = self.ready.get(&id) {
                lost_ready |= !prev.is_subset(&ready);
            }
            self.present.insert(id, bs.present.clone());
            self.ready.insert(id, ready);
            self.slots.insert(id, new);
        }

        // 3. Frontends (their count now matches the slots written above).
        for (fk, spec) in &d.frontends {
            let id = self.ids[&spec.set];
            let v = FrontendValue {
                svc_id: id,
                count: self.slots_of(id).len() as u32,
                affinity_timeout: spec.affinity_timeout.unwrap_or(0),
                affinity: spec.affinity_timeout.is_some(),
            };
            if self.frontends.get(fk) != Some(&v) {
                maps.put_frontend(fk, &v)?;
                self.frontends.insert(*fk, v);
                st.frontend_writes += 1;
            }
        }
        let vips = d.vips();
        for vip in vips.difference(&self.markers.clone()) {
            maps.put_marker(*vip)?;
            self.markers.insert(*vip);
            st.marker_writes += 1;
        }

        // 4. Now unreachable: slots past a shrunk count, gone frontends, their sets, markers.
        for (id, from, to) in shrink {
            for slot in from..to {
                maps.delete_slot(id, slot)?;
                st.slot_deletes += 1;
            }
        }
        let gone: Vec<FrontendKey> = self
            .frontends
            .keys()
            .filter(|k| !d.frontends.contains_key(k))
            .copied()
            .collect();
        for fk in gone {
            maps.delete_frontend(&fk)?;
            self.frontends.remove(&fk);
            st.frontend_deletes += 1;
        }
        let live: HashSet<u32> = self.ids.values().copied().collect();
        let dead: Vec<u32> = self
            .slots
            .keys()
            .filter(|id| !live.contains(id))
            .copied()
            .collect();
        for id in dead {
            for slot in 0..self.slots[&id].len() as u32 {
                maps.delete_slot(id, slot)?;
                st.slot_deletes += 1;
            }
            self.slots.remove(&id);
            lost_present |= self.present.remove(&id).is_some();
            lost_ready |= self.ready.remove(&id).is_some();
        }
        for vip in self.markers.clone().difference(&vips) {
            maps.delete_marker(*vip)?;
            self.markers.remove(vip);
            st.marker_writes += 1;
        }

        // 5. Flows to backends that left their set entirely stop; affinity only points at ready
        // backends. Full scans, so only when something was lost (and once after start).
        if lost_present || !self.synced_once {
            let present = &self.present;
            st.flows_purged =
                maps.purge_flows(&|id, b| present.get(&id).is_some_and(|p| p.contains(&b)))?;
        }
        if lost_ready || !self.synced_once {
            let ready = &self.ready;
            st.affinity_purged =
                maps.purge_affinity(&|id, b| ready.get(&id).is_some_and(|r| r.contains(&b)))?;
        }
        self.synced_once = true;
        Ok(st)
    }
}

/// The new slot order: survivors keep their slot, a removed backend's slot takes the last one,
/// newcomers are appended.
fn plan(old: &[Backend], want: &[Backend]) -> Vec<Backend> {
    let wanted: HashSet<&Backend> = want.iter().collect();
    let mut v = old.to_vec();
    let mut i = 0;
    while i < v.len() {
        if wanted.contains(&v[i]) {
            i += 1;
        } else {
            v.swap_remove(i);
        }
    }
    let have: HashSet<Backend> = v.iter().copied().collect();
    v.extend(want.iter().filter(|b| !have.contains(b)));
    v
}

#[cfg(test)]
pub mod fake {
    //! An in-memory [`ServiceMaps`] with the same invariants the datapath relies on.
    use super::*;

    #[derive(Default, Debug, Clone)]
    pub struct FakeMaps {
        pub frontends: BTreeMap<FrontendKey, FrontendValue>,
        pub markers: BTreeSet<Ipv4Addr>,
        pub slots: BTreeMap<(u32, u32), Backend>,
        /// (svc_id, backend) of live flows.
        pub flows: Vec<(u32, Backend)>,
        pub affinity: Vec<(u32, Backend)>,
        pub counter_resets: Vec<u32>,
        pub writes: usize,
    }

    impl FakeMaps {
        /// What a new flow to `fk` could get: the slots below the count.
        pub fn choices(&self, fk: &FrontendKey) -> Vec<Backend> {
            let Some(f) = self.frontends.get(fk) else {
                return vec![];
            };
            (0..f.count).map(|s| self.slots[&(f.svc_id, s)]).collect()
        }
    }

    impl ServiceMaps for FakeMaps {
        fn frontends(&self) -> Result<Vec<(FrontendKey, FrontendValue)>> {
            Ok(self.frontends.iter().map(|(k, v)| (*k, *v)).collect())
        }
        fn markers(&self) -> Result<Vec<Ipv4Addr>> {
            Ok(self.markers.iter().copied().collect())
        }
        fn slots(&self) -> Result<Vec<(u32, u32, Backend)>> {
            Ok(self.slots.iter().map(|((i, s), b)| (*i, *s, *b)).collect())
        }
        fn put_frontend(&mut self, k: &FrontendKey, v: &FrontendValue) -> Result<()> {
            for s in 0..v.count {
                assert!(
                    self.slots.contains_key(&(v.svc_id, s)),
                    "count {} raised before slot {s} of {} was written",
                    v.count,
                    v.svc_id
                );
            }
            self.writes += 1;
            self.frontends.insert(*k, *v);
            Ok(())
        }
        fn delete_frontend(&mut self, k: &FrontendKey) -> Result<()> {
            self.writes += 1;
            self.frontends.remove(k);
            Ok(())
        }
        fn put_marker(&mut self, vip: Ipv4Addr) -> Result<()> {
            self.writes += 1;
            self.markers.insert(vip);
            Ok(())
        }
        fn delete_marker(&mut self, vip: Ipv4Addr) -> Result<()> {
            self.writes += 1;
            self.markers.remove(&vip);
            Ok(())
        }
        fn put_slot(&mut self, id: u32, slot: u32, b: &Backend) -> Result<()> {
            self.writes += 1;
            self.slots.insert((id, slot), *b);
            Ok(())
        }
        fn delete_slot(&mut self, id: u32, slot: u32) -> Result<()> {
            for f in self.frontends.values() {
                assert!(
                    !(f.svc_id == id && slot < f.count),
                    "slot {slot} of {id} deleted while the count {} still covers it",
                    f.count
                );
            }
            self.writes += 1;
            self.slots.remove(&(id, slot));
            Ok(())
        }
        fn purge_flows(&mut self, keep: &dyn Fn(u32, Backend) -> bool) -> Result<usize> {
            let before = self.flows.len();
            self.flows.retain(|(id, b)| keep(*id, *b));
            Ok(before - self.flows.len())
        }
        fn purge_affinity(&mut self, keep: &dyn Fn(u32, Backend) -> bool) -> Result<usize> {
            let before = self.affinity.len();
            self.affinity.retain(|(id, b)| keep(*id, *b));
            Ok(before - self.affinity.len())
        }
        fn reset_counters(&mut self, svc_id: u32) -> Result<()> {
            self.counter_resets.push(svc_id);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeMaps;
    use super::*;
    use crate::services::model::Proto;
    use crate::services::objects::parse;

    fn desired_of(yaml: &str) -> Desired {
        crate::services::desired_of(&parse(yaml, "t").unwrap())
    }

    fn svc(name: &str, vip: &str, endpoints: &[(&str, &str)]) -> String {
        let eps: Vec<String> = endpoints
            .iter()
            .map(|(ip, cond)| format!("- {{addresses: [{ip}], conditions: {cond}}}"))
            .collect();
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {vip}, ports: [{{port: 80, targetPort: 8080}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nendpoints:\n{}\n",
            if eps.is_empty() { "[]".to_string() } else { eps.join("\n") }
        )
        .replace("endpoints:\n[]", "endpoints: []")
    }

    const READY: &str = "{ready: true}";
    const TERMINATING: &str = "{ready: false, serving: true, terminating: true}";

    fn fk(vip: &str) -> FrontendKey {
        FrontendKey {
            vip: vip.parse().unwrap(),
            port: 80,
            proto: Proto::Tcp,
        }
    }

    fn be(ip: &str) -> Backend {
        Backend {
            ip: ip.parse().unwrap(),
            port: 8080,
        }
    }

    #[test]
    fn first_sync_writes_everything_and_a_second_nothing() {
        let mut maps = FakeMaps::default();
        let mut w = Writer::load(&maps, 100).unwrap();
        let d = desired_of(
            &(svc(
                "a",
                "10.96.0.1",
                &[("10.244.0.1", READY), ("10.244.0.2", READY)],
            ) + &svc("b", "10.96.0.2", &[])),
        );
        let st = w.sync(&d, &mut maps).unwrap();
        assert_eq!(
            (st.frontend_writes, st.slot_writes, st.marker_writes),
            (2, 2, 2)
        );
        assert_eq!(
            maps.choices(&fk("10.96.0.1")),
            vec![be("10.244.0.1"), be("10.244.0.2")]
        );
        assert_eq!(
            maps.choices(&fk("10.96.0.2")),
            vec![],
            "no endpoints: count 0, the datapath rejects"
        );
        assert_eq!(w.sync(&d, &mut maps).unwrap().map_writes(), 0);
    }

    #[test]
    fn one_endpoint_change_touches_only_its_entries() {
        let mut maps = FakeMaps::default();
        let mut w = Writer::load(&maps, 20000).unwrap();
        let mut docs: String = (0..1000)
            .map(|i| {
                svc(
                    &format!("s{i}"),
                    &format!("10.96.{}.{}", i / 250, i % 250 + 1),
                    &[("10.244.0.1", READY), ("10.244.0.2", READY)],
                )
            })
            .collect();
        w.sync(&desired_of(&docs), &mut maps).unwrap();
        // Service s7 gains an endpoint.
        docs = docs.replace(
            "name: s7-1, labels: {kubernetes.io/service-name: s7}}\naddressType: IPv4\nendpoints:\n",
            "name: s7-1, labels: {kubernetes.io/service-name: s7}}\naddressType: IPv4\nendpoints:\n- {addresses: [10.244.0.3], conditions: {ready: true}}\n",
        );
        let st = w.sync(&desired_of(&docs), &mut maps).unwrap();
        assert_eq!(
            (st.slot_writes, st.frontend_writes, st.map_writes()),
            (1, 1, 2),
            "{st:?}"
        );
        assert_eq!(maps.choices(&fk("10.96.0.8")).len(), 3);
    }

    #[test]
    fn removal_moves_the_last_slot_into_the_hole_and_purges_only_that_backends_flows() {
        let mut maps = FakeMaps::default();
        let mut w = Writer::load(&maps, 100).unwrap();
        let three = [
            ("10.244.0.1", READY),
            ("10.244.0.2", READY),
            ("10.244.0.3", READY),
        ];
        w.sync(&desired_of(&svc("a", "10.96.0.1", &three)), &mut maps)
            .unwrap();
        let id = maps.frontends[&fk("10.96.0.1")].svc_id;
        maps.flows = vec![
            (id, be("10.244.0.1")),
            (id, be("10.244.0.2")),
            (id, be("10.244.0.3")),
        ];
        maps.affinity = vec![(id, be("10.244.0.1"))];

        let st = w
            .sync(
                &desired_of(&svc(
                    "a",
                    "10.96.0.1",
                    &[("10.244.0.2", READY), ("10.244.0.3", READY)],
                )),
                &mut maps,
            )
            .unwrap();
        assert_eq!(
            maps.choices(&fk("10.96.0.1")),
            vec![be("10.244.0.3"), be("10.244.0.2")]
        );
        assert_eq!(
            (st.slot_writes, st.slot_deletes, st.frontend_writes),
            (1, 1, 1)
        );
        assert_eq!(
            maps.flows,
            vec![(id, be("10.244.0.2")), (id, be("10.244.0.3"))],
            "flows to the removed backend stop"
        );
        assert!(maps.affinity.is_empty());
    }

    #[test]
    fn terminating_endpoints_keep_flows_but_get_no_new_ones() {
        let mut maps = FakeMaps::default();
        let mut w = Writer::load(&maps, 100).unwrap();
        w.sync(
            &desired_of(&svc(
                "a",
                "10.96.0.1",
                &[("10.244.0.1", READY), ("10.244.0.2", READY)],
            )),
            &mut maps,
        )
        .unwrap();
        let id = maps.frontends[&fk("10.96.0.1")].svc_id;
        maps.flows = vec![(id, be("10.244.0.1")), (id, be("10.244.0.2"))];
        maps.affinity = vec![(id, be("10.244.0.2"))];
        w.sync(
            &desired_of(&svc(
                "a",
                "10.96.0.1",
                &[("10.244.0.1", READY), ("10.244.0.2", TERMINATING)],
            )),
            &mut maps,
        )
        .unwrap();
        assert_eq!(maps.choices(&fk("10.96.0.1")), vec![be("10.244.0.1")]);
        assert_eq!(
            maps.flows.len(),
            2,
            "the terminating endpoint keeps its flow"
        );
        assert!(
            maps.affinity.is_empty(),
            "but affinity no longer sends new flows to it"
        );
    }

    #[test]
    fn deleting_a_service_removes_its_frontend_slots_marker_and_flows() {
        let mut maps = FakeMaps::default();
        let mut w = Writer::load(&maps, 100).unwrap();
        let both = svc("a", "10.96.0.1", &[("10.244.0.1", READY)])
            + &svc("b", "10.96.0.2", &[("10.244.0.9", READY)]);
        w.sync(&desired_of(&both), &mut maps).unwrap();
        let a = maps.frontends[&fk("10.96.0.1")].svc_id;
        let b = maps.frontends[&fk("10.96.0.2")].svc_id;
        maps.flows = vec![(a, be("10.244.0.1")), (b, be("10.244.0.9"))];
        w.sync(
            &desired_of(&svc("b", "10.96.0.2", &[("10.244.0.9", READY)])),
            &mut maps,
        )
        .unwrap();
        assert_eq!(maps.frontends.len(), 1);
        assert_eq!(maps.slots.len(), 1);
        assert_eq!(
            maps.markers
                .iter()
                .map(|m| m.to_string())
                .collect::<Vec<_>>(),
            ["10.96.0.2"]
        );
        assert_eq!(maps.flows, vec![(b, be("10.244.0.9"))]);
    }

    #[test]
    fn a_restarted_writer_adopts_the_maps_and_writes_nothing() {
        let mut maps = FakeMaps::default();
        let d = desired_of(
            &(svc(
                "a",
                "10.96.0.1",
                &[("10.244.0.1", READY), ("10.244.0.2", READY)],
            ) + &svc("b", "10.96.0.2", &[("10.244.0.3", READY)])),
        );
        Writer::load(&maps, 100)
            .unwrap()
            .sync(&d, &mut maps)
            .unwrap();
        let id = maps.frontends[&fk("10.96.0.1")].svc_id;
        maps.flows = vec![(id, be("10.244.0.1"))];
        let mut w2 = Writer::load(&maps, 100).unwrap();
        let st = w2.sync(&d, &mut maps).unwrap();
        assert_eq!(st.map_writes(), 0, "{st:?}");
        assert_eq!(
            maps.flows.len(),
            1,
            "established flows survive a daemon restart"
        );
    }

    #[test]
    fn a_vip_shared_by_two_ports_keeps_its_marker_until_both_go() {
        let mut maps = FakeMaps::default();
        let mut w = Writer::load(&maps, 100).unwrap();
        let two = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{name: x, port: 80}, {name: y, port: 81}]}\n";
        w.sync(&desired_of(two), &mut maps).unwrap();
        assert_eq!(maps.frontends.len(), 2);
        assert_eq!(maps.markers.len(), 1);
        w.sync(&desired_of(""), &mut maps).unwrap();
        assert!(maps.frontends.is_empty() && maps.markers.is_empty() && maps.slots.is_empty());
    }

    #[test]
    fn id_space_is_bounded() {
        let mut maps = FakeMaps::default();
        let mut w = Writer::load(&maps, 2).unwrap();
        let docs: String = (0..3)
            .map(|i| svc(&format!("s{i}"), &format!("10.96.0.{}", i + 1), &[]))
            .collect();
        assert!(w.sync(&desired_of(&docs), &mut maps).is_err());
    }
}

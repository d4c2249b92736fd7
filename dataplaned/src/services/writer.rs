//! Desired state → BPF maps, incrementally. The writer mirrors what the maps hold and writes only
//! differences: a change to one endpoint touches that backend set's slots, its membership entry and
//! its frontends' counts, nothing else. Order keeps the datapath consistent at every instant:
//! members and slots are written before a frontend's count grows; a leaving backend's member entry
//! goes before the frontend's generation is bumped (so a UDP flow that re-checks it sees it gone),
//! and its slot only after the count shrank.
//!
//! No conntrack or affinity scan happens here: established TCP flows to a backend that left keep
//! going (as with kube-proxy), UDP flows re-check their backend's membership when the frontend's
//! generation changed and move on (kube-proxy's stale-UDP cleanup), and affinity entries are
//! checked against membership when used.
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
    /// Bumped whenever a backend leaves the set.
    pub gen: u32,
}

/// The operations the writer needs from the service maps.
pub trait ServiceMaps {
    fn frontends(&self) -> Result<Vec<(FrontendKey, FrontendValue)>>;
    /// VIPs with a marker entry (fragments to them without a known first fragment are dropped).
    fn markers(&self) -> Result<Vec<Ipv4Addr>>;
    fn slots(&self) -> Result<Vec<(u32, u32, Backend)>>;
    fn members(&self) -> Result<Vec<(u32, Backend)>>;
    fn put_frontend(&mut self, k: &FrontendKey, v: &FrontendValue) -> Result<()>;
    fn delete_frontend(&mut self, k: &FrontendKey) -> Result<()>;
    fn put_marker(&mut self, vip: Ipv4Addr) -> Result<()>;
    fn delete_marker(&mut self, vip: Ipv4Addr) -> Result<()>;
    fn put_slot(&mut self, svc_id: u32, slot: u32, b: &Backend) -> Result<()>;
    fn delete_slot(&mut self, svc_id: u32, slot: u32) -> Result<()>;
    fn put_member(&mut self, svc_id: u32, b: &Backend) -> Result<()>;
    fn delete_member(&mut self, svc_id: u32, b: &Backend) -> Result<()>;
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
    pub member_writes: usize,
    pub marker_writes: usize,
    /// Backends that left a set (their UDP flows move on, TCP flows finish).
    pub backends_left: usize,
}

impl SyncStats {
    pub fn map_writes(&self) -> usize {
        self.frontend_writes
            + self.frontend_deletes
            + self.slot_writes
            + self.slot_deletes
            + self.member_writes
            + self.marker_writes
    }
}

pub struct Writer {
    frontends: BTreeMap<FrontendKey, FrontendValue>,
    markers: BTreeSet<Ipv4Addr>,
    slots: HashMap<u32, Vec<Backend>>,
    members: HashMap<u32, BTreeSet<Backend>>,
    gens: HashMap<u32, u32>,
    ids: HashMap<SetKey, u32>,
    names: HashMap<u32, SetKey>,
    max_ids: u32,
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
        let mut members: HashMap<u32, BTreeSet<Backend>> = HashMap::new();
        for (id, b) in maps.members()? {
            members.entry(id).or_default().insert(b);
        }
        let mut gens: HashMap<u32, u32> = HashMap::new();
        for f in frontends.values() {
            let g = gens.entry(f.svc_id).or_default();
            *g = (*g).max(f.gen);
        }
        Ok(Writer {
            frontends,
            markers: maps.markers()?.into_iter().collect(),
            slots,
            members,
            gens,
            ids: HashMap::new(),
            names: HashMap::new(),
            max_ids,
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

        // 2. Members and slots: minimal moves; growth is invisible until the count is raised.
        let mut shrink: Vec<(u32, u32, u32)> = Vec::new();
        for (set, bs) in &d.sets {
            let id = self.ids[set];
            let want: BTreeSet<Backend> = bs.ready.iter().copied().collect();
            let have = self.members.entry(id).or_default();
            for b in want.difference(&have.clone()) {
                maps.put_member(id, b)?;
                have.insert(*b);
                st.member_writes += 1;
            }
            let left: Vec<Backend> = have.difference(&want).copied().collect();
            for b in &left {
                maps.delete_member(id, b)?;
                have.remove(b);
                st.member_writes += 1;
            }
            if !left.is_empty() {
                st.backends_left += left.len();
                let g = self.gens.entry(id).or_default();
                *g = g.wrapping_add(1);
            }
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
                gen: self.gens.get(&id).copied().unwrap_or(0),
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
            .chain(self.members.keys())
            .filter(|id| !live.contains(id))
            .copied()
            .collect::<BTreeSet<u32>>()
            .into_iter()
            .collect();
        for id in dead {
            for slot in 0..self.slots_of(id).len() as u32 {
                maps.delete_slot(id, slot)?;
                st.slot_deletes += 1;
            }
            for b in self.members.remove(&id).unwrap_or_default() {
                maps.delete_member(id, &b)?;
                st.member_writes += 1;
            }
            self.slots.remove(&id);
            self.gens.remove(&id);
        }
        for vip in self.markers.clone().difference(&vips) {
            maps.delete_marker(*vip)?;
            self.markers.remove(vip);
            st.marker_writes += 1;
        }
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
        pub members: BTreeSet<(u32, Backend)>,
        pub counter_resets: Vec<u32>,
        pub writes: usize,
    }

    impl FakeMaps {
        /// What a new flow to `fk` could get: the slots below the count.
        pub fn choices(&self, fk: &FrontendKey) -> Vec<Backend> {
            let Some(f) = self.frontends.get(fk) else {
                return vec![];
            };
            let v: Vec<Backend> = (0..f.count).map(|s| self.slots[&(f.svc_id, s)]).collect();
            for b in &v {
                assert!(
                    self.members.contains(&(f.svc_id, *b)),
                    "slot backend {b:?} is not a member"
                );
            }
            v
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
        fn members(&self) -> Result<Vec<(u32, Backend)>> {
            Ok(self.members.iter().copied().collect())
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
            if let Some(old) = self.frontends.get(k) {
                // A gen bump tells UDP flows to re-check membership: the member must be gone.
                if old.svc_id == v.svc_id && old.gen != v.gen {
                    for s in 0..old.count {
                        let b = self.slots[&(old.svc_id, s)];
                        let still = (0..v.count).any(|n| self.slots[&(v.svc_id, n)] == b);
                        assert!(
                            still || !self.members.contains(&(v.svc_id, b)),
                            "gen bumped while the member entry of {b:?} (leaving) still exists"
                        );
                    }
                }
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
        fn put_member(&mut self, id: u32, b: &Backend) -> Result<()> {
            self.writes += 1;
            self.members.insert((id, *b));
            Ok(())
        }
        fn delete_member(&mut self, id: u32, b: &Backend) -> Result<()> {
            self.writes += 1;
            self.members.remove(&(id, *b));
            Ok(())
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
            (
                st.frontend_writes,
                st.slot_writes,
                st.member_writes,
                st.marker_writes
            ),
            (2, 2, 2, 2)
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
            (
                st.slot_writes,
                st.frontend_writes,
                st.member_writes,
                st.map_writes()
            ),
            (1, 1, 1, 3),
            "{st:?}"
        );
        assert_eq!(maps.choices(&fk("10.96.0.8")).len(), 3);
    }

    #[test]
    fn removal_moves_the_last_slot_into_the_hole_drops_its_member_and_bumps_the_generation() {
        let mut maps = FakeMaps::default();
        let mut w = Writer::load(&maps, 100).unwrap();
        let three = [
            ("10.244.0.1", READY),
            ("10.244.0.2", READY),
            ("10.244.0.3", READY),
        ];
        w.sync(&desired_of(&svc("a", "10.96.0.1", &three)), &mut maps)
            .unwrap();
        let before = maps.frontends[&fk("10.96.0.1")];
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
            (
                st.slot_writes,
                st.slot_deletes,
                st.frontend_writes,
                st.member_writes
            ),
            (1, 1, 1, 1)
        );
        assert_eq!(st.backends_left, 1);
        let after = maps.frontends[&fk("10.96.0.1")];
        assert_eq!(
            after.gen,
            before.gen + 1,
            "UDP flows re-check their backend"
        );
        assert!(!maps.members.contains(&(after.svc_id, be("10.244.0.1"))));
    }

    #[test]
    fn a_gained_backend_writes_no_generation_bump() {
        let mut maps = FakeMaps::default();
        let mut w = Writer::load(&maps, 100).unwrap();
        w.sync(
            &desired_of(&svc("a", "10.96.0.1", &[("10.244.0.1", READY)])),
            &mut maps,
        )
        .unwrap();
        let gen = maps.frontends[&fk("10.96.0.1")].gen;
        w.sync(
            &desired_of(&svc(
                "a",
                "10.96.0.1",
                &[("10.244.0.1", READY), ("10.244.0.2", READY)],
            )),
            &mut maps,
        )
        .unwrap();
        assert_eq!(maps.frontends[&fk("10.96.0.1")].gen, gen);
    }

    #[test]
    fn terminating_endpoints_get_new_flows_only_when_no_endpoint_is_ready() {
        let mut maps = FakeMaps::default();
        let mut w = Writer::load(&maps, 100).unwrap();
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
        // A one-replica rolling update: the only endpoint is terminating but still serving.
        w.sync(
            &desired_of(&svc("a", "10.96.0.1", &[("10.244.0.2", TERMINATING)])),
            &mut maps,
        )
        .unwrap();
        assert_eq!(
            maps.choices(&fk("10.96.0.1")),
            vec![be("10.244.0.2")],
            "falls back to serving+terminating endpoints"
        );
    }

    #[test]
    fn deleting_a_service_removes_its_frontend_slots_members_and_marker() {
        let mut maps = FakeMaps::default();
        let mut w = Writer::load(&maps, 100).unwrap();
        let both = svc("a", "10.96.0.1", &[("10.244.0.1", READY)])
            + &svc("b", "10.96.0.2", &[("10.244.0.9", READY)]);
        w.sync(&desired_of(&both), &mut maps).unwrap();
        let b = maps.frontends[&fk("10.96.0.2")].svc_id;
        w.sync(
            &desired_of(&svc("b", "10.96.0.2", &[("10.244.0.9", READY)])),
            &mut maps,
        )
        .unwrap();
        assert_eq!(maps.frontends.len(), 1);
        assert_eq!(maps.slots.len(), 1);
        assert_eq!(
            maps.members.iter().copied().collect::<Vec<_>>(),
            vec![(b, be("10.244.0.9"))]
        );
        assert_eq!(
            maps.markers
                .iter()
                .map(|m| m.to_string())
                .collect::<Vec<_>>(),
            ["10.96.0.2"]
        );
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
        let mut w2 = Writer::load(&maps, 100).unwrap();
        let st = w2.sync(&d, &mut maps).unwrap();
        assert_eq!(st.map_writes(), 0, "{st:?}");
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
        assert!(maps.members.is_empty());
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

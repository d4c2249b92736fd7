//! Desired state → BPF maps, incrementally, Service by Service. A sync takes the desired state of
//! the Services that changed and writes, in batches, only the differences: one endpoint change is
//! its slot, its membership entry and its frontends' counts, nothing else.
//!
//! The writer keeps two things apart:
//! - a mirror of what the maps hold (frontends, backend sets' slots and members, VIP markers),
//!   read at start and read again after any map error, so it is never out of step with them;
//! - ownership: which Service port holds which backend set id and which frontends. A Service port
//!   without an id adopts the one its frontend already has in the maps, so a restarted daemon
//!   rewrites nothing. What nobody owns after start is "foreign" (written by an earlier daemon for
//!   objects not loaded yet): it stays until [`Writer::prune`], which runs once every object source
//!   has loaded completely. What a failed sync left behind is garbage, deleted by the next one.
//!
//! Order keeps the datapath consistent at every instant (the fake maps below check it):
//! members and slots are written before a frontend's count grows; a leaving backend's member entry
//! goes before the frontend write that bumps the generation (so a UDP flow that re-checks sees it
//! gone); slots go only after the count shrank, sets only after no frontend points at them.
//! Within one sync every Service's writes of one kind are one batch, in that order:
//! members in, members out (leaving), slots in, counters zeroed, frontends in, markers in,
//! frontends out, slots out, members out (dead sets), markers out.
//!
//! New entries are written before old ones are deleted, so the maps must hold old ∪ new during a
//! change: [`Writer::plan`] counts that peak and refuses the whole change before anything is
//! written.
//!
//! No conntrack or affinity scan happens here: established TCP flows to a backend that left keep
//! going (as with kube-proxy), UDP flows re-check their backend's membership when the frontend's
//! generation changed and move on (kube-proxy's stale-UDP cleanup), and affinity entries are
//! checked against membership when used.
//!
//! It talks to the maps through [`ServiceMaps`], so all of this is tested without a kernel.

use std::net::Ipv4Addr;

use anyhow::Result;
use sluice_core::bpf::pod_veth::types::{frontend_flags, frontend_kind};

use super::model::{
    Backend, FrontendKey, FrontendKind, Placement, PortDesired, PortKey, ServiceDesired, ServiceKey,
};
use super::{FastMap, FastSet};

/// A frontend map value, as the writer sees it (the fields of `struct frontend_value`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FrontendValue {
    pub cluster_id: u32,
    pub cluster_count: u32,
    pub local_id: u32,
    pub local_count: u32,
    pub affinity_timeout: u32,
    /// Bumped whenever a backend leaves a set of this frontend.
    pub gen: u32,
    /// FE_F_* bits.
    pub flags: u32,
    /// FE_KIND_*.
    pub kind: u8,
}

/// The set id of a Service port's local set: its cluster set's id with this bit set. Derived, so
/// a port holds one id and a restarted daemon finds both sets from its frontends' cluster_id.
/// (Set ids index the per-service counters only through cluster_id, which never has the bit.)
pub const LOCAL_SET: u32 = 1 << 31;

/// The cluster set id of a set id.
pub fn base_id(id: u32) -> u32 {
    id & !LOCAL_SET
}

/// A backend slot's value: the backend and where it runs (`struct backend_value`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot {
    pub backend: Backend,
    pub at: Placement,
}

/// The operations the writer needs from the service maps. Writes take batches; a batch that
/// fails may have been applied in part (the writer then reads the maps again).
pub trait ServiceMaps {
    fn frontends(&self) -> Result<Vec<(FrontendKey, FrontendValue)>>;
    /// VIPs with a marker entry (fragments to them without a known first fragment are dropped).
    fn markers(&self) -> Result<Vec<Ipv4Addr>>;
    fn slots(&self) -> Result<Vec<(u32, u32, Slot)>>;
    fn members(&self) -> Result<Vec<(u32, Backend)>>;
    fn put_frontends(&mut self, e: &[(FrontendKey, FrontendValue)]) -> Result<()>;
    fn delete_frontends(&mut self, k: &[FrontendKey]) -> Result<()>;
    fn put_markers(&mut self, vips: &[Ipv4Addr]) -> Result<()>;
    fn delete_markers(&mut self, vips: &[Ipv4Addr]) -> Result<()>;
    fn put_slots(&mut self, e: &[(u32, u32, Slot)]) -> Result<()>;
    fn delete_slots(&mut self, e: &[(u32, u32)]) -> Result<()>;
    fn put_members(&mut self, e: &[(u32, Backend)]) -> Result<()>;
    fn delete_members(&mut self, e: &[(u32, Backend)]) -> Result<()>;
    /// Zeroes set ids' packet counters (the ids are being given to other Service ports).
    fn reset_counters(&mut self, ids: &[u32]) -> Result<()>;
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
    /// Services whose desired state was diffed.
    pub services: usize,
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

/// How many entries each map holds at most.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    pub frontends: u32,
    /// The VIP marker map (as large as the frontend map).
    pub markers: u32,
    /// Backend slots, and membership entries (one per slot).
    pub backends: u32,
    /// Backend set ids (the per-service counter array's size).
    pub set_ids: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The change does not fit the maps; nothing was written.
    #[error("{0}")]
    Capacity(String),
    /// A map write failed; the writer has read the maps again.
    #[error("{0:#}")]
    Map(anyhow::Error),
}

/// One backend set's contents in the maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct SetContent {
    /// Slots 0.., without holes.
    slots: Vec<Slot>,
    /// Slots past a hole (left by a writer that died): never reachable, deleted when synced.
    strays: Vec<u32>,
    /// Sorted.
    members: Vec<Backend>,
}

/// What the maps hold.
#[derive(Debug, Default)]
struct Mirror {
    frontends: FastMap<FrontendKey, FrontendValue>,
    sets: FastMap<u32, SetContent>,
    markers: FastSet<Ipv4Addr>,
    /// Frontends per VIP (a marker is needed while there is one).
    vip_refs: FastMap<Ipv4Addr, u32>,
    /// Frontends pointing at each set id.
    id_frontends: FastMap<u32, Vec<FrontendKey>>,
    slot_count: usize,
    member_count: usize,
}

impl Mirror {
    fn load(maps: &impl ServiceMaps) -> Result<Mirror> {
        let mut m = Mirror::default();
        let mut slots: FastMap<u32, Vec<Option<Slot>>> = FastMap::default();
        for (id, slot, b) in maps.slots()? {
            let v = slots.entry(id).or_default();
            if v.len() <= slot as usize {
                v.resize(slot as usize + 1, None);
            }
            v[slot as usize] = Some(b);
            m.slot_count += 1;
        }
        for (id, v) in slots {
            let live = v.iter().take_while(|b| b.is_some()).count();
            let set = m.sets.entry(id).or_default();
            set.slots = v[..live].iter().map(|b| b.expect("live prefix")).collect();
            set.strays = (live..v.len())
                .filter(|i| v[*i].is_some())
                .map(|i| i as u32)
                .collect();
        }
        for (id, b) in maps.members()? {
            m.sets.entry(id).or_default().members.push(b);
            m.member_count += 1;
        }
        for s in m.sets.values_mut() {
            s.members.sort_unstable();
        }
        for (k, v) in maps.frontends()? {
            m.add_frontend(k, v);
        }
        m.markers = maps.markers()?.into_iter().collect();
        Ok(m)
    }

    fn add_frontend(&mut self, k: FrontendKey, v: FrontendValue) {
        match self.frontends.insert(k, v) {
            Some(old) if old.cluster_id == v.cluster_id => return,
            Some(old) => self.unref(old.cluster_id, &k),
            None => *self.vip_refs.entry(k.vip).or_default() += 1,
        }
        self.id_frontends.entry(v.cluster_id).or_default().push(k);
    }

    fn remove_frontend(&mut self, k: &FrontendKey) {
        if let Some(old) = self.frontends.remove(k) {
            self.unref(old.cluster_id, k);
            dec(&mut self.vip_refs, &k.vip);
        }
    }

    fn unref(&mut self, id: u32, k: &FrontendKey) {
        if let Some(v) = self.id_frontends.get_mut(&id) {
            v.retain(|x| x != k);
            if v.is_empty() {
                self.id_frontends.remove(&id);
            }
        }
    }

    /// The highest generation among these frontends in the maps.
    fn gen_of<'a>(&self, keys: impl IntoIterator<Item = &'a FrontendKey>) -> u32 {
        keys.into_iter()
            .filter_map(|k| self.frontends.get(k))
            .map(|v| v.gen)
            .max()
            .unwrap_or(0)
    }

    /// Whether the maps hold anything of the port set `id` (a base id): its sets or frontends.
    fn in_use(&self, id: u32) -> bool {
        self.sets.contains_key(&id)
            || self.sets.contains_key(&(id | LOCAL_SET))
            || self.id_frontends.contains_key(&id)
    }

    /// Replays a written plan (the maps now hold exactly this).
    fn replay(&mut self, ops: &Ops) {
        for (id, b) in &ops.member_puts {
            let m = &mut self.sets.entry(*id).or_default().members;
            if let Err(p) = m.binary_search(b) {
                m.insert(p, *b);
                self.member_count += 1;
            }
        }
        for (id, b) in ops.member_leaves.iter().chain(&ops.member_deletes) {
            if let Some(s) = self.sets.get_mut(id) {
                if let Ok(p) = s.members.binary_search(b) {
                    s.members.remove(p);
                    self.member_count -= 1;
                }
            }
        }
        for (id, slot, b) in &ops.slot_puts {
            let s = &mut self.sets.entry(*id).or_default().slots;
            let i = *slot as usize;
            if i < s.len() {
                s[i] = *b;
            } else {
                debug_assert_eq!(i, s.len(), "slots are appended in order");
                s.push(*b);
                self.slot_count += 1;
            }
        }
        for (k, v) in &ops.frontend_puts {
            self.add_frontend(*k, *v);
        }
        self.markers.extend(ops.marker_puts.iter().copied());
        for k in &ops.frontend_deletes {
            self.remove_frontend(k);
        }
        for (id, slot) in &ops.slot_deletes {
            if let Some(s) = self.sets.get_mut(id) {
                if let Some(p) = s.strays.iter().position(|x| x == slot) {
                    s.strays.swap_remove(p);
                    self.slot_count -= 1;
                } else if *slot as usize + 1 == s.slots.len() {
                    s.slots.pop();
                    self.slot_count -= 1;
                }
            }
        }
        for vip in &ops.marker_deletes {
            self.markers.remove(vip);
        }
        self.sets
            .retain(|_, s| !(s.slots.is_empty() && s.members.is_empty() && s.strays.is_empty()));
    }
}

fn dec<K: std::hash::Hash + Eq>(m: &mut FastMap<K, u32>, k: &K) {
    if let Some(n) = m.get_mut(k) {
        *n -= 1;
        if *n == 0 {
            m.remove(k);
        }
    }
}

/// One Service port as the writer holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OwnedPort {
    port: PortKey,
    set_id: u32,
    gen: u32,
    frontends: Vec<FrontendKey>,
}

/// The map writes of one sync, in the order they are made.
#[derive(Debug, Default)]
struct Ops {
    member_puts: Vec<(u32, Backend)>,
    member_leaves: Vec<(u32, Backend)>,
    slot_puts: Vec<(u32, u32, Slot)>,
    counter_resets: Vec<u32>,
    frontend_puts: Vec<(FrontendKey, FrontendValue)>,
    marker_puts: Vec<Ipv4Addr>,
    frontend_deletes: Vec<FrontendKey>,
    slot_deletes: Vec<(u32, u32)>,
    member_deletes: Vec<(u32, Backend)>,
    marker_deletes: Vec<Ipv4Addr>,
}

/// A sync worked out but not written: [`Writer::execute`] writes it.
#[derive(Debug, Default)]
pub struct Plan {
    ops: Ops,
    owned: Vec<(ServiceKey, Vec<OwnedPort>)>,
    freed_ids: Vec<u32>,
    next_id_hint: u32,
    stats: SyncStats,
    /// Garbage this plan deletes (cleared from the writer's list once written).
    clears_garbage: bool,
}

impl Plan {
    /// Map writes the plan will make.
    pub fn map_writes(&self) -> usize {
        let o = &self.ops;
        o.member_puts.len()
            + o.member_leaves.len()
            + o.slot_puts.len()
            + o.frontend_puts.len()
            + o.marker_puts.len()
            + o.frontend_deletes.len()
            + o.slot_deletes.len()
            + o.member_deletes.len()
            + o.marker_deletes.len()
    }
}

pub struct Writer {
    mirror: Mirror,
    owned: FastMap<ServiceKey, Vec<OwnedPort>>,
    /// Set id → the Service port holding it.
    holders: FastMap<u32, (ServiceKey, PortKey)>,
    owned_frontends: FastSet<FrontendKey>,
    /// Left in the maps by an earlier daemon and not adopted (yet).
    foreign_frontends: FastSet<FrontendKey>,
    foreign_sets: FastSet<u32>,
    foreign_markers: FastSet<Ipv4Addr>,
    /// Left in the maps by a sync that failed: deleted by the next.
    garbage_frontends: FastSet<FrontendKey>,
    garbage_sets: FastSet<u32>,
    garbage_markers: FastSet<Ipv4Addr>,
    capacity: Capacity,
    /// Lowest set id that may be free.
    id_hint: u32,
}

impl Writer {
    /// Mirrors what the maps hold now (after a restart: what the previous daemon wrote); all of
    /// it is foreign until adopted.
    pub fn load(maps: &impl ServiceMaps, capacity: Capacity) -> Result<Writer> {
        let mirror = Mirror::load(maps)?;
        let foreign_frontends = mirror.frontends.keys().copied().collect();
        let foreign_sets = mirror
            .sets
            .keys()
            .chain(mirror.id_frontends.keys())
            .map(|id| base_id(*id))
            .collect();
        let foreign_markers = mirror.markers.clone();
        Ok(Writer {
            mirror,
            owned: FastMap::default(),
            holders: FastMap::default(),
            owned_frontends: FastSet::default(),
            foreign_frontends,
            foreign_sets,
            foreign_markers,
            garbage_frontends: FastSet::default(),
            garbage_sets: FastSet::default(),
            garbage_markers: FastSet::default(),
            capacity,
            id_hint: 0,
        })
    }

    /// Reads the maps again (after a failed write). Ownership stays; whatever is in the maps
    /// that nobody owns and that was not there at start is garbage for the next sync.
    pub fn reload(&mut self, maps: &impl ServiceMaps) -> Result<()> {
        self.mirror = Mirror::load(maps)?;
        // One past what the maps hold: a failed batch may have removed members whose frontend
        // (and its generation bump) it never wrote; the next sync writes a new generation so that
        // UDP flows re-check where they go.
        for ports in self.owned.values_mut() {
            for p in ports {
                p.gen = p.gen.max(self.mirror.gen_of(&p.frontends)).wrapping_add(1);
            }
        }
        self.garbage_frontends = self
            .mirror
            .frontends
            .keys()
            .filter(|k| !self.owned_frontends.contains(k) && !self.foreign_frontends.contains(k))
            .copied()
            .collect();
        self.garbage_sets = self
            .mirror
            .sets
            .keys()
            .chain(self.mirror.id_frontends.keys())
            .map(|id| base_id(*id))
            .filter(|id| !self.holders.contains_key(id) && !self.foreign_sets.contains(id))
            .collect();
        self.garbage_markers = self
            .mirror
            .markers
            .iter()
            .filter(|v| !self.mirror.vip_refs.contains_key(v) && !self.foreign_markers.contains(v))
            .copied()
            .collect();
        Ok(())
    }

    /// The backend set id a Service port holds.
    pub fn set_id(&self, svc: &ServiceKey, port: &PortKey) -> Option<u32> {
        self.owned
            .get(svc)?
            .iter()
            .find(|p| &p.port == port)
            .map(|p| p.set_id)
    }

    /// The Service port a set id serves.
    pub fn set_of(&self, id: u32) -> Option<&(ServiceKey, PortKey)> {
        self.holders.get(&id)
    }

    /// The backends in a set's slots, in slot order.
    pub fn slots_of(&self, id: u32) -> &[Slot] {
        self.mirror
            .sets
            .get(&id)
            .map(|s| s.slots.as_slice())
            .unwrap_or(&[])
    }

    /// Frontends in the maps.
    pub fn frontend_count(&self) -> usize {
        self.mirror.frontends.len()
    }

    /// Frontends kept from before the start that no loaded object explains.
    pub fn foreign_frontend_count(&self) -> usize {
        self.foreign_frontends.len()
    }

    /// Plans and writes the desired state of `batch` (Services not in it are left as they are).
    pub fn sync(
        &mut self,
        batch: &[(ServiceKey, ServiceDesired)],
        maps: &mut impl ServiceMaps,
    ) -> Result<SyncStats, SyncError> {
        let plan = self.plan(batch)?;
        self.execute(plan, maps)
    }

    fn free_id(&self, planned: &FastSet<u32>, hint: &mut u32) -> Option<u32> {
        let max = self.capacity.set_ids;
        for _ in 0..2 {
            while *hint < max {
                let id = *hint;
                *hint += 1;
                if !self.holders.contains_key(&id)
                    && !self.mirror.in_use(id)
                    && !self.foreign_sets.contains(&id)
                    && !self.garbage_sets.contains(&id)
                    && !planned.contains(&id)
                {
                    return Some(id);
                }
            }
            *hint = 0;
        }
        None
    }

    /// Works out the writes that bring `batch` to its desired state, and checks that the maps
    /// can hold old ∪ new while they are made.
    pub fn plan(&self, batch: &[(ServiceKey, ServiceDesired)]) -> Result<Plan, SyncError> {
        let mut plan = Plan {
            clears_garbage: !self.garbage_frontends.is_empty()
                || !self.garbage_sets.is_empty()
                || !self.garbage_markers.is_empty(),
            ..Plan::default()
        };
        plan.stats.services = batch.len();

        // Set ids the batch lets go of (a port that went away), and frontends it still wants.
        let mut released: FastSet<u32> = FastSet::default();
        let mut wanted: FastSet<FrontendKey> = FastSet::default();
        for (svc, d) in batch {
            for old in self.owned.get(svc).into_iter().flatten() {
                if !d.ports.iter().any(|p| p.port == old.port) {
                    released.insert(old.set_id);
                }
            }
            for p in &d.ports {
                wanted.extend(p.frontends.iter().map(|f| f.key));
            }
        }

        // Ids: kept, adopted from the port's frontend in the maps (after a restart, or from a
        // Service renamed in this batch), or new.
        let mut adopted: FastSet<u32> = FastSet::default();
        let mut fresh: FastSet<u32> = FastSet::default();
        let mut hint = self.id_hint;
        let mut ids: Vec<Vec<(u32, u32)>> = Vec::with_capacity(batch.len()); // (id, base gen)
        for (svc, d) in batch {
            let old_ports = self.owned.get(svc);
            let mut v = Vec::with_capacity(d.ports.len());
            for p in &d.ports {
                if let Some(old) = old_ports.and_then(|o| o.iter().find(|o| o.port == p.port)) {
                    v.push((old.set_id, old.gen));
                    continue;
                }
                // Only a set no frontend outside this port points at: its counts stay right.
                let adoptable = |id: u32| {
                    !adopted.contains(&id)
                        && (self.foreign_sets.contains(&id)
                            || self.garbage_sets.contains(&id)
                            || released.contains(&id))
                        && self.mirror.id_frontends.get(&id).is_none_or(|keys| {
                            keys.iter().all(|k| p.frontends.iter().any(|f| f.key == *k))
                        })
                };
                let found = p
                    .frontends
                    .iter()
                    .filter_map(|f| self.mirror.frontends.get(&f.key))
                    .map(|v| v.cluster_id)
                    .find(|id| adoptable(*id));
                if let Some(id) = found {
                    adopted.insert(id);
                    if released.contains(&id) || self.garbage_sets.contains(&id) {
                        plan.ops.counter_resets.push(id); // another Service port's counters
                    }
                    v.push((id, self.mirror.gen_of(p.frontends.iter().map(|f| &f.key))));
                    continue;
                }
                let Some(id) = self.free_id(&fresh, &mut hint) else {
                    return Err(SyncError::Capacity(format!(
                        "more than {} backend sets: raise --frontends-size",
                        self.capacity.set_ids
                    )));
                };
                fresh.insert(id);
                plan.ops.counter_resets.push(id);
                v.push((id, 0));
            }
            ids.push(v);
        }

        // Per port: members, slots, frontends.
        let mut new_frontend_keys = 0usize;
        let mut new_slots = 0usize;
        let mut vip_delta: FastMap<Ipv4Addr, i64> = FastMap::default();
        for ((svc, d), ids) in batch.iter().zip(&ids) {
            let mut owned_ports = Vec::with_capacity(d.ports.len());
            for (p, &(id, base_gen)) in d.ports.iter().zip(ids) {
                let mut gen = base_gen;
                let (cluster_count, left, added) =
                    self.plan_set(&mut plan, id, &p.cluster.ready, p);
                let (local_count, left_local, added_local) =
                    self.plan_set(&mut plan, id | LOCAL_SET, &p.local, p);
                new_slots += added + added_local;
                if left + left_local > 0 {
                    plan.stats.backends_left += left + left_local;
                    gen = gen.wrapping_add(1);
                }
                // A frontend moving here from another set must see its generation change, so
                // that its UDP flows re-check where they go.
                if p.frontends.iter().any(|f| {
                    self.mirror
                        .frontends
                        .get(&f.key)
                        .is_some_and(|v| v.cluster_id != id && v.gen == gen)
                }) {
                    gen = gen.wrapping_add(1);
                }
                for f in &p.frontends {
                    if !f.key.vip.is_unspecified() {
                        vip_delta.entry(f.key.vip).or_default();
                    }
                    let mut flags = 0;
                    // sessionAffinity for ClusterIPs only: an affinity entry records the backend,
                    // not its node, which an external flow to a remote backend needs.
                    if f.affinity_timeout.is_some() && !f.kind.external() {
                        flags |= frontend_flags::FE_F_AFFINITY.0;
                    }
                    if f.kind.external() {
                        flags |= frontend_flags::FE_F_EXTERNAL.0;
                        if f.local_only {
                            flags |= frontend_flags::FE_F_ETP_LOCAL.0;
                        }
                    } else if f.local_only {
                        flags |= frontend_flags::FE_F_ITP_LOCAL.0;
                    }
                    let v = FrontendValue {
                        cluster_id: id,
                        cluster_count,
                        local_id: id | LOCAL_SET,
                        local_count,
                        affinity_timeout: f.affinity_timeout.unwrap_or(0),
                        gen,
                        flags,
                        kind: match f.kind {
                            FrontendKind::ClusterIp => frontend_kind::FE_KIND_CLUSTER_IP.0,
                            FrontendKind::NodePort => frontend_kind::FE_KIND_NODE_PORT.0,
                            FrontendKind::LoadBalancer => frontend_kind::FE_KIND_LOAD_BALANCER.0,
                            FrontendKind::ExternalIp => frontend_kind::FE_KIND_EXTERNAL_IP.0,
                        },
                    };
                    match self.mirror.frontends.get(&f.key) {
                        Some(old) if *old == v => {}
                        Some(_) => plan.ops.frontend_puts.push((f.key, v)),
                        None => {
                            plan.ops.frontend_puts.push((f.key, v));
                            new_frontend_keys += 1;
                            if !f.key.vip.is_unspecified() {
                                *vip_delta.entry(f.key.vip).or_default() += 1;
                            }
                        }
                    }
                }
                owned_ports.push(OwnedPort {
                    port: p.port.clone(),
                    set_id: id,
                    gen,
                    frontends: p.frontends.iter().map(|f| f.key).collect(),
                });
            }
            plan.owned.push((svc.clone(), owned_ports));
        }

        // What the batch no longer wants: its old frontends and sets, and any garbage.
        let mut gone_frontends: Vec<FrontendKey> = Vec::new();
        let mut gone_sets: Vec<u32> = Vec::new();
        for (svc, _) in batch {
            for old in self.owned.get(svc).into_iter().flatten() {
                gone_frontends.extend(old.frontends.iter().filter(|k| !wanted.contains(k)));
            }
        }
        gone_frontends.extend(
            self.garbage_frontends
                .iter()
                .filter(|k| !wanted.contains(k) && self.mirror.frontends.contains_key(k)),
        );
        gone_sets.extend(released.iter().filter(|id| !adopted.contains(id)));
        gone_sets.extend(
            self.garbage_sets
                .iter()
                .filter(|id| !adopted.contains(id) && !released.contains(id)),
        );
        gone_frontends.sort_unstable();
        gone_frontends.dedup();
        for k in &gone_frontends {
            if self.mirror.frontends.contains_key(k) {
                plan.ops.frontend_deletes.push(*k);
                if !k.vip.is_unspecified() {
                    *vip_delta.entry(k.vip).or_default() -= 1;
                }
            }
        }
        gone_sets.sort_unstable();
        for id in &gone_sets {
            for sid in [*id, *id | LOCAL_SET] {
                if let Some(s) = self.mirror.sets.get(&sid) {
                    for slot in (0..s.slots.len()).rev() {
                        plan.ops.slot_deletes.push((sid, slot as u32));
                    }
                    plan.ops
                        .slot_deletes
                        .extend(s.strays.iter().map(|x| (sid, *x)));
                    plan.ops
                        .member_deletes
                        .extend(s.members.iter().map(|b| (sid, *b)));
                }
            }
            if released.contains(id) {
                plan.freed_ids.push(*id);
            }
        }
        // Markers follow the frontends: one while any frontend has the VIP.
        for vip in &self.garbage_markers {
            vip_delta.entry(*vip).or_default();
        }
        for (vip, delta) in vip_delta {
            let now = self.mirror.vip_refs.get(&vip).copied().unwrap_or(0) as i64;
            let has = self.mirror.markers.contains(&vip);
            if now + delta > 0 && !has {
                plan.ops.marker_puts.push(vip);
            } else if now + delta <= 0 && has {
                plan.ops.marker_deletes.push(vip);
            }
        }
        // Deleted entries of a frontend this batch moves are not deleted: batch Services that
        // gave up a frontend another batch Service took have it in `wanted`.
        debug_assert!(plan
            .ops
            .frontend_deletes
            .iter()
            .all(|k| !wanted.contains(k)));
        plan.next_id_hint = hint;

        self.check_capacity(&plan, new_frontend_keys, new_slots)?;
        plan.stats.frontend_writes = plan.ops.frontend_puts.len();
        plan.stats.frontend_deletes = plan.ops.frontend_deletes.len();
        plan.stats.slot_writes = plan.ops.slot_puts.len();
        plan.stats.slot_deletes = plan.ops.slot_deletes.len();
        plan.stats.member_writes = plan.ops.member_puts.len()
            + plan.ops.member_leaves.len()
            + plan.ops.member_deletes.len();
        plan.stats.marker_writes = plan.ops.marker_puts.len() + plan.ops.marker_deletes.len();
        Ok(plan)
    }

    /// Plans one backend set's members and slots; returns (slots after, members that left,
    /// slots added).
    fn plan_set(
        &self,
        plan: &mut Plan,
        id: u32,
        want: &[Backend],
        p: &PortDesired,
    ) -> (u32, usize, usize) {
        let empty = SetContent::default();
        let have = self.mirror.sets.get(&id).unwrap_or(&empty);
        let want_sorted = sorted_distinct(want);
        for b in difference(&want_sorted, &have.members) {
            plan.ops.member_puts.push((id, b));
        }
        let left = difference(&have.members, &want_sorted);
        plan.ops.member_leaves.extend(left.iter().map(|b| (id, *b)));
        let old: Vec<Backend> = have.slots.iter().map(|s| s.backend).collect();
        let new = plan_slots(&old, &want_sorted);
        let mut added = 0;
        for (i, b) in new.iter().enumerate() {
            let slot = Slot {
                backend: *b,
                at: p.placement_of(b),
            };
            if have.slots.get(i) != Some(&slot) {
                plan.ops.slot_puts.push((id, i as u32, slot));
                if i >= have.slots.len() {
                    added += 1;
                }
            }
        }
        for slot in (new.len()..have.slots.len()).rev() {
            plan.ops.slot_deletes.push((id, slot as u32));
        }
        plan.ops
            .slot_deletes
            .extend(have.strays.iter().map(|s| (id, *s)));
        (new.len() as u32, left.len(), added)
    }

    fn check_capacity(
        &self,
        plan: &Plan,
        new_frontends: usize,
        new_slots: usize,
    ) -> Result<(), SyncError> {
        let c = self.capacity;
        let m = &self.mirror;
        let over = |what: &str, now: usize, more: usize, max: u32, flag: &str| {
            let peak = now + more;
            (peak > max as usize).then(|| {
                SyncError::Capacity(if more >= peak {
                    format!("{peak} {what} would exceed the map's {max} (raise {flag})")
                } else {
                    format!("{peak} {what} while the change is written ({now} now, new ones are written before old ones go) would exceed the map's {max} (raise {flag})")
                })
            })
        };
        let checks = [
            over(
                "frontends",
                m.frontends.len(),
                new_frontends,
                c.frontends,
                "--frontends-size",
            ),
            over(
                "frontend addresses",
                m.markers.len(),
                plan.ops.marker_puts.len(),
                c.markers,
                "--frontends-size",
            ),
            over(
                "backend slots",
                m.slot_count,
                new_slots,
                c.backends,
                "--backends-size",
            ),
            over(
                "backend set members",
                m.member_count,
                plan.ops.member_puts.len(),
                c.backends,
                "--backends-size",
            ),
        ];
        match checks.into_iter().flatten().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Writes a plan. On a map error the writer reads the maps again (ownership stays as it
    /// was; what the failed writes left is garbage for the next sync) and returns the error.
    pub fn execute(
        &mut self,
        plan: Plan,
        maps: &mut impl ServiceMaps,
    ) -> Result<SyncStats, SyncError> {
        if let Err(e) = write_ops(&plan.ops, maps) {
            if let Err(e2) = self.reload(maps) {
                tracing::error!(error = %format!("{e2:#}"), "reading the service maps after a failed write");
            }
            return Err(SyncError::Map(e));
        }
        self.mirror.replay(&plan.ops);
        // Ownership: first what the batch gave up, then what it holds (a set or frontend may
        // pass from one of its Services to another).
        for (svc, _) in &plan.owned {
            for p in self.owned.remove(svc).into_iter().flatten() {
                self.holders.remove(&p.set_id);
                for k in &p.frontends {
                    self.owned_frontends.remove(k);
                }
            }
        }
        for (svc, ports) in plan.owned {
            if ports.is_empty() {
                continue;
            }
            for p in &ports {
                self.holders.insert(p.set_id, (svc.clone(), p.port.clone()));
                self.foreign_sets.remove(&p.set_id);
                self.garbage_sets.remove(&p.set_id);
                for k in &p.frontends {
                    self.owned_frontends.insert(*k);
                    self.foreign_frontends.remove(k);
                    self.garbage_frontends.remove(k);
                }
            }
            self.owned.insert(svc, ports);
        }
        self.id_hint = plan.next_id_hint;
        for id in plan.freed_ids {
            self.id_hint = self.id_hint.min(id);
        }
        if plan.clears_garbage {
            let m = &self.mirror;
            self.garbage_frontends
                .retain(|k| m.frontends.contains_key(k));
            let holders = &self.holders;
            self.garbage_sets
                .retain(|id| m.in_use(*id) && !holders.contains_key(id));
            self.garbage_markers
                .retain(|v| m.markers.contains(v) && !m.vip_refs.contains_key(v));
        }
        Ok(plan.stats)
    }

    /// Deletes everything nobody owns (foreign and garbage): run once every object source has
    /// loaded, so that what the maps hold is exactly what the objects say.
    pub fn prune(&mut self, maps: &mut impl ServiceMaps) -> Result<SyncStats, SyncError> {
        let mut ops = Ops::default();
        let mut vip_delta: FastMap<Ipv4Addr, i64> = FastMap::default();
        let mut doomed: Vec<FrontendKey> = self
            .mirror
            .frontends
            .keys()
            .filter(|k| !self.owned_frontends.contains(k))
            .copied()
            .collect();
        doomed.sort_unstable();
        let doomed_set: FastSet<&FrontendKey> = doomed.iter().collect();
        for k in &doomed {
            *vip_delta.entry(k.vip).or_default() -= 1;
        }
        let referenced = |id: &u32| {
            self.mirror
                .id_frontends
                .get(id)
                .is_some_and(|keys| keys.iter().any(|k| !doomed_set.contains(k)))
        };
        let mut sets: Vec<u32> = self
            .mirror
            .sets
            .keys()
            .filter(|id| !self.holders.contains_key(&base_id(**id)) && !referenced(&base_id(**id)))
            .copied()
            .collect();
        sets.sort_unstable();
        for id in sets {
            let s = &self.mirror.sets[&id];
            for slot in (0..s.slots.len()).rev() {
                ops.slot_deletes.push((id, slot as u32));
            }
            ops.slot_deletes.extend(s.strays.iter().map(|x| (id, *x)));
            ops.member_deletes
                .extend(s.members.iter().map(|b| (id, *b)));
        }
        // Strays of owned sets, and markers of VIPs no frontend has.
        for (id, s) in &self.mirror.sets {
            if self.holders.contains_key(&base_id(*id)) {
                ops.slot_deletes.extend(s.strays.iter().map(|x| (*id, *x)));
            }
        }
        let mut markers: Vec<Ipv4Addr> = self
            .mirror
            .markers
            .iter()
            .filter(|vip| {
                let n = self.mirror.vip_refs.get(vip).copied().unwrap_or(0) as i64;
                n + vip_delta.get(vip).copied().unwrap_or(0) <= 0
            })
            .copied()
            .collect();
        markers.sort_unstable();
        ops.marker_deletes = markers;
        drop(doomed_set);
        ops.frontend_deletes = doomed;
        let stats = SyncStats {
            frontend_deletes: ops.frontend_deletes.len(),
            slot_deletes: ops.slot_deletes.len(),
            member_writes: ops.member_deletes.len(),
            marker_writes: ops.marker_deletes.len(),
            ..SyncStats::default()
        };
        if let Err(e) = write_ops(&ops, maps) {
            if let Err(e2) = self.reload(maps) {
                tracing::error!(error = %format!("{e2:#}"), "reading the service maps after a failed write");
            }
            return Err(SyncError::Map(e));
        }
        self.mirror.replay(&ops);
        self.foreign_frontends.clear();
        self.foreign_sets.clear();
        self.foreign_markers.clear();
        self.garbage_frontends.clear();
        self.garbage_sets.clear();
        self.garbage_markers.clear();
        self.id_hint = 0;
        Ok(stats)
    }
}

fn write_ops(o: &Ops, maps: &mut impl ServiceMaps) -> Result<()> {
    fn nonempty<T>(v: &[T], f: impl FnOnce(&[T]) -> Result<()>) -> Result<()> {
        if v.is_empty() {
            Ok(())
        } else {
            f(v)
        }
    }
    nonempty(&o.member_puts, |v| maps.put_members(v))?;
    nonempty(&o.member_leaves, |v| maps.delete_members(v))?;
    nonempty(&o.slot_puts, |v| maps.put_slots(v))?;
    nonempty(&o.counter_resets, |v| maps.reset_counters(v))?;
    nonempty(&o.frontend_puts, |v| maps.put_frontends(v))?;
    nonempty(&o.marker_puts, |v| maps.put_markers(v))?;
    nonempty(&o.frontend_deletes, |v| maps.delete_frontends(v))?;
    nonempty(&o.slot_deletes, |v| maps.delete_slots(v))?;
    nonempty(&o.member_deletes, |v| maps.delete_members(v))?;
    nonempty(&o.marker_deletes, |v| maps.delete_markers(v))?;
    Ok(())
}

fn sorted_distinct(v: &[Backend]) -> Vec<Backend> {
    let mut out = v.to_vec();
    out.sort_unstable();
    out.dedup();
    out
}

/// Elements of sorted `a` not in sorted `b`.
fn difference(a: &[Backend], b: &[Backend]) -> Vec<Backend> {
    a.iter()
        .filter(|x| b.binary_search(x).is_err())
        .copied()
        .collect()
}

/// The new slot order: survivors keep their slot, a removed backend's slot takes the last one,
/// newcomers are appended. `want` is sorted.
fn plan_slots(old: &[Backend], want: &[Backend]) -> Vec<Backend> {
    let mut v = old.to_vec();
    let mut i = 0;
    while i < v.len() {
        if want.binary_search(&v[i]).is_ok() {
            i += 1;
        } else {
            v.swap_remove(i);
        }
    }
    let mut have = v.clone();
    have.sort_unstable();
    v.extend(want.iter().filter(|b| have.binary_search(b).is_err()));
    v
}

#[cfg(test)]
pub mod fake {
    //! An in-memory [`ServiceMaps`] with the same invariants the datapath relies on, and a way to
    //! make it fail.
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    #[derive(Default, Debug, Clone)]
    pub struct FakeMaps {
        pub frontends: BTreeMap<FrontendKey, FrontendValue>,
        pub markers: BTreeSet<Ipv4Addr>,
        pub slots: BTreeMap<(u32, u32), Slot>,
        pub members: BTreeSet<(u32, Backend)>,
        pub counter_resets: Vec<u32>,
        /// Entries written or deleted.
        pub writes: usize,
        /// Batch calls made.
        pub calls: usize,
        /// Fail the write that would be entry number `n` (counting from now); earlier entries
        /// of its batch are applied, as a kernel batch operation does.
        pub fail_after: Option<usize>,
        /// Most entries each map held at any time.
        pub peak_frontends: usize,
        pub peak_slots: usize,
        pub peak_members: usize,
    }

    impl FakeMaps {
        /// What a new flow to `fk` could get: the slots below the count.
        pub fn choices(&self, fk: &FrontendKey) -> Vec<Backend> {
            let Some(f) = self.frontends.get(fk) else {
                return vec![];
            };
            let v: Vec<Backend> = (0..f.cluster_count)
                .map(|s| self.slots[&(f.cluster_id, s)].backend)
                .collect();
            for b in &v {
                assert!(
                    self.members.contains(&(f.cluster_id, *b)),
                    "slot backend {b:?} is not a member"
                );
            }
            v
        }

        /// Every set's members are exactly its slots' backends.
        pub fn assert_consistent(&self) {
            let mut by_set: BTreeMap<u32, BTreeSet<Backend>> = BTreeMap::new();
            for ((id, _), b) in &self.slots {
                by_set.entry(*id).or_default().insert(b.backend);
            }
            let mut members: BTreeMap<u32, BTreeSet<Backend>> = BTreeMap::new();
            for (id, b) in &self.members {
                members.entry(*id).or_default().insert(*b);
            }
            assert_eq!(by_set, members, "members = slots' backends");
            for f in self.frontends.values() {
                let n = self
                    .slots
                    .keys()
                    .filter(|(i, _)| *i == f.cluster_id)
                    .count();
                assert_eq!(n as u32, f.cluster_count, "no slot past the count: {f:?}");
                let n = self.slots.keys().filter(|(i, _)| *i == f.local_id).count();
                assert_eq!(
                    n as u32, f.local_count,
                    "no local slot past the count: {f:?}"
                );
            }
            let vips: BTreeSet<Ipv4Addr> = self
                .frontends
                .keys()
                .map(|k| k.vip)
                .filter(|v| !v.is_unspecified())
                .collect();
            assert_eq!(vips, self.markers, "one marker per frontend address");
        }

        fn step(&mut self) -> Result<()> {
            if let Some(n) = &mut self.fail_after {
                if *n == 0 {
                    self.fail_after = None;
                    anyhow::bail!("injected map failure");
                }
                *n -= 1;
            }
            self.writes += 1;
            Ok(())
        }

        fn peaks(&mut self) {
            self.peak_frontends = self.peak_frontends.max(self.frontends.len());
            self.peak_slots = self.peak_slots.max(self.slots.len());
            self.peak_members = self.peak_members.max(self.members.len());
        }
    }

    impl ServiceMaps for FakeMaps {
        fn frontends(&self) -> Result<Vec<(FrontendKey, FrontendValue)>> {
            Ok(self.frontends.iter().map(|(k, v)| (*k, *v)).collect())
        }
        fn markers(&self) -> Result<Vec<Ipv4Addr>> {
            Ok(self.markers.iter().copied().collect())
        }
        fn slots(&self) -> Result<Vec<(u32, u32, Slot)>> {
            Ok(self.slots.iter().map(|((i, s), b)| (*i, *s, *b)).collect())
        }
        fn members(&self) -> Result<Vec<(u32, Backend)>> {
            Ok(self.members.iter().copied().collect())
        }
        fn put_frontends(&mut self, e: &[(FrontendKey, FrontendValue)]) -> Result<()> {
            self.calls += 1;
            for (k, v) in e {
                for s in 0..v.cluster_count {
                    assert!(
                        self.slots.contains_key(&(v.cluster_id, s)),
                        "count {} raised before slot {s} of {} was written",
                        v.cluster_count,
                        v.cluster_id
                    );
                }
                for s in 0..v.local_count {
                    assert!(
                        self.slots.contains_key(&(v.local_id, s)),
                        "local count {} raised before slot {s} of {} was written",
                        v.local_count,
                        v.local_id
                    );
                }
                if let Some(old) = self.frontends.get(k) {
                    // A gen bump tells UDP flows to re-check membership: the member must be gone.
                    if old.cluster_id == v.cluster_id && old.gen != v.gen {
                        // Both sets: a leaving backend's member entry is gone first.
                        for (id, old_n, new_n) in [
                            (v.cluster_id, old.cluster_count, v.cluster_count),
                            (v.local_id, old.local_count, v.local_count),
                        ] {
                            for s in 0..old_n {
                                let b = self.slots[&(id, s)].backend;
                                let still = (0..new_n).any(|n| self.slots[&(id, n)].backend == b);
                                assert!(
                                    still || !self.members.contains(&(id, b)),
                                    "gen bumped while the member entry of {b:?} (leaving set {id}) still exists"
                                );
                            }
                        }
                    }
                    if old.cluster_id != v.cluster_id {
                        assert_ne!(old.gen, v.gen, "a frontend moved sets without a new gen");
                    }
                }
                self.step()?;
                self.frontends.insert(*k, *v);
            }
            self.peaks();
            Ok(())
        }
        fn delete_frontends(&mut self, k: &[FrontendKey]) -> Result<()> {
            self.calls += 1;
            for k in k {
                self.step()?;
                self.frontends.remove(k);
            }
            Ok(())
        }
        fn put_markers(&mut self, vips: &[Ipv4Addr]) -> Result<()> {
            self.calls += 1;
            for vip in vips {
                self.step()?;
                self.markers.insert(*vip);
            }
            Ok(())
        }
        fn delete_markers(&mut self, vips: &[Ipv4Addr]) -> Result<()> {
            self.calls += 1;
            for vip in vips {
                self.step()?;
                self.markers.remove(vip);
            }
            Ok(())
        }
        fn put_slots(&mut self, e: &[(u32, u32, Slot)]) -> Result<()> {
            self.calls += 1;
            for (id, slot, b) in e {
                self.step()?;
                self.slots.insert((*id, *slot), *b);
            }
            self.peaks();
            Ok(())
        }
        fn delete_slots(&mut self, e: &[(u32, u32)]) -> Result<()> {
            self.calls += 1;
            for (id, slot) in e {
                for f in self.frontends.values() {
                    assert!(
                        !(f.cluster_id == *id && *slot < f.cluster_count),
                        "slot {slot} of {id} deleted while the count {} still covers it",
                        f.cluster_count
                    );
                }
                self.step()?;
                self.slots.remove(&(*id, *slot));
            }
            Ok(())
        }
        fn put_members(&mut self, e: &[(u32, Backend)]) -> Result<()> {
            self.calls += 1;
            for (id, b) in e {
                self.step()?;
                self.members.insert((*id, *b));
            }
            self.peaks();
            Ok(())
        }
        fn delete_members(&mut self, e: &[(u32, Backend)]) -> Result<()> {
            self.calls += 1;
            for (id, b) in e {
                self.step()?;
                self.members.remove(&(*id, *b));
            }
            Ok(())
        }
        fn reset_counters(&mut self, ids: &[u32]) -> Result<()> {
            self.counter_resets.extend_from_slice(ids);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeMaps;
    use super::*;
    use crate::services::model::testing::changes;
    use crate::services::model::{Change, Model, Proto};

    const CAP: Capacity = Capacity {
        frontends: 65536,
        markers: 65536,
        backends: 262144,
        set_ids: 131072,
    };

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

    /// A model fed whole "files": each `set` makes the model hold exactly those objects, as an
    /// apply of them plus a delete of everything else would.
    struct World {
        model: Model,
        held: std::collections::BTreeMap<crate::services::objects::ObjectKey, Change>,
    }

    impl World {
        fn new() -> World {
            World {
                model: Model::default(),
                held: Default::default(),
            }
        }

        /// A world whose model places endpoints for node `name` with pod CIDR `cidr`.
        fn on_node(name: &str, cidr: &str) -> World {
            World {
                model: Model::for_node(name, crate::services::model::parse_cidr(cidr)),
                held: Default::default(),
            }
        }

        /// The desired state of every touched Service, after the model holds `yaml`.
        fn set(&mut self, yaml: &str) -> Vec<(ServiceKey, ServiceDesired)> {
            let new: std::collections::BTreeMap<_, _> = changes(yaml)
                .into_iter()
                .map(|c| (c.key.clone(), c))
                .collect();
            let mut delta = Vec::new();
            for (k, c) in &self.held {
                if !new.contains_key(k) {
                    delta.push(Change {
                        key: k.clone(),
                        old: c.new.clone(),
                        new: None,
                    });
                }
            }
            for (k, c) in &new {
                let old = self.held.get(k).and_then(|o| o.new.clone());
                if old.as_deref() != c.new.as_deref() {
                    delta.push(Change {
                        key: k.clone(),
                        old,
                        new: c.new.clone(),
                    });
                }
            }
            self.held = new;
            let touched = self.model.apply(&delta);
            touched
                .into_iter()
                .map(|s| {
                    let d = self.model.desired(&s);
                    (s, d)
                })
                .collect()
        }

        /// Every Service's desired state (a restart's first sync).
        fn all(&self) -> Vec<(ServiceKey, ServiceDesired)> {
            let mut keys: Vec<ServiceKey> = self.model.services().cloned().collect();
            keys.sort();
            keys.into_iter()
                .map(|s| {
                    let d = self.model.desired(&s);
                    (s, d)
                })
                .collect()
        }
    }

    #[test]
    fn first_sync_writes_everything_and_a_second_nothing() {
        let mut maps = FakeMaps::default();
        let mut w = Writer::load(&maps, CAP).unwrap();
        let mut world = World::new();
        let yaml = svc(
            "a",
            "10.96.0.1",
            &[("10.244.0.1", READY), ("10.244.0.2", READY)],
        ) + &svc("b", "10.96.0.2", &[]);
        let st = w.sync(&world.set(&yaml), &mut maps).unwrap();
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
        assert_eq!(w.sync(&world.all(), &mut maps).unwrap().map_writes(), 0);
        maps.assert_consistent();
    }

    #[test]
    fn one_endpoint_change_touches_only_its_entries() {
        let mut maps = FakeMaps::default();
        let mut w = Writer::load(&maps, CAP).unwrap();
        let mut world = World::new();
        let mut docs: String = (0..1000)
            .map(|i| {
                svc(
                    &format!("s{i}"),
                    &format!("10.96.{}.{}", i / 250, i % 250 + 1),
                    &[("10.244.0.1", READY), ("10.244.0.2", READY)],
                )
            })
            .collect();
        w.sync(&world.set(&docs), &mut maps).unwrap();
        // Service s7 gains an endpoint.
        docs = docs.replace(
            "name: s7-1, labels: {kubernetes.io/service-name: s7}}\naddressType: IPv4\nendpoints:\n",
            "name: s7-1, labels: {kubernetes.io/service-name: s7}}\naddressType: IPv4\nendpoints:\n- {addresses: [10.244.0.3], conditions: {ready: true}}\n",
        );
        let batch = world.set(&docs);
        assert_eq!(batch.len(), 1, "one Service touched");
        let st = w.sync(&batch, &mut maps).unwrap();
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
        let mut w = Writer::load(&maps, CAP).unwrap();
        let mut world = World::new();
        let three = [
            ("10.244.0.1", READY),
            ("10.244.0.2", READY),
            ("10.244.0.3", READY),
        ];
        w.sync(&world.set(&svc("a", "10.96.0.1", &three)), &mut maps)
            .unwrap();
        let before = maps.frontends[&fk("10.96.0.1")];
        let st = w
            .sync(
                &world.set(&svc(
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
        assert!(!maps.members.contains(&(after.cluster_id, be("10.244.0.1"))));
    }

    #[test]
    fn a_gained_backend_writes_no_generation_bump() {
        let mut maps = FakeMaps::default();
        let mut w = Writer::load(&maps, CAP).unwrap();
        let mut world = World::new();
        w.sync(
            &world.set(&svc("a", "10.96.0.1", &[("10.244.0.1", READY)])),
            &mut maps,
        )
        .unwrap();
        let gen = maps.frontends[&fk("10.96.0.1")].gen;
        w.sync(
            &world.set(&svc(
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
        let mut w = Writer::load(&maps, CAP).unwrap();
        let mut world = World::new();
        w.sync(
            &world.set(&svc(
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
            &world.set(&svc("a", "10.96.0.1", &[("10.244.0.2", TERMINATING)])),
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
        let mut w = Writer::load(&maps, CAP).unwrap();
        let mut world = World::new();
        let both = svc("a", "10.96.0.1", &[("10.244.0.1", READY)])
            + &svc("b", "10.96.0.2", &[("10.244.0.9", READY)]);
        w.sync(&world.set(&both), &mut maps).unwrap();
        let b = maps.frontends[&fk("10.96.0.2")].cluster_id;
        w.sync(
            &world.set(&svc("b", "10.96.0.2", &[("10.244.0.9", READY)])),
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
        maps.assert_consistent();
    }

    #[test]
    fn a_restarted_writer_adopts_the_maps_and_writes_nothing() {
        let mut maps = FakeMaps::default();
        let mut world = World::new();
        let batch = world.set(
            &(svc(
                "a",
                "10.96.0.1",
                &[("10.244.0.1", READY), ("10.244.0.2", READY)],
            ) + &svc("b", "10.96.0.2", &[("10.244.0.3", READY)])),
        );
        Writer::load(&maps, CAP)
            .unwrap()
            .sync(&batch, &mut maps)
            .unwrap();
        let mut w2 = Writer::load(&maps, CAP).unwrap();
        let st = w2.sync(&world.all(), &mut maps).unwrap();
        assert_eq!(st.map_writes(), 0, "{st:?}");
        assert_eq!(w2.prune(&mut maps).unwrap().map_writes(), 0);
        assert!(maps.counter_resets.len() == 2, "counters survive a restart");
    }

    #[test]
    fn local_sets_follow_the_nodes_endpoints_and_slots_carry_their_node() {
        let mut maps = FakeMaps::default();
        let mut world = World::on_node("node-a", "10.244.1.0/24");
        let nodes = "---\napiVersion: v1\nkind: Node\nmetadata: {name: node-b}\nspec: {podCIDR: 10.244.2.0/24}\nstatus: {addresses: [{type: InternalIP, address: 192.168.77.2}]}\n";
        let two = svc(
            "a",
            "10.96.0.1",
            &[("10.244.1.5", READY), ("10.244.2.5", READY)],
        );
        let mut w = Writer::load(&maps, CAP).unwrap();
        w.sync(&world.set(&(two.clone() + nodes)), &mut maps)
            .unwrap();
        maps.assert_consistent();
        let fe = maps.frontends[&fk("10.96.0.1")];
        assert_eq!(fe.local_id, fe.cluster_id | LOCAL_SET);
        assert_eq!((fe.cluster_count, fe.local_count), (2, 1));
        let local = maps.slots[&(fe.local_id, 0)];
        assert_eq!(local.backend, be("10.244.1.5"));
        assert!(local.at.local);
        let remote = (0..2)
            .map(|i| maps.slots[&(fe.cluster_id, i)])
            .find(|s| s.backend == be("10.244.2.5"))
            .unwrap();
        assert_eq!(
            remote.at,
            Placement {
                local: false,
                node: "192.168.77.2".parse().unwrap()
            }
        );
        // A restart adopts both sets and writes nothing; pruning keeps them.
        let mut w2 = Writer::load(&maps, CAP).unwrap();
        assert_eq!(w2.sync(&world.all(), &mut maps).unwrap().map_writes(), 0);
        assert_eq!(w2.prune(&mut maps).unwrap().map_writes(), 0);
        // The local endpoint goes: the local set empties, the generation moves on.
        let one = svc("a", "10.96.0.1", &[("10.244.2.5", READY)]);
        w2.sync(&world.set(&(one + nodes)), &mut maps).unwrap();
        maps.assert_consistent();
        let fe2 = maps.frontends[&fk("10.96.0.1")];
        assert_eq!((fe2.cluster_count, fe2.local_count), (1, 0));
        assert_ne!(fe2.gen, fe.gen);
        // The Service goes: both sets are deleted.
        w2.sync(&world.set(nodes), &mut maps).unwrap();
        assert!(maps.slots.is_empty() && maps.members.is_empty(), "{maps:?}");
    }

    #[test]
    fn a_vip_shared_by_two_ports_keeps_its_marker_until_both_go() {
        let mut maps = FakeMaps::default();
        let mut w = Writer::load(&maps, CAP).unwrap();
        let mut world = World::new();
        let two = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{name: x, port: 80}, {name: y, port: 81}]}\n";
        w.sync(&world.set(two), &mut maps).unwrap();
        assert_eq!(maps.frontends.len(), 2);
        assert_eq!(maps.markers.len(), 1);
        w.sync(&world.set(""), &mut maps).unwrap();
        assert!(maps.frontends.is_empty() && maps.markers.is_empty() && maps.slots.is_empty());
        assert!(maps.members.is_empty());
    }

    #[test]
    fn id_space_is_bounded() {
        let mut maps = FakeMaps::default();
        let mut w = Writer::load(&maps, Capacity { set_ids: 2, ..CAP }).unwrap();
        let mut world = World::new();
        let docs: String = (0..3)
            .map(|i| svc(&format!("s{i}"), &format!("10.96.0.{}", i + 1), &[]))
            .collect();
        assert!(matches!(
            w.sync(&world.set(&docs), &mut maps),
            Err(SyncError::Capacity(_))
        ));
        assert_eq!(maps.writes, 0, "nothing written");
    }

    #[test]
    fn a_rename_near_the_map_size_is_refused_whole_before_anything_is_written() {
        // 3 services with 2 backends each fill 6 of 8 slots; renaming all three needs their new
        // sets written before the old ones go: 12 slots at the peak.
        let cap = Capacity { backends: 8, ..CAP };
        let two = [("10.244.0.1", READY), ("10.244.0.2", READY)];
        // New names and addresses: nothing to take over, every set is new.
        let names = |prefix: &str| -> String {
            let net = if prefix == "old" { 0 } else { 1 };
            (0..3)
                .map(|i| {
                    svc(
                        &format!("{prefix}{i}"),
                        &format!("10.96.{net}.{}", i + 1),
                        &two,
                    )
                })
                .collect()
        };
        let mut maps = FakeMaps::default();
        let mut w = Writer::load(&maps, cap).unwrap();
        let mut world = World::new();
        w.sync(&world.set(&names("old")), &mut maps).unwrap();
        let before = maps.clone();
        let writes = maps.writes;
        let err = w.sync(&world.set(&names("new")), &mut maps).unwrap_err();
        assert!(matches!(err, SyncError::Capacity(_)), "{err}");
        assert!(
            err.to_string().contains("while the change is written"),
            "{err}"
        );
        assert_eq!(maps.writes, writes, "nothing written");
        assert_eq!(maps.frontends, before.frontends);
        // With room for old ∪ new it goes through, and the peak is what was checked.
        let cap = Capacity {
            backends: 12,
            ..CAP
        };
        let mut maps = FakeMaps::default();
        let mut w = Writer::load(&maps, cap).unwrap();
        let mut world = World::new();
        w.sync(&world.set(&names("old")), &mut maps).unwrap();
        w.sync(&world.set(&names("new")), &mut maps).unwrap();
        assert!(maps.peak_slots <= 12 && maps.peak_members <= 12);
        assert_eq!(maps.slots.len(), 6);
        maps.assert_consistent();
    }

    #[test]
    fn a_renamed_service_takes_over_its_frontend_without_a_gap() {
        let mut maps = FakeMaps::default();
        let mut w = Writer::load(&maps, CAP).unwrap();
        let mut world = World::new();
        w.sync(
            &world.set(&svc("old", "10.96.0.1", &[("10.244.0.1", READY)])),
            &mut maps,
        )
        .unwrap();
        let st = w
            .sync(
                &world.set(&svc("new", "10.96.0.1", &[("10.244.0.1", READY)])),
                &mut maps,
            )
            .unwrap();
        assert_eq!(
            st.frontend_deletes, 0,
            "the frontend is taken over, never deleted"
        );
        assert_eq!(maps.choices(&fk("10.96.0.1")), vec![be("10.244.0.1")]);
        maps.assert_consistent();
    }

    #[test]
    fn after_a_map_error_the_writer_reads_the_maps_again_and_the_next_sync_repairs() {
        let base: String = (0..20)
            .map(|i| {
                svc(
                    &format!("s{i}"),
                    &format!("10.96.0.{}", i + 1),
                    &[("10.244.0.1", READY), ("10.244.0.2", READY)],
                )
            })
            .collect();
        let changed: String = (0..20)
            .map(|i| {
                svc(
                    &format!("s{i}"),
                    &format!("10.96.1.{}", i + 1),
                    &[("10.244.0.3", READY)],
                )
            })
            .collect();
        // Fail at every possible write of the change: each time the writer must end in step
        // with the maps, and a retry must bring them to the desired state.
        for fail_at in 0..200 {
            let mut maps = FakeMaps::default();
            let mut w = Writer::load(&maps, CAP).unwrap();
            let mut world = World::new();
            w.sync(&world.set(&base), &mut maps).unwrap();
            maps.fail_after = Some(fail_at);
            let batch = world.set(&changed);
            let result = w.sync(&batch, &mut maps);
            let failed = result.is_err();
            if failed {
                assert!(matches!(result, Err(SyncError::Map(_))));
                let fresh = Mirror::load(&maps).unwrap();
                assert_eq!(w.mirror.frontends, fresh.frontends, "fail_at {fail_at}");
                assert_eq!(w.mirror.sets, fresh.sets, "fail_at {fail_at}");
                assert_eq!(w.mirror.markers, fresh.markers, "fail_at {fail_at}");
                // The retry (the same desired state) repairs.
                w.sync(&batch, &mut maps).unwrap();
            }
            maps.assert_consistent();
            let want: Vec<Backend> = vec![be("10.244.0.3")];
            for i in 0..20 {
                assert_eq!(maps.choices(&fk(&format!("10.96.1.{}", i + 1))), want);
                assert!(!maps
                    .frontends
                    .contains_key(&fk(&format!("10.96.0.{}", i + 1))));
            }
            assert_eq!(maps.slots.len(), 20, "fail_at {fail_at}: no garbage left");
            assert_eq!(maps.members.len(), 20);
            if !failed {
                break; // the change needed fewer writes than fail_at
            }
        }
    }

    #[test]
    fn a_failed_sync_rolled_back_leaves_nothing_behind() {
        let base = svc("a", "10.96.0.1", &[("10.244.0.1", READY)]);
        let more = base.clone() + &svc("b", "10.96.0.2", &[("10.244.0.2", READY)]);
        for fail_at in 0..6 {
            let mut maps = FakeMaps::default();
            let mut w = Writer::load(&maps, CAP).unwrap();
            let mut world = World::new();
            w.sync(&world.set(&base), &mut maps).unwrap();
            let snapshot = (
                maps.frontends.clone(),
                maps.slots.clone(),
                maps.members.clone(),
            );
            maps.fail_after = Some(fail_at);
            if w.sync(&world.set(&more), &mut maps).is_ok() {
                continue;
            }
            // The caller puts the model back and syncs the touched Services again.
            w.sync(&world.set(&base), &mut maps).unwrap();
            assert_eq!(
                (
                    maps.frontends.clone(),
                    maps.slots.clone(),
                    maps.members.clone()
                ),
                snapshot,
                "fail_at {fail_at}"
            );
            maps.assert_consistent();
        }
    }

    #[test]
    fn foreign_entries_stay_until_prune() {
        // A daemon wrote a and b; the next one can load only a (b's source is broken).
        let mut maps = FakeMaps::default();
        let mut world = World::new();
        let both = svc("a", "10.96.0.1", &[("10.244.0.1", READY)])
            + &svc("b", "10.96.0.2", &[("10.244.0.2", READY)]);
        Writer::load(&maps, CAP)
            .unwrap()
            .sync(&world.set(&both), &mut maps)
            .unwrap();
        let mut w = Writer::load(&maps, CAP).unwrap();
        let mut degraded = World::new();
        let st = w
            .sync(
                &degraded.set(&svc("a", "10.96.0.1", &[("10.244.0.1", READY)])),
                &mut maps,
            )
            .unwrap();
        assert_eq!(st.map_writes(), 0);
        assert_eq!(w.foreign_frontend_count(), 1);
        // New services do not reuse b's set id; changes to a work.
        let st = w
            .sync(
                &degraded.set(
                    &(svc("a", "10.96.0.1", &[("10.244.0.9", READY)])
                        + &svc("c", "10.96.0.3", &[("10.244.0.3", READY)])),
                ),
                &mut maps,
            )
            .unwrap();
        assert!(st.map_writes() > 0);
        assert_eq!(
            maps.choices(&fk("10.96.0.2")),
            vec![be("10.244.0.2")],
            "b kept"
        );
        maps.assert_consistent();
        // Once everything loaded and b is not among it: prune.
        let st = w.prune(&mut maps).unwrap();
        assert_eq!((st.frontend_deletes, st.slot_deletes), (1, 1));
        assert!(!maps.frontends.contains_key(&fk("10.96.0.2")));
        assert_eq!(w.foreign_frontend_count(), 0);
        maps.assert_consistent();
    }

    #[test]
    fn writes_are_batched_per_kind() {
        let mut maps = FakeMaps::default();
        let mut w = Writer::load(&maps, CAP).unwrap();
        let mut world = World::new();
        let docs: String = (0..500)
            .map(|i| {
                svc(
                    &format!("s{i}"),
                    &format!("10.96.{}.{}", i / 250, i % 250 + 1),
                    &[("10.244.0.1", READY), ("10.244.0.2", READY)],
                )
            })
            .collect();
        w.sync(&world.set(&docs), &mut maps).unwrap();
        assert_eq!(maps.writes, 500 * 6);
        assert_eq!(
            maps.calls, 4,
            "members, slots, frontends, markers: one batch each"
        );
        maps.calls = 0;
        w.sync(&world.set(""), &mut maps).unwrap();
        assert_eq!(maps.calls, 4, "frontends, slots, members, markers out");
        assert!(maps.frontends.is_empty() && maps.slots.is_empty() && maps.members.is_empty());
    }
}

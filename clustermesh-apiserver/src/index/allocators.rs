//! The index's two allocators: cluster-local identity numbers for label sets, and ClusterSetIPs
//! from a CIDR for imported services. Both keep what they handed out across restarts (seeded).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use mesh_model::MaxConnectedClusters;
use mesh_model::keys::ServiceName;

/// Identity label set, sorted.
pub(super) type Labels = BTreeMap<String, String>;

/// Allocates cluster-local identity numbers to label sets; a label set keeps its number for the life of the
/// process, and across restarts through [`MeshIndex::seed`].
#[derive(Debug, Default)]
pub(super) struct IdentityAllocator {
    by_labels: BTreeMap<Labels, u32>,
    used: BTreeSet<u32>,
    users: HashMap<u32, usize>,
    next: u32,
}

impl IdentityAllocator {
    pub(super) fn max_local(mcc: MaxConnectedClusters) -> u32 {
        (1u32 << mcc.local_identity_bits()) - 1
    }

    pub(super) fn seed(&mut self, local: u32, labels: Labels) {
        if self.used.contains(&local) || self.by_labels.contains_key(&labels) {
            return;
        }
        self.used.insert(local);
        self.by_labels.insert(labels, local);
        self.next = self.next.max(local + 1);
    }

    /// Takes one reference on the label set's identity, allocating it when new. `None` when the space is full.
    pub(super) fn acquire(&mut self, labels: &Labels, mcc: MaxConnectedClusters) -> Option<u32> {
        if let Some(&id) = self.by_labels.get(labels) {
            *self.users.entry(id).or_default() += 1;
            return Some(id);
        }
        let max = Self::max_local(mcc);
        let start = self.next.clamp(1, max);
        let free = (start..=max)
            .chain(1..start)
            .find(|n| !self.used.contains(n))
            .or_else(|| {
                // Every number was handed out once: forget label sets nobody uses any more.
                let idle: Vec<u32> = self
                    .used
                    .iter()
                    .copied()
                    .filter(|n| self.users.get(n).copied().unwrap_or(0) == 0)
                    .collect();
                self.by_labels.retain(|_, n| !idle.contains(n));
                self.used.retain(|n| !idle.contains(n));
                idle.first().copied()
            })?;
        self.used.insert(free);
        self.by_labels.insert(labels.clone(), free);
        self.users.insert(free, 1);
        self.next = free + 1;
        Some(free)
    }

    pub(super) fn release(&mut self, id: u32) {
        if let Some(n) = self.users.get_mut(&id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.users.remove(&id);
            }
        }
    }

    pub(super) fn in_use(&self, id: u32) -> bool {
        self.users.get(&id).copied().unwrap_or(0) > 0
    }

    pub(super) fn labels_of(&self, id: u32) -> Option<&Labels> {
        self.by_labels
            .iter()
            .find(|(_, n)| **n == id)
            .map(|(l, _)| l)
    }
}

/// Hands out ClusterSetIPs from a CIDR: one address per imported service, never the same address to two
/// services, and the address a service had before a restart (seeded) again.
#[derive(Debug)]
pub(super) struct ClusterSetIpAllocator {
    pub(super) net: IpNet,
    by_service: BTreeMap<ServiceName, IpAddr>,
    used: BTreeSet<IpAddr>,
    /// Offset after the last address handed out: allocation walks forward so a freed address is not reused soon.
    cursor: u128,
}

pub(super) fn ip_to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v) => u128::from(u32::from(v)),
        IpAddr::V6(v) => u128::from(v),
    }
}

impl ClusterSetIpAllocator {
    pub(super) fn new(net: IpNet) -> Self {
        Self {
            net,
            by_service: BTreeMap::new(),
            used: BTreeSet::new(),
            cursor: 1,
        }
    }

    /// Usable host offsets: [1, size-1) for IPv4 nets with a broadcast address, [1, size) otherwise.
    pub(super) fn range(&self) -> (u128, u128) {
        let bits = u32::from(self.net.max_prefix_len() - self.net.prefix_len());
        let size: u128 = if bits >= 128 {
            u128::MAX
        } else {
            1u128 << bits
        };
        match self.net {
            IpNet::V4(_) if size > 2 => (1, size - 1),
            _ if size > 1 => (1, size),
            _ => (0, size),
        }
    }

    pub(super) fn at(&self, off: u128) -> IpAddr {
        match self.net {
            IpNet::V4(n) => IpAddr::V4(std::net::Ipv4Addr::from(
                u32::from(n.network()) + off as u32,
            )),
            IpNet::V6(n) => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(n.network()) + off)),
        }
    }

    pub(super) fn seed(&mut self, svc: ServiceName, ip: IpAddr) -> bool {
        if !self.net.contains(&ip) || self.used.contains(&ip) || self.by_service.contains_key(&svc)
        {
            return false;
        }
        let off = ip_to_u128(ip) - ip_to_u128(self.net.network());
        self.cursor = self.cursor.max(off + 1);
        self.used.insert(ip);
        self.by_service.insert(svc, ip);
        true
    }

    pub(super) fn get_or_allocate(&mut self, svc: &ServiceName) -> Option<IpAddr> {
        if let Some(ip) = self.by_service.get(svc) {
            return Some(*ip);
        }
        let (lo, hi) = self.range();
        if lo >= hi || self.used.len() as u128 >= hi - lo {
            return None;
        }
        let start = self.cursor.clamp(lo, hi - 1);
        let mut off = start;
        loop {
            let ip = self.at(off);
            if !self.used.contains(&ip) {
                self.used.insert(ip);
                self.by_service.insert(svc.clone(), ip);
                self.cursor = off + 1;
                return Some(ip);
            }
            off += 1;
            if off >= hi {
                off = lo;
            }
            if off == start {
                return None;
            }
        }
    }

    pub(super) fn release(&mut self, svc: &ServiceName) {
        if let Some(ip) = self.by_service.remove(svc) {
            self.used.remove(&ip);
        }
    }
}

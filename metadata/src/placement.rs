//! Placement: choosing the R disks of a new placement group.
//!
//! Pure and deterministic (every member of the raft group must compute the same answer from the
//! same state). The rule: a group's disks sit in R distinct failure domains; among the disks that
//! keep that true, take the one holding the fewest groups, then the one whose failure domain holds
//! the fewest, then the lowest id. Filling groups this way keeps every disk within a slot or two
//! of the mean, so a failed disk is rebuilt from, and onto, many disks at once.

use std::collections::{BTreeMap, BTreeSet};

/// A disk as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub disk: String,
    /// The failure domain at the pool's level: host, rack or site name.
    pub domain: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("placement needs {needed} distinct failure domains with a healthy disk; the cluster has {available}")]
pub struct NotEnoughDomains {
    pub needed: usize,
    pub available: usize,
}

/// Chooses `replicas` disks for a new group. `load` is the number of groups each disk is already
/// in (disks missing from it hold none). Returns disk ids in group order.
pub fn choose_group(
    candidates: &[Candidate],
    load: &BTreeMap<String, u64>,
    replicas: usize,
) -> Result<Vec<String>, NotEnoughDomains> {
    let domains: BTreeSet<&str> = candidates.iter().map(|c| c.domain.as_str()).collect();
    if domains.len() < replicas {
        return Err(NotEnoughDomains {
            needed: replicas,
            available: domains.len(),
        });
    }
    let disk_load = |d: &str| load.get(d).copied().unwrap_or(0);
    let mut domain_load: BTreeMap<&str, u64> = BTreeMap::new();
    for c in candidates {
        *domain_load.entry(c.domain.as_str()).or_default() += disk_load(&c.disk);
    }
    let mut chosen: Vec<&Candidate> = Vec::with_capacity(replicas);
    for _ in 0..replicas {
        let best = candidates
            .iter()
            .filter(|c| !chosen.iter().any(|p| p.domain == c.domain))
            .min_by(|a, b| {
                (disk_load(&a.disk), domain_load[a.domain.as_str()], &a.disk).cmp(&(
                    disk_load(&b.disk),
                    domain_load[b.domain.as_str()],
                    &b.disk,
                ))
            })
            .expect("at least `replicas` distinct domains, checked above");
        chosen.push(best);
    }
    Ok(chosen.into_iter().map(|c| c.disk.clone()).collect())
}

/// How many groups a pool keeps for its disks: enough that each disk is in about
/// `groups_per_disk` of them.
pub fn target_groups(disks: usize, replicas: usize, groups_per_disk: usize) -> usize {
    (disks * groups_per_disk).div_ceil(replicas.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cluster(disks_per_host: &[usize]) -> Vec<Candidate> {
        let mut v = Vec::new();
        for (h, &n) in disks_per_host.iter().enumerate() {
            for d in 0..n {
                v.push(Candidate {
                    disk: format!("h{h}-d{d}"),
                    domain: format!("h{h}"),
                });
            }
        }
        v
    }

    fn build(c: &[Candidate], replicas: usize, groups: usize) -> Vec<Vec<String>> {
        let mut load = BTreeMap::new();
        let mut out = Vec::new();
        for _ in 0..groups {
            let g = choose_group(c, &load, replicas).unwrap();
            for d in &g {
                *load.entry(d.clone()).or_insert(0) += 1;
            }
            out.push(g);
        }
        out
    }

    fn domain_of<'a>(c: &'a [Candidate], disk: &str) -> &'a str {
        &c.iter().find(|x| x.disk == disk).unwrap().domain
    }

    proptest! {
        /// Every group has R disks in R distinct failure domains, for any shape of cluster
        /// (DESIGN.md §3: a group's members are on distinct failure domains).
        #[test]
        fn groups_span_distinct_domains(
            hosts in proptest::collection::vec(1usize..5, 1..8),
            replicas in 1usize..5,
            groups_per_disk in 1usize..12,
        ) {
            let c = cluster(&hosts);
            let groups = target_groups(c.len(), replicas, groups_per_disk);
            if hosts.len() < replicas {
                let e = choose_group(&c, &BTreeMap::new(), replicas).unwrap_err();
                prop_assert_eq!(e, NotEnoughDomains { needed: replicas, available: hosts.len() });
                return Ok(());
            }
            for g in build(&c, replicas, groups) {
                prop_assert_eq!(g.len(), replicas);
                let doms: BTreeSet<&str> = g.iter().map(|d| domain_of(&c, d)).collect();
                prop_assert_eq!(doms.len(), replicas);
            }
        }
    }

    /// At 12 disks on 4 hosts with R = 3, the busiest disk holds at most 1.25× the groups of
    /// the least busy (the balance bound), at every pool size from 8 to 64 groups/disk.
    #[test]
    fn balanced_on_12_disks_4_hosts() {
        let c = cluster(&[3, 3, 3, 3]);
        for per_disk in [8, 16, 32, 64] {
            let groups = build(&c, 3, target_groups(12, 3, per_disk));
            let mut load: BTreeMap<&str, u64> = BTreeMap::new();
            for d in groups.iter().flatten() {
                *load.entry(d).or_default() += 1;
            }
            assert_eq!(load.len(), 12, "every disk is used");
            let max = *load.values().max().unwrap() as f64;
            let min = *load.values().min().unwrap() as f64;
            assert!(
                max <= 1.25 * min,
                "per_disk={per_disk}: max {max} min {min}"
            );
        }
    }

    /// Uneven hosts: a host with more disks takes proportionally more groups, and no group
    /// repeats a host.
    #[test]
    fn uneven_hosts() {
        let c = cluster(&[1, 2, 4, 1]);
        let groups = build(&c, 3, 40);
        let mut per_host: BTreeMap<&str, u64> = BTreeMap::new();
        for g in &groups {
            for d in g {
                *per_host.entry(domain_of(&c, d)).or_default() += 1;
            }
        }
        assert!(per_host["h2"] > per_host["h0"], "{per_host:?}");
    }
}

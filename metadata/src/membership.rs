//! Group membership after failures: a member that missed writes leaves the group's active
//! set, catches up, and comes back — each step one committed command that raises the group's
//! epoch, so every storage node and client can tell the current membership from an old one
//! (DESIGN.md §5.4).
//!
//! ```text
//!   Active --(a write to it failed; ≥ min_replicas stay active)--> Stale
//!   Stale | Syncing --(it starts catching up)--> Syncing   (receives writes, serves no reads)
//!   Syncing --(it has caught up)--> Active
//!   Syncing --(a write to it failed)--> Stale
//!   any (its node silent past the grace period) --> replaced: a disk on another host takes
//!       its place, Stale and marked for a full copy
//! ```
//!
//! Each command names the epoch its sender saw; a command about an older epoch changes
//! nothing and answers with the group as it is now, so two clients reporting the same failure,
//! or a report racing a resync, never take a second member out by mistake.

use serde::{Deserialize, Serialize};

use crate::error::MetaError;
use crate::state::{ClusterState, GroupRecord, Reply, Write};

/// A member's state; members without an entry are active.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    Active,
    Stale,
    Syncing,
}

impl GroupRecord {
    pub fn state_of(&self, disk: &str) -> MemberState {
        self.states
            .get(disk)
            .copied()
            .unwrap_or(MemberState::Active)
    }

    fn set_state(&mut self, disk: &str, s: MemberState) {
        if s == MemberState::Active {
            self.states.remove(disk);
        } else {
            self.states.insert(disk.to_owned(), s);
        }
        self.epoch += 1;
    }

    /// Whether the member needs every chunk of the group copied (a replacement), not only
    /// those written while it was away.
    pub fn needs_full_copy(&self, disk: &str) -> bool {
        self.full_copy.contains(disk)
    }

    pub fn active(&self) -> usize {
        self.disks
            .iter()
            .filter(|d| self.state_of(d) == MemberState::Active)
            .count()
    }

    /// Whether every member is active.
    pub fn whole(&self) -> bool {
        self.states.is_empty()
    }
}

/// What a membership command asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Failed,
    BeginResync,
    FinishResync,
}

impl ClusterState {
    /// Applies a membership change to `group`'s member `disk`, as seen at `epoch`.
    pub(crate) fn change_member(
        &mut self,
        group: u64,
        epoch: u64,
        disk: &str,
        change: Change,
        w: &mut Vec<Write>,
    ) -> Result<Reply, MetaError> {
        let g = self
            .groups
            .get(&group)
            .cloned()
            .ok_or(MetaError::GroupNotFound { id: group })?;
        if !g.disks.iter().any(|d| d == disk) {
            return Err(MetaError::NotAMember {
                group,
                disk: disk.to_owned(),
            });
        }
        let unchanged = Ok(Reply::Group(group));
        if epoch != g.epoch {
            return match change {
                // Someone already changed the group; the reporter refreshes and retries.
                Change::Failed => unchanged,
                _ => Err(MetaError::EpochMoved {
                    group,
                    got: epoch,
                    current: g.epoch,
                }),
            };
        }
        let mut g = g;
        let state = g.state_of(disk);
        match (change, state) {
            (Change::Failed, MemberState::Stale) => return unchanged,
            (Change::Failed, MemberState::Syncing) => g.set_state(disk, MemberState::Stale),
            (Change::Failed, MemberState::Active) => {
                let min = self
                    .pools
                    .get(&g.pool)
                    .map_or(2, |p| p.min_replicas as usize);
                if g.active() - 1 < min {
                    return Err(MetaError::BelowMinReplicas {
                        group,
                        active: g.active(),
                        min,
                    });
                }
                g.set_state(disk, MemberState::Stale);
            }
            (Change::BeginResync, MemberState::Stale | MemberState::Syncing) => {
                g.set_state(disk, MemberState::Syncing)
            }
            (Change::FinishResync, MemberState::Syncing) => {
                g.full_copy.remove(disk);
                g.set_state(disk, MemberState::Active)
            }
            (_, s) => {
                return Err(MetaError::WrongMemberState {
                    group,
                    disk: disk.to_owned(),
                    state: format!("{s:?}").to_lowercase(),
                })
            }
        }
        self.put_group_record(g, w);
        Ok(Reply::Group(group))
    }

    /// Replaces `group`'s member `old` (on a node gone for good) with `new`, which then
    /// copies every chunk of the group before it serves.
    pub(crate) fn replace_member(
        &mut self,
        group: u64,
        epoch: u64,
        old: &str,
        new: &str,
        w: &mut Vec<Write>,
    ) -> Result<Reply, MetaError> {
        let mut g = self
            .groups
            .get(&group)
            .cloned()
            .ok_or(MetaError::GroupNotFound { id: group })?;
        if epoch != g.epoch {
            return Err(MetaError::EpochMoved {
                group,
                got: epoch,
                current: g.epoch,
            });
        }
        let Some(slot) = g.disks.iter().position(|d| d == old) else {
            return Err(MetaError::NotAMember {
                group,
                disk: old.to_owned(),
            });
        };
        let level = self
            .pools
            .get(&g.pool)
            .map(|p| p.failure_domain)
            .unwrap_or_default();
        let domain_of = |d: &str| {
            self.nodes
                .values()
                .find(|n| n.disks.iter().any(|x| x.uuid == d))
                .map(|n| n.domain(level).to_owned())
        };
        let new_domain = domain_of(new).ok_or_else(|| MetaError::NotAMember {
            group,
            disk: new.to_owned(),
        })?;
        if g.disks
            .iter()
            .filter(|d| *d != old)
            .any(|d| domain_of(d).as_deref() == Some(new_domain.as_str()))
        {
            return Err(MetaError::WrongMemberState {
                group,
                disk: new.to_owned(),
                state: format!("in the same {level} as another member"),
            });
        }
        g.states.remove(old);
        g.full_copy.remove(old);
        g.disks[slot] = new.to_owned();
        g.full_copy.insert(new.to_owned());
        g.set_state(new, MemberState::Stale);
        self.put_group_record(g, w);
        Ok(Reply::Group(group))
    }

    /// The groups in which a disk of node `node_id` is not active.
    pub fn stale_groups_of(&self, node_id: u64) -> Vec<u64> {
        self.groups_of(node_id, false)
    }

    /// The groups with a member on `node_id`'s disks: every one (`all`), or those whose member
    /// there is out of date or catching up.
    pub fn groups_of(&self, node_id: u64, all: bool) -> Vec<u64> {
        let Some(n) = self.nodes.get(&node_id) else {
            return Vec::new();
        };
        let here = |d: &String| n.disks.iter().any(|x| &x.uuid == d);
        self.groups
            .values()
            .filter(|g| {
                if all {
                    g.disks.iter().any(here)
                } else {
                    g.states.keys().any(here)
                }
            })
            .map(|g| g.id)
            .collect()
    }
}

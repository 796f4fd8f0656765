//! How a client follows its placement groups' membership (DESIGN.md §4, §5.4): which members
//! take writes and serve reads, reporting a member whose write failed, and sending a write
//! again to the group as it is after a change.

use std::sync::Arc;

use bytes::Bytes;
use cairn_proto::data as dpb;
use cairn_proto::metadata as pb;
use futures::future::join_all;

use super::{Piece, Result, VolumeClient, VolumeError};

/// How often one write follows a membership change before giving up.
const MEMBERSHIP_RETRIES: usize = 8;

/// A placement group as this client last saw it.
#[derive(Debug, Clone)]
pub(crate) struct Group {
    pub id: u64,
    pub epoch: u64,
    pub members: Vec<pb::GroupMember>,
}

fn state(m: &pb::GroupMember) -> pb::MemberState {
    pb::MemberState::try_from(m.state).unwrap_or(pb::MemberState::Stale)
}

impl Group {
    /// Members that take writes: active ones and those catching up.
    pub fn writers(&self) -> Vec<&pb::GroupMember> {
        self.members
            .iter()
            .filter(|m| state(m) != pb::MemberState::Stale)
            .collect()
    }

    /// Members that serve reads: active ones only.
    pub fn readers(&self) -> Vec<&pb::GroupMember> {
        self.members
            .iter()
            .filter(|m| state(m) == pb::MemberState::Active)
            .collect()
    }

    /// Whether some member is missing writes (so writes are recorded for its resync).
    pub fn degraded(&self) -> bool {
        self.members
            .iter()
            .any(|m| state(m) != pb::MemberState::Active)
    }
}

impl VolumeClient {
    /// Caches `g` for every segment on that group, unless the cache already has a newer epoch.
    pub(super) fn update_group(&self, g: pb::PlacementGroup) -> Arc<Group> {
        let new = Arc::new(super::group_of(g));
        let mut segs = self.segments.lock().expect("segments lock");
        let mut newest = new.clone();
        for cached in segs.values_mut().filter(|c| c.id == new.id) {
            if cached.epoch < new.epoch {
                *cached = new.clone();
            } else if cached.epoch > newest.epoch {
                newest = cached.clone();
            }
        }
        newest
    }

    /// The group as the metadata service has it now.
    pub(super) async fn refresh_group(&self, id: u64) -> Result<Arc<Group>> {
        let r = self
            .meta
            .call(|mut c| async move { c.get_group(pb::GetGroupRequest { group: id }).await })
            .await?;
        let g = r
            .group
            .ok_or_else(|| VolumeError::io("group reply without a group"))?;
        Ok(self.update_group(g))
    }

    /// Reports that a write to `m` failed: it leaves the group's active set if enough members
    /// stay. Returns the group as it is after the report.
    pub(super) async fn report_failure(
        &self,
        g: &Group,
        m: &pb::GroupMember,
        why: &str,
    ) -> Result<Arc<Group>> {
        tracing::warn!(volume = %self.name, group = g.id, epoch = g.epoch, node = m.node_id, error = why, "member failed; reporting it");
        let req = pb::ReportMemberFailureRequest {
            group: g.id,
            epoch: g.epoch,
            disk_uuid: m.disk_uuid.clone(),
            reason: why.to_owned(),
        };
        let r = self
            .meta
            .call(|mut c| {
                let req = req.clone();
                async move { c.report_member_failure(req).await }
            })
            .await?;
        let g = r
            .group
            .ok_or_else(|| VolumeError::io("group reply without a group"))?;
        Ok(self.update_group(g))
    }

    /// Sends one piece's request to every member of its group that takes writes, in
    /// parallel, until every active member has it: a member that fails is reported (and the
    /// request sent again to the group without it), a changed membership fetched.
    pub(super) async fn to_all(
        &self,
        p: Piece,
        op: dpb::Op,
        payload: Bytes,
        allocate: bool,
    ) -> Result<()> {
        let Some(mut g) = self.group(p.chunk, allocate).await? else {
            return Ok(()); // discarding or zeroing a segment never written: nothing there
        };
        // In the activity record from before the first member sees it until it is settled.
        let ticket = self.begin_write(p.chunk);
        let payload_crc = if payload.is_empty() {
            0
        } else {
            crc32c::crc32c(&payload)
        };
        for _ in 0..MEMBERSHIP_RETRIES {
            // Borrowed from this membership, which `g` may be replaced by a newer one below.
            let cur = g.clone();
            let writers = cur.writers();
            let calls = writers.iter().map(|m| {
                let mut req = self.request(op, &g, p.chunk, p.offset, p.len);
                req.seq = ticket.seq;
                req.payload_crc = payload_crc;
                self.call(m, req, payload.clone())
            });
            let mut stale = false;
            let mut failed = Vec::new();
            for (m, r) in writers.iter().zip(join_all(calls).await) {
                match r.and_then(|(r, _)| self.check(&r)) {
                    Ok(()) => {}
                    Err(e @ (VolumeError::Fenced { .. } | VolumeError::NoSpace(_))) => {
                        return Err(e)
                    }
                    Err(VolumeError::StaleEpoch) => stale = true,
                    Err(e) => failed.push((m, e)),
                }
            }
            if failed.is_empty() && !stale {
                ticket.succeeded();
                return Ok(());
            }
            let mut again = stale;
            for (m, e) in failed {
                let was_active = state(m) == pb::MemberState::Active;
                let why = format!("{} {}: {e}", op.as_str_name(), m.data_addr);
                g = match self.report_failure(&g, m, &why).await {
                    Ok(now) => now,
                    Err(re) => {
                        // Refused: the membership may have moved on meanwhile (the member
                        // replaced, say), or taking it out would leave too few copies.
                        let now = self.refresh_group(g.id).await?;
                        if now.epoch == g.epoch {
                            return Err(VolumeError::io(format!(
                                "{why}; the member cannot be taken out: {re}"
                            )));
                        }
                        again = true;
                        now
                    }
                };
                // An active member that missed the request: send it again to the group as it
                // is now (marked degraded). A member catching up that missed it goes back to
                // stale, and its resync will copy the chunk.
                again |= was_active;
            }
            if !again {
                ticket.succeeded();
                return Ok(());
            }
            if stale {
                g = self.refresh_group(g.id).await?;
            }
        }
        Err(VolumeError::io(format!(
            "placement group {}: membership kept changing; request not completed",
            g.id
        )))
    }
}

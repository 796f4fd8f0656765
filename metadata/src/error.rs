//! The metadata service's errors, and their one mapping to gRPC status codes.

use cairn_proto::{format_size, InvalidArgument};

use crate::placement::NotEnoughDomains;

/// gRPC metadata key carrying the leader's address when a follower refuses a request.
pub const LEADER_ADDR_KEY: &str = "cairn-leader-addr";
/// gRPC metadata key carrying the leader's raft id.
pub const LEADER_ID_KEY: &str = "cairn-leader-id";

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error(transparent)]
    InvalidArgument(#[from] InvalidArgument),
    #[error("volume {name:?} already exists")]
    VolumeExists { name: String },
    #[error("volume {name:?} does not exist")]
    VolumeNotFound { name: String },
    #[error("pool {name:?} already exists")]
    PoolExists { name: String },
    #[error("pool {name:?} does not exist")]
    PoolNotFound { name: String },
    #[error("storage node {id} is not registered")]
    NodeNotFound { id: u64 },
    #[error("volume {name:?} is attached by {holder:?}; detach it first")]
    VolumeAttached { name: String, holder: String },
    #[error(
        "volume {name:?} is attached by {holder:?} (lease expires in {expires_in_ms} ms); \
         use --force to take it over"
    )]
    LeaseHeld {
        name: String,
        holder: String,
        expires_in_ms: u64,
    },
    #[error("lease on volume {name:?} with generation {generation} is no longer held (now: {current:?})")]
    LeaseLost {
        name: String,
        generation: u64,
        current: Option<(String, u64)>,
    },
    #[error(
        "volume {name:?} is {}; shrinking it to {} is refused (it would destroy data)",
        format_size(*size), format_size(*new_size)
    )]
    ShrinkRefused {
        name: String,
        size: u64,
        new_size: u64,
    },
    #[error("segment {index} is past the end of volume {name:?} ({segments} segments)")]
    SegmentOutOfRange {
        name: String,
        index: u64,
        segments: u64,
    },
    #[error("cannot place data with one replica per {level}")]
    NoPlacement {
        level: String,
        #[source]
        source: NotEnoughDomains,
    },
    #[error("placement group {id} does not exist")]
    GroupNotFound { id: u64 },
    #[error("disk {disk} is not a member of placement group {group}")]
    NotAMember { group: u64, disk: String },
    #[error("placement group {group} is at epoch {current}, not {got}: its membership changed; fetch it again")]
    EpochMoved { group: u64, got: u64, current: u64 },
    #[error(
        "placement group {group} has {active} active members and needs {min}: \
         taking another out would leave too few copies"
    )]
    BelowMinReplicas {
        group: u64,
        active: usize,
        min: usize,
    },
    #[error("disk {disk} of placement group {group} is {state}")]
    WrongMemberState {
        group: u64,
        disk: String,
        state: String,
    },
    #[error("member {id} already exists")]
    MemberExists { id: u64 },
    #[error("member {id} does not exist")]
    MemberNotFound { id: u64 },
    #[error("this member is not the leader")]
    NotLeader { leader: Option<(u64, String)> },
    #[error("the request's outcome is unknown (leadership changed or timed out); retry it")]
    Dropped,
    #[error("the metadata service is shutting down")]
    ShuttingDown,
    #[error("metadata storage failed: {0}")]
    Storage(String),
}

impl MetaError {
    /// Whether the same request may succeed if sent again (to the leader).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::NotLeader { .. } | Self::Dropped | Self::ShuttingDown
        )
    }
}

impl From<MetaError> for tonic::Status {
    fn from(e: MetaError) -> Self {
        use tonic::Code;
        let code = match &e {
            MetaError::InvalidArgument(_) | MetaError::ShrinkRefused { .. } => {
                Code::InvalidArgument
            }
            MetaError::VolumeExists { .. }
            | MetaError::PoolExists { .. }
            | MetaError::MemberExists { .. } => Code::AlreadyExists,
            MetaError::VolumeNotFound { .. }
            | MetaError::PoolNotFound { .. }
            | MetaError::NodeNotFound { .. }
            | MetaError::GroupNotFound { .. }
            | MetaError::MemberNotFound { .. } => Code::NotFound,
            MetaError::NotAMember { .. } => Code::InvalidArgument,
            MetaError::EpochMoved { .. }
            | MetaError::BelowMinReplicas { .. }
            | MetaError::WrongMemberState { .. } => Code::FailedPrecondition,
            MetaError::VolumeAttached { .. }
            | MetaError::LeaseHeld { .. }
            | MetaError::LeaseLost { .. }
            | MetaError::NoPlacement { .. } => Code::FailedPrecondition,
            MetaError::SegmentOutOfRange { .. } => Code::OutOfRange,
            MetaError::NotLeader { .. } | MetaError::Dropped | MetaError::ShuttingDown => {
                Code::Unavailable
            }
            MetaError::Storage(_) => Code::Internal,
        };
        let msg = match &e {
            MetaError::NoPlacement { source, .. } => format!("{e}: {source}"),
            _ => e.to_string(),
        };
        let mut status = tonic::Status::new(code, msg);
        if let MetaError::NotLeader {
            leader: Some((id, addr)),
        } = &e
        {
            if let Ok(v) = addr.parse() {
                status.metadata_mut().insert(LEADER_ADDR_KEY, v);
            }
            if let Ok(v) = id.to_string().parse() {
                status.metadata_mut().insert(LEADER_ID_KEY, v);
            }
        }
        status
    }
}

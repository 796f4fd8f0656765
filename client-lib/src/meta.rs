//! [`MetaClient`]: calls the metadata service's leader, wherever it is.
//!
//! Any member answers a request it cannot serve with UNAVAILABLE, naming the leader (gRPC
//! metadata `cairn-leader-addr`) when it knows one. The client goes there; when no member knows
//! a leader (an election is under way) or a member does not answer, it tries the next member,
//! backing off, until its deadline. Other errors are the caller's answer and are returned as
//! they are.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cairn_proto::metadata::metadata_client::MetadataClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Metadata key a follower sets to the leader's address (kept in sync with the server's).
pub const LEADER_ADDR_KEY: &str = "cairn-leader-addr";

#[derive(Debug, thiserror::Error)]
pub enum MetaClientError {
    /// The service answered, and the answer is an error.
    #[error("{}", .0.message())]
    Status(#[from] Status),
    #[error("no metadata leader answered within {waited:?} (tried {tried}); last error: {last}")]
    NoLeader {
        waited: Duration,
        tried: String,
        last: String,
    },
    #[error("invalid metadata address {addr:?}: {why}")]
    BadAddress { addr: String, why: String },
}

impl MetaClientError {
    pub fn code(&self) -> Code {
        match self {
            Self::Status(s) => s.code(),
            Self::NoLeader { .. } => Code::Unavailable,
            Self::BadAddress { .. } => Code::InvalidArgument,
        }
    }
}

pub struct MetaClient {
    members: Vec<(String, Channel)>,
    /// Index into `members` (or an address learned from a hint) of the last known leader.
    leader: Mutex<Option<(String, Channel)>>,
    deadline: Duration,
}

fn channel(addr: &str) -> Result<Channel, MetaClientError> {
    let bad = |why: String| MetaClientError::BadAddress {
        addr: addr.to_owned(),
        why,
    };
    let url = if addr.starts_with("http://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let ep = Endpoint::from_shared(url).map_err(|e| bad(e.to_string()))?;
    Ok(ep
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        // A member whose host lost power sends no FIN: without probes a connection to it
        // stays up for good, every call on it timing out (see `data::tcp_session`).
        .tcp_keepalive(Some(cairn_proto::keepalive::IDLE))
        .tcp_keepalive_interval(Some(cairn_proto::keepalive::INTERVAL))
        .tcp_keepalive_retries(Some(cairn_proto::keepalive::PROBES))
        .connect_lazy())
}

impl MetaClient {
    /// A client for a cluster whose members are at `addrs` (any subset that includes a live
    /// member is enough). Connections are made lazily. Must be called inside a tokio runtime.
    pub fn new(addrs: &[String]) -> Result<Self, MetaClientError> {
        if addrs.is_empty() {
            return Err(MetaClientError::BadAddress {
                addr: String::new(),
                why: "no metadata address given".into(),
            });
        }
        let members = addrs
            .iter()
            .map(|a| Ok((a.clone(), channel(a)?)))
            .collect::<Result<_, MetaClientError>>()?;
        Ok(Self {
            members,
            leader: Mutex::new(None),
            deadline: Duration::from_secs(20),
        })
    }

    /// How long a call keeps looking for a leader before giving up.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Calls `f` on the leader, following redirects and retrying through elections.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, MetaClientError>
    where
        F: Fn(MetadataClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let start = Instant::now();
        let mut next = 0usize;
        let mut backoff = Duration::from_millis(50);
        let mut last;
        loop {
            let target = self.leader.lock().expect("leader lock").clone();
            let (addr, ch) = match target {
                Some(t) => t,
                None => {
                    let t = self.members[next % self.members.len()].clone();
                    next += 1;
                    t
                }
            };
            let client = MetadataClient::new(ch.clone()).max_decoding_message_size(64 << 20);
            match f(client).await {
                Ok(r) => {
                    *self.leader.lock().expect("leader lock") = Some((addr, ch));
                    return Ok(r.into_inner());
                }
                Err(s) if retryable(&s) => {
                    let hint = s
                        .metadata()
                        .get(LEADER_ADDR_KEY)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    last = format!("{addr}: {}", s.message());
                    let next_leader = match hint {
                        Some(h) if h != addr => Some((h.clone(), self.channel_for(&h)?)),
                        _ => None,
                    };
                    let redirected = next_leader.is_some();
                    *self.leader.lock().expect("leader lock") = next_leader;
                    if start.elapsed() >= self.deadline {
                        return Err(MetaClientError::NoLeader {
                            waited: start.elapsed(),
                            tried: self
                                .members
                                .iter()
                                .map(|m| m.0.as_str())
                                .collect::<Vec<_>>()
                                .join(","),
                            last,
                        });
                    }
                    if !redirected {
                        // Wait only after a full round of members without an answer.
                        if next.is_multiple_of(self.members.len()) {
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_millis(500));
                        }
                    }
                }
                Err(s) => return Err(s.into()),
            }
        }
    }

    /// Whether any member answers within `within` and knows a leader: the metadata service is
    /// working (perhaps electing a new leader) and reachable from here. A member cut off with
    /// a minority soon knows no leader.
    pub async fn reachable(&self, within: Duration) -> bool {
        let probes = self.members.iter().map(|(_, ch)| {
            let mut c = MetadataClient::new(ch.clone());
            async move {
                let r = tokio::time::timeout(
                    within,
                    c.member_status(cairn_proto::metadata::MemberStatusRequest {}),
                )
                .await;
                matches!(r, Ok(Ok(s)) if s.get_ref().leader_id != 0)
            }
        });
        futures::future::join_all(probes)
            .await
            .into_iter()
            .any(|x| x)
    }

    fn channel_for(&self, addr: &str) -> Result<Channel, MetaClientError> {
        match self.members.iter().find(|(a, _)| a == addr) {
            Some((_, ch)) => Ok(ch.clone()),
            None => channel(addr),
        }
    }
}

/// Whether a failed call may be sent again, to the same or another member. UNAVAILABLE is how
/// members refuse (not the leader, shutting down, outcome unknown). A connection that breaks
/// mid-call surfaces as UNKNOWN, CANCELLED or DEADLINE_EXCEEDED from the transport; the
/// server itself never answers with those codes.
fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

//! Validated domain types. Everything a sender can get wrong is rejected here with one clear
//! message, before the request reaches the metadata service's state machine.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::metadata as pb;

/// Logical block size of every volume: the unit of checksums and of I/O alignment.
pub const BLOCK_SIZE: u64 = 4096;
/// The allocation unit the metadata service tracks (DESIGN.md §3).
pub const SEGMENT_SIZE: u64 = 1 << 30;
/// Largest volume Cairn creates: 64 TiB, the largest VMDK VMware allows is 62 TB.
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;
/// Longest volume or pool name.
pub const MAX_NAME_LEN: usize = 64;
/// Replication factors a pool or volume may ask for.
pub const MAX_REPLICAS: u32 = 5;

/// A request that cannot be valid, whatever the cluster's state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidArgument {
    #[error("{what} name {name:?} is invalid: {why}")]
    Name {
        what: &'static str,
        name: String,
        why: &'static str,
    },
    #[error("size {size} is invalid: {why}")]
    Size { size: u64, why: String },
    #[error("replicas {replicas} is invalid: {why}")]
    Replicas { replicas: u32, why: String },
    #[error("{field} is required")]
    Missing { field: &'static str },
    #[error("{field}: {why}")]
    Other { field: &'static str, why: String },
}

fn validate_name(what: &'static str, name: &str) -> Result<(), InvalidArgument> {
    let err = |why| {
        Err(InvalidArgument::Name {
            what,
            name: name.to_owned(),
            why,
        })
    };
    if name.is_empty() {
        return err("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return err("it is longer than 64 characters");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return err("it must start with a letter or digit");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return err("only letters, digits, '-', '_' and '.' are allowed");
    }
    Ok(())
}

macro_rules! name_type {
    ($ty:ident, $what:literal) => {
        #[doc = concat!("A validated ", $what, " name: 1–64 of `[A-Za-z0-9._-]`, starting alphanumeric.")]
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $ty {
            type Error = InvalidArgument;
            fn try_from(s: String) -> Result<Self, InvalidArgument> {
                validate_name($what, &s)?;
                Ok(Self(s))
            }
        }

        impl TryFrom<&str> for $ty {
            type Error = InvalidArgument;
            fn try_from(s: &str) -> Result<Self, InvalidArgument> {
                Self::try_from(s.to_owned())
            }
        }

        impl From<$ty> for String {
            fn from(n: $ty) -> String {
                n.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(VolumeName, "volume");
name_type!(PoolName, "pool");

impl PoolName {
    /// The pool volumes go to when none is named.
    pub fn default_pool() -> Self {
        Self("default".to_owned())
    }
}

/// A volume size: non-zero, a multiple of the block size, at most [`MAX_VOLUME_SIZE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct VolumeSize(u64);

impl VolumeSize {
    pub fn bytes(self) -> u64 {
        self.0
    }
    /// Number of segments that cover the volume.
    pub fn segments(self) -> u64 {
        self.0.div_ceil(SEGMENT_SIZE)
    }
}

impl TryFrom<u64> for VolumeSize {
    type Error = InvalidArgument;
    fn try_from(size: u64) -> Result<Self, InvalidArgument> {
        let err = |why: String| Err(InvalidArgument::Size { size, why });
        if size == 0 {
            return err("a volume cannot be empty".into());
        }
        if !size.is_multiple_of(BLOCK_SIZE) {
            return err(format!(
                "it must be a multiple of the {BLOCK_SIZE}-byte block size"
            ));
        }
        if size > MAX_VOLUME_SIZE {
            return err(format!(
                "the largest volume is {}",
                format_size(MAX_VOLUME_SIZE)
            ));
        }
        Ok(Self(size))
    }
}

impl From<VolumeSize> for u64 {
    fn from(s: VolumeSize) -> u64 {
        s.0
    }
}

/// Which failure domain the members of a placement group must not share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailureDomainLevel {
    #[default]
    Host,
    Rack,
    Site,
}

impl FailureDomainLevel {
    pub fn to_pb(self) -> pb::FailureDomainLevel {
        match self {
            Self::Host => pb::FailureDomainLevel::Host,
            Self::Rack => pb::FailureDomainLevel::Rack,
            Self::Site => pb::FailureDomainLevel::Site,
        }
    }
    pub fn from_pb(v: i32) -> Result<Self, InvalidArgument> {
        match pb::FailureDomainLevel::try_from(v) {
            Ok(pb::FailureDomainLevel::Unspecified) | Ok(pb::FailureDomainLevel::Host) => {
                Ok(Self::Host)
            }
            Ok(pb::FailureDomainLevel::Rack) => Ok(Self::Rack),
            Ok(pb::FailureDomainLevel::Site) => Ok(Self::Site),
            Err(_) => Err(InvalidArgument::Other {
                field: "failure_domain",
                why: format!("unknown failure-domain level {v}"),
            }),
        }
    }
}

impl std::str::FromStr for FailureDomainLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "host" => Ok(Self::Host),
            "rack" => Ok(Self::Rack),
            "site" => Ok(Self::Site),
            _ => Err(format!(
                "unknown failure-domain level {s:?}: use host, rack or site"
            )),
        }
    }
}

impl fmt::Display for FailureDomainLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Host => "host",
            Self::Rack => "rack",
            Self::Site => "site",
        })
    }
}

/// A validated pool definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSpec {
    pub name: PoolName,
    pub replicas: u32,
    pub min_replicas: u32,
    pub failure_domain: FailureDomainLevel,
}

impl PoolSpec {
    /// The pool created on first use: 3 replicas, writes need 2, one replica per host.
    pub fn default_pool() -> Self {
        Self {
            name: PoolName::default_pool(),
            replicas: 3,
            min_replicas: 2,
            failure_domain: FailureDomainLevel::Host,
        }
    }

    pub fn to_pb(&self) -> pb::Pool {
        pb::Pool {
            name: self.name.to_string(),
            replicas: self.replicas,
            min_replicas: self.min_replicas,
            failure_domain: self.failure_domain.to_pb() as i32,
        }
    }
}

/// Checks a replication factor.
pub fn validate_replicas(replicas: u32) -> Result<u32, InvalidArgument> {
    if replicas == 0 || replicas > MAX_REPLICAS {
        return Err(InvalidArgument::Replicas {
            replicas,
            why: format!("it must be between 1 and {MAX_REPLICAS}"),
        });
    }
    Ok(replicas)
}

impl TryFrom<pb::Pool> for PoolSpec {
    type Error = InvalidArgument;
    fn try_from(p: pb::Pool) -> Result<Self, InvalidArgument> {
        let name = PoolName::try_from(p.name)?;
        let replicas = validate_replicas(if p.replicas == 0 { 3 } else { p.replicas })?;
        let min_replicas = if p.min_replicas == 0 {
            replicas.div_ceil(2)
        } else {
            p.min_replicas
        };
        if min_replicas > replicas {
            return Err(InvalidArgument::Replicas {
                replicas: min_replicas,
                why: format!("min_replicas cannot exceed replicas ({replicas})"),
            });
        }
        Ok(Self {
            name,
            replicas,
            min_replicas,
            failure_domain: FailureDomainLevel::from_pb(p.failure_domain)?,
        })
    }
}

/// A validated volume create request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateVolume {
    pub name: VolumeName,
    pub size: VolumeSize,
    pub pool: PoolName,
    /// `None`: the pool's replication factor.
    pub replicas: Option<u32>,
    pub request_id: String,
}

impl TryFrom<pb::CreateVolumeRequest> for CreateVolume {
    type Error = InvalidArgument;
    fn try_from(r: pb::CreateVolumeRequest) -> Result<Self, InvalidArgument> {
        Ok(Self {
            name: VolumeName::try_from(r.name)?,
            size: VolumeSize::try_from(r.size_bytes)?,
            pool: if r.pool.is_empty() {
                PoolName::default_pool()
            } else {
                PoolName::try_from(r.pool)?
            },
            replicas: match r.replicas {
                0 => None,
                n => Some(validate_replicas(n)?),
            },
            request_id: if r.request_id.len() > 128 {
                return Err(InvalidArgument::Other {
                    field: "request_id",
                    why: "longer than 128 bytes".into(),
                });
            } else {
                r.request_id
            },
        })
    }
}

/// Parses a human size such as `10G`, `512M`, `4096`, `1.5T` (binary units, like qemu-img:
/// K = 1024). Bare numbers are bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (num, shift) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 10),
        Some('m') => (&body[..body.len() - 1], 20),
        Some('g') => (&body[..body.len() - 1], 30),
        Some('t') => (&body[..body.len() - 1], 40),
        Some('p') => (&body[..body.len() - 1], 50),
        _ => (body, 0),
    };
    let bad = || format!("invalid size {s:?}: use bytes or a number with K, M, G, T or P");
    let num = num.trim();
    if num.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(1u64 << shift)
            .ok_or_else(|| format!("size {s:?} is too large"));
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    if !f.is_finite() || f < 0.0 {
        return Err(bad());
    }
    let v = f * (1u64 << shift) as f64;
    if v >= u64::MAX as f64 {
        return Err(format!("size {s:?} is too large"));
    }
    if v.fract() != 0.0 {
        return Err(format!("size {s:?} is not a whole number of bytes"));
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(v as u64)
}

/// Formats a byte count with the largest binary unit that keeps it readable: `10 GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut v = bytes as f64;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Names: the accepted alphabet and the rejected edge cases.
    #[test]
    fn names() {
        assert!(VolumeName::try_from("vm-01.disk_0").is_ok());
        assert!(VolumeName::try_from("9").is_ok());
        for bad in ["", "-x", ".x", "a b", "a/b", "é", &"x".repeat(65)] {
            assert!(VolumeName::try_from(bad).is_err(), "{bad:?} accepted");
        }
        assert!(VolumeName::try_from("x".repeat(64)).is_ok());
    }

    /// Sizes: zero, unaligned and huge sizes are rejected, with the reason in the message.
    #[test]
    fn sizes() {
        assert!(matches!(
            VolumeSize::try_from(0),
            Err(InvalidArgument::Size { .. })
        ));
        let e = VolumeSize::try_from(4097).unwrap_err().to_string();
        assert!(e.contains("multiple of the 4096-byte block size"), "{e}");
        let e = VolumeSize::try_from(MAX_VOLUME_SIZE + BLOCK_SIZE)
            .unwrap_err()
            .to_string();
        assert!(e.contains("64 TiB"), "{e}");
        assert_eq!(
            VolumeSize::try_from(SEGMENT_SIZE + 4096)
                .unwrap()
                .segments(),
            2
        );
    }

    /// Human sizes parse in binary units and reject junk.
    #[test]
    fn human_sizes() {
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "G", "-1G", "ten", "1.1", "99999999999P", "nanG"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(format_size(10 << 30), "10 GiB");
        assert_eq!(format_size(1536), "1.50 KiB");
    }

    proptest! {
        /// Whatever string arrives, name validation answers without panicking, and accepted
        /// names round-trip through serde.
        #[test]
        fn name_never_panics(s in ".{0,80}") {
            if let Ok(n) = VolumeName::try_from(s.as_str()) {
                let j = serde_json::to_string(&n).unwrap();
                prop_assert_eq!(serde_json::from_str::<VolumeName>(&j).unwrap(), n);
            }
        }

        #[test]
        fn parse_size_never_panics(s in "[0-9.kKmMgGtTpPiIbB ]{0,24}") {
            let _ = parse_size(&s);
        }
    }
}

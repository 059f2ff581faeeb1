//! The `local.*` load-balancer attributes and the address pool.

use super::error::LocalError;
use cloudlb_core::model::ServiceRef;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

/// Attribute: the addresses Services get, a comma list of CIDRs (`127.0.1.0/24`), ranges
/// (`127.0.1.10-127.0.1.20`) and single addresses.
pub const ATTR_ADDRESS_POOL: &str = "local.address_pool";
/// Attribute: `random` (default) or `round-robin`.
pub const ATTR_ALGORITHM: &str = "local.algorithm";
/// Attribute: the address the Service had before (its status); used when in the pool and free.
pub const ATTR_REQUESTED_ADDRESS: &str = "local.requested_address";
/// Attribute: seconds existing connections to a removed target may go on.
pub const ATTR_DRAIN_TIMEOUT_SECONDS: &str = "local.drain_timeout_seconds";
/// The pool used when the attribute is missing: Linux routes all of 127.0.0.0/8 to loopback.
pub const DEFAULT_ADDRESS_POOL: &str = "127.0.1.0/24";

/// How a target group picks a target for a new connection or UDP flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Algorithm {
    #[default]
    Random,
    RoundRobin,
}

impl Algorithm {
    pub(crate) fn as_u8(self) -> u8 {
        match self {
            Algorithm::Random => 0,
            Algorithm::RoundRobin => 1,
        }
    }
    pub(crate) fn from_u8(v: u8) -> Self {
        if v == 1 {
            Algorithm::RoundRobin
        } else {
            Algorithm::Random
        }
    }
}

/// The local settings of one load balancer, parsed from its attributes.
#[derive(Clone, Debug)]
pub(crate) struct LbSettings {
    pub pool: AddressPool,
    pub algorithm: Algorithm,
    pub requested: Option<IpAddr>,
    pub drain_timeout: Duration,
}

impl LbSettings {
    pub(crate) fn parse(
        service: &ServiceRef,
        attributes: &BTreeMap<String, String>,
        default_drain: Duration,
    ) -> Result<Self, LocalError> {
        let invalid =
            |key: &'static str, value: &str, reason: String| LocalError::InvalidAttribute {
                service: service.to_string(),
                key,
                value: value.to_string(),
                reason,
            };
        let get = |key: &str| {
            attributes
                .get(key)
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
        };
        let pool_spec = get(ATTR_ADDRESS_POOL).unwrap_or(DEFAULT_ADDRESS_POOL);
        let pool = AddressPool::parse(pool_spec)
            .map_err(|reason| invalid(ATTR_ADDRESS_POOL, pool_spec, reason))?;
        let algorithm = match get(ATTR_ALGORITHM) {
            None => Algorithm::Random,
            Some(v) if v.eq_ignore_ascii_case("random") => Algorithm::Random,
            Some(v)
                if v.eq_ignore_ascii_case("round-robin")
                    || v.eq_ignore_ascii_case("round_robin") =>
            {
                Algorithm::RoundRobin
            }
            Some(v) => {
                return Err(invalid(
                    ATTR_ALGORITHM,
                    v,
                    "expected random or round-robin".into(),
                ));
            }
        };
        let requested = match get(ATTR_REQUESTED_ADDRESS) {
            None => None,
            Some(v) => Some(v.parse::<IpAddr>().map_err(|e| {
                invalid(
                    ATTR_REQUESTED_ADDRESS,
                    v,
                    format!("not an IP address ({e})"),
                )
            })?),
        };
        let drain_timeout = match get(ATTR_DRAIN_TIMEOUT_SECONDS) {
            None => default_drain,
            Some(v) => Duration::from_secs(v.parse::<u64>().map_err(|e| {
                invalid(
                    ATTR_DRAIN_TIMEOUT_SECONDS,
                    v,
                    format!("expected whole seconds ({e})"),
                )
            })?),
        };
        Ok(LbSettings {
            pool,
            algorithm,
            requested,
            drain_timeout,
        })
    }
}

/// An inclusive range of addresses of one family, as integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Range {
    v6: bool,
    start: u128,
    end: u128,
}

impl Range {
    fn len(&self) -> u128 {
        (self.end - self.start).saturating_add(1)
    }
}

fn to_int(ip: IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(a) => (false, u128::from(u32::from(a))),
        IpAddr::V6(a) => (true, u128::from(a)),
    }
}

fn from_int(v6: bool, n: u128) -> Option<IpAddr> {
    if v6 {
        Some(IpAddr::V6(Ipv6Addr::from(n)))
    } else {
        u32::try_from(n).ok().map(|n| IpAddr::V4(Ipv4Addr::from(n)))
    }
}

/// A set of addresses to allocate from; see [`ATTR_ADDRESS_POOL`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressPool {
    spec: String,
    ranges: Vec<Range>,
}

impl AddressPool {
    /// Parses `127.0.1.0/24`, `10.0.0.5-10.0.0.9`, `127.0.1.7` or a comma list of them. In IPv4
    /// blocks larger than /31 the network and broadcast addresses are left out.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut ranges = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            ranges.push(parse_item(item)?);
        }
        if ranges.is_empty() {
            return Err("no address given".into());
        }
        Ok(AddressPool {
            spec: spec.to_string(),
            ranges,
        })
    }

    pub fn spec(&self) -> &str {
        &self.spec
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let (v6, n) = to_int(ip);
        self.ranges
            .iter()
            .any(|r| r.v6 == v6 && r.start <= n && n <= r.end)
    }

    /// Number of addresses (saturating).
    pub fn len(&self) -> u128 {
        self.ranges
            .iter()
            .fold(0u128, |acc, r| acc.saturating_add(r.len()))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn nth(&self, mut i: u128) -> Option<IpAddr> {
        for r in &self.ranges {
            if i < r.len() {
                return from_int(r.v6, r.start + i);
            }
            i -= r.len();
        }
        None
    }

    /// Picks an address: `requested` when it is in the pool and free; otherwise the first free
    /// address from a position derived from `seed` (the Service UID), so a Service tends to get
    /// the same address again after an operator restart even without `requested`.
    pub fn allocate(
        &self,
        requested: Option<IpAddr>,
        seed: &str,
        in_use: usize,
        taken: impl Fn(IpAddr) -> bool,
    ) -> Option<IpAddr> {
        if let Some(ip) = requested.filter(|ip| self.contains(*ip) && !taken(*ip)) {
            return Some(ip);
        }
        let n = self.len();
        if n == 0 {
            return None;
        }
        let start = seed_position(seed) % n;
        // Consecutive probes meet each taken address at most once: in_use + 1 probes suffice.
        let probes = n.min(in_use as u128 + 1);
        (0..probes)
            .filter_map(|i| self.nth((start + i) % n))
            .find(|ip| !taken(*ip))
    }
}

fn seed_position(seed: &str) -> u128 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(seed.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(bytes)
}

fn parse_item(item: &str) -> Result<Range, String> {
    if let Some((addr, prefix)) = item.split_once('/') {
        let ip: IpAddr = addr
            .trim()
            .parse()
            .map_err(|e| format!("{item:?}: bad address ({e})"))?;
        let prefix: u32 = prefix
            .trim()
            .parse()
            .map_err(|e| format!("{item:?}: bad prefix length ({e})"))?;
        let (v6, n) = to_int(ip);
        let bits = if v6 { 128 } else { 32 };
        if prefix > bits {
            return Err(format!("{item:?}: prefix length over {bits}"));
        }
        let host_bits = bits - prefix;
        let host_mask: u128 = if host_bits == 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        let start = n & !host_mask;
        let end = start | host_mask;
        // Leave out the network and broadcast (IPv4) / subnet-router anycast (IPv6) addresses.
        let (start, end) = match (v6, host_bits) {
            (false, 2..) => (start + 1, end - 1),
            (true, 1..) => (start + 1, end),
            _ => (start, end),
        };
        return Ok(Range { v6, start, end });
    }
    if let Some((a, b)) = item.split_once('-') {
        let a: IpAddr = a
            .trim()
            .parse()
            .map_err(|e| format!("{item:?}: bad range start ({e})"))?;
        let b: IpAddr = b
            .trim()
            .parse()
            .map_err(|e| format!("{item:?}: bad range end ({e})"))?;
        let ((v6a, start), (v6b, end)) = (to_int(a), to_int(b));
        if v6a != v6b || start > end {
            return Err(format!(
                "{item:?}: a range needs two addresses of one family, low to high"
            ));
        }
        return Ok(Range {
            v6: v6a,
            start,
            end,
        });
    }
    let ip: IpAddr = item
        .parse()
        .map_err(|e| format!("{item:?}: expected an address, a CIDR or a range ({e})"))?;
    let (v6, n) = to_int(ip);
    Ok(Range {
        v6,
        start: n,
        end: n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn cidr_leaves_out_network_and_broadcast() {
        let p = AddressPool::parse("127.0.1.0/30").expect("pool");
        assert_eq!(p.len(), 2);
        assert!(!p.contains(ip("127.0.1.0")));
        assert!(p.contains(ip("127.0.1.1")));
        assert!(p.contains(ip("127.0.1.2")));
        assert!(!p.contains(ip("127.0.1.3")));
        let single = AddressPool::parse("127.0.1.9/32").expect("pool");
        assert_eq!(single.len(), 1);
        assert!(single.contains(ip("127.0.1.9")));
    }

    #[test]
    fn lists_ranges_and_v6() {
        let p = AddressPool::parse("127.0.2.5, 127.0.2.10-127.0.2.12, fd00::/126").expect("pool");
        assert_eq!(p.len(), 1 + 3 + 3);
        assert!(p.contains(ip("127.0.2.11")));
        assert!(p.contains(ip("fd00::3")));
        assert!(!p.contains(ip("fd00::")));
        assert!(AddressPool::parse("").is_err());
        assert!(AddressPool::parse("127.0.0.1/33").is_err());
        assert!(AddressPool::parse("127.0.0.9-127.0.0.1").is_err());
        assert!(AddressPool::parse("nope").is_err());
    }

    #[test]
    fn allocation_prefers_requested_then_is_stable_per_seed() {
        let p = AddressPool::parse("127.0.3.0/28").expect("pool");
        let none = |_: IpAddr| false;
        assert_eq!(
            p.allocate(Some(ip("127.0.3.7")), "u", 0, none),
            Some(ip("127.0.3.7"))
        );
        // Out of the pool: ignored.
        let a = p
            .allocate(Some(ip("10.0.0.1")), "u", 0, none)
            .expect("addr");
        assert!(p.contains(a));
        assert_eq!(p.allocate(None, "u", 0, none), Some(a));
        // Taken: the next free one.
        let b = p.allocate(None, "u", 1, |x| x == a).expect("addr");
        assert_ne!(a, b);
        // Exhausted.
        assert_eq!(p.allocate(None, "u", 14, |_| true), None);
    }
}

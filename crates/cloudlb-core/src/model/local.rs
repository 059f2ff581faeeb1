//! The local provider's settings of one load balancer, typed: [`LocalSpec`].
//!
//! Parsed and validated once, by [`crate::config`] from `LoadBalancerClass.spec.local`; the build
//! adds the address the Service already has ([`LocalSpec::requested_address`]). The local
//! provider (`cloudlb-local`) takes them as they are: it allocates from the [`AddressPool`] and
//! balances with the [`Algorithm`].

use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The pool of a class without `spec.local.addressPool`: Linux routes all of 127.0.0.0/8 to
/// loopback, so these addresses need no set-up (and are reachable from the host only).
pub const DEFAULT_ADDRESS_POOL: &str = "127.0.1.0/24";
/// How long connections to a removed target may go on, when the class does not say.
pub const DEFAULT_DRAIN_TIMEOUT_SECONDS: u32 = 30;
/// The longest drain a class may ask for.
pub const MAX_DRAIN_TIMEOUT_SECONDS: u32 = 3600;

/// What the local provider needs to serve one load balancer beyond the listeners and target
/// groups of the model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalSpec {
    /// The addresses the load balancer may get.
    pub address_pool: AddressPool,
    /// How each target group picks a target for a new connection or UDP flow.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// How long connections to a removed target may go on before they are closed.
    #[serde(default = "default_drain_timeout_seconds")]
    pub drain_timeout_seconds: u32,
    /// The address the Service has in its status: given again when it is in the pool and free,
    /// so a Service keeps its address across operator restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_address: Option<IpAddr>,
}

fn default_drain_timeout_seconds() -> u32 {
    DEFAULT_DRAIN_TIMEOUT_SECONDS
}

impl Default for LocalSpec {
    fn default() -> Self {
        LocalSpec {
            address_pool: AddressPool::default(),
            algorithm: Algorithm::default(),
            drain_timeout_seconds: DEFAULT_DRAIN_TIMEOUT_SECONDS,
            requested_address: None,
        }
    }
}

/// How a target group picks a target for a new connection or UDP flow (among the healthy ones).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// Uniformly at random, like kube-proxy.
    #[default]
    Random,
    /// In turn.
    RoundRobin,
}

impl Algorithm {
    pub const ALL: [Algorithm; 2] = [Algorithm::Random, Algorithm::RoundRobin];

    /// `random`, `round-robin`: the spelling of the class and of the JSON model.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Random => "random",
            Algorithm::RoundRobin => "round-robin",
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Algorithm {
    type Err = String;

    /// Exactly `random` or `round-robin`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Algorithm::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| "allowed values: random, round-robin".to_string())
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

/// A set of addresses, written as a comma-separated list of CIDRs (`127.0.1.0/24`,
/// `fd00:1::/120`), ranges (`127.0.1.10-127.0.1.20`) and single addresses, IPv4 and IPv6 mixed.
/// In CIDR blocks the network and broadcast addresses (IPv4 blocks larger than /31) and the
/// subnet-router anycast address (IPv6) are left out.
///
/// In JSON it is the string it was parsed from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AddressPool {
    spec: String,
    ranges: Vec<Range>,
}

impl Default for AddressPool {
    /// [`DEFAULT_ADDRESS_POOL`].
    fn default() -> Self {
        AddressPool {
            spec: DEFAULT_ADDRESS_POOL.to_string(),
            ranges: vec![cidr(IpAddr::V4(Ipv4Addr::new(127, 0, 1, 0)), 24)],
        }
    }
}

impl AddressPool {
    /// Parses a pool (see the type); `Err` says which item is wrong and why.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let spec = spec.trim();
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

    /// The pool as written.
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

    /// The `i`-th address, in the order written.
    pub fn nth(&self, mut i: u128) -> Option<IpAddr> {
        for r in &self.ranges {
            if i < r.len() {
                return from_int(r.v6, r.start + i);
            }
            i -= r.len();
        }
        None
    }
}

impl std::fmt::Display for AddressPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.spec)
    }
}

impl std::str::FromStr for AddressPool {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AddressPool::parse(s)
    }
}

impl From<IpAddr> for AddressPool {
    /// The pool of this one address.
    fn from(ip: IpAddr) -> Self {
        let (v6, n) = to_int(ip);
        AddressPool {
            spec: ip.to_string(),
            ranges: vec![Range {
                v6,
                start: n,
                end: n,
            }],
        }
    }
}

impl TryFrom<String> for AddressPool {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        AddressPool::parse(&s)
    }
}

impl From<AddressPool> for String {
    fn from(p: AddressPool) -> Self {
        p.spec
    }
}

/// The usable addresses of `ip/prefix` (`prefix` at most the family's bits).
fn cidr(ip: IpAddr, prefix: u32) -> Range {
    let (v6, n) = to_int(ip);
    let bits = if v6 { 128 } else { 32 };
    let host_bits = bits - prefix.min(bits);
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
    Range { v6, start, end }
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
        let bits = if ip.is_ipv6() { 128 } else { 32 };
        if prefix > bits {
            return Err(format!("{item:?}: prefix length over {bits}"));
        }
        return Ok(cidr(ip, prefix));
    }
    let generic = |e: std::net::AddrParseError| {
        format!(
            "{item:?}: expected an address, a CIDR (address/length) or a range (low-high) ({e})"
        )
    };
    if let Some((a, b)) = item.split_once('-') {
        // Not even the start is an address: not meant as a range.
        let a: IpAddr = a.trim().parse().map_err(generic)?;
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
    let ip: IpAddr = item.parse().map_err(generic)?;
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
        let pair = AddressPool::parse("127.0.1.8/31").expect("pool");
        assert_eq!(pair.len(), 2, "a /31 has no network or broadcast address");
    }

    #[test]
    fn lists_ranges_and_v6() {
        let p = AddressPool::parse("127.0.2.5, 127.0.2.10-127.0.2.12, fd00::/126").expect("pool");
        assert_eq!(p.len(), 1 + 3 + 3);
        assert!(p.contains(ip("127.0.2.11")));
        assert!(p.contains(ip("fd00::3")));
        assert!(!p.contains(ip("fd00::")));
        assert!(!p.contains(ip("127.0.2.9")));
        assert_eq!(p.nth(0), Some(ip("127.0.2.5")));
        assert_eq!(p.nth(1), Some(ip("127.0.2.10")));
        assert_eq!(p.nth(4), Some(ip("fd00::1")));
        assert_eq!(p.nth(7), None);
        let v6 = AddressPool::parse("fd00::10-fd00::1f").expect("v6 range");
        assert_eq!(v6.len(), 16);
    }

    #[test]
    fn bad_pools_say_which_item_and_why() {
        for (spec, why) in [
            ("", "no address given"),
            (" , ", "no address given"),
            ("127.0.0.1/33", "\"127.0.0.1/33\": prefix length over 32"),
            ("fd00::/129", "\"fd00::/129\": prefix length over 128"),
            ("127.0.0.9-127.0.0.1", "low to high"),
            ("127.0.0.1-fd00::1", "one family"),
            ("127.0.0.1, nope", "\"nope\": expected an address, a CIDR"),
            ("not-a-pool", "\"not-a-pool\": expected an address, a CIDR"),
            ("127.0.0.1-x", "\"127.0.0.1-x\": bad range end"),
            ("10.0.0.0/x", "\"10.0.0.0/x\": bad prefix length"),
        ] {
            let e = AddressPool::parse(spec).expect_err(spec);
            assert!(e.contains(why), "{spec:?}: {e}");
        }
    }

    #[test]
    fn one_address_is_a_pool() {
        let one = AddressPool::from(ip("127.2.1.1"));
        assert_eq!(one, AddressPool::parse("127.2.1.1").expect("pool"));
        assert_eq!(one.len(), 1);
        assert_eq!(AddressPool::from(ip("fd00::1")).spec(), "fd00::1");
    }

    #[test]
    fn default_pool_is_the_documented_one() {
        assert_eq!(
            AddressPool::default(),
            AddressPool::parse(DEFAULT_ADDRESS_POOL).expect("pool")
        );
        assert_eq!(AddressPool::default().len(), 254);
    }

    #[test]
    fn serializes_as_written() {
        let spec = LocalSpec {
            address_pool: AddressPool::parse("127.0.1.0/28, fd00::5").expect("pool"),
            algorithm: Algorithm::RoundRobin,
            drain_timeout_seconds: 5,
            requested_address: Some(ip("127.0.1.3")),
        };
        let json = serde_json::to_value(&spec).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "addressPool": "127.0.1.0/28, fd00::5",
                "algorithm": "round-robin",
                "drainTimeoutSeconds": 5,
                "requestedAddress": "127.0.1.3"
            })
        );
        let back: LocalSpec = serde_json::from_value(json).expect("back");
        assert_eq!(back, spec);
        let minimal: LocalSpec =
            serde_json::from_value(serde_json::json!({"addressPool": "127.0.1.7"})).expect("min");
        assert_eq!(minimal.algorithm, Algorithm::Random);
        assert_eq!(minimal.drain_timeout_seconds, DEFAULT_DRAIN_TIMEOUT_SECONDS);
        assert!(
            serde_json::from_value::<LocalSpec>(serde_json::json!({"addressPool": "nope"}))
                .is_err()
        );
    }

    #[test]
    fn algorithms_parse_exactly_their_names() {
        for a in Algorithm::ALL {
            assert_eq!(a.as_str().parse::<Algorithm>(), Ok(a));
            assert_eq!(
                serde_json::to_value(a).expect("json"),
                serde_json::json!(a.as_str())
            );
        }
        assert!("least-conn".parse::<Algorithm>().is_err());
        assert!("Round-Robin".parse::<Algorithm>().is_err());
    }
}

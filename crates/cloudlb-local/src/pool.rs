//! Taking an address from a load balancer's [`AddressPool`] (parsed and validated in
//! `cloudlb-core`).

use cloudlb_core::model::AddressPool;
use std::net::IpAddr;

/// Picks an address: `requested` when it is in the pool and free; otherwise the first free
/// address from a position derived from `seed` (the Service UID), so a Service tends to get the
/// same address again after an operator restart even without `requested`. `in_use` is how many
/// addresses `taken` holds (it bounds the probes).
pub(crate) fn allocate(
    pool: &AddressPool,
    requested: Option<IpAddr>,
    seed: &str,
    in_use: usize,
    taken: impl Fn(IpAddr) -> bool,
) -> Option<IpAddr> {
    if let Some(ip) = requested.filter(|ip| pool.contains(*ip) && !taken(*ip)) {
        return Some(ip);
    }
    let n = pool.len();
    if n == 0 {
        return None;
    }
    let start = seed_position(seed) % n;
    // Consecutive probes meet each taken address at most once: in_use + 1 probes suffice.
    let probes = n.min(in_use as u128 + 1);
    (0..probes)
        .filter_map(|i| pool.nth((start + i) % n))
        .find(|ip| !taken(*ip))
}

fn seed_position(seed: &str) -> u128 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(seed.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn allocation_prefers_requested_then_is_stable_per_seed() {
        let p = AddressPool::parse("127.0.3.0/28").expect("pool");
        let none = |_: IpAddr| false;
        assert_eq!(
            allocate(&p, Some(ip("127.0.3.7")), "u", 0, none),
            Some(ip("127.0.3.7"))
        );
        // Out of the pool: ignored.
        let a = allocate(&p, Some(ip("10.0.0.1")), "u", 0, none).expect("addr");
        assert!(p.contains(a));
        assert_eq!(allocate(&p, None, "u", 0, none), Some(a));
        // Taken: the next free one.
        let b = allocate(&p, None, "u", 1, |x| x == a).expect("addr");
        assert_ne!(a, b);
        // Requested but taken: another one.
        let c = allocate(&p, Some(a), "v", 1, |x| x == a).expect("addr");
        assert_ne!(c, a);
        // Exhausted.
        assert_eq!(allocate(&p, None, "u", 14, |_| true), None);
    }

    #[test]
    fn allocates_from_ranges_and_v6() {
        let p = AddressPool::parse("fd00::10-fd00::11").expect("pool");
        let a = allocate(&p, None, "u", 0, |_| false).expect("addr");
        assert!(p.contains(a) && a.is_ipv6());
        let b = allocate(&p, None, "u", 1, |x| x == a).expect("addr");
        assert!(p.contains(b) && b != a);
        assert_eq!(allocate(&p, None, "u", 2, |x| x == a || x == b), None);
    }
}

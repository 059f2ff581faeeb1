//! The address ranges of the cluster's VPC (its primary and secondary IPv4 CIDR blocks): IP
//! targets outside them are not registered (AWS would refuse the whole call) but reported.
//! Read once per VPC per process.

use super::AwsProvider;
use cloudlb_core::provider::ProviderError;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;

/// An IPv4 CIDR block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cidr {
    net: u32,
    bits: u32,
}

impl Cidr {
    pub(crate) fn parse(s: &str) -> Option<Cidr> {
        let (addr, bits) = s.split_once('/')?;
        let addr: Ipv4Addr = addr.trim().parse().ok()?;
        let bits: u32 = bits.trim().parse().ok().filter(|b| *b <= 32)?;
        Some(Cidr {
            net: u32::from(addr) & Self::mask(bits),
            bits,
        })
    }

    fn mask(bits: u32) -> u32 {
        u32::MAX.checked_shl(32 - bits).unwrap_or(0)
    }

    /// Whether the target address `ip` is in the block. Addresses that are not IPv4 are not
    /// judged here (true).
    pub(crate) fn contains(&self, ip: &str) -> bool {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => u32::from(v4) & Self::mask(self.bits) == self.net,
            _ => true,
        }
    }
}

/// The CIDR blocks of each VPC, once read.
#[derive(Debug, Default)]
pub(crate) struct VpcCache(Mutex<HashMap<String, Vec<Cidr>>>);

impl AwsProvider {
    /// The IPv4 CIDR blocks of `vpc` (one DescribeVpcs per process).
    pub(crate) async fn vpc_cidrs(&self, vpc: &str) -> Result<Vec<Cidr>, ProviderError> {
        let cached = self
            .vpc_cache
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(vpc)
            .cloned();
        if let Some(c) = cached {
            return Ok(c);
        }
        let blocks = self.ec2.vpc_cidr_blocks(&self.calls, vpc).await?;
        let cidrs: Vec<Cidr> = blocks.iter().filter_map(|b| Cidr::parse(b)).collect();
        if cidrs.is_empty() {
            return Err(ProviderError::InvalidConfig(format!(
                "VPC {vpc} has no IPv4 CIDR block cloudlb can read"
            )));
        }
        self.vpc_cache
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(vpc.to_string(), cidrs.clone());
        Ok(cidrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_contain_what_they_should() {
        let c = Cidr::parse("10.0.0.0/16").expect("cidr");
        assert!(c.contains("10.0.255.1"));
        assert!(!c.contains("10.1.0.1"));
        assert!(!c.contains("192.168.0.1"));
        assert!(c.contains("fd00::1"), "IPv6 is not judged by IPv4 blocks");
        let secondary = Cidr::parse("100.64.0.0/10").expect("cidr");
        assert!(secondary.contains("100.127.1.2"));
        assert!(Cidr::parse("0.0.0.0/0").expect("all").contains("8.8.8.8"));
        assert_eq!(Cidr::parse("10.0.0.0/33"), None);
        assert_eq!(Cidr::parse("garbage"), None);
    }
}

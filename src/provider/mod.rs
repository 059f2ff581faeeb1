//! The providers, one crate each, behind the [`Provider`] trait of `cloudlb-core` (re-exported
//! here with the observed-state types and [`ProviderError`]): [`aws`] is `cloudlb-aws`, [`local`]
//! is `cloudlb-local`.

pub use cloudlb_aws as aws;
pub use cloudlb_core::provider::*;
pub use cloudlb_local as local;

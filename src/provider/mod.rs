//! The providers, one folder each, behind the [`Provider`] trait of `cloudlb-core` (re-exported
//! here with the observed-state types and [`ProviderError`]).

pub use cloudlb_core::provider::*;

pub mod aws;
pub mod local;

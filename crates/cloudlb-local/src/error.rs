//! Errors of the local provider → [`ProviderError`].

use cloudlb_core::provider::ProviderError;

/// What can go wrong while serving a Service locally. Each message names the Service, what and
/// what to do.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(
        "Service {service}: no free address in pool {pool:?} ({in_use} in use); widen spec.local.addressPool of the class or delete a Service of this class"
    )]
    PoolExhausted {
        /// `namespace/name`.
        service: String,
        pool: String,
        in_use: usize,
    },
    #[error(
        "Service {service}: cannot listen on {address}/{protocol}: {source}; free the port or change the Service port"
    )]
    Bind {
        /// `namespace/name`.
        service: String,
        address: std::net::SocketAddr,
        protocol: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "Service {service}: cannot listen on {address}/TCP: the operator's own {owner} listener ({held}) holds that port; change the Service port, or start cloudlb with {owner} on another port or address"
    )]
    OwnListener {
        /// `namespace/name`.
        service: String,
        address: std::net::SocketAddr,
        held: std::net::SocketAddr,
        /// The flag that set the operator's listener, e.g. `--metrics-addr`.
        owner: String,
    },
    #[error(
        "Service {service}: listener {port}/{protocol} cannot be served by the local provider ({reason})"
    )]
    Unsupported {
        /// `namespace/name`.
        service: String,
        port: u16,
        protocol: &'static str,
        reason: &'static str,
    },
    #[error(
        "Service {service}: target {target} of target group {group} is not an IP address; the local provider needs IP targets (target type ip, node InternalIP)"
    )]
    InvalidTarget {
        /// `namespace/name`.
        service: String,
        group: String,
        target: String,
    },
    #[error(
        "Service {service}: listener {port} forwards to target group {group}, which is not in the model"
    )]
    MissingGroup {
        /// `namespace/name`.
        service: String,
        port: u16,
        group: String,
    },
    #[error(
        "Service {service}: the plan does not fit what is served ({reason}); it is planned again"
    )]
    PlanMismatch {
        /// `namespace/name`.
        service: String,
        reason: String,
    },
    #[error(
        "operation {op} is not one the local provider plans (it has no security groups, attributes or subnets); plan with the local provider"
    )]
    NotLocal { op: String },
    #[error("the local provider is shut down; restart the operator")]
    ShutDown,
}

impl LocalError {
    /// Conflicts leave the rest served; the others are configuration errors.
    fn is_conflict(&self) -> bool {
        matches!(
            self,
            LocalError::PoolExhausted { .. }
                | LocalError::Bind { .. }
                | LocalError::OwnListener { .. }
                | LocalError::Unsupported { .. }
                | LocalError::InvalidTarget { .. }
                | LocalError::PlanMismatch { .. }
        )
    }
}

impl From<LocalError> for ProviderError {
    fn from(e: LocalError) -> Self {
        match e {
            LocalError::ShutDown => ProviderError::Api {
                operation: "local",
                message: e.to_string(),
                throttled: false,
            },
            e if e.is_conflict() => ProviderError::Conflict(e.to_string()),
            e => ProviderError::InvalidConfig(e.to_string()),
        }
    }
}

/// Several partial failures of one apply as one [`ProviderError::Conflict`] (or the first
/// configuration error, if any).
pub(crate) fn combine(errors: Vec<LocalError>) -> Option<ProviderError> {
    if errors.is_empty() {
        return None;
    }
    if let Some(pos) = errors.iter().position(|e| !e.is_conflict()) {
        let mut errors = errors;
        return Some(errors.swap_remove(pos).into());
    }
    let msg = errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    Some(ProviderError::Conflict(msg))
}

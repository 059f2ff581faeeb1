//! SDK errors → [`ProviderError`].

use aws_sdk_elasticloadbalancingv2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use cloudlb_core::provider::ProviderError;

/// What a failed call means to us, decided by the AWS error code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    NotFound,
    Throttled,
    /// `DependencyViolation`, `ResourceInUse`: retry later.
    InUse,
    /// `Duplicate…`, `InvalidPermission.Duplicate`.
    Duplicate,
    Other,
}

impl ErrorKind {
    pub(crate) fn from_code(code: Option<&str>) -> ErrorKind {
        let Some(code) = code else {
            return ErrorKind::Other;
        };
        match code {
            "Throttling" | "ThrottlingException" | "RequestLimitExceeded" => ErrorKind::Throttled,
            "DependencyViolation" | "ResourceInUse" => ErrorKind::InUse,
            _ if code.ends_with("NotFound")
                || code.ends_with("NotFoundException")
                || code.contains(".NotFound") =>
            {
                ErrorKind::NotFound
            }
            _ if code.starts_with("Duplicate") || code.ends_with(".Duplicate") => {
                ErrorKind::Duplicate
            }
            _ => ErrorKind::Other,
        }
    }
}

/// The error of an SDK operation (ELBv2 or EC2): what [`AwsError::from_sdk`] reads.
pub(crate) trait OperationError:
    ProvideErrorMetadata + std::error::Error + Send + Sync + 'static
{
}

impl<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static> OperationError for E {}

/// A failed AWS call, classified.
#[derive(Clone, Debug)]
pub(crate) struct AwsError {
    pub operation: &'static str,
    pub kind: ErrorKind,
    pub code: Option<String>,
    pub message: String,
}

impl AwsError {
    pub(crate) fn from_sdk<E, R>(operation: &'static str, err: SdkError<E, R>) -> Self
    where
        E: OperationError,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        let code = err.code().map(str::to_string);
        let message = match (&err, err.message()) {
            (SdkError::ServiceError(_), Some(m)) => m.to_string(),
            _ => DisplayErrorContext(&err).to_string(),
        };
        AwsError {
            operation,
            kind: ErrorKind::from_code(code.as_deref()),
            code,
            message,
        }
    }

    pub(crate) fn is_not_found(&self) -> bool {
        self.kind == ErrorKind::NotFound
    }

    pub(crate) fn is_duplicate(&self) -> bool {
        self.kind == ErrorKind::Duplicate
    }

    pub(crate) fn is_in_use(&self) -> bool {
        self.kind == ErrorKind::InUse
    }

    fn describe(&self) -> String {
        match &self.code {
            Some(code) => format!("{code}: {}", self.message),
            None => self.message.clone(),
        }
    }

    /// The generic mapping.
    pub(crate) fn into_provider(self) -> ProviderError {
        ProviderError::Api {
            operation: self.operation,
            message: self.describe(),
            throttled: self.kind == ErrorKind::Throttled,
        }
    }

    /// For a change to something we observed: NotFound (and a duplicate rule: the resource
    /// changed under us) means re-observe.
    pub(crate) fn gone(self, what: &'static str) -> ProviderError {
        match self.kind {
            ErrorKind::NotFound | ErrorKind::Duplicate => self.vanished(what),
            _ => self.into_provider(),
        }
    }

    /// `what` is not there (whatever the error's kind): observe again before the next plan.
    pub(crate) fn vanished(self, what: &'static str) -> ProviderError {
        ProviderError::Gone {
            what,
            message: format!("{}: {}", self.operation, self.describe()),
        }
    }

    /// For a delete: something still depends on it, retry later.
    pub(crate) fn in_use(self, what: &'static str) -> ProviderError {
        match self.kind {
            ErrorKind::InUse => ProviderError::InUse {
                what,
                message: format!("{}: {}", self.operation, self.describe()),
            },
            _ => self.into_provider(),
        }
    }
}

/// The mappings of [`AwsError`], on the result of a call.
pub(crate) trait CallResult<T> {
    /// Not found is `None`: a delete of what is already gone (deletes are idempotent), a read
    /// of what vanished meanwhile.
    fn found(self) -> Result<Option<T>, AwsError>;

    /// See [`AwsError::gone`].
    fn gone(self, what: &'static str) -> Result<T, ProviderError>;

    /// See [`AwsError::in_use`].
    fn in_use(self, what: &'static str) -> Result<T, ProviderError>;
}

impl<T> CallResult<T> for Result<T, AwsError> {
    fn found(self) -> Result<Option<T>, AwsError> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn gone(self, what: &'static str) -> Result<T, ProviderError> {
        self.map_err(|e| e.gone(what))
    }

    fn in_use(self, what: &'static str) -> Result<T, ProviderError> {
        self.map_err(|e| e.in_use(what))
    }
}

impl From<AwsError> for ProviderError {
    fn from(e: AwsError) -> Self {
        e.into_provider()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        use ErrorKind::*;
        for (code, kind) in [
            ("LoadBalancerNotFound", NotFound),
            ("TargetGroupNotFound", NotFound),
            ("ListenerNotFound", NotFound),
            ("InvalidGroup.NotFound", NotFound),
            ("InvalidPermission.NotFound", NotFound),
            ("Throttling", Throttled),
            ("ThrottlingException", Throttled),
            ("RequestLimitExceeded", Throttled),
            ("DependencyViolation", InUse),
            ("ResourceInUse", InUse),
            ("DuplicateTargetGroupName", Duplicate),
            ("InvalidPermission.Duplicate", Duplicate),
            ("ValidationError", Other),
        ] {
            assert_eq!(ErrorKind::from_code(Some(code)), kind, "{code}");
        }
        assert_eq!(ErrorKind::from_code(None), Other);
    }

    fn error(operation: &'static str, kind: ErrorKind, code: &str, message: &str) -> AwsError {
        AwsError {
            operation,
            kind,
            code: Some(code.into()),
            message: message.into(),
        }
    }

    #[test]
    fn provider_errors() {
        use ErrorKind::*;
        let e = error("RegisterTargets", Throttled, "Throttling", "Rate exceeded");
        match e.gone("target group") {
            ProviderError::Api {
                operation,
                message,
                throttled,
            } => {
                assert_eq!(operation, "RegisterTargets");
                assert_eq!(message, "Throttling: Rate exceeded");
                assert!(throttled);
            }
            other => panic!("{other:?}"),
        }
        let e = error("ModifyTargetGroup", NotFound, "TargetGroupNotFound", "gone");
        assert_eq!(e.gone("target group").category(), "gone");
        let e = error(
            "DeleteSecurityGroup",
            InUse,
            "DependencyViolation",
            "in use",
        );
        assert_eq!(e.in_use("security group").category(), "in_use");
    }
}

//! One error type for the API, mapped once to a gRPC code and once to an
//! HTTP status, so that gRPC and the REST gateway agree by construction.

use http::StatusCode;
use tonic::Code;

/// An error a caller sees. The message is lowercase and names the field
/// when the caller's input is at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// The tenant's rate limit: retry after this many seconds.
    #[error("rate limit exceeded for this tenant; retry in {retry_after_secs}s")]
    RateLimited { retry_after_secs: u64 },
    #[error("{0}")]
    Unavailable(String),
    /// The cause is logged, not shown to the caller.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// An unknown webhook, or another tenant's: the same answer for both.
    pub fn webhook_not_found(id: &str) -> Self {
        ApiError::NotFound(format!("webhook {id} not found"))
    }

    /// Logs an unexpected failure and hides it from the caller.
    pub fn internal(context: &str, err: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %err, "{context}");
        ApiError::Internal
    }

    pub fn code(&self) -> Code {
        match self {
            ApiError::InvalidArgument { .. } => Code::InvalidArgument,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::AlreadyExists(_) => Code::AlreadyExists,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::ResourceExhausted(_) | ApiError::RateLimited { .. } => {
                Code::ResourceExhausted
            }
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::Internal => Code::Internal,
        }
    }
}

/// The metadata key (and, through the REST gateway, HTTP header) that
/// carries a retry hint in seconds.
pub const RETRY_AFTER: &str = "retry-after";

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let mut status = tonic::Status::new(e.code(), e.to_string());
        if let ApiError::RateLimited { retry_after_secs } = e {
            status
                .metadata_mut()
                .insert(RETRY_AFTER, retry_after_secs.into());
        }
        status
    }
}

/// The HTTP status for a gRPC code: the one mapping both protocols share
/// (the table of google.rpc.Code).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).expect("valid status"),
        Code::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::FailedPrecondition => StatusCode::BAD_REQUEST,
        Code::Aborted => StatusCode::CONFLICT,
        Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_names_field_and_maps_to_400() {
        let e = ApiError::invalid("webhook.url", "is required");
        assert_eq!(e.to_string(), "webhook.url: is required");
        assert_eq!(http_status(e.code()), StatusCode::BAD_REQUEST);
        let s: tonic::Status = e.into();
        assert_eq!(s.code(), Code::InvalidArgument);
    }

    #[test]
    fn rate_limited_carries_the_retry_hint() {
        let s: tonic::Status = ApiError::RateLimited {
            retry_after_secs: 7,
        }
        .into();
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(s.metadata().get(RETRY_AFTER).unwrap(), "7");
        assert!(s.message().contains("7s"), "{}", s.message());
    }

    #[test]
    fn codes_map_to_http() {
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(http_status(Code::AlreadyExists), StatusCode::CONFLICT);
        assert_eq!(http_status(Code::Unauthenticated), StatusCode::UNAUTHORIZED);
        assert_eq!(
            http_status(Code::ResourceExhausted),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            http_status(Code::Unimplemented),
            StatusCode::NOT_IMPLEMENTED
        );
    }
}

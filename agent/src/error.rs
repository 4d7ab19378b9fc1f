//! The one error type every inference path returns, and its mapping to both
//! gRPC status codes and HTTP statuses, so the two protocols always agree.

/// What kind of failure, independent of protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Unknown model or version.
    NotFound,
    /// The request is malformed or does not match the model.
    InvalidArgument,
    /// The model exists but is not ready (failed to load, shutting down).
    Unavailable,
    /// The model's queue is full.
    ResourceExhausted,
    /// The request is bigger than the configured limit.
    TooLarge,
    /// The runtime failed while running the model.
    Internal,
    /// The client stopped sending its request before it was whole.
    TimedOut,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 7] = [
        ErrorCode::NotFound,
        ErrorCode::InvalidArgument,
        ErrorCode::Unavailable,
        ErrorCode::ResourceExhausted,
        ErrorCode::TooLarge,
        ErrorCode::Internal,
        ErrorCode::TimedOut,
    ];

    pub fn grpc_code(self) -> tonic::Code {
        match self {
            ErrorCode::NotFound => tonic::Code::NotFound,
            ErrorCode::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorCode::Unavailable => tonic::Code::Unavailable,
            ErrorCode::ResourceExhausted | ErrorCode::TooLarge => tonic::Code::ResourceExhausted,
            ErrorCode::Internal => tonic::Code::Internal,
            ErrorCode::TimedOut => tonic::Code::DeadlineExceeded,
        }
    }

    pub fn http_status(self) -> axum::http::StatusCode {
        use axum::http::StatusCode;
        match self {
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::InvalidArgument => StatusCode::BAD_REQUEST,
            ErrorCode::Unavailable | ErrorCode::ResourceExhausted => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::TimedOut => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// Label value for the error counter.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::ResourceExhausted => "queue_full",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Internal => "internal",
            ErrorCode::TimedOut => "timed_out",
        }
    }
}

/// An inference failure with a message meant for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InferError {
    pub code: ErrorCode,
    pub message: String,
}

impl InferError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> InferError {
        InferError {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> InferError {
        InferError::new(ErrorCode::InvalidArgument, message)
    }

    /// A request for one of Triton's protocol extensions the agent does not
    /// have (its `what` — "input" or "output" — `name` names it).
    pub fn unsupported_extension(what: &str, name: &str, extension: &str) -> InferError {
        InferError::invalid(format!(
            "{what} '{name}' uses the {extension} extension, which this server does not support"
        ))
    }

    pub fn not_found(message: impl Into<String>) -> InferError {
        InferError::new(ErrorCode::NotFound, message)
    }

    pub fn internal(message: impl Into<String>) -> InferError {
        InferError::new(ErrorCode::Internal, message)
    }
}

impl From<InferError> for tonic::Status {
    fn from(err: InferError) -> tonic::Status {
        tonic::Status::new(err.code.grpc_code(), err.message)
    }
}

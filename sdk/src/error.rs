//! The one error type of the SDK, and the one place where a gRPC status
//! becomes an [`Error`].

use tonic::Code;

/// Why a call to the vault failed.
///
/// The status variants carry the vault's message. The vault promises that
/// its messages never contain a value, and the SDK never formats a request
/// into an error, so an `Error` is safe to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The vault did not accept the credentials (`UNAUTHENTICATED`): no API
    /// key was set, or the key is unknown or revoked.
    ///
    /// Set a valid key with [`Client::api_key`](crate::Client::api_key).
    /// Do not retry in a loop: the vault slows down addresses that keep
    /// failing authentication.
    #[error("the vault did not accept the API key: {0}")]
    Unauthenticated(String),

    /// The key is valid but its role may not do this (`PERMISSION_DENIED`),
    /// for example a purpose the role does not have.
    ///
    /// Retrying will not help; ask the vault operator for the role or grant.
    #[error("permission denied: {0}")]
    PermissionDenied(String),

    /// The vault rejected the request as malformed (`INVALID_ARGUMENT`): an
    /// empty or oversized value, a malformed token, a missing purpose, too
    /// many fields. The message names the offending field's index.
    ///
    /// Fix the request; retrying it unchanged will fail again.
    #[error("the vault rejected the request: {0}")]
    InvalidArgument(String),

    /// A token is unknown to the vault (`NOT_FOUND`): mistyped, from another
    /// vault, or its data was forgotten on a deletion request.
    ///
    /// Check where the token came from; it will not reappear.
    #[error("not found: {0}")]
    NotFound(String),

    /// A quota or size limit was reached (`RESOURCE_EXHAUSTED`): too many
    /// reveals for the role, or a request over the message size limit.
    ///
    /// Back off before retrying, or split the request into smaller batches.
    /// Bulk reveals are also reported to the vault's auditors.
    #[error("limit reached: {0}")]
    ResourceExhausted(String),

    /// The vault is not in a state to serve this request
    /// (`FAILED_PRECONDITION`), for example it is not initialised or a key
    /// version has been retired.
    ///
    /// This needs the vault operator; retrying will not help.
    #[error("the vault cannot serve this request now: {0}")]
    FailedPrecondition(String),

    /// Stored data failed its integrity check (`DATA_LOSS`).
    ///
    /// Report it to the vault operator; do not retry.
    #[error("stored data failed its integrity check: {0}")]
    DataLoss(String),

    /// The vault is unreachable, shutting down, or cannot write its audit log
    /// (`UNAVAILABLE`). Nothing was revealed.
    ///
    /// Retry later with back-off.
    #[error("the vault is unavailable: {0}")]
    Unavailable(String),

    /// The API key given to [`Client::api_key`](crate::Client::api_key)
    /// cannot be sent as a bearer token: it is empty or holds something
    /// other than visible ASCII (often a space or a trailing newline from
    /// copying it). Nothing was sent.
    ///
    /// Check how the key was read; `serve --dev` prints keys ready to paste.
    #[error(
        "the API key is empty or holds characters other than visible ASCII (a space, a newline?), so it cannot be sent"
    )]
    InvalidApiKey,

    /// No connection to the vault could be made: the URL is malformed, or
    /// nothing is listening there.
    ///
    /// Check the address and that the vault is running.
    #[error("cannot connect to the vault: {0}")]
    Transport(String),

    /// The vault's reply does not match the request (a missing token, a
    /// different number of entries, an outcome the SDK does not know).
    /// No part of such a reply is returned.
    ///
    /// The SDK and the vault probably speak different versions of the API:
    /// upgrade the SDK.
    #[error("the vault's reply cannot be interpreted: {0}")]
    Protocol(String),

    /// The vault answered with a status the SDK does not map to its own
    /// variant, such as `INTERNAL` (a fault in the vault) or
    /// `DEADLINE_EXCEEDED`.
    ///
    /// Report `INTERNAL` to the vault operator with the message.
    #[error("the vault answered {code:?}: {message}")]
    Other {
        /// The gRPC status code.
        code: Code,
        /// The vault's message.
        message: String,
    },
}

impl Error {
    /// The gRPC status code behind this error, or `None` when the error
    /// arose in the SDK ([`InvalidApiKey`](Error::InvalidApiKey),
    /// [`Transport`](Error::Transport), [`Protocol`](Error::Protocol)).
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Unauthenticated(_) => Some(Code::Unauthenticated),
            Error::PermissionDenied(_) => Some(Code::PermissionDenied),
            Error::InvalidArgument(_) => Some(Code::InvalidArgument),
            Error::NotFound(_) => Some(Code::NotFound),
            Error::ResourceExhausted(_) => Some(Code::ResourceExhausted),
            Error::FailedPrecondition(_) => Some(Code::FailedPrecondition),
            Error::DataLoss(_) => Some(Code::DataLoss),
            Error::Unavailable(_) => Some(Code::Unavailable),
            Error::Other { code, .. } => Some(*code),
            Error::InvalidApiKey | Error::Transport(_) | Error::Protocol(_) => None,
        }
    }

    /// A [`Transport`](Error::Transport) error with the whole `source()`
    /// chain, since tonic's top-level message alone ("transport error") does
    /// not say what went wrong.
    pub(crate) fn transport(error: &(dyn std::error::Error + 'static)) -> Self {
        let mut message = error.to_string();
        let mut last = message.clone();
        let mut source = error.source();
        while let Some(cause) = source {
            // hyper-util wraps an error in one with the same text; say it once.
            let text = cause.to_string();
            if text != last {
                message.push_str(": ");
                message.push_str(&text);
                last = text;
            }
            source = cause.source();
        }
        Error::Transport(message)
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        let message = status.message().to_owned();
        match status.code() {
            Code::Unauthenticated => Error::Unauthenticated(message),
            Code::PermissionDenied => Error::PermissionDenied(message),
            Code::InvalidArgument => Error::InvalidArgument(message),
            Code::NotFound => Error::NotFound(message),
            Code::ResourceExhausted => Error::ResourceExhausted(message),
            Code::FailedPrecondition => Error::FailedPrecondition(message),
            Code::DataLoss => Error::DataLoss(message),
            Code::Unavailable => Error::Unavailable(message),
            code => Error::Other { code, message },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Status;

    #[test]
    fn each_status_code_maps_to_its_variant() {
        type Variant = fn(String) -> Error;
        let cases: [(Code, Variant); 8] = [
            (Code::Unauthenticated, Error::Unauthenticated),
            (Code::PermissionDenied, Error::PermissionDenied),
            (Code::InvalidArgument, Error::InvalidArgument),
            (Code::NotFound, Error::NotFound),
            (Code::ResourceExhausted, Error::ResourceExhausted),
            (Code::FailedPrecondition, Error::FailedPrecondition),
            (Code::DataLoss, Error::DataLoss),
            (Code::Unavailable, Error::Unavailable),
        ];
        for (code, variant) in cases {
            let error = Error::from(Status::new(code, "the vault's message"));
            assert_eq!(error, variant("the vault's message".to_owned()));
            assert_eq!(error.code(), Some(code));
        }
    }

    #[test]
    fn unmapped_codes_become_other_with_the_code() {
        for code in [
            Code::Ok,
            Code::Cancelled,
            Code::Unknown,
            Code::DeadlineExceeded,
            Code::AlreadyExists,
            Code::Aborted,
            Code::OutOfRange,
            Code::Unimplemented,
            Code::Internal,
        ] {
            let error = Error::from(Status::new(code, "boom"));
            assert_eq!(
                error,
                Error::Other {
                    code,
                    message: "boom".to_owned()
                }
            );
            assert_eq!(error.code(), Some(code));
        }
    }

    #[test]
    fn sdk_side_errors_have_no_code() {
        assert_eq!(Error::InvalidApiKey.code(), None);
        assert_eq!(Error::Transport("refused".into()).code(), None);
        assert_eq!(Error::Protocol("short reply".into()).code(), None);
    }

    #[test]
    fn display_carries_the_vault_message() {
        let error = Error::from(Status::permission_denied(
            "purpose \"marketing\" is not allowed for role courier",
        ));
        assert_eq!(
            error.to_string(),
            "permission denied: purpose \"marketing\" is not allowed for role courier"
        );
        let other = Error::from(Status::internal("store failed"));
        assert_eq!(
            other.to_string(),
            "the vault answered Internal: store failed"
        );
    }

    #[test]
    fn transport_error_keeps_the_source_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("transport error")]
        struct Outer(#[source] std::io::Error);
        let error = Error::transport(&Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        )));
        assert_eq!(
            error,
            Error::Transport("transport error: connection refused".into())
        );

        // tonic's connect error: hyper-util wraps its connect error in one
        // with the same text.
        #[derive(Debug, thiserror::Error)]
        #[error("tcp connect error")]
        struct Connect(#[source] std::io::Error);
        #[derive(Debug, thiserror::Error)]
        #[error("tcp connect error")]
        struct Wrapper(#[source] Connect);
        let refused = std::io::Error::other("Connection refused");
        let error = Error::transport(&Outer(std::io::Error::other(Wrapper(Connect(refused)))));
        assert_eq!(
            error,
            Error::Transport("transport error: tcp connect error: Connection refused".into())
        );
    }
}

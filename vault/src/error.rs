//! The vault's one error type. [`crate::service`] maps it to gRPC status
//! codes in exactly one function; nothing else decides wire codes.

/// What went wrong while serving a request, split by who has to act.
///
/// Messages are shown to callers: they name fields by index and kind and
/// never carry a value, a key or an API key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VaultError {
    /// The request is malformed (bad token, empty value, unknown kind, too
    /// many fields). The caller must fix the request; retrying won't help.
    #[error("{0}")]
    InvalidArgument(String),
    /// No valid API key was presented. The caller needs a valid, unrevoked key.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is known but its role or purpose does not allow this.
    #[error("{0}")]
    PermissionDenied(String),
    /// A token the caller named is not held by this vault.
    #[error("{0}")]
    NotFound(String),
    /// The thing to create already exists (a principal name).
    #[error("{0}")]
    AlreadyExists(String),
    /// A quota or size limit was hit. The caller may retry later or smaller.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A rate or daily cap was hit; retry after the given time.
    #[error("{message}")]
    RateLimited {
        /// What was hit, and when to retry.
        message: String,
        /// Milliseconds until a retry can succeed.
        retry_after_ms: u64,
    },
    /// The vault is not in a state to do this (for example a data key at its
    /// usage cap with automatic rotation off). An operator must act.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Stored data failed its integrity check: it was altered or corrupted.
    /// Nothing was revealed. An operator must investigate.
    #[error("{0}")]
    DataLoss(String),
    /// Storage (or the audit log) is unavailable; nothing was revealed or
    /// half-written. The caller may retry.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected state inside the vault.
    #[error("{0}")]
    Internal(String),
}

impl From<crate::store::StoreError> for VaultError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match e {
            StoreError::Unavailable(m) => {
                VaultError::Unavailable(format!("storage unavailable: {m}"))
            }
            StoreError::Corrupt(m) => VaultError::DataLoss(format!("stored data is corrupt: {m}")),
            StoreError::Conflict(m) => VaultError::AlreadyExists(m),
            StoreError::Invalid(m) => VaultError::InvalidArgument(m),
            e @ StoreError::DailyCapReached { .. } => VaultError::RateLimited {
                message: format!("{e}; retry after 00:00 UTC"),
                retry_after_ms: 0,
            },
        }
    }
}

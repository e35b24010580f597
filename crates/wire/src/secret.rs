//! The cluster secret: what a router or a relay shows a cell process to be
//! let in. Never a client token, never printed.

use std::fmt;
use std::sync::Arc;

use subtle::ConstantTimeEq;

/// The fewest bytes a cluster secret may have.
pub const SECRET_BYTES_MIN: usize = 16;

#[derive(Clone)]
pub struct ClusterSecret(Arc<str>);

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("the cluster secret must be at least {SECRET_BYTES_MIN} bytes")]
    TooShort,
    #[error("the cluster secret must be printable ASCII without spaces")]
    NotPrintable,
}

impl ClusterSecret {
    pub fn new(secret: &str) -> Result<Self, SecretError> {
        if secret.len() < SECRET_BYTES_MIN {
            return Err(SecretError::TooShort);
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(SecretError::NotPrintable);
        }
        Ok(Self(secret.into()))
    }

    /// The `authorization` header value that carries it.
    pub fn header(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// Does an `authorization` header carry this secret? Constant time in the secret.
    pub fn matches_header(&self, offered: &[u8]) -> bool {
        let Some(token) = offered.strip_prefix(b"Bearer ") else { return false };
        token.ct_eq(self.0.as_bytes()).into()
    }
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_matches_only_itself_and_never_prints() {
        let s = ClusterSecret::new("0123456789abcdefXYZ").unwrap();
        assert!(s.matches_header(s.header().as_bytes()));
        assert!(!s.matches_header(b"Bearer 0123456789abcdefXY"));
        assert!(!s.matches_header(b"0123456789abcdefXYZ"));
        assert!(!format!("{s:?}").contains("0123"));
        assert!(matches!(ClusterSecret::new("short"), Err(SecretError::TooShort)));
        assert!(matches!(ClusterSecret::new("with a space in it ok"), Err(SecretError::NotPrintable)));
    }
}

//! Account, transfer and tenant ids: validated once at the edge, then cheap to clone.
//!
//! Both are `[A-Za-z0-9_.:-]{1,64}` (DESIGN.md section 1). They are backed by
//! `SmolStr`: ids up to 23 bytes live inline (no allocation, no pointer to
//! chase when a hash table compares keys), longer ones in an `Arc`. Either way
//! a clone is O(1), and one id is held by the account index, the transfer
//! record, history entries and outbox messages at once.

use std::fmt;

use smol_str::SmolStr;

/// The longest id the contract admits, in bytes (I7).
pub const ID_BYTES_MAX: usize = 64;

/// Why a string is not a valid id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("id is empty")]
    Empty,
    #[error("id is longer than {ID_BYTES_MAX} bytes")]
    TooLong,
    #[error("id may only contain A-Z a-z 0-9 _ . : -")]
    BadChar,
}

fn check_id(s: &[u8]) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > ID_BYTES_MAX {
        return Err(IdError::TooLong);
    }
    let allowed = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-');
    if !s.iter().all(allowed) {
        return Err(IdError::BadChar);
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(SmolStr);

        impl $name {
            /// Validates `s` and wraps it.
            pub fn new(s: &str) -> Result<Self, IdError> {
                check_id(s.as_bytes())?;
                Ok(Self(SmolStr::new(s)))
            }

            /// Validates raw bytes (as the codec reads them) and wraps them.
            pub fn from_bytes(bytes: &[u8]) -> Result<Self, IdError> {
                check_id(bytes)?;
                let s = std::str::from_utf8(bytes).expect("the id charset is ASCII");
                Ok(Self(SmolStr::new(s)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0.as_str())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// An account id, `[A-Za-z0-9_.:-]{1,64}`.
    AccountId
);
id_type!(
    /// A transfer id: the client-chosen idempotency key, `[A-Za-z0-9_.:-]{1,64}`.
    TransferId
);
id_type!(
    /// A tenant: who an account belongs to, and whom a client token acts for.
    TenantId
);

/// The tenant of a token or an account when none is named.
pub const TENANT_DEFAULT: &str = "default";

impl TenantId {
    /// The tenant named [`TENANT_DEFAULT`].
    pub fn default_tenant() -> Self {
        Self(SmolStr::new_static(TENANT_DEFAULT))
    }
}

impl TransferId {
    /// The time a UUIDv7 id carries (its first 48 bits, Unix milliseconds), or
    /// `None` for any other id: such an id tells when the client made it, so
    /// a retry older than the idempotency window can be recognised as one.
    pub fn uuid_v7_ms(&self) -> Option<u64> {
        let s = self.as_str().as_bytes();
        // 8-4-4-4-12 hex digits; version nibble 7; variant 10xx.
        if s.len() != 36 || [8, 13, 18, 23].iter().any(|&i| s[i] != b'-') {
            return None;
        }
        let mut hex = [0u8; 32];
        for (slot, &c) in hex.iter_mut().zip(s.iter().filter(|&&c| c != b'-')) {
            *slot = (c as char).to_digit(16)? as u8;
        }
        if s.iter().filter(|&&c| c == b'-').count() != 4 || hex[12] != 7 || !(8..=11).contains(&hex[16]) {
            return None;
        }
        Some(hex[..12].iter().fold(0u64, |ms, &d| ms << 4 | u64::from(d)))
    }
}

/// A cell's number in the shard map.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CellId(pub u32);

impl fmt::Display for CellId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_the_contract_charset() {
        assert!(AccountId::new("alice_1.eu:main-2").is_ok());
        assert!(AccountId::new(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn ids_reject_what_the_contract_forbids() {
        assert_eq!(AccountId::new(""), Err(IdError::Empty));
        assert_eq!(AccountId::new(&"a".repeat(65)), Err(IdError::TooLong));
        assert_eq!(TransferId::new("a b"), Err(IdError::BadChar));
        assert_eq!(TransferId::new("é"), Err(IdError::BadChar));
        assert_eq!(TransferId::new("a/b"), Err(IdError::BadChar));
    }

    #[test]
    fn a_uuid_v7_id_tells_its_time_and_nothing_else_does() {
        let v7 = TransferId::new("0190163d-8694-739b-aea5-966c26f8ad91").unwrap();
        assert_eq!(v7.uuid_v7_ms(), Some(0x0190_163d_8694));
        let v4 = TransferId::new("0190163d-8694-439b-aea5-966c26f8ad91").unwrap();
        assert_eq!(v4.uuid_v7_ms(), None, "version 4");
        let bad_variant = TransferId::new("0190163d-8694-739b-cea5-966c26f8ad91").unwrap();
        assert_eq!(bad_variant.uuid_v7_ms(), None);
        assert_eq!(TransferId::new("pay-1").unwrap().uuid_v7_ms(), None);
        assert_eq!(TransferId::new("0190163d-8694-739b-aea5-966c26f8ad9g").unwrap().uuid_v7_ms(), None);
    }
}

//! Bearer tokens with roles `client` and `admin`.
//!
//! Secrets are kept only as SHA-256 digests and compared in constant time
//! against every configured token, so neither timing nor a log line reveals
//! one. Only the role ever reaches a log or an error message.

use std::fmt;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use cellpay_core::{Authority, ErrorCode, TenantId};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::listener::ConnectionRef;
use crate::AppState;

/// The shortest secret accepted (I7): a guessable token is no token.
pub const SECRET_BYTES_MIN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Client,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Admin => "admin",
        }
    }
}

/// A configured token: its role, the tenant it acts for (a client token;
/// admin acts for every tenant) and the digest of its secret.
#[derive(Clone)]
pub struct Token {
    role: Role,
    tenant: TenantId,
    digest: [u8; 32],
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({}@{}, <secret>)", self.role.as_str(), self.tenant)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenError(pub String);

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TokenError {}

fn digest(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

impl Token {
    pub fn new(role: Role, secret: &str) -> Result<Self, TokenError> {
        if secret.len() < SECRET_BYTES_MIN || !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError(format!(
                "a {} token secret must be at least {SECRET_BYTES_MIN} printable ASCII characters",
                role.as_str()
            )));
        }
        Ok(Self { role, tenant: TenantId::default_tenant(), digest: digest(secret.as_bytes()) })
    }

    /// The same token acting for `tenant` (a client token's accounts are its tenant's).
    pub fn for_tenant(mut self, tenant: TenantId) -> Self {
        self.tenant = tenant;
        self
    }

    /// Parses `ROLE:SECRET` or `client@TENANT:SECRET` (no tenant: `default`);
    /// the error never repeats the secret.
    pub fn parse(spec: &str) -> Result<Self, TokenError> {
        let shape = "a token is ROLE:SECRET or client@TENANT:SECRET";
        let (who, secret) = spec.split_once(':').ok_or_else(|| TokenError(shape.into()))?;
        let (role, tenant) = match who.split_once('@') {
            Some((role, tenant)) => (role, Some(tenant)),
            None => (who, None),
        };
        let role = match role {
            "client" => Role::Client,
            "admin" => Role::Admin,
            _ => return Err(TokenError("a token's role is client or admin".into())),
        };
        let token = Self::new(role, secret)?;
        match tenant {
            None => Ok(token),
            Some(_) if role == Role::Admin => Err(TokenError("an admin token acts for every tenant: name none".into())),
            Some(t) => {
                let tenant = TenantId::new(t).map_err(|e| TokenError(format!("a token's tenant: {e}")))?;
                Ok(token.for_tenant(tenant))
            }
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// On whose behalf this token acts.
    pub fn authority(&self) -> Authority {
        match self.role {
            Role::Admin => Authority::Admin,
            Role::Client => Authority::Tenant(self.tenant.clone()),
        }
    }
}

/// The configured tokens.
#[derive(Debug, Clone)]
pub struct Auth {
    tokens: Vec<Token>,
}

impl Auth {
    pub fn new(tokens: Vec<Token>) -> Self {
        assert!(!tokens.is_empty(), "serve always has tokens (configured or generated)");
        Self { tokens }
    }

    /// The role of a presented secret. Compares against every token without
    /// stopping early.
    pub fn role_of(&self, secret: &[u8]) -> Option<Role> {
        self.caller_of(secret).map(|c| c.role)
    }

    /// Which token a presented secret is (its number and role), comparing
    /// against every token without stopping early.
    pub fn caller_of(&self, secret: &[u8]) -> Option<Caller> {
        let presented = digest(secret);
        let mut found: Option<Caller> = None;
        for (token, t) in self.tokens.iter().enumerate() {
            if bool::from(t.digest.ct_eq(&presented)) && found.is_none_or(|f| f.role < t.role) {
                found = Some(Caller { token, role: t.role });
            }
        }
        found
    }

    /// On whose behalf the caller's token acts.
    pub fn authority(&self, caller: Caller) -> Authority {
        self.tokens[caller.token].authority()
    }

    /// The role of each token, by number: what per-token rate limits are keyed on.
    pub fn token_roles(&self) -> Vec<String> {
        self.tokens.iter().map(|t| t.role.as_str().to_string()).collect()
    }
}

/// Who sent a request: the number of its token and the token's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub token: usize,
    pub role: Role,
}

/// The secret of an `Authorization: Bearer <secret>` header. The scheme is
/// case-insensitive (RFC 7235 section 2.1) and may be followed by several spaces.
pub fn bearer_secret(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer";
    let (scheme, rest) = value.split_at_checked(SCHEME.len())?;
    if !scheme.eq_ignore_ascii_case(SCHEME) || rest.first() != Some(&b' ') {
        return None;
    }
    let secret = rest.trim_ascii();
    (!secret.is_empty()).then_some(secret)
}

/// Middleware for `/v1`: a valid bearer token or 401; its role and the
/// authority it acts with go into the request's extensions. A connection that
/// completes a request with a valid token is marked: it is never closed to
/// make room at the connection cap ([`crate::listener`]).
pub async fn require_token(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let presented = request.headers().get(AUTHORIZATION).and_then(|v| bearer_secret(v.as_bytes()));
    let Some(caller) = presented.and_then(|secret| state.auth.caller_of(secret)) else {
        return ApiError::new(ErrorCode::Unauthorized, "a valid bearer token is required").into_response();
    };
    let authority = state.auth.authority(caller);
    let tenant = match &authority {
        Authority::Admin => crate::metrics::TenantLabel("(admin)".to_string()),
        Authority::Tenant(t) => crate::metrics::TenantLabel(t.to_string()),
    };
    request.extensions_mut().insert(caller.role);
    request.extensions_mut().insert(authority);
    request.extensions_mut().insert(caller);
    let connection = request.extensions().get::<ConnectionRef>().cloned();
    let mut response = next.run(request).await;
    response.extensions_mut().insert(tenant);
    if let Some(connection) = connection {
        connection.mark_authenticated();
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_found_by_secret_and_secrets_stay_out_of_errors() {
        let auth = Auth::new(vec![
            Token::parse("client:client-secret-0123456789").unwrap(),
            Token::parse("admin:admin-secret-0123456789").unwrap(),
        ]);
        assert_eq!(auth.role_of(b"client-secret-0123456789"), Some(Role::Client));
        assert_eq!(auth.role_of(b"admin-secret-0123456789"), Some(Role::Admin));
        assert_eq!(auth.role_of(b"admin-secret-012345678"), None);
        let err = Token::parse("root:short-and-secret").unwrap_err().to_string();
        assert!(!err.contains("short-and-secret"));
        let err = Token::parse("admin:tooshort").unwrap_err().to_string();
        assert!(!err.contains("tooshort"), "{err}");
        assert!(!format!("{:?}", Token::parse("admin:admin-secret-0123456789").unwrap()).contains("admin-secret"));
    }

    #[test]
    fn a_client_token_acts_for_its_tenant_and_admin_for_all() {
        let acme = Token::parse("client@acme:client-secret-0123456789").unwrap();
        assert_eq!(acme.authority(), Authority::Tenant(TenantId::new("acme").unwrap()));
        let plain = Token::parse("client:client-secret-0123456789").unwrap();
        assert_eq!(plain.authority(), Authority::Tenant(TenantId::default_tenant()));
        assert_eq!(Token::parse("admin:admin-secret-0123456789").unwrap().authority(), Authority::Admin);
        assert!(Token::parse("admin@acme:admin-secret-0123456789").is_err());
        let err = Token::parse("client@bad tenant:client-secret-0123456789").unwrap_err().to_string();
        assert!(!err.contains("client-secret"), "{err}");
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for ok in ["Bearer s3cret", "bearer s3cret", "BEARER s3cret", "bEaReR   s3cret "] {
            assert_eq!(bearer_secret(ok.as_bytes()), Some(&b"s3cret"[..]), "{ok}");
        }
        for bad in ["Bearers3cret", "Basic s3cret", "Bearer", "Bearer ", "bear s3cret", ""] {
            assert_eq!(bearer_secret(bad.as_bytes()), None, "{bad}");
        }
    }
}

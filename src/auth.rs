//! Identity: verifies the Guardian-shaped JWT of a socket's `token` parameter, and mints such tokens.
//!
//! Only the configured HMAC algorithm is accepted (a token naming another one, or `none`, is refused).
//! `exp` and `nbf` are checked with no leeway, as Guardian does; `sub` must be a decimal user id and `jti`
//! must be present. The token itself is never logged: [`AuthError`] says why it failed, nothing more.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

use crate::config::Secret;
use crate::topic::UserId;

/// Issuer and audience Guardian writes into Epochtalk tokens. Minted tokens carry them; verification
/// does not require them, as Guardian does not for sockets.
pub const GUARDIAN_ISSUER: &str = "EpochtalkServer";

/// Who an authenticated socket belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user_id: UserId,
    /// Session id (Guardian's `jti`).
    pub jti: String,
    /// Unix seconds after which the token is no longer valid.
    pub expires_at: u64,
}

/// Why a token was refused. Each maps to an HTTP 403 with an empty body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token is malformed")]
    Malformed,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token uses an algorithm that is not accepted")]
    WrongAlgorithm,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token has no `{0}` claim")]
    MissingClaim(&'static str),
    #[error("token subject is not a user id")]
    BadSubject,
    #[error("token was revoked")]
    Revoked,
}

enum_with_all! {
    /// [`AuthError`] without its details: the metric label and log field of a refused token.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum AuthFailure {
        Malformed,
        BadSignature,
        WrongAlgorithm,
        Expired,
        NotYetValid,
        MissingClaim,
        BadSubject,
        Revoked,
    }
}

impl AuthFailure {
    pub const fn label(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::BadSignature => "bad_signature",
            Self::WrongAlgorithm => "wrong_algorithm",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::MissingClaim => "missing_claim",
            Self::BadSubject => "bad_subject",
            Self::Revoked => "revoked",
        }
    }
}

impl AuthError {
    pub const fn failure(self) -> AuthFailure {
        match self {
            Self::Malformed => AuthFailure::Malformed,
            Self::BadSignature => AuthFailure::BadSignature,
            Self::WrongAlgorithm => AuthFailure::WrongAlgorithm,
            Self::Expired => AuthFailure::Expired,
            Self::NotYetValid => AuthFailure::NotYetValid,
            Self::MissingClaim(_) => AuthFailure::MissingClaim,
            Self::BadSubject => AuthFailure::BadSubject,
            Self::Revoked => AuthFailure::Revoked,
        }
    }

    /// Metric label and log field.
    pub const fn label(self) -> &'static str {
        self.failure().label()
    }
}

#[derive(Debug, Deserialize)]
struct VerifiedClaims {
    sub: Option<String>,
    jti: Option<String>,
    exp: u64,
}

#[derive(Debug, Serialize)]
struct MintedClaims<'a> {
    aud: &'a str,
    exp: u64,
    iat: u64,
    iss: &'a str,
    jti: &'a str,
    nbf: u64,
    sub: String,
    typ: &'a str,
}

/// Verifies and mints tokens with one secret and one algorithm.
pub struct Authenticator {
    algorithm: Algorithm,
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
    /// For tokens named in `logout` events: the signature counts, the time does not.
    any_time: Validation,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn new(secret: &Secret, algorithm: Algorithm) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // Guardian does not check the audience of socket tokens.
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp"]);
        let mut any_time = validation.clone();
        any_time.validate_exp = false;
        any_time.validate_nbf = false;
        Self {
            algorithm,
            decoding: DecodingKey::from_secret(secret.expose().as_bytes()),
            encoding: EncodingKey::from_secret(secret.expose().as_bytes()),
            validation,
            any_time,
        }
    }

    /// Identifies a token signed with this secret, expired or not (to revoke it).
    ///
    /// # Errors
    /// [`AuthError`] when the token is not one of this secret and algorithm.
    pub fn identify(&self, token: &str) -> Result<Principal, AuthError> {
        self.check(token, &self.any_time)
    }

    /// # Errors
    /// [`AuthError`] when the token is not a valid, current token of this secret and algorithm.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        self.check(token, &self.validation)
    }

    fn check(&self, token: &str, validation: &Validation) -> Result<Principal, AuthError> {
        let data = jsonwebtoken::decode::<VerifiedClaims>(token, &self.decoding, validation)
            .map_err(|err| match err.kind() {
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    AuthError::WrongAlgorithm
                }
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::MissingRequiredClaim(_) => AuthError::MissingClaim("exp"),
                _ => AuthError::Malformed,
            })?;
        let claims = data.claims;
        let sub = claims.sub.ok_or(AuthError::MissingClaim("sub"))?;
        let user_id = UserId::parse(&sub).ok_or(AuthError::BadSubject)?;
        let jti = claims
            .jti
            .filter(|jti| !jti.is_empty())
            .ok_or(AuthError::MissingClaim("jti"))?;
        Ok(Principal {
            user_id,
            jti,
            expires_at: claims.exp,
        })
    }

    /// A token shaped like the ones Guardian issues for Epochtalk sessions.
    pub fn mint(&self, user_id: UserId, ttl_secs: u64, jti: &str) -> String {
        let now = unix_now();
        let claims = MintedClaims {
            aud: GUARDIAN_ISSUER,
            exp: now + ttl_secs,
            iat: now,
            iss: GUARDIAN_ISSUER,
            jti,
            nbf: now.saturating_sub(1),
            sub: user_id.to_string(),
            typ: "access",
        };
        // HMAC signing of serialisable claims cannot fail.
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, &self.encoding)
            .expect("HMAC signing succeeds")
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authenticator() -> Authenticator {
        Authenticator::new(&Secret::new("test secret"), Algorithm::HS512)
    }

    fn sign(claims: &serde_json::Value, algorithm: Algorithm, secret: &str) -> String {
        jsonwebtoken::encode(
            &Header::new(algorithm),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn minted_tokens_verify() {
        let auth = authenticator();
        let token = auth.mint(UserId::new(42), 60, "a-jti");
        let principal = auth.verify(&token).unwrap();
        assert_eq!(principal.user_id, UserId::new(42));
        assert_eq!(principal.jti, "a-jti");
    }

    #[test]
    fn refuses_bad_tokens() {
        let auth = authenticator();
        let now = unix_now();
        let good = serde_json::json!({"sub": "7", "jti": "j", "exp": now + 60});
        let cases = [
            (
                sign(&good, Algorithm::HS512, "other"),
                AuthError::BadSignature,
            ),
            (
                sign(&good, Algorithm::HS256, "test secret"),
                AuthError::WrongAlgorithm,
            ),
            (
                sign(
                    &serde_json::json!({"sub": "7", "jti": "j", "exp": now - 1}),
                    Algorithm::HS512,
                    "test secret",
                ),
                AuthError::Expired,
            ),
            (
                sign(
                    &serde_json::json!({"sub": "7", "jti": "j", "exp": now + 60, "nbf": now + 30}),
                    Algorithm::HS512,
                    "test secret",
                ),
                AuthError::NotYetValid,
            ),
            (
                sign(
                    &serde_json::json!({"sub": "7", "exp": now + 60}),
                    Algorithm::HS512,
                    "test secret",
                ),
                AuthError::MissingClaim("jti"),
            ),
            (
                sign(
                    &serde_json::json!({"sub": "x7", "jti": "j", "exp": now + 60}),
                    Algorithm::HS512,
                    "test secret",
                ),
                AuthError::BadSubject,
            ),
            ("not.a.token".to_owned(), AuthError::Malformed),
            (String::new(), AuthError::Malformed),
        ];
        for (token, expected) in cases {
            assert_eq!(auth.verify(&token), Err(expected));
        }
    }

    #[test]
    fn identifies_expired_tokens_of_this_secret_only() {
        let auth = authenticator();
        let expired = sign(
            &serde_json::json!({"sub": "7", "jti": "j", "exp": unix_now() - 10}),
            Algorithm::HS512,
            "test secret",
        );
        assert_eq!(auth.verify(&expired), Err(AuthError::Expired));
        assert_eq!(auth.identify(&expired).unwrap().jti, "j");
        let foreign = sign(
            &serde_json::json!({"sub": "7", "jti": "j", "exp": 1}),
            Algorithm::HS512,
            "x",
        );
        assert_eq!(auth.identify(&foreign), Err(AuthError::BadSignature));
    }

    #[test]
    fn refuses_alg_none() {
        // {"alg":"none","typ":"JWT"} . {"sub":"7","jti":"j","exp":9999999999} . (no signature)
        let token = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiI3IiwianRpIjoiaiIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(authenticator().verify(token).is_err());
    }
}

//! The three NATS JWTs of an auth callout: the server's authorization
//! request (which we read and check), and the authorization response with
//! the user it carries (which we sign with the issuer account's nkey).
//!
//! A NATS JWT is `header.claims.signature`, each part base64url without
//! padding; the header says `ed25519-nkey`, and the signature is the
//! issuer's ed25519 over `header.claims`. Only the fields Ferry reads or
//! writes are modelled; the server ignores absent optional ones.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

const HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;

/// Why a token was not read.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    /// Not three parts of base64url JSON, or the header is not NATS's.
    #[error("not a NATS JWT: {0}")]
    Malformed(String),
    /// The signature is not the issuer's.
    #[error("the token is not signed by its issuer {0}")]
    BadSignature(String),
    /// The claims are not of the kind expected.
    #[error("expected a {expected} token, got {got:?}")]
    WrongType {
        /// The kind wanted.
        expected: &'static str,
        /// The kind found.
        got: String,
    },
    /// Signing failed.
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// The registered claims around every NATS payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims<T> {
    /// Who it is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// Unix seconds after which it is void.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    /// When it was issued.
    #[serde(default)]
    pub iat: i64,
    /// The signer's public nkey.
    pub iss: String,
    /// A unique id.
    #[serde(default)]
    pub jti: String,
    /// A name for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Whom it is about.
    #[serde(default)]
    pub sub: String,
    /// NATS's own part.
    pub nats: T,
}

/// What the server asks about a connecting client.
#[derive(Debug, Clone, Deserialize)]
pub struct AuthorizationRequest {
    /// The server asking.
    pub server_id: ServerId,
    /// The one-use user key the server made for this connection: the
    /// user we answer with must be this key.
    pub user_nkey: String,
    /// The client's connection.
    #[serde(default)]
    pub client_info: ClientInfo,
    /// What the client sent at CONNECT.
    #[serde(default)]
    pub connect_opts: ConnectOpts,
    /// The client's TLS certificates, when it showed any.
    #[serde(default)]
    pub client_tls: Option<ClientTls>,
    /// `authorization_request`.
    #[serde(rename = "type", default)]
    pub kind: String,
}

/// The server in a request.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ServerId {
    /// Its public nkey: the response's audience.
    pub id: String,
    /// Its name.
    #[serde(default)]
    pub name: String,
}

/// The connection in a request.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ClientInfo {
    /// The client's address.
    #[serde(default)]
    pub host: String,
    /// `nats`, `mqtt`, `websocket`, ...
    #[serde(rename = "type", default)]
    pub kind: String,
    /// An MQTT client's client id.
    #[serde(default)]
    pub mqtt_id: Option<String>,
}

/// The CONNECT options in a request.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ConnectOpts {
    /// User name.
    #[serde(default)]
    pub user: Option<String>,
    /// Password.
    #[serde(default)]
    pub pass: Option<String>,
}

/// The client's TLS in a request.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ClientTls {
    /// The chains the server verified its certificate by (against the
    /// fleet CA), each leaf first (PEM). Only a verified certificate
    /// counts: anyone can make one with a copied serial.
    #[serde(default)]
    pub verified_chains: Vec<Vec<String>>,
}

/// Our answer: a user, or an error.
#[derive(Debug, Clone, Serialize)]
pub struct AuthorizationResponse {
    /// The user JWT, when admitted.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub jwt: String,
    /// Why not, when refused.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// `authorization_response`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// 2.
    pub version: u8,
}

/// A user's permissions.
#[derive(Debug, Clone, Serialize)]
pub struct User {
    /// What it may publish.
    #[serde(rename = "pub")]
    pub publish: Permission,
    /// What it may subscribe to.
    #[serde(rename = "sub")]
    pub subscribe: Permission,
    /// Limits: -1 is none.
    pub subs: i64,
    /// Bytes: -1 is none.
    pub data: i64,
    /// Largest message: -1 is the server's.
    pub payload: i64,
    /// `user`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// 2.
    pub version: u8,
}

/// Subjects allowed and denied. NATS reads an empty allow list as
/// "everything", so a side a user may not use at all is a deny of `>`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Permission {
    /// Subjects allowed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Subjects denied.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

/// Reads a token signed by the key it names as issuer.
pub fn decode<T: DeserializeOwned>(token: &str) -> Result<Claims<T>, JwtError> {
    let malformed = |why: &str| JwtError::Malformed(why.to_owned());
    let (signed, signature) = token
        .trim()
        .rsplit_once('.')
        .ok_or_else(|| malformed("no signature"))?;
    let (header, claims) = signed
        .split_once('.')
        .ok_or_else(|| malformed("no claims"))?;
    let part = |p: &str| {
        URL_SAFE_NO_PAD
            .decode(p)
            .map_err(|e| JwtError::Malformed(e.to_string()))
    };
    let header: serde_json::Value =
        serde_json::from_slice(&part(header)?).map_err(|e| JwtError::Malformed(e.to_string()))?;
    if header["alg"] != "ed25519-nkey" {
        return Err(malformed("not signed with an nkey"));
    }
    let claims: Claims<T> =
        serde_json::from_slice(&part(claims)?).map_err(|e| JwtError::Malformed(e.to_string()))?;
    let issuer = nkeys::KeyPair::from_public_key(&claims.iss)
        .map_err(|_| JwtError::BadSignature(claims.iss.clone()))?;
    issuer
        .verify(signed.as_bytes(), &part(signature)?)
        .map_err(|_| JwtError::BadSignature(claims.iss.clone()))?;
    Ok(claims)
}

/// Signs `claims` with `key` (which becomes the issuer), stamping the
/// issue time and a fresh id.
pub fn encode<T: Serialize>(
    mut claims: Claims<T>,
    key: &nkeys::KeyPair,
) -> Result<String, JwtError> {
    claims.iss = key.public_key();
    claims.iat = crate::serve::store::unix_now();
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| JwtError::Sign(e.to_string()))?;
    claims.jti = hex::encode_upper(id);
    let body = serde_json::to_vec(&claims).map_err(|e| JwtError::Sign(e.to_string()))?;
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(HEADER),
        URL_SAFE_NO_PAD.encode(body)
    );
    let signature = key
        .sign(signed.as_bytes())
        .map_err(|e| JwtError::Sign(e.to_string()))?;
    Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature)))
}

/// Reads the server's request, checking its signature and kind.
pub fn read_request(token: &str) -> Result<Claims<AuthorizationRequest>, JwtError> {
    let claims: Claims<AuthorizationRequest> = decode(token)?;
    if claims.nats.kind != "authorization_request" {
        return Err(JwtError::WrongType {
            expected: "authorization_request",
            got: claims.nats.kind,
        });
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_token_reads_back_and_a_changed_one_does_not() {
        let key = nkeys::KeyPair::new_account();
        let claims = Claims {
            aud: Some("FLEET".into()),
            exp: None,
            iat: 0,
            iss: String::new(),
            jti: String::new(),
            name: Some("gw-1".into()),
            sub: "U".into(),
            nats: serde_json::json!({ "type": "user", "version": 2 }),
        };
        let token = encode(claims, &key).unwrap();
        let read: Claims<serde_json::Value> = decode(&token).unwrap();
        assert_eq!(read.iss, key.public_key());
        assert_eq!(read.name.as_deref(), Some("gw-1"));
        // Another body under the same signature.
        let mut parts: Vec<&str> = token.split('.').collect();
        let other = URL_SAFE_NO_PAD.encode(
            serde_json::json!({ "iss": key.public_key(), "name": "gw-2", "nats": {} }).to_string(),
        );
        parts[1] = &other;
        let forged = parts.join(".");
        assert!(matches!(
            decode::<serde_json::Value>(&forged),
            Err(JwtError::BadSignature(_))
        ));
        // Not a request.
        assert!(matches!(
            read_request(&token),
            Err(JwtError::WrongType { .. }) | Err(JwtError::Malformed(_))
        ));
        assert!(matches!(
            decode::<serde_json::Value>("a.b"),
            Err(JwtError::Malformed(_))
        ));
    }
}

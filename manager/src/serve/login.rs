//! Who may connect to the broker, whichever broker it is: the one rule the
//! embedded broker's hook ([`super::broker`]) and a NATS cluster's auth
//! callout ([`super::nats`]) both apply.

use std::sync::Arc;

use super::broker::ManagerLogin;
use super::store::{Store, unix_now, verify_password};

/// What a connection is let in as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Login {
    /// The manager's own client: every Ferry topic.
    Manager,
    /// A device: its own topics only (the user name is its id).
    Device,
    /// Neither; why, for the manager's log.
    Refused(Refusal),
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The manager's name with a wrong password or certificate.
    NotTheManager,
    /// A client id that is not the user name: no one takes over another
    /// device's session.
    ClientIdNotUser,
    /// Over TLS, no certificate, or one the store no longer stands behind
    /// for this device (revoked, expired, another device's).
    Certificate,
    /// A wrong password, or no such device.
    Password,
    /// The store could not be read.
    Store,
}

/// The rule, with what it needs to know.
pub struct Logins {
    /// Devices, their passwords and certificates.
    pub store: Arc<Store>,
    /// The manager's own credentials.
    pub manager: ManagerLogin,
    /// Over TLS, the serial of the manager's client certificate: then
    /// devices prove themselves by certificate, never by password.
    pub manager_serial: Option<String>,
}

impl Logins {
    /// Whether these are the manager's user name and password.
    pub fn is_manager(&self, user: &str, password: &str) -> bool {
        use crate::serve::api::auth::constant_time_eq;
        user == self.manager.username
            && constant_time_eq(password.as_bytes(), self.manager.password.as_bytes())
    }

    /// Decides a connection by its user name, password, client id and,
    /// over TLS, its certificate's serial.
    pub async fn decide(
        &self,
        user: &str,
        password: &str,
        client_id: &str,
        serial: Option<&str>,
    ) -> Login {
        if user == self.manager.username {
            let certificate_ok = match &self.manager_serial {
                Some(own) => serial == Some(own.as_str()),
                None => true,
            };
            return if certificate_ok && password == self.manager.password {
                Login::Manager
            } else {
                Login::Refused(Refusal::NotTheManager)
            };
        }
        if client_id != user {
            return Login::Refused(Refusal::ClientIdNotUser);
        }
        if self.manager_serial.is_some() {
            // TLS: the certificate decides, and it must be this device's.
            let Some(serial) = serial else {
                return Login::Refused(Refusal::Certificate);
            };
            return match self.store.certificate_device(serial, unix_now()).await {
                Ok(Some(device)) if device == user => Login::Device,
                Ok(_) => {
                    tracing::warn!(device = %user, %serial, "certificate refused: revoked, or another device's");
                    Login::Refused(Refusal::Certificate)
                }
                Err(e) => {
                    tracing::error!("certificate lookup failed: {e}");
                    Login::Refused(Refusal::Store)
                }
            };
        }
        match self.store.password_hash_of(user).await {
            Ok(Some(stored)) if verify_password(&stored, password) => Login::Device,
            Ok(_) => Login::Refused(Refusal::Password),
            Err(e) => {
                tracing::error!("device lookup failed: {e}");
                Login::Refused(Refusal::Store)
            }
        }
    }
}

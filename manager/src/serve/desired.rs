//! Desired state: what one device should run, as the manager publishes it.
//!
//! A device's desired state lists one release per service. Deploying a
//! release replaces that service's entry and keeps the others; the label
//! (`deploy-N` or `rollout-N`) comes back in the device's results, which is
//! how its progress is tracked.

use ferry_protocol::Envelope;
use ferry_protocol::messages::{Desired, DesiredRelease, MESSAGE_SCHEMA, Message};
use ferry_protocol::root::SignedRoot;

use super::store::{Store, StoreError};

/// The label of deployment `id`'s desired states.
pub fn deployment_label(id: i64) -> String {
    format!("deploy-{id}")
}

/// The deployment a label names (`deploy-<id>`).
pub fn deployment_id(label: Option<&str>) -> Option<i64> {
    label?.strip_prefix("deploy-")?.parse().ok()
}

/// The device's desired state with `envelope` in place of its service's
/// current entry, encoded for the `desired` topic.
pub async fn with_release(
    store: &Store,
    device: &str,
    envelope: &Envelope,
    artifact_url: &str,
    label: &str,
) -> Result<String, StoreError> {
    let service = envelope
        .unverified_manifest()
        .map(|m| m.service.as_str().to_owned())
        .unwrap_or_default();
    let mut releases: Vec<DesiredRelease> = match store.desired(device).await? {
        Some(text) => Desired::decode(text.as_bytes())
            .map(|d| d.releases)
            .unwrap_or_default(),
        None => Vec::new(),
    };
    releases.retain(|r| {
        r.envelope
            .unverified_manifest()
            .map(|m| m.service.as_str() != service)
            .unwrap_or(false)
    });
    releases.push(DesiredRelease {
        envelope: envelope.clone(),
        artifact_url: Some(artifact_url.to_owned()),
    });
    let message = Desired {
        schema: MESSAGE_SCHEMA,
        rollout: Some(label.to_owned()),
        releases,
        roots: roots(store).await?,
    };
    Ok(String::from_utf8_lossy(&message.encode()).into_owned())
}

/// The trust roots published, oldest first: every desired state carries
/// the chain, so a device walks from whatever version it holds.
pub async fn roots(store: &Store) -> Result<Vec<SignedRoot>, StoreError> {
    store
        .roots()
        .await?
        .iter()
        .map(|text| {
            SignedRoot::from_json(text.as_bytes())
                .map_err(|e| StoreError::Invalid(format!("a stored trust root: {e}")))
        })
        .collect()
}

/// `payload` (a desired state) with `roots` in place of the chain it had;
/// `None` when it does not read.
pub fn with_roots(payload: &str, roots: &[SignedRoot]) -> Option<String> {
    let mut desired = Desired::decode(payload.as_bytes()).ok()?;
    desired.roots = roots.to_vec();
    Some(String::from_utf8_lossy(&desired.encode()).into_owned())
}

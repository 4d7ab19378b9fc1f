//! Devices that list a model version with bytes other than the registry's:
//! its `model.onnx` was changed on the device after activation (an edit,
//! tampering, disk corruption), or it was put there by hand. The operator
//! API marks such versions (`ModelVersionRef.expected_sha256`) and a
//! session logs a warning when a device starts listing one, so neither
//! `devices get` nor an operator counts the device as serving the
//! released model.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use edgefleet_proto::edgefleet::v1 as pb;

use crate::store::{DeviceModel, Store, StoreError};

/// The registry's digest of each listed (name, version) it knows; each
/// distinct one is looked up once.
async fn registry_digests(
    store: &dyn Store,
    listed: BTreeSet<(String, u64)>,
) -> Result<BTreeMap<(String, u64), String>, StoreError> {
    let mut digests = BTreeMap::new();
    for (name, version) in listed {
        if let Some(model) = store.model(&name, Some(version)).await? {
            digests.insert((name, version), model.sha256);
        }
    }
    Ok(digests)
}

/// The registry's digest if `sha256` is another (an empty `sha256`, a file
/// the device could not read, says nothing; nor does a version the
/// registry does not know).
fn mismatch<'d>(
    digests: &'d BTreeMap<(String, u64), String>,
    name: &str,
    version: u64,
    sha256: &str,
) -> Option<&'d String> {
    digests
        .get(&(name.to_string(), version))
        .filter(|expected| !sha256.is_empty() && **expected != sha256)
}

/// Sets `expected_sha256` on each model version of `devices` whose digest
/// is not the registry's for that version.
pub async fn mark_mismatches(
    store: &dyn Store,
    devices: &mut [pb::Device],
) -> Result<(), StoreError> {
    let listed = devices
        .iter()
        .flat_map(|d| d.models.iter().map(|m| (m.name.clone(), m.version)))
        .collect();
    let digests = registry_digests(store, listed).await?;
    for model in devices.iter_mut().flat_map(|d| d.models.iter_mut()) {
        if let Some(expected) = mismatch(&digests, &model.name, model.version, &model.sha256) {
            model.expected_sha256 = expected.clone();
        }
    }
    Ok(())
}

/// The mismatches a replica has warned about: per (device, model, version)
/// the digest the device listed. A warning is logged once per change, not
/// again for each Hello of a device that reconnects listing the same.
#[derive(Debug, Default)]
pub struct DriftWarnings {
    warned: Mutex<HashMap<(String, String, u64), String>>,
}

impl DriftWarnings {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String, u64), String>> {
        self.warned.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Logs a warning for each version of `listed` (a device's Hello or
    /// ModelsChanged) with a digest other than the registry's, unless this
    /// replica warned about that digest of it already. Only versions that
    /// are not in `previous` (what the device listed before) with the same
    /// digest are looked up. A store error is logged, never fails the
    /// session.
    pub async fn check(
        &self,
        store: &dyn Store,
        device_id: &str,
        previous: &[DeviceModel],
        listed: &[DeviceModel],
    ) {
        let key = |m: &DeviceModel| (device_id.to_string(), m.name.clone(), m.version);
        let new: Vec<&DeviceModel> = {
            let warned = self.lock();
            listed
                .iter()
                .filter(|m| {
                    !m.sha256.is_empty()
                        && warned.get(&key(m)) != Some(&m.sha256)
                        && !previous.iter().any(|p| {
                            p.name == m.name && p.version == m.version && p.sha256 == m.sha256
                        })
                })
                .collect()
        };
        if new.is_empty() {
            return;
        }
        let wanted = new.iter().map(|m| (m.name.clone(), m.version)).collect();
        let digests = match registry_digests(store, wanted).await {
            Ok(digests) => digests,
            Err(err) => {
                tracing::warn!(device = %device_id, error = %err, "cannot compare the device's model digests with the registry's");
                return;
            }
        };
        let mut warned = self.lock();
        for model in new {
            let Some(expected) = mismatch(&digests, &model.name, model.version, &model.sha256)
            else {
                // Back to the registry's bytes (or unknown to it): a later
                // change is warned about again.
                warned.remove(&key(model));
                continue;
            };
            if warned.insert(key(model), model.sha256.clone()).as_ref() == Some(&model.sha256) {
                continue;
            }
            tracing::warn!(
                device = %device_id,
                model = %model.name,
                version = model.version,
                state = %model.state,
                expected = %expected,
                found = %model.sha256,
                "the device lists a model version with bytes other than the registry's"
            );
        }
    }
}

//! What `/healthz` reports: per service, how many workers there should be,
//! how many are consuming, their process ids and how often they were
//! restarted.

use std::collections::BTreeMap;
use std::sync::{PoisonError, RwLock};

/// One service's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServiceHealth {
    /// Workers configured.
    pub workers: u16,
    /// Workers consuming now.
    pub consuming: u16,
    /// The process ids of the workers running now.
    pub pids: Vec<u32>,
    /// Restarts after a worker died or was recycled.
    pub restarts: u32,
}

/// Every service's state.
#[derive(Debug, Default)]
pub struct Health {
    services: RwLock<BTreeMap<String, ServiceHealth>>,
}

impl Health {
    /// Replaces one service's state.
    pub fn set(&self, service: &str, health: ServiceHealth) {
        self.services
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(service.to_owned(), health);
    }

    /// Forgets a service.
    pub fn remove(&self, service: &str) {
        self.services
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(service);
    }

    /// Updates one service's state.
    pub fn update(&self, service: &str, f: impl FnOnce(&mut ServiceHealth)) {
        let mut services = self
            .services
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        f(services.entry(service.to_owned()).or_default());
    }

    /// Each service and its state.
    pub fn snapshot(&self) -> BTreeMap<String, ServiceHealth> {
        self.services
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// True when there is at least one service and each has a consuming
    /// worker.
    pub fn all_consuming(&self) -> bool {
        let s = self.snapshot();
        !s.is_empty() && s.values().all(|h| h.consuming > 0)
    }

    /// The `/healthz` body.
    pub fn to_json(&self) -> serde_json::Value {
        let services: serde_json::Map<String, serde_json::Value> = self
            .snapshot()
            .into_iter()
            .map(|(name, h)| {
                let status = if h.consuming > 0 {
                    "consuming"
                } else {
                    "not consuming"
                };
                let mut v = serde_json::to_value(&h).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("status".to_owned(), status.into());
                }
                (name, v)
            })
            .collect();
        serde_json::json!({ "services": services })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_only_when_every_service_has_a_consuming_worker() {
        let h = Health::default();
        assert!(!h.all_consuming(), "no service is not healthy");
        h.set(
            "simple",
            ServiceHealth {
                workers: 2,
                consuming: 1,
                pids: vec![10, 11],
                restarts: 0,
            },
        );
        h.update("demo", |d| d.workers = 1);
        assert!(!h.all_consuming());
        h.update("demo", |d| d.consuming = 1);
        assert!(h.all_consuming());
        let j = h.to_json();
        assert_eq!(j["services"]["simple"]["status"], "consuming");
        assert_eq!(j["services"]["simple"]["pids"], serde_json::json!([10, 11]));
        assert_eq!(j["services"]["demo"]["consuming"], 1);
    }
}

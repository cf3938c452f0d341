//! events: publishes Kubernetes Events (events.k8s.io/v1) about ModelDeployments.
//!
//! A repeat of the same Event (same object, type, reason and action) within
//! [`SERIES_TTL`] becomes a series on the first one (count and last time) instead of a
//! new object, as kubectl and the API conventions expect. To know what it published,
//! the publisher keeps one small entry per Event (a hash, the Event's name and the
//! series state), not a copy of the Event: with a thousand ModelDeployments each
//! announcing its objects, copies of whole Events were the operator's largest memory.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};

pub use crate::status::EventSpec;

/// How long a published Event can grow into a series.
pub const SERIES_TTL: SignedDuration = SignedDuration::from_mins(6);

#[derive(Debug)]
struct Published {
    name: String,
    count: i32,
    last: Timestamp,
}

/// Publishes Events as one reporting controller instance.
pub struct Publisher {
    client: Client,
    controller: String,
    instance: String,
    published: Mutex<Cache>,
}

#[derive(Debug, Default)]
struct Cache {
    entries: HashMap<u64, Published>,
    last_sweep: Option<Timestamp>,
}

impl Cache {
    /// Forgets Events too old to grow a series; at most once a minute, so publishing
    /// stays O(1).
    fn sweep(&mut self, now: Timestamp) {
        if self
            .last_sweep
            .is_some_and(|t| now.duration_since(t) < SignedDuration::from_mins(1))
        {
            return;
        }
        self.entries
            .retain(|_, p| now.duration_since(p.last) < SERIES_TTL);
        self.last_sweep = Some(now);
    }
}

/// What to send for one publish: a new Event, or a series update of an earlier one.
#[derive(Debug, PartialEq)]
enum Send {
    Create { name: String },
    Series { name: String, count: i32 },
}

impl Publisher {
    pub fn new(client: Client, controller: &str, instance: &str) -> Self {
        Self {
            client,
            controller: controller.into(),
            instance: instance.into(),
            published: Mutex::default(),
        }
    }

    fn key(&self, ev: &EventSpec, regarding: &ObjectReference) -> u64 {
        let mut h = DefaultHasher::new();
        (ev.warning, &ev.reason, &ev.action).hash(&mut h);
        (
            &regarding.uid,
            &regarding.namespace,
            &regarding.name,
            &regarding.kind,
        )
            .hash(&mut h);
        h.finish()
    }

    /// Decides, and records, what publishing `ev` at `now` sends.
    fn plan(&self, key: u64, regarding: &ObjectReference, now: Timestamp) -> Send {
        let mut cache = self.published.lock().expect("not poisoned");
        cache.sweep(now);
        match cache.entries.get_mut(&key) {
            Some(p) if now.duration_since(p.last) < SERIES_TTL => {
                p.count += 1;
                p.last = now;
                Send::Series {
                    name: p.name.clone(),
                    count: p.count,
                }
            }
            _ => {
                let name = format!(
                    "{}.{:x}",
                    regarding.name.as_deref().unwrap_or(&self.controller),
                    now.as_nanosecond()
                );
                cache.entries.insert(
                    key,
                    Published {
                        name: name.clone(),
                        count: 1,
                        last: now,
                    },
                );
                Send::Create { name }
            }
        }
    }

    /// Publishes `ev` about `regarding` (in its namespace).
    pub async fn publish(
        &self,
        ev: &EventSpec,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let key = self.key(ev, regarding);
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), namespace);
        let result = match self.plan(key, regarding, now) {
            Send::Create { name } => {
                let event = self.event(ev, regarding, name, now);
                api.create(&PostParams::default(), &event).await.map(drop)
            }
            Send::Series { name, count } => {
                let patch = serde_json::json!({
                    "series": EventSeries { count, last_observed_time: MicroTime(now) }
                });
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(drop)
            }
        };
        if result.is_err() {
            // The next publish starts afresh rather than patching an Event that may not exist.
            self.published
                .lock()
                .expect("not poisoned")
                .entries
                .remove(&key);
        }
        result
    }

    fn event(
        &self,
        ev: &EventSpec,
        regarding: &ObjectReference,
        name: String,
        now: Timestamp,
    ) -> K8sEvent {
        K8sEvent {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: regarding.namespace.clone(),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(if ev.warning { "Warning" } else { "Normal" }.into()),
            reason: Some(ev.reason.clone()),
            action: Some(ev.action.clone()),
            note: Some(ev.message.chars().take(1000).collect()),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        }
    }

    /// Events remembered for series.
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.published.lock().expect("not poisoned").entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publisher() -> Publisher {
        // A client that is never called: plan() is pure over the cache.
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        Publisher::new(
            Client::try_from(config).unwrap(),
            "kestrel-operator",
            "op-1",
        )
    }

    fn md_ref(name: &str) -> ObjectReference {
        ObjectReference {
            kind: Some("ModelDeployment".into()),
            namespace: Some("ns".into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            ..Default::default()
        }
    }

    fn scaled() -> EventSpec {
        EventSpec {
            warning: false,
            reason: "Scaled".into(),
            action: "Scale2To4".into(),
            message: "scaled from 2 to 4".into(),
        }
    }

    #[tokio::test]
    async fn a_repeat_within_the_ttl_grows_a_series_on_the_first_event() {
        let p = publisher();
        let r = md_ref("m");
        let t0 = Timestamp::from_second(1_800_000_000).unwrap();
        let key = p.key(&scaled(), &r);
        let Send::Create { name } = p.plan(key, &r, t0) else {
            panic!("first publish creates")
        };
        assert!(name.starts_with("m."), "{name}");
        assert_eq!(
            p.plan(key, &r, t0 + SignedDuration::from_secs(30)),
            Send::Series { name, count: 2 }
        );
    }

    #[tokio::test]
    async fn other_objects_reasons_or_late_repeats_create_new_events() {
        let p = publisher();
        let t0 = Timestamp::from_second(1_800_000_000).unwrap();
        let (a, b) = (md_ref("a"), md_ref("b"));
        let k = p.key(&scaled(), &a);
        assert!(matches!(p.plan(k, &a, t0), Send::Create { .. }));
        let kb = p.key(&scaled(), &b);
        assert_ne!(k, kb);
        assert!(matches!(p.plan(kb, &b, t0), Send::Create { .. }));
        let other = EventSpec {
            action: "Scale4To2".into(),
            ..scaled()
        };
        assert_ne!(p.key(&other, &a), k);
        let late = t0 + SERIES_TTL + SignedDuration::from_secs(1);
        assert!(matches!(p.plan(k, &a, late), Send::Create { .. }));
    }

    #[tokio::test]
    async fn old_entries_are_forgotten() {
        let p = publisher();
        let t0 = Timestamp::from_second(1_800_000_000).unwrap();
        for i in 0..100 {
            let r = md_ref(&format!("m{i}"));
            p.plan(p.key(&scaled(), &r), &r, t0);
        }
        assert_eq!(p.remembered(), 100);
        let r = md_ref("late");
        p.plan(
            p.key(&scaled(), &r),
            &r,
            t0 + SERIES_TTL + SignedDuration::from_mins(2),
        );
        assert_eq!(p.remembered(), 1);
    }
}

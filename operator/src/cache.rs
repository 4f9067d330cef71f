//! Watch caches of the objects the operator owns, so a reconcile decides from memory and talks
//! to the API server only to write. Reading each child with a GET, listing pods and listing
//! every kind again to prune cost about 15 requests per reconcile; with a thousand resources
//! those requests, not the writes, were what kept the API server busy.
//!
//! Every cache is filled by a label-selected watch (only objects carrying `kiln.dev/modeldeployment`)
//! and kept without `managedFields`, which the comparison never reads and which would double
//! the memory each object takes.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use crate::crd::ModelDeployment;
use crate::resources::LABEL_MD;

/// A boxed stream of one kind's changed objects (applied or deleted), for the controller's
/// owns triggers. The cache itself is kept current by its driver, whether or not this is polled.
pub type Changes<K> = futures::stream::BoxStream<'static, Result<K, watcher::Error>>;

/// Futures that keep the caches current; spawn each of them.
pub type Drivers = Vec<futures::future::BoxFuture<'static, ()>>;

macro_rules! caches {
    ($($field:ident: $kind:ty,)*) => {
        /// Read views of the caches: one per owned kind, and the pods.
        #[derive(Clone)]
        pub struct Caches {
            $(pub $field: Store<$kind>,)*
            pub pods: Store<Pod>,
        }

        /// What the controller is handed: each owned kind's changes (applied or deleted) as
        /// triggers, and the tasks that run the watches. The watches run on their own, not
        /// inside the controller's trigger stream: the controller stops polling its triggers
        /// while its reconciles are all busy, and a cache starved that way would never finish
        /// its first listing.
        pub struct Watches {
            $(pub $field: Changes<$kind>,)*
            pub drivers: Drivers,
        }

        impl Caches {
            /// Caches over one namespace, or all of them, their change streams and their drivers.
            pub fn watch(client: &Client, namespace: Option<&str>) -> (Caches, Watches) {
                let mut drivers = Vec::new();
                $(let $field = cached::<$kind>(scoped(client, namespace), &mut drivers);)*
                // Pods only feed their cache (their changes reach us through the Deployment's status).
                let (pods, _) = cached_with(scoped(client, namespace), &mut drivers, |pod: &mut Pod| {
                    // Status reads only a pod's name, labels and status: the spec is most of its size.
                    pod.spec = None;
                    pod.metadata.annotations = None;
                    pod.metadata.owner_references = None;
                });
                (
                    Caches { $($field: $field.0,)* pods },
                    Watches { $($field: $field.1,)* drivers },
                )
            }

            /// Waits until every cache has completed its first listing; before that, an absent
            /// object may only be not yet seen, and acting on it would re-apply what exists.
            pub async fn ready(&self) -> Result<(), reflector::store::WriterDropped> {
                $(self.$field.wait_until_ready().await?;)*
                self.pods.wait_until_ready().await
            }

            /// Caches holding `objects` (each typed by its `kind`), as if the watches had listed
            /// them: for tests of the reconciler.
            #[cfg(test)]
            pub fn listing(objects: &[serde_json::Value]) -> Caches {
                Caches { $($field: testing::of_kind::<$kind>(objects),)* pods: testing::of_kind::<Pod>(objects) }
            }
        }

        impl Watches {
            /// `controller` triggered by every owned kind's changes, and the drivers to spawn.
            pub fn own(self, controller: Controller<ModelDeployment>) -> (Controller<ModelDeployment>, Drivers) {
                (controller$(.owns_stream(self.$field))*, self.drivers)
            }
        }
    };
}

crate::owned::owned_kinds!(caches);

/// The cached object `name` in `namespace`.
pub fn get<K>(store: &Store<K>, namespace: &str, name: &str) -> Option<Arc<K>>
where
    K: Resource + Clone,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    store.get(&ObjectRef::new(name).within(namespace))
}

/// Cached objects in `namespace` whose labels include every pair of `labels`.
pub fn labelled<K>(store: &Store<K>, namespace: &str, labels: &[(&str, &str)]) -> Vec<Arc<K>>
where
    K: Resource + Clone,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    store.state_filter(|o| {
        o.namespace().as_deref() == Some(namespace)
            && labels.iter().all(|(k, v)| o.labels().get(*k).map(String::as_str) == Some(*v))
    })
}

fn cached<K>(api: Api<K>, drivers: &mut Drivers) -> (Store<K>, Changes<K>)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    cached_with(api, drivers, |_| {})
}

/// A cache whose objects are trimmed by `trim` (and lose `managedFields`) before they are kept,
/// the stream of its changes, and (pushed to `drivers`) the future that runs its watch.
fn cached_with<K>(
    api: Api<K>,
    drivers: &mut Drivers,
    trim: impl Fn(&mut K) + Send + 'static,
) -> (Store<K>, Changes<K>)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let writer: Writer<K> = Writer::default();
    let reader = writer.as_reader();
    let config = watcher::Config::default().labels(LABEL_MD);
    // Unbounded, so a busy controller never holds the watch back; the controller's scheduler
    // drains it quickly (it keeps one entry per owner).
    let (tx, rx) = futures::channel::mpsc::unbounded();
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let driver = reflector::reflector(
        writer,
        watcher(api, config).default_backoff().modify(move |o| {
            o.managed_fields_mut().clear();
            trim(o);
        }),
    )
    .touched_objects()
    .for_each(move |changed| {
        match changed {
            // Nobody listening (pods, or the controller gone at shutdown) is fine.
            Ok(o) => drop(tx.unbounded_send(Ok(o))),
            Err(e) => tracing::warn!(kind = %kind, error = %e, "watch failed; retrying with backoff"),
        }
        futures::future::ready(())
    });
    drivers.push(futures::FutureExt::boxed(driver));
    (reader, rx.boxed())
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Caches filled by hand, for tests of the reconciler: each object is as if the watch had
/// listed it.
#[cfg(test)]
pub mod testing {
    use super::*;

    /// A store of the objects in `objects` whose `kind` is `K`'s.
    pub fn of_kind<K>(objects: &[serde_json::Value]) -> Store<K>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned,
    {
        let kind = K::kind(&());
        store(
            objects
                .iter()
                .filter(|o| o["kind"] == kind.as_ref())
                .map(|o| serde_json::from_value(o.clone()).unwrap_or_else(|e| panic!("a {kind}: {e}"))),
        )
    }

    pub fn store<K>(objects: impl IntoIterator<Item = K>) -> Store<K>
    where
        K: Resource + Clone,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone,
    {
        let mut writer: Writer<K> = Writer::default();
        let reader = writer.as_reader();
        writer.apply_watcher_event(&watcher::Event::Init);
        for o in objects {
            writer.apply_watcher_event(&watcher::Event::InitApply(o));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        reader
    }
}

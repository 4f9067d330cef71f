//! The kinds of object a pool is made of, listed once. [`owned_kinds!`] hands the list to a
//! macro that expands it, so every place that handles all of them (the watch caches and their
//! change streams, the controller's triggers, the typed APIs, pruning) is generated from this
//! one list: a new kind is one line here, plus its builder and its apply.

/// Calls `$then!` with `field: Type,` for each owned kind.
macro_rules! owned_kinds {
    ($then:ident) => {
        $then! {
            deployments: k8s_openapi::api::apps::v1::Deployment,
            services: k8s_openapi::api::core::v1::Service,
            config_maps: k8s_openapi::api::core::v1::ConfigMap,
            pdbs: k8s_openapi::api::policy::v1::PodDisruptionBudget,
            hpas: k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler,
        }
    };
}

pub(crate) use owned_kinds;

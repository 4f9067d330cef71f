//! The server manifest of one pool: its `serve` list plus the fallbacks they name.

use kiln_model_server::manifest::{Load, Manifest, ModelEntry, ModelRef, ModelSource};

use crate::crd::{ModelDeployment, PoolSpec};
use crate::quantity::parse_bytes;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("pool {pool}: serve entry {entry:?} is not NAME:VERSION of spec.models")]
    UnknownServe { pool: String, entry: String },
    #[error("model {model}: memory {value:?} is not a quantity")]
    Memory { model: String, value: String },
    #[error("pool {pool}: {source}")]
    Invalid { pool: String, source: kiln_model_server::manifest::ManifestError },
}

pub fn pool_manifest(md: &ModelDeployment, pool: &PoolSpec) -> Result<Manifest, ManifestError> {
    let spec = &md.spec;
    let find = |id: &ModelRef| spec.models.iter().find(|m| m.name == id.name && m.version == id.version);
    let mut entries: Vec<ModelEntry> = Vec::new();
    let push = |id: ModelRef, serve: bool, entries: &mut Vec<ModelEntry>| -> Result<(), ManifestError> {
        if let Some(existing) = entries.iter_mut().find(|e| e.id() == id) {
            existing.serve |= serve;
            return Ok(());
        }
        let Some(m) = find(&id) else {
            return Err(ManifestError::UnknownServe { pool: pool.name.clone(), entry: id.to_string() });
        };
        let bytes = |q: &Option<String>| match q {
            Some(q) => parse_bytes(q)
                .map(Some)
                .ok_or_else(|| ManifestError::Memory { model: id.to_string(), value: q.clone() }),
            None => Ok(None),
        };
        let memory_bytes = bytes(&m.memory)?;
        let kv_cache_bytes = bytes(&m.kv_cache_memory)?;
        entries.push(ModelEntry {
            name: m.name.clone(),
            version: m.version.clone(),
            source: ModelSource { uri: m.source.uri.clone(), sha256: m.source.sha256.clone() },
            memory_bytes,
            fallback: m.fallback.as_ref().map(|f| ModelRef::new(&f.name, &f.version)),
            serve,
            kv_cache_bytes,
            // A fallback loads when the model it stands in for fails to preload.
            load: if serve { m.load.unwrap_or_default() } else { Load::Preload },
        });
        Ok(())
    };
    for entry in &pool.serve {
        let id: ModelRef = entry
            .parse()
            .map_err(|_| ManifestError::UnknownServe { pool: pool.name.clone(), entry: entry.clone() })?;
        push(id, true, &mut entries)?;
    }
    // Fallbacks travel with the pool so the pod can load them without another pull.
    let fallbacks: Vec<ModelRef> = entries.iter().filter_map(|e| e.fallback.clone()).collect();
    for fb in fallbacks {
        push(fb, false, &mut entries)?;
    }
    let mut manifest = Manifest::new(spec.family, entries, spec.warmup.clone(), spec.batching.clone());
    manifest.memory_budget_bytes = match &pool.memory_budget {
        Some(q) => Some(parse_bytes(q).ok_or_else(|| ManifestError::Memory {
            model: format!("pool {}", pool.name),
            value: q.clone(),
        })?),
        None => None,
    };
    manifest.idle_unload_seconds = pool.idle_unload_seconds;
    manifest.validate().map_err(|source| ManifestError::Invalid { pool: pool.name.clone(), source })?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::sample;

    #[test]
    fn a_pool_carries_its_models_and_their_fallbacks() {
        let md = sample("embeddings-ab-gpu.yaml");
        let l4 = &md.spec.pools[1];
        let m = pool_manifest(&md, l4).expect("manifest");
        let ids: Vec<(String, bool)> = m.models.iter().map(|e| (e.id().to_string(), e.serve)).collect();
        assert_eq!(ids, [("bge-base:v2".to_string(), true), ("bge-base:v1".to_string(), false)]);
        assert_eq!(m.models[0].fallback, Some(ModelRef::new("bge-base", "v1")));
        assert_eq!(m.models[0].memory_bytes, Some(450 << 20));
        let a100 = pool_manifest(&md, &md.spec.pools[0]).expect("manifest");
        assert_eq!(a100.models.len(), 1, "the A pool serves only v1");
    }

    #[test]
    fn lazy_models_and_the_pool_budget_reach_the_server() {
        let md = sample("embeddings-many.yaml");
        let m = pool_manifest(&md, &md.spec.pools[0]).expect("manifest");
        let loads: Vec<(String, Load)> = m.models.iter().map(|e| (e.id().to_string(), e.load)).collect();
        assert_eq!(
            loads,
            [
                ("minilm:v2".to_string(), Load::Preload),
                ("bge-small:v1".to_string(), Load::Lazy),
                ("e5-small:v2".to_string(), Load::Lazy)
            ]
        );
        assert_eq!(m.memory_budget_bytes, Some(300 << 20));
        assert_eq!(m.idle_unload_seconds, Some(600));
        // The server reads back what the operator wrote.
        let read = Manifest::from_json(&m.to_json()).expect("parse");
        assert_eq!(read, m);
    }

    #[test]
    fn an_unknown_serve_entry_is_an_error_not_a_panic() {
        let mut md = sample("embeddings-cpu.yaml");
        md.spec.pools[0].serve = vec!["minilm:v9".into()];
        let err = pool_manifest(&md, &md.spec.pools[0]).expect_err("unknown");
        assert_eq!(err, ManifestError::UnknownServe { pool: "cpu".into(), entry: "minilm:v9".into() });
    }
}

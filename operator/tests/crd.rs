#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
//! The CRD as the API server will see it: generated output equals `crds/`, the metadata users
//! rely on is present, every CEL rule compiles within the cost budget, the samples are accepted,
//! and each validation rule refuses the resource it exists to refuse, with an actionable message.
//! (e2e proves the same table against a real API server.)

use std::path::PathBuf;

use kiln_operator::crd::{ModelDeployment, crd_yaml};
use kube::CustomResourceExt;
use kube::core::cel::{CompiledSchema, ScopeContext, Validator, WarningKind, analyze_rule, compile_schema};
use serde_json::{Value, json};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn schema() -> Value {
    let crd = ModelDeployment::crd();
    let s = crd.spec.versions[0].schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()).expect("schema");
    serde_json::to_value(s).expect("schema json")
}

/// Every complaint the API server would make about `obj`: OpenAPI keywords (checked by a JSON
/// Schema validator; the subset the CRD uses means the same thing there) and CEL rules.
fn complaints(obj: &Value) -> Vec<String> {
    let schema = schema();
    let mut out: Vec<String> = Vec::new();
    let openapi = jsonschema::validator_for(&schema).expect("schema compiles as JSON Schema");
    out.extend(openapi.iter_errors(obj).map(|e| format!("{}: {}", e.instance_path(), e)));
    // The API server applies defaults before it runs CEL.
    if let Err(errs) = Validator::new().validate_with_defaults(&schema, obj, None) {
        out.extend(errs.iter().map(|e| e.to_string()));
    }
    out
}

fn sample(name: &str) -> Value {
    let text = std::fs::read_to_string(repo().join("config/samples").join(name)).expect("sample");
    serde_norway::from_str(&text).expect("sample yaml")
}

#[test]
fn checked_in_crd_equals_crdgen_output() {
    let generated = crd_yaml().expect("crd yaml");
    let path = repo().join("crds/modeldeployment.yaml");
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        generated == checked_in,
        "{} is stale: run `cargo run -p kiln-operator --bin crdgen > crds/modeldeployment.yaml`",
        path.display()
    );
}

/// `make test` checks the generated files here, in the test build it compiles anyway, rather
/// than by running `crdgen`: that needs the operator built with its own feature set, about nine
/// minutes more on a cold 2-core machine.
#[test]
fn checked_in_reference_equals_crdgen_output() {
    let crd = serde_json::to_value(ModelDeployment::crd()).expect("crd json");
    let generated = kiln_operator::reference::reference_markdown(&crd);
    let path = repo().join("docs/reference.md");
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(generated == checked_in, "{} is stale: run `make crds`", path.display());
}

#[test]
fn crd_carries_names_columns_and_status() {
    let crd = ModelDeployment::crd();
    assert_eq!(crd.spec.group, "kiln.dev");
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.short_names.as_deref(), Some(&["md".to_string()][..]));
    assert_eq!(crd.spec.names.categories.as_deref(), Some(&["kiln".to_string()][..]));
    let v = &crd.spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    assert!(v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(), "status subresource");
    let cols: Vec<_> = v
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| (c.name.to_uppercase(), c.json_path.as_str()))
        .collect();
    assert_eq!(
        cols,
        [
            ("FAMILY".into(), ".spec.family"),
            ("READY".into(), ".status.ready"),
            ("MODELS".into(), ".status.modelSummary"),
            ("AGE".into(), ".metadata.creationTimestamp"),
        ]
    );
    assert!(schema().to_string().contains("x-kubernetes-validations"));
}

/// Each CEL expression with the schema node it is evaluated at (its cost depends on that node).
fn all_rules(node: &Value, out: &mut Vec<(String, Value)>) {
    match node {
        Value::Object(map) => {
            if let Some(Value::Array(rules)) = map.get("x-kubernetes-validations") {
                for r in rules {
                    out.push((r["rule"].as_str().expect("rule text").to_string(), node.clone()));
                    if let Some(m) = r.get("messageExpression").and_then(Value::as_str) {
                        out.push((m.to_string(), node.clone()));
                    }
                }
            }
            map.values().for_each(|v| all_rules(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| all_rules(v, out)),
        _ => {}
    }
}

fn no_compile_errors(node: &CompiledSchema, path: &str) {
    let errs = node.compilation_errors();
    assert!(errs.is_empty(), "{path}: {errs:?}");
    for (k, child) in &node.properties {
        no_compile_errors(child, &format!("{path}.{k}"));
    }
    if let Some(items) = &node.items {
        no_compile_errors(items, &format!("{path}[]"));
    }
    if let Some(ap) = &node.additional_properties {
        no_compile_errors(ap, &format!("{path}{{}}"));
    }
}

#[test]
fn every_cel_rule_compiles_within_budget() {
    let schema = schema();
    let compiled = compile_schema(&schema);
    no_compile_errors(&compiled, "");
    let mut rules = Vec::new();
    all_rules(&schema, &mut rules);
    assert!(rules.len() >= 15, "expected the full rule set, found {}", rules.len());
    for (rule, node) in rules {
        let warnings: Vec<_> = analyze_rule(&rule, &compile_schema(&node), ScopeContext::CrdValidation)
            .into_iter()
            // Scope analysis is left to the real API server in e2e: kube-cel's checker does not
            // know comprehension variables (`p` in `pools.all(p, ...)`) inside root rules.
            .filter(|w| w.kind == WarningKind::CostExceeded)
            .collect();
        assert!(warnings.is_empty(), "{rule}: {warnings:?}");
    }
}

#[test]
fn samples_are_accepted_and_parse() {
    let dir = repo().join("config/samples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("samples dir") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        if !name.ends_with(".yaml") || name == "kustomization.yaml" {
            continue;
        }
        let obj = sample(&name);
        assert_eq!(complaints(&obj), Vec::<String>::new(), "{name}");
        let md: ModelDeployment = serde_json::from_value(obj).expect("sample parses into ModelDeployment");
        md.validate_cel().expect("derived CEL check agrees");
        n += 1;
    }
    assert_eq!(
        n, 7,
        "seven samples: CPU embeddings, A/B GPU, text generation from PVC, speech to text, several lazy models, image-text embeddings, face detection"
    );
}

/// Set `pointer` in `obj` (creating nothing: the parent must exist) or remove it with `None`.
fn edit(mut obj: Value, pointer: &str, value: Option<Value>) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer");
    let target = obj.pointer_mut(parent).unwrap_or_else(|| panic!("{parent} exists"));
    match (target, value) {
        (Value::Object(map), Some(v)) => {
            map.insert(key.to_string(), v);
        }
        (Value::Object(map), None) => {
            map.remove(key);
        }
        (Value::Array(items), Some(v)) if key == "-" => items.push(v),
        (Value::Array(items), Some(v)) => items[key.parse::<usize>().expect("index")] = v,
        (Value::Array(items), None) => {
            items.remove(key.parse::<usize>().expect("index"));
        }
        _ => panic!("cannot edit {pointer}"),
    }
    obj
}

#[test]
fn each_rule_refuses_what_it_guards_with_an_actionable_message() {
    let ab = sample("embeddings-ab-gpu.yaml");
    let set = |p: &str, v: Value| edit(ab.clone(), p, Some(v));
    let del = |p: &str| edit(ab.clone(), p, None);
    let model_v1 = ab["spec"]["models"][0].clone();
    let pool_a100 = ab["spec"]["pools"][0].clone();
    let cases: Vec<(&str, Value, &str)> = vec![
        ("family enum", set("/spec/family", json!("image-generation")), "image-generation"),
        // Refused until the server serves it, rather than accepted into crash-looping pods.
        (
            "a family the server does not serve",
            set("/spec/family", json!("image-generation")),
            "image-generation",
        ),
        (
            "model name DNS-1123",
            set("/spec/models/0/name", json!("BGE_base")),
            "BGE_base is not a DNS-1123 label",
        ),
        ("model name length", set("/spec/models/0/name", json!("a".repeat(64))), "longer than 63"),
        ("version DNS-1123", set("/spec/models/0/version", json!("v1.0")), "v1.0 is not a DNS-1123 label"),
        ("pool name DNS-1123", set("/spec/pools/0/name", json!("A100")), "A100 is not a DNS-1123 label"),
        (
            "uri scheme",
            set("/spec/models/0/source/uri", json!("ftp://models/x")),
            "ftp://models/x is not supported: use s3://",
        ),
        ("uri s3 bucket", set("/spec/models/0/source/uri", json!("s3:///prefix")), "is not supported"),
        (
            "uri file absolute",
            set("/spec/models/0/source/uri", json!("file://relative/x")),
            "is not supported",
        ),
        (
            "sha256 hex",
            set("/spec/models/0/source/sha256", json!({"model.safetensors": "ABC"})),
            "^[0-9a-f]{64}$",
        ),
        (
            "sha256 path",
            set("/spec/models/0/source/sha256", json!({"../secret": "a".repeat(64)})),
            "without a leading '/', empty parts, '.' or '..'",
        ),
        ("memory quantity", set("/spec/models/0/memory", json!("lots")), "lots is not a quantity"),
        (
            "uri without credentials",
            set("/spec/models/0/source/uri", json!("https://user:hunter2@mirror/models/")),
            "must not carry credentials",
        ),
        (
            "sha256 marker name",
            set("/spec/models/0/source/sha256", json!({".kiln-complete.json": "a".repeat(64)})),
            "completion marker",
        ),
        (
            "kvCacheMemory quantity",
            set("/spec/models/0/kvCacheMemory", json!("lots")),
            "lots is not a quantity",
        ),
        (
            "kvCacheMemory for text generation",
            set("/spec/models/0/kvCacheMemory", json!("2Gi")),
            "text-generation models only",
        ),
        ("gpuMemory quantity", set("/spec/pools/0/gpuMemory", json!("80GB")), "80GB is not a quantity"),
        ("at least one model", set("/spec/models", json!([])), "less than 1 item"),
        ("at least one pool", set("/spec/pools", json!([])), "less than 1 item"),
        ("serve not empty", set("/spec/pools/0/serve", json!([])), "less than 1 item"),
        ("models unique", edit(ab.clone(), "/spec/models/-", Some(model_v1)), "unique name and version"),
        ("pools unique", edit(ab.clone(), "/spec/pools/-", Some(pool_a100)), "unique name"),
        (
            "serve unique",
            set("/spec/pools/0/serve", json!(["bge-base:v1", "bge-base:v1"])),
            "each name:version once",
        ),
        (
            "serve exists",
            set("/spec/pools/0/serve", json!(["bge-base:v3"])),
            "must name a name:version listed in spec.models",
        ),
        (
            "fallback exists",
            set("/spec/models/1/fallback", json!({"name": "bge-base", "version": "v0"})),
            "must name a version listed in spec.models",
        ),
        (
            "fallback not self",
            set("/spec/models/1/fallback", json!({"name": "bge-base", "version": "v2"})),
            "cannot be its own fallback",
        ),
        ("gpus >= 0", set("/spec/pools/0/gpus", json!(-1)), "minimum"),
        ("replicas >= 0", set("/spec/pools/0/replicas", json!(-2)), "minimum"),
        (
            "replicas xor autoscaling",
            set("/spec/pools/1/replicas", json!(2)),
            "either replicas (fixed size) or autoscaling, not both",
        ),
        ("minReplicas >= 1", set("/spec/pools/1/autoscaling/minReplicas", json!(0)), "minimum of 1"),
        (
            "min <= max",
            set("/spec/pools/1/autoscaling/minReplicas", json!(5)),
            "minReplicas must not exceed maxReplicas",
        ),
        (
            "targetQueueDepth >= 1",
            set("/spec/pools/1/autoscaling/targetQueueDepth", json!(0)),
            "minimum of 1",
        ),
        ("autoscaling needs max", del("/spec/pools/1/autoscaling/maxReplicas"), "maxReplicas"),
        ("maxBatchSize >= 1", set("/spec/batching", json!({"maxBatchSize": 0})), "minimum of 1"),
        ("timeoutSeconds >= 1", set("/spec/warmup", json!({"timeoutSeconds": 0})), "minimum of 1"),
        ("metadata.name for Services", set("/metadata/name", json!("9lives")), "must start with a letter"),
        ("Service name length", set("/metadata/name", json!("b".repeat(60))), "must fit in 63 characters"),
        ("spec required", del("/spec"), "spec"),
    ];
    let mut failures = Vec::new();
    for (what, obj, want) in &cases {
        let got = complaints(obj);
        if !got.iter().any(|c| c.contains(want)) {
            failures.push(format!("{what}: wanted {want:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(complaints(&ab).is_empty(), "the unmodified base is accepted");
}

//! The engine against sentence-transformers' reference vectors, on the real MiniLM weights.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use kiln_model_server::engine::{EmbeddingModel, Pooling, cosine};

#[test]
fn minilm_matches_the_golden_sample_alone_and_batched() {
    let model = EmbeddingModel::load(&common::minilm_dir()).expect("load MiniLM");
    assert_eq!(model.dimension(), 384);
    let s = model.settings();
    assert_eq!((s.pooling, s.normalize, s.max_seq_length), (Pooling::Mean, true, 256));
    let golden = common::golden();
    let texts: Vec<&str> = golden.iter().map(|g| g.text.as_str()).collect();
    let batched = model.embed(&texts).expect("batch");
    for (g, b) in golden.iter().zip(&batched) {
        let tokens = model.tokenize(&g.text).expect("tokenize");
        assert_eq!(tokens.ids.len(), g.n_tokens, "token count of {:?}", g.text);
        assert_eq!(tokens.truncated, g.n_tokens_untruncated > g.n_tokens);
        let alone = model.embed(&[&g.text]).expect("alone").remove(0);
        let c = cosine(&alone, &g.embedding);
        assert!(c >= 0.999, "cosine {c} for {:?}", g.text);
        // Padding in a mixed batch must not change any result.
        let cb = cosine(b, &alone);
        assert!(cb >= 0.99999, "batched differs from alone: {cb} for {:?}", g.text);
    }
}

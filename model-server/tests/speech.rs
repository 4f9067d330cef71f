//! Whisper against faster-whisper (CTranslate2) on the same CTranslate2 model directory and
//! the same samples: espeak-ng clips, greedy decoding of the first window must give exactly the
//! tokens faster-whisper asked CTranslate2 for (scripts/whisper_reference.py).
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use kiln_model_server::models::whisper::{Task, WINDOW_FRAMES, Whisper};

#[test]
fn greedy_tokens_of_the_first_window_equal_faster_whisper_s() {
    let whisper = Whisper::load(&common::whisper_tiny_en_dir()).expect("load tiny.en");
    let cases = common::speech_reference();
    assert!(cases.len() >= 4, "the reference has {} clips", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let features = whisper.features(&case.samples);
        let frames = features.len() / whisper.network().dims.mels;
        // faster-whisper's content frames leave out the one after the last hop.
        let window = whisper.window(&features, frames, 0, (frames - 1).min(WINDOW_FRAMES));
        let prompt = whisper.sot_sequence(None, Task::Transcribe);
        assert_eq!(prompt, case.prompt, "{}: start-of-transcript sequence", case.name);
        let audio = whisper.encode(&window).expect("encode");
        let decoded = whisper.decode(&audio, &prompt).expect("decode");
        let text = whisper.text(&decoded.tokens).expect("text");
        eprintln!(
            "{}: {:?} (reference {:?}; spoken {:?})",
            case.name,
            text.trim(),
            case.transcript,
            case.spoken
        );
        if decoded.tokens != case.tokens {
            let at = decoded.tokens.iter().zip(&case.tokens).position(|(a, b)| a != b).unwrap_or(0);
            failures.push(format!(
                "{}: first difference at token {at}\n  kiln:      {:?}\n  reference: {:?}",
                case.name, decoded.tokens, case.tokens
            ));
        }
        assert!(decoded.no_speech_prob < 0.5, "{}: speech taken for silence", case.name);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_multilingual_model_detects_the_language_and_decodes_as_faster_whisper_does() {
    let whisper = Whisper::load(&common::whisper_base_dir()).expect("load base");
    assert!(whisper.is_multilingual());
    let cases = common::speech_reference_of("whisper-base-reference");
    let mut failures = Vec::new();
    for case in &cases {
        let features = whisper.features(&case.samples);
        let frames = features.len() / whisper.network().dims.mels;
        // faster-whisper detects on the first 3000 frames, the one after the last hop included.
        let detect =
            whisper.encode(&whisper.window(&features, frames, 0, frames.min(WINDOW_FRAMES))).expect("encode");
        let (lang, p) = whisper.detect_language(&detect).expect("detect");
        let code = whisper.language_code(lang).expect("code");
        eprintln!(
            "{}: {code} ({p:.3}; reference {} {:.3})",
            case.name, case.language, case.language_probability
        );
        assert_eq!(code, case.language, "{}: detected language", case.name);
        assert!(
            (p - case.language_probability).abs() < 0.02,
            "{}: probability {p} vs {}",
            case.name,
            case.language_probability
        );
        let prompt = whisper.sot_sequence(Some(lang), Task::Transcribe);
        assert_eq!(prompt, case.prompt, "{}: start-of-transcript sequence", case.name);
        let window = whisper.window(&features, frames, 0, (frames - 1).min(WINDOW_FRAMES));
        let decoded = whisper.decode(&whisper.encode(&window).expect("encode"), &prompt).expect("decode");
        let text = whisper.text(&decoded.tokens).expect("text");
        eprintln!("  {:?} (reference {:?})", text.trim(), case.transcript);
        if decoded.tokens != case.tokens {
            failures.push(format!(
                "{}:\n  kiln:      {:?}\n  reference: {:?}",
                case.name, decoded.tokens, case.tokens
            ));
        }
    }
    // The spoken languages, not only the reference's: English and a non-English clip.
    let by_name = |n: &str| cases.iter().find(|c| c.name == n).map(|c| c.language.clone());
    assert_eq!((by_name("english").as_deref(), by_name("spanish").as_deref()), (Some("en"), Some("es")));
    let es = whisper.language_token("es").expect("Spanish is a language of the model");
    assert_eq!(whisper.language_code(es).as_deref(), Some("es"));
    assert_eq!(whisper.language_token("xx"), None, "an unknown code is no language");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn an_english_only_model_does_not_detect_languages() {
    let whisper = Whisper::load(&common::whisper_tiny_en_dir()).expect("load tiny.en");
    assert!(!whisper.is_multilingual());
    let audio = whisper.encode(&vec![0.0; whisper.network().dims.mels * WINDOW_FRAMES]).expect("encode");
    let err = whisper.detect_language(&audio).expect_err("refused").to_string();
    assert!(err.contains("English-only"), "{err}");
}

#[test]
fn a_file_that_is_not_whisper_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("model.bin"), b"not a model").expect("write");
    let err = Whisper::load(dir.path()).err().expect("refused").to_string();
    assert!(err.contains("model.bin") && err.contains("binary version"), "{err}");
}

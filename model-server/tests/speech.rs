//! Whisper against faster-whisper (CTranslate2) on the same CTranslate2 model directory and
//! the same samples: espeak-ng clips, greedy decoding of the first window must give exactly the
//! tokens faster-whisper asked CTranslate2 for (scripts/whisper_reference.py).
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use kiln_model_server::models::whisper::transcribe::{Options, OptionsError};
use kiln_model_server::models::whisper::{Task, WINDOW_FRAMES, Whisper};

#[test]
fn greedy_tokens_of_the_first_window_equal_faster_whisper_s() {
    first_windows_equal_the_reference(&common::whisper_tiny_en_dir());
}

/// The same weights written as a Hugging Face checkpoint decode to the same tokens.
#[test]
fn a_hugging_face_checkpoint_of_the_same_weights_decodes_the_same_tokens() {
    first_windows_equal_the_reference(&common::whisper_tiny_en_hf_dir());
}

fn first_windows_equal_the_reference(dir: &std::path::Path) {
    let whisper = Whisper::load(dir).expect("load tiny.en");
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
        assert!(
            (decoded.no_speech_prob - case.no_speech_prob).abs() < 0.01,
            "{}: no-speech probability {} vs faster-whisper's {}",
            case.name,
            decoded.no_speech_prob,
            case.no_speech_prob
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_clip_of_over_90_seconds_is_transcribed_whole_as_faster_whisper_does() {
    let whisper = Whisper::load(&common::whisper_tiny_en_dir()).expect("load tiny.en");
    let case = common::speech_reference().into_iter().find(|c| c.name == "long").expect("the long clip");
    assert!(case.samples.len() >= 90 * 16_000, "the long clip is {} samples", case.samples.len());
    let options = Options { language: None, task: Task::Transcribe, prompt: None };
    let mut reported = Vec::new();
    let transcript = whisper.transcribe(&case.samples, &options, |s| reported.push(s)).expect("transcribe");
    let got: Vec<(f64, f64, String)> =
        transcript.segments.iter().map(|s| (s.start, s.end, s.text.clone())).collect();
    for (g, w) in got.iter().zip(&case.segments) {
        eprintln!("{:7.2} {:7.2} {:?}\n{:7.2} {:7.2} {:?}", g.0, g.1, g.2, w.0, w.1, w.2);
    }
    assert_eq!(got.len(), case.segments.len(), "segment count");
    for (g, w) in got.iter().zip(&case.segments) {
        assert_eq!(g.2, w.2, "segment text");
        assert!((g.0 - w.0).abs() < 1e-6 && (g.1 - w.1).abs() < 1e-6, "segment times {g:?} vs {w:?}");
    }
    assert_eq!(transcript.text(), case.transcript);
    // Monotonic, inside the clip, and progress reported up to the end.
    assert!(got.windows(2).all(|p| p[0].1 <= p[1].0 + 1e-9 && p[0].0 < p[0].1));
    assert!(got.last().is_some_and(|s| s.1 <= transcript.duration + 0.02));
    assert!(reported.windows(2).all(|p| p[0] < p[1]) && reported.len() >= 4, "{reported:?}");
    assert!((reported.last().copied().unwrap_or(0.0) - transcript.duration).abs() < 0.02);
}

#[test]
fn options_the_model_cannot_honour_are_refused_before_any_work() {
    let en = Whisper::load(&common::whisper_tiny_en_dir()).expect("load tiny.en");
    let translate = Options { language: None, task: Task::Translate, prompt: None };
    assert_eq!(en.check_options(&translate), Err(OptionsError::EnglishOnly("translate".into())));
    let german = Options { language: Some("de".into()), task: Task::Transcribe, prompt: None };
    assert_eq!(en.check_options(&german), Err(OptionsError::EnglishOnly("de".into())));
    let base = Whisper::load(&common::whisper_base_dir()).expect("load base");
    assert_eq!(base.check_options(&german), Ok(()));
    let klingon = Options { language: Some("tlh".into()), task: Task::Transcribe, prompt: None };
    assert_eq!(base.check_options(&klingon), Err(OptionsError::UnknownLanguage("tlh".into())));
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

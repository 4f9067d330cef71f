//! Whisper against faster-whisper (CTranslate2) on the same CTranslate2 model directory and
//! the same samples: espeak-ng clips, greedy decoding of the first window must give exactly the
//! tokens faster-whisper asked CTranslate2 for (scripts/whisper_reference.py).
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use candle_core::DType;
use kiln_model_server::models::whisper::engine::Placement;
use kiln_model_server::models::whisper::transcribe::{Options, OptionsError, Transcript, Transcription};
use kiln_model_server::models::whisper::{Task, WINDOW_FRAMES, Whisper};

/// Greedy decoding without fallback, as the reference asked faster-whisper for.
fn greedy() -> Options {
    Options { temperatures: vec![0.0], ..Options::transcribe() }
}

/// Transcribes the clips together, as the worker does with concurrent requests: their windows
/// share encoder batches and their hypotheses decoder steps.
fn together(whisper: &Whisper, clips: &[&[f32]], options: &Options) -> Vec<Transcript> {
    let mut active: Vec<Transcription> =
        clips.iter().map(|c| Transcription::new(whisper, c, options.clone()).expect("start")).collect();
    let mut passes = 0;
    while !active.iter().all(Transcription::is_done) {
        whisper.advance(&mut active);
        passes += 1;
        assert!(passes < 100_000, "the transcriptions do not finish");
    }
    active.into_iter().map(|t| t.finish().expect("transcript")).collect()
}

#[test]
fn transcriptions_stepping_together_each_equal_faster_whisper_s() {
    let whisper = Whisper::load(&common::whisper_tiny_en_dir()).expect("load tiny.en");
    let cases = common::speech_reference();
    let clips: Vec<&[f32]> = cases.iter().map(|c| c.samples.as_slice()).collect();
    let transcripts = together(&whisper, &clips, &greedy());
    for (case, t) in cases.iter().zip(&transcripts) {
        assert_eq!(t.text(), case.transcript, "{}", case.name);
    }
    let long = cases.iter().position(|c| c.name == "long").expect("the long clip");
    let got: Vec<(f64, f64, String)> =
        transcripts[long].segments.iter().map(|s| (s.start, s.end, s.text.clone())).collect();
    assert_eq!(got.len(), cases[long].segments.len(), "segments of the long clip");
    for (g, w) in got.iter().zip(&cases[long].segments) {
        assert_eq!(g.2, w.2);
        assert!((g.0 - w.0).abs() < 1e-6 && (g.1 - w.1).abs() < 1e-6, "{g:?} vs {w:?}");
    }
}

#[test]
fn multilingual_transcriptions_detect_their_languages_while_stepping_together() {
    let whisper = Whisper::load(&common::whisper_base_dir()).expect("load base");
    let cases = common::speech_reference_of("whisper-base-reference");
    let clips: Vec<&[f32]> = cases.iter().map(|c| c.samples.as_slice()).collect();
    for (case, t) in cases.iter().zip(together(&whisper, &clips, &greedy())) {
        assert_eq!(t.language, case.language, "{}", case.name);
        assert!((t.language_probability - case.language_probability).abs() < 0.02, "{}", case.name);
        assert_eq!(t.text(), case.transcript, "{}", case.name);
    }
}

#[test]
fn sampled_windows_are_reproducible_and_say_their_temperature() {
    let whisper = Whisper::load(&common::whisper_tiny_en_dir()).expect("load tiny.en");
    let cases = common::speech_reference();
    let case = cases.iter().find(|c| c.name != "long").expect("a short clip");
    // Sampling from the start: five hypotheses per window, the likeliest kept.
    let hot = Options { temperatures: Options::schedule_from(0.4), ..Options::transcribe() };
    let clips = [case.samples.as_slice(), case.samples.as_slice()];
    let [a, b]: [Transcript; 2] = together(&whisper, &clips, &hot).try_into().expect("two");
    assert_eq!(a, b, "the same audio samples the same text");
    assert!(!a.segments.is_empty());
    assert!(a.segments.iter().all(|s| s.temperature >= 0.4 - 1e-6), "{:?}", a.segments);
    let wer = common::word_error_rate(&a.text(), &case.spoken);
    let greedy_wer = common::word_error_rate(&case.transcript, &case.spoken);
    eprintln!("sampled at 0.4: {:?} (WER {wer:.3}, greedy {greedy_wer:.3})", a.text());
    assert!(wer <= greedy_wer + 0.25, "sampling at 0.4 drifted: {:?}", a.text());
}

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
    first_windows_of_equal_the_reference(&Whisper::load(dir).expect("load tiny.en"), "packed");
}

/// Whisper's GPU path (candle's ops) on each device, in float32 and in float16 as it runs on a
/// GPU: the first windows' greedy tokens equal faster-whisper's, and transcriptions stepping
/// together (encoder batches, decoder steps of several sequences) give faster-whisper's text.
#[test]
fn the_gpu_path_gives_faster_whisper_s_tokens() {
    let dir = common::whisper_tiny_en_dir();
    for device in &common::devices() {
        for dtype in [DType::F32, DType::F16] {
            let placement = Placement::Candle { device: device.candle().clone(), dtype };
            let whisper = Whisper::load_on(&dir, &placement).expect("candle's Whisper");
            let label = format!("candle {dtype:?} on {} ({})", device.label(), device.name());
            first_windows_of_equal_the_reference(&whisper, &label);
            let cases = common::speech_reference();
            let short: Vec<_> = cases.iter().filter(|c| c.name != "long").collect();
            let clips: Vec<&[f32]> = short.iter().map(|c| c.samples.as_slice()).collect();
            for (case, t) in short.iter().zip(together(&whisper, &clips, &greedy())) {
                assert_eq!(t.text(), case.transcript, "{label}: {}", case.name);
            }
            eprintln!("{label}: faster-whisper's tokens and transcripts");
        }
    }
}

/// A window encoded by one engine and a sequence begun by the other are refused by name, and
/// the failed step leaves the sequence as it was.
#[test]
fn a_window_of_one_engine_is_refused_by_the_other() {
    let dir = common::whisper_tiny_en_dir();
    let packed = Whisper::load(&dir).expect("packed");
    let placement = Placement::Candle { device: candle_core::Device::Cpu, dtype: DType::F32 };
    let candle = Whisper::load_on(&dir, &placement).expect("candle");
    let mels = packed.engine().dims().mels;
    let silence = vec![0.0; mels * WINDOW_FRAMES];
    let sot = [packed.specials().sot];
    for (a, b) in [(&packed, &candle), (&candle, &packed)] {
        let audio = a.encode(&silence).expect("encode");
        let mut seq = b.engine().sequence();
        let err = b.engine().decode(&audio, &mut seq, &sot).expect_err("another engine's window");
        assert!(err.to_string().contains("made by another engine"), "{err}");
        let mut own = a.engine().sequence();
        a.engine().decode(&audio, &mut own, &sot).expect("its own engine decodes it");
    }
}

fn first_windows_of_equal_the_reference(whisper: &Whisper, label: &str) {
    let cases = common::speech_reference();
    assert!(cases.len() >= 4, "the reference has {} clips", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let features = whisper.features(&case.samples);
        let frames = features.len() / whisper.engine().dims().mels;
        // faster-whisper's content frames leave out the one after the last hop.
        let window = whisper.window(&features, frames, 0, (frames - 1).min(WINDOW_FRAMES));
        let prompt = whisper.sot_sequence(None, Task::Transcribe);
        assert_eq!(prompt, case.prompt, "{}: start-of-transcript sequence", case.name);
        let audio = whisper.encode(&window).expect("encode");
        let decoded = whisper.decode(&audio, &prompt).expect("decode");
        let text = whisper.text(&decoded.tokens).expect("text");
        eprintln!(
            "{label} {}: {:?} (reference {:?}; spoken {:?})",
            case.name,
            text.trim(),
            case.transcript,
            case.spoken
        );
        if decoded.tokens != case.tokens {
            let at = decoded.tokens.iter().zip(&case.tokens).position(|(a, b)| a != b).unwrap_or(0);
            failures.push(format!(
                "{label} {}: first difference at token {at}\n  kiln:      {:?}\n  reference: {:?}",
                case.name, decoded.tokens, case.tokens
            ));
        }
        assert!(
            (decoded.no_speech_prob - case.no_speech_prob).abs() < 0.01,
            "{label} {}: no-speech probability {} vs faster-whisper's {}",
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
    // faster-whisper's reference ran greedy, without fallback.
    let options = greedy();
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
    let translate = Options { task: Task::Translate, ..greedy() };
    assert_eq!(en.check_options(&translate), Err(OptionsError::EnglishOnly("translate".into())));
    let german = Options { language: Some("de".into()), ..greedy() };
    assert_eq!(en.check_options(&german), Err(OptionsError::EnglishOnly("de".into())));
    let base = Whisper::load(&common::whisper_base_dir()).expect("load base");
    assert_eq!(base.check_options(&german), Ok(()));
    let klingon = Options { language: Some("tlh".into()), ..greedy() };
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
        let frames = features.len() / whisper.engine().dims().mels;
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
    let audio = whisper.encode(&vec![0.0; whisper.engine().dims().mels * WINDOW_FRAMES]).expect("encode");
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

#[test]
fn working_memory_estimates_follow_the_model_size() {
    let dir = common::whisper_tiny_en_dir();
    let tiny = Whisper::load(&dir).expect("load tiny.en");
    // model.bin holds the float16 weights: twice its size is about the float32 weights.
    let file = 2.0 * std::fs::metadata(dir.join("model.bin")).expect("model.bin").len() as f64;
    let weights = tiny.engine().dims().weight_bytes() as f64;
    assert!((weights / file - 1.0).abs() < 0.05, "{weights} bytes estimated, {file} in the file");
    let base = Whisper::load(&common::whisper_base_dir()).expect("load base");
    let (t, b) = (tiny.transcription_bytes(), base.transcription_bytes());
    assert!(t > 30 << 20 && b > t, "tiny {t}, base {b}");
}

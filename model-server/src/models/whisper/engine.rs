//! The network a Whisper model computes with: the packed CPU kernels (`network`) or candle's
//! ops on a GPU (`candle`). Windows and sequences belong to the engine that made them.

use candle_core::{DType, Device};

use super::candle::{self, CandleNetwork};
use super::layout::{self, Dims, Layout, Source};
use super::network::{self, Network};
use crate::models::ModelError;

/// Where and in what float type the network computes.
#[derive(Debug, Clone)]
pub enum Placement {
    /// The packed CPU kernels.
    Packed,
    /// candle's ops on `device`, matrices and activations in `dtype`.
    Candle { device: Device, dtype: DType },
}

// One per model, never moved about: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Engine {
    Packed(Network),
    Candle(CandleNetwork),
}

/// One encoded window: each decoder layer's cross-attention keys and values of it.
pub enum Audio {
    Packed(network::Audio),
    Candle(candle::Audio),
}

/// One sequence being decoded: its self-attention cache.
pub enum Sequence {
    Packed(network::Sequence),
    Candle(candle::Sequence),
}

/// One sequence's part of a decoder step.
pub type Step<'a> = layout::Step<'a, Audio, Sequence>;

fn foreign() -> ModelError {
    ModelError::Inference("a window or sequence made by another engine".to_string())
}

impl Engine {
    /// The network in `source` (laid out as `layout`, of shape `dims`) placed as asked.
    pub fn load(
        source: &dyn Source,
        layout: Layout,
        dims: Dims,
        placement: &Placement,
    ) -> Result<Engine, ModelError> {
        Ok(match placement {
            Placement::Packed => Engine::Packed(Network::load(source, layout, dims)?),
            Placement::Candle { device, dtype } => {
                Engine::Candle(CandleNetwork::load(source, layout, dims, device, *dtype)?)
            }
        })
    }

    pub fn dims(&self) -> Dims {
        match self {
            Engine::Packed(n) => n.dims,
            Engine::Candle(n) => n.dims,
        }
    }

    /// `packed` (float32 on the CPU) or `candle F16` and the like.
    pub fn describe(&self) -> String {
        match self {
            Engine::Packed(_) => "packed float32".to_string(),
            Engine::Candle(n) => format!("candle {:?}", n.dtype()).to_lowercase(),
        }
    }

    /// Encodes windows of log-mel features (`[mels × frames]` each) together.
    pub fn encode_batch(&self, mels: &[&[f32]]) -> Result<Vec<Audio>, ModelError> {
        Ok(match self {
            Engine::Packed(n) => n.encode_batch(mels)?.into_iter().map(Audio::Packed).collect(),
            Engine::Candle(n) => n.encode_batch(mels)?.into_iter().map(Audio::Candle).collect(),
        })
    }

    pub fn encode(&self, mel: &[f32]) -> Result<Audio, ModelError> {
        let mut audio = self.encode_batch(&[mel])?;
        audio.pop().ok_or_else(|| ModelError::Inference("the encoder returned nothing".to_string()))
    }

    /// A sequence with nothing decoded yet.
    pub fn sequence(&self) -> Sequence {
        match self {
            Engine::Packed(n) => Sequence::Packed(n.sequence()),
            Engine::Candle(n) => Sequence::Candle(n.sequence()),
        }
    }

    /// Feeds `tokens` after what `seq` holds and returns the logits that follow the last one.
    pub fn decode(&self, audio: &Audio, seq: &mut Sequence, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let mut logits = self.decode_batch(&mut [Step { audio, seq, tokens }])?;
        logits.pop().ok_or_else(|| ModelError::Inference("the decoder returned nothing".to_string()))
    }

    /// One decoder step of several sequences together; per step, the logits after its last
    /// token. Nothing changes unless every step succeeds.
    pub fn decode_batch(&self, steps: &mut [Step<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
        match self {
            Engine::Packed(n) => {
                let mut inner = Vec::with_capacity(steps.len());
                for step in steps.iter_mut() {
                    let (Audio::Packed(audio), Sequence::Packed(seq)) = (step.audio, &mut *step.seq) else {
                        return Err(foreign());
                    };
                    inner.push(network::Step { audio, seq, tokens: step.tokens });
                }
                n.decode_batch(&mut inner)
            }
            Engine::Candle(n) => {
                let mut inner = Vec::with_capacity(steps.len());
                for step in steps.iter_mut() {
                    let (Audio::Candle(audio), Sequence::Candle(seq)) = (step.audio, &mut *step.seq) else {
                        return Err(foreign());
                    };
                    inner.push(candle::Step { audio, seq, tokens: step.tokens });
                }
                n.decode_batch(&mut inner)
            }
        }
    }
}

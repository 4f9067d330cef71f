//! A checkpoint's `preprocessor_config.json` (Hugging Face's `SiglipImageProcessor` and
//! `CLIPImageProcessor` read the same keys) and the pixel values it turns an RGB image into:
//! resize (exact, or the shortest edge), centre crop, rescale and normalise, channels first.

use std::path::Path;

use image::RgbImage;
use image::imageops::FilterType;
use serde::Deserialize;

use crate::models::ModelError;

/// A size as the configs write it: `{"height", "width"}`, `{"shortest_edge"}`, or one number
/// (a square).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum SizeSpec {
    Exact { height: u32, width: u32 },
    ShortestEdge { shortest_edge: u32 },
    Square(u32),
}

fn yes() -> bool {
    true
}
fn bicubic() -> u8 {
    3
}
fn one_over_255() -> f32 {
    1.0 / 255.0
}

/// The keys of `preprocessor_config.json` this server reads; absent keys take the processors'
/// defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PreprocessorConfig {
    #[serde(default = "yes")]
    pub do_resize: bool,
    pub size: Option<SizeSpec>,
    /// PIL's resampling filter codes: 0 nearest, 1 Lanczos, 2 bilinear, 3 bicubic.
    #[serde(default = "bicubic")]
    pub resample: u8,
    #[serde(default)]
    pub do_center_crop: bool,
    pub crop_size: Option<SizeSpec>,
    #[serde(default = "yes")]
    pub do_rescale: bool,
    #[serde(default = "one_over_255")]
    pub rescale_factor: f32,
    #[serde(default = "yes")]
    pub do_normalize: bool,
    pub image_mean: Option<[f32; 3]>,
    pub image_std: Option<[f32; 3]>,
}

/// The preprocessing of one checkpoint, checked once at load.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    resize: Option<(SizeSpec, FilterType)>,
    crop: Option<(u32, u32)>,
    scale: f32,
    mean: [f32; 3],
    std: [f32; 3],
}

/// Pixel values, channels first (`[3][height][width]`), as the vision tower takes them.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl PixelValues {
    /// `images`, each `side`×`side`, as one `(n, 3, side, side)` tensor on `device`: a candle
    /// vision tower's batch.
    pub fn batch(
        images: &[&PixelValues],
        side: usize,
        device: &candle_core::Device,
    ) -> Result<candle_core::Tensor, ModelError> {
        let mut data = Vec::with_capacity(images.len() * 3 * side * side);
        for image in images {
            if (image.height, image.width) != (side, side) || image.data.len() != 3 * side * side {
                return Err(ModelError::Inference(format!(
                    "pixel values of {}x{} for a tower that takes {side}x{side}",
                    image.width, image.height
                )));
            }
            data.extend_from_slice(&image.data);
        }
        Ok(candle_core::Tensor::from_vec(data, (images.len(), 3, side, side), device)?)
    }
}

impl Preprocess {
    pub fn read(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("preprocessor_config.json");
        let config: PreprocessorConfig = crate::weights::read_json(&path)?;
        Self::new(&config).map_err(|message| ModelError::Files { path: path.display().to_string(), message })
    }

    pub fn new(c: &PreprocessorConfig) -> Result<Self, String> {
        let filter = match c.resample {
            0 => FilterType::Nearest,
            1 => FilterType::Lanczos3,
            2 => FilterType::Triangle,
            3 => FilterType::CatmullRom,
            other => {
                return Err(format!(
                    "resample {other} is not supported (0 nearest, 1 Lanczos, 2 bilinear, 3 bicubic)"
                ));
            }
        };
        let resize = match (c.do_resize, c.size) {
            (false, _) => None,
            (true, Some(size)) => Some((size, filter)),
            (true, None) => return Err("do_resize is set but size is missing".into()),
        };
        let crop = match (c.do_center_crop, c.crop_size) {
            (false, _) => None,
            (true, Some(SizeSpec::Exact { height, width })) => Some((width, height)),
            (true, Some(SizeSpec::Square(side))) => Some((side, side)),
            (true, _) => return Err("do_center_crop needs crop_size as {height, width} or a number".into()),
        };
        if resize.is_none() && crop.is_none() {
            return Err("neither a resize nor a crop: the vision tower needs a fixed input size".into());
        }
        let (mean, std) = match (c.do_normalize, c.image_mean, c.image_std) {
            (false, _, _) => ([0.0; 3], [1.0; 3]),
            (true, Some(mean), Some(std)) if std.iter().all(|s| *s > 0.0) => (mean, std),
            (true, _, _) => return Err("do_normalize needs image_mean and a positive image_std".into()),
        };
        let scale = if c.do_rescale { c.rescale_factor } else { 1.0 };
        Ok(Preprocess { resize, crop, scale, mean, std })
    }

    /// The size the tower sees for an image of `width × height`.
    pub fn output_size(&self, width: u32, height: u32) -> (u32, u32) {
        if let Some(crop) = self.crop {
            return crop;
        }
        self.resized_size(width, height)
    }

    fn resized_size(&self, width: u32, height: u32) -> (u32, u32) {
        match self.resize {
            None => (width, height),
            Some((SizeSpec::Exact { height, width }, _)) => (width, height),
            Some((SizeSpec::Square(side), _)) => (side, side),
            // As transformers does: the short side becomes `edge`, the long one is truncated.
            Some((SizeSpec::ShortestEdge { shortest_edge: edge }, _)) => {
                let (short, long) = (width.min(height).max(1), width.max(height));
                let scaled = (u64::from(edge) * u64::from(long) / u64::from(short)) as u32;
                if width <= height { (edge, scaled) } else { (scaled, edge) }
            }
        }
    }

    /// Resize, crop, rescale and normalise `image`.
    pub fn pixel_values(&self, image: &RgbImage) -> PixelValues {
        let (w, h) = image.dimensions();
        let (rw, rh) = self.resized_size(w, h);
        let resized = match self.resize {
            Some((_, filter)) if (rw, rh) != (w, h) => {
                image::imageops::resize(image, rw.max(1), rh.max(1), filter)
            }
            _ => image.clone(),
        };
        let (cw, ch) = self.crop.unwrap_or((rw, rh));
        // Centred as transformers does; where the crop is larger than the image, zeros.
        let left = (i64::from(rw) - i64::from(cw)) / 2;
        let top = (i64::from(rh) - i64::from(ch)) / 2;
        let (cw, ch) = (cw as usize, ch as usize);
        let mut data = vec![0.0f32; 3 * cw * ch];
        for y in 0..ch {
            for x in 0..cw {
                let (sx, sy) = (x as i64 + left, y as i64 + top);
                let inside = sx >= 0 && sy >= 0 && sx < i64::from(rw) && sy < i64::from(rh);
                for c in 0..3 {
                    let value =
                        if inside { f32::from(resized.get_pixel(sx as u32, sy as u32).0[c]) } else { 0.0 };
                    data[(c * ch + y) * cw + x] = (value * self.scale - self.mean[c]) / self.std[c];
                }
            }
        }
        PixelValues { height: ch, width: cw, data }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn config(json: &str) -> PreprocessorConfig {
        serde_json::from_str(json).expect("config")
    }

    /// SigLIP's preprocessor_config.json as published.
    const SIGLIP: &str = r#"{"do_normalize": true, "do_rescale": true, "do_resize": true,
        "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor",
        "image_std": [0.5, 0.5, 0.5], "processor_class": "SiglipProcessor", "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"height": 224, "width": 224}}"#;
    /// CLIP's, as published for openai/clip-vit-base-patch32.
    const CLIP: &str = r#"{"crop_size": {"height": 224, "width": 224}, "do_center_crop": true,
        "do_convert_rgb": true, "do_normalize": true, "do_rescale": true, "do_resize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224}}"#;

    #[test]
    fn a_flat_colour_normalises_to_the_formula_in_channel_order() {
        let p = Preprocess::new(&config(SIGLIP)).expect("siglip");
        let image = RgbImage::from_pixel(300, 200, Rgb([255, 0, 51]));
        let v = p.pixel_values(&image);
        assert_eq!((v.width, v.height, v.data.len()), (224, 224, 3 * 224 * 224));
        let plane = 224 * 224;
        // (255/255 - 0.5)/0.5 = 1, (0 - 0.5)/0.5 = -1, (51/255 - 0.5)/0.5 = -0.6
        for (c, want) in [1.0f32, -1.0, -0.6].into_iter().enumerate() {
            let worst =
                v.data[c * plane..(c + 1) * plane].iter().map(|x| (x - want).abs()).fold(0.0, f32::max);
            assert!(worst < 1e-5, "channel {c}: off by {worst}");
        }
    }

    #[test]
    fn clip_resizes_the_shortest_edge_then_crops_the_centre() {
        let p = Preprocess::new(&config(CLIP)).expect("clip");
        // transformers: int(224 * 640 / 480) = 298.
        assert_eq!(p.resized_size(640, 480), (298, 224));
        assert_eq!(p.resized_size(480, 640), (224, 298));
        assert_eq!(p.output_size(640, 480), (224, 224));
        // Left third red, middle blue, right third green: the centre crop is mostly blue.
        let image = RgbImage::from_fn(900, 300, |x, _| match x / 300 {
            0 => Rgb([255, 0, 0]),
            1 => Rgb([0, 0, 255]),
            _ => Rgb([0, 255, 0]),
        });
        let v = p.pixel_values(&image);
        assert_eq!((v.width, v.height), (224, 224));
        // The crop spans x 224..448 of the 672-wide resize: the middle third, blue.
        let plane = 224 * 224;
        let at = |c: usize, x: usize, y: usize| v.data[c * plane + y * 224 + x];
        let blue = (1.0 - 0.408_210_7) / 0.275_777_1;
        assert!((at(2, 112, 100) - blue).abs() < 1e-4, "{}", at(2, 112, 100));
        assert!(at(0, 112, 100) < 0.0 && at(1, 112, 100) < 0.0);
    }

    #[test]
    fn a_crop_larger_than_the_image_pads_with_zeros_before_normalising() {
        let c = config(
            r#"{"do_resize": false, "do_center_crop": true, "crop_size": 4,
            "do_normalize": false, "rescale_factor": 1.0}"#,
        );
        let p = Preprocess::new(&c).expect("crop only");
        let v = p.pixel_values(&RgbImage::from_pixel(2, 2, Rgb([9, 9, 9])));
        assert_eq!((v.width, v.height), (4, 4));
        let row0: Vec<f32> = v.data[0..4].to_vec();
        let row1: Vec<f32> = v.data[4..8].to_vec();
        assert_eq!(row0, [0.0; 4]);
        assert_eq!(row1, [0.0, 9.0, 9.0, 0.0]);
    }

    #[test]
    fn configs_the_server_cannot_honour_are_refused_by_key() {
        let bad = |json: &str| Preprocess::new(&config(json)).expect_err("refused");
        assert!(bad(r#"{"size": {"height": 8, "width": 8}, "resample": 4, "image_mean": [0,0,0], "image_std": [1,1,1]}"#).contains("resample 4"));
        assert!(bad(r#"{"image_mean": [0,0,0], "image_std": [1,1,1]}"#).contains("size is missing"));
        assert!(
            bad(r#"{"size": 8, "image_mean": [0,0,0], "image_std": [1,0,1]}"#).contains("positive image_std")
        );
        assert!(bad(r#"{"size": 8}"#).contains("image_mean"));
    }
}

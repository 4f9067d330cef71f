//! Images from requests, for every family that takes them (image-text embeddings, face
//! detection): decoding with limits, EXIF orientation and alpha on white ([`decode`]), and the
//! Hugging Face preprocessing a checkpoint's `preprocessor_config.json` describes
//! ([`preprocess`]).

pub mod preprocess;

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

/// Bounds on what one image may cost to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Encoded bytes.
    pub max_bytes: usize,
    /// Decoded width × height: a small file can claim a huge canvas (a decompression bomb).
    pub max_pixels: u64,
    /// Decoded width or height.
    pub max_side: u32,
}

impl Default for ImageLimits {
    fn default() -> Self {
        // A 50-megapixel photo decodes; a 40000 × 40000 canvas in a 100 KB PNG does not.
        ImageLimits { max_bytes: 20 << 20, max_pixels: 50_000_000, max_side: 16_384 }
    }
}

/// Why an image was refused; each names what to send instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    #[error("the image is {bytes} bytes; the limit is {limit}")]
    TooManyBytes { bytes: usize, limit: usize },
    #[error(
        "the image is {width} × {height} pixels; the limit is {max_pixels} pixels and {max_side} per side: send a smaller image"
    )]
    TooManyPixels { width: u32, height: u32, max_pixels: u64, max_side: u32 },
    #[error("the image exceeds the decoder's memory limit ({0}): send a smaller image")]
    OverLimit(String),
    #[error("{0}: send JPEG, PNG, WebP or GIF")]
    Unsupported(String),
    #[error("the image cannot be decoded: {0}")]
    Corrupt(String),
}

/// The formats this server decodes (the `image` crate is built with only these).
const FORMATS: [ImageFormat; 4] = [ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::WebP, ImageFormat::Gif];

/// Decode `bytes` (JPEG, PNG, WebP, or a GIF's first frame, told apart by content) into RGB,
/// with its EXIF orientation applied and transparency composited onto white, as Hugging Face's
/// `convert_to_rgb` does. Sizes are checked from the header, before anything is allocated.
pub fn decode(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage, ImageError> {
    if bytes.len() > limits.max_bytes {
        return Err(ImageError::TooManyBytes { bytes: bytes.len(), limit: limits.max_bytes });
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Corrupt(e.to_string()))?;
    match reader.format() {
        Some(f) if FORMATS.contains(&f) => {}
        Some(f) => return Err(ImageError::Unsupported(format!("{f:?} images are not supported"))),
        None => {
            return Err(ImageError::Unsupported(
                "the bytes are not an image format this server knows".into(),
            ));
        }
    }
    let mut reader = reader;
    // Width and height are checked below from the header, so the error can name them; the
    // allocation bound backs that up inside the decoder (RGBA at 8 bits, plus its buffers).
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8));
    reader.limits(decoder_limits);
    let too_many = |width: u32, height: u32| ImageError::TooManyPixels {
        width,
        height,
        max_pixels: limits.max_pixels,
        max_side: limits.max_side,
    };
    let mut decoder = reader.into_decoder().map_err(|e| match e {
        image::ImageError::Limits(l) => ImageError::OverLimit(l.to_string()),
        image::ImageError::Unsupported(u) => ImageError::Unsupported(u.to_string()),
        other => ImageError::Corrupt(other.to_string()),
    })?;
    let (width, height) = decoder.dimensions();
    if width > limits.max_side
        || height > limits.max_side
        || u64::from(width) * u64::from(height) > limits.max_pixels
    {
        return Err(too_many(width, height));
    }
    // A missing or unreadable EXIF block means "as stored", not an error.
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| match e {
        image::ImageError::Limits(l) => ImageError::OverLimit(l.to_string()),
        other => ImageError::Corrupt(other.to_string()),
    })?;
    image.apply_orientation(orientation);
    Ok(to_rgb_on_white(image))
}

/// RGB, with any alpha composited onto white.
fn to_rgb_on_white(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.into_rgb8();
    }
    let rgba = image.into_rgba8();
    let (width, height) = rgba.dimensions();
    RgbImage::from_fn(width, height, |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        let over = |c: u8| ((u32::from(c) * u32::from(a) + 255 * (255 - u32::from(a)) + 127) / 255) as u8;
        image::Rgb([over(r), over(g), over(b)])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageEncoder, Rgb, Rgba, RgbaImage};

    fn gradient(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8]))
    }

    fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, format).expect("encode");
        out.into_inner()
    }

    #[test]
    fn every_format_decodes_to_the_same_pixels_within_its_codec() {
        let original = gradient(40, 24);
        for format in [ImageFormat::Png, ImageFormat::WebP, ImageFormat::Gif, ImageFormat::Jpeg] {
            let image = DynamicImage::ImageRgb8(original.clone());
            // GIF is paletted: encode an image it can hold exactly.
            let image = if format == ImageFormat::Gif {
                DynamicImage::ImageRgb8(RgbImage::from_fn(40, 24, |x, _| {
                    if x < 20 { Rgb([255, 0, 0]) } else { Rgb([0, 0, 255]) }
                }))
            } else {
                image
            };
            let bytes = encode(&image, format);
            let decoded = decode(&bytes, &ImageLimits::default()).expect("decode");
            assert_eq!(decoded.dimensions(), (40, 24), "{format:?}");
            let want = image.to_rgb8();
            let worst = decoded
                .pixels()
                .zip(want.pixels())
                .flat_map(|(a, b)| a.0.iter().zip(b.0).map(|(x, y)| x.abs_diff(y)).collect::<Vec<_>>())
                .max()
                .unwrap_or(0);
            let tolerance = if format == ImageFormat::Jpeg { 24 } else { 0 };
            assert!(worst <= tolerance, "{format:?}: worst channel difference {worst}");
        }
    }

    /// A JPEG carrying an EXIF block with `orientation` (the TIFF tag 0x0112), as cameras write.
    fn jpeg_with_orientation(image: &RgbImage, orientation: u16) -> Vec<u8> {
        let jpeg = encode(&DynamicImage::ImageRgb8(image.clone()), ImageFormat::Jpeg);
        let mut tiff = b"II*\0".to_vec();
        tiff.extend(8u32.to_le_bytes());
        tiff.extend(1u16.to_le_bytes()); // one IFD entry
        tiff.extend(0x0112u16.to_le_bytes());
        tiff.extend(3u16.to_le_bytes()); // SHORT
        tiff.extend(1u32.to_le_bytes());
        tiff.extend(orientation.to_le_bytes());
        tiff.extend([0, 0]);
        tiff.extend(0u32.to_le_bytes()); // no next IFD
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend(tiff);
        let mut out = vec![0xFF, 0xD8, 0xFF, 0xE1];
        out.extend(u16::try_from(app1.len() + 2).expect("small").to_be_bytes());
        out.extend(app1);
        out.extend(&jpeg[2..]);
        out
    }

    #[test]
    fn exif_orientation_is_applied() {
        // Left half dark, right half bright, 40 wide and 20 tall.
        let image =
            RgbImage::from_fn(40, 20, |x, _| if x < 20 { Rgb([0, 0, 0]) } else { Rgb([250, 250, 250]) });
        let upright = decode(&jpeg_with_orientation(&image, 1), &ImageLimits::default()).expect("decode");
        assert_eq!(upright.dimensions(), (40, 20));
        // 6: the camera was turned; the image is rotated 90° clockwise to display.
        let rotated = decode(&jpeg_with_orientation(&image, 6), &ImageLimits::default()).expect("decode");
        assert_eq!(rotated.dimensions(), (20, 40));
        // The dark left half is now on top.
        assert!(rotated.get_pixel(10, 5).0[0] < 60, "{:?}", rotated.get_pixel(10, 5));
        assert!(rotated.get_pixel(10, 35).0[0] > 190, "{:?}", rotated.get_pixel(10, 35));
    }

    #[test]
    fn transparency_lands_on_white() {
        let image =
            RgbaImage::from_fn(4, 4, |x, _| if x < 2 { Rgba([0, 0, 0, 0]) } else { Rgba([0, 0, 0, 128]) });
        let bytes = encode(&DynamicImage::ImageRgba8(image), ImageFormat::Png);
        let rgb = decode(&bytes, &ImageLimits::default()).expect("decode");
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255], "fully transparent is white");
        assert_eq!(rgb.get_pixel(3, 0).0, [127, 127, 127], "half transparent black is mid grey");
    }

    #[test]
    fn limits_refuse_before_decoding() {
        let png = encode(&DynamicImage::ImageRgb8(gradient(64, 64)), ImageFormat::Png);
        let tight = ImageLimits { max_bytes: 10, ..ImageLimits::default() };
        assert!(matches!(decode(&png, &tight), Err(ImageError::TooManyBytes { .. })));
        let few_pixels = ImageLimits { max_pixels: 64 * 63, ..ImageLimits::default() };
        let err = decode(&png, &few_pixels).expect_err("too many pixels");
        assert_eq!(
            err,
            ImageError::TooManyPixels { width: 64, height: 64, max_pixels: 64 * 63, max_side: 16_384 }
        );
        // A bomb: a valid PNG header claiming 60000 × 60000 over a few bytes of data.
        let mut bomb = Vec::new();
        image::codecs::png::PngEncoder::new(&mut bomb)
            .write_image(&[0; 3], 1, 1, image::ExtendedColorType::Rgb8)
            .expect("png");
        bomb[16..20].copy_from_slice(&60_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&60_000u32.to_be_bytes());
        // The IHDR chunk's CRC (over its type and data) must agree, or it is merely corrupt.
        let mut crc = flate2::Crc::new();
        crc.update(&bomb[12..29]);
        bomb[29..33].copy_from_slice(&crc.sum().to_be_bytes());
        let err = decode(&bomb, &ImageLimits::default()).expect_err("bomb");
        assert!(matches!(err, ImageError::TooManyPixels { width: 60_000, height: 60_000, .. }), "{err:?}");
    }

    #[test]
    fn junk_and_other_formats_are_named() {
        let err = decode(b"definitely not an image", &ImageLimits::default()).expect_err("junk");
        assert!(matches!(err, ImageError::Unsupported(_)), "{err:?}");
        assert!(err.to_string().contains("JPEG, PNG, WebP or GIF"));
        let bmp = b"BM\x3e\0\0\0\0\0\0\0\x36\0\0\0";
        assert!(matches!(decode(bmp, &ImageLimits::default()), Err(ImageError::Unsupported(_))));
        // A JPEG cut short: its format is known, its data is not there.
        let jpeg = encode(&DynamicImage::ImageRgb8(gradient(32, 32)), ImageFormat::Jpeg);
        let err = decode(&jpeg[..jpeg.len() / 3], &ImageLimits::default()).expect_err("truncated");
        assert!(matches!(err, ImageError::Corrupt(_)), "{err:?}");
    }
}

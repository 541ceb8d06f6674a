//! Frames to pixel values, as the Hugging Face Video-LLaVA processors compute them.
//!
//! Resize the shortest edge to [`PreprocessConfig::size`] (Pillow-style antialiased bicubic,
//! horizontal pass then vertical pass, each rounded to u8 as Pillow does), center crop to
//! [`PreprocessConfig::crop`], multiply by [`PreprocessConfig::rescale`], normalize with the
//! mean/std, and lay out channels first.
//!
//! ```
//! use vl_runtime::preprocess::{preprocess_image, PreprocessConfig};
//! use vl_runtime::video::RgbFrame;
//! let frame = RgbFrame::new(320, 180, vec![128; 320 * 180 * 3])?;
//! let pixels = preprocess_image(&frame, &PreprocessConfig::video_llava())?;
//! assert_eq!(pixels.shape(), &[1, 3, 224, 224]);
//! # Ok::<(), vl_runtime::video::VideoError>(())
//! ```

use std::borrow::Cow;
use std::path::Path;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use ndarray::{Array4, Array5, ArrayD, Axis, Ix5};
use serde::{Deserialize, Serialize};

use crate::video::{RgbFrame, VideoError};

/// OpenAI CLIP normalization mean (RGB), as in transformers' `OPENAI_CLIP_MEAN`.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP normalization std (RGB), as in transformers' `OPENAI_CLIP_STD`.
#[allow(clippy::excessive_precision)] // the digits of the published CLIP config
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_1];

/// The resampling filter for the resize.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resample {
    /// Pillow's `BICUBIC` (Keys cubic, a = -0.5, support widened when downscaling).
    Bicubic,
    /// Pillow's `BILINEAR` (triangle, support widened when downscaling).
    Bilinear,
}

impl Resample {
    /// The `fast_image_resize` filter with the same kernel as Pillow's.
    fn filter(self) -> FilterType {
        match self {
            Resample::Bicubic => FilterType::CatmullRom,
            Resample::Bilinear => FilterType::Bilinear,
        }
    }
}

/// How frames become pixel values; the exporter writes it into the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessConfig {
    /// Target length of the shortest edge after resizing (`size["shortest_edge"]`).
    pub size: u32,
    /// Side of the square center crop (`crop_size`).
    pub crop: u32,
    /// Per-channel mean subtracted after rescaling (RGB).
    pub mean: [f32; 3],
    /// Per-channel std divided by after subtracting the mean (RGB).
    pub std: [f32; 3],
    /// Factor from u8 to the model's range, `1/255`.
    pub rescale: f32,
    /// Resampling filter.
    pub resample: Resample,
}

impl PreprocessConfig {
    /// Video-LLaVA's settings: shortest edge 224, crop 224, bicubic, ×1/255, CLIP mean/std.
    pub fn video_llava() -> Self {
        Self { size: 224, crop: 224, mean: CLIP_MEAN, std: CLIP_STD, rescale: 1.0 / 255.0, resample: Resample::Bicubic }
    }

    /// Checks that the config can be applied (sizes > 0, finite values, non-zero std).
    pub fn validate(&self) -> Result<(), VideoError> {
        if self.size == 0 || self.crop == 0 {
            return Err(VideoError::InvalidConfig("size and crop must be > 0"));
        }
        if !self.rescale.is_finite() || self.rescale == 0.0 {
            return Err(VideoError::InvalidConfig("rescale must be finite and non-zero"));
        }
        if self.mean.iter().chain(&self.std).any(|v| !v.is_finite()) {
            return Err(VideoError::InvalidConfig("mean and std must be finite"));
        }
        if self.std.contains(&0.0) {
            return Err(VideoError::InvalidConfig("std must be non-zero"));
        }
        Ok(())
    }

    /// Values per preprocessed frame: `3 × crop × crop`.
    pub fn values_per_frame(&self) -> usize {
        3 * self.crop as usize * self.crop as usize
    }
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        Self::video_llava()
    }
}

/// Size `(width, height)` after resizing the shortest edge to `shortest_edge`.
///
/// transformers' `get_resize_output_image_size(default_to_square=False)`: the long side is
/// `int(shortest_edge * long / short)` in float64 (truncated); a square stays square.
pub fn resize_output_size(width: u32, height: u32, shortest_edge: u32) -> (u32, u32) {
    let (short, long) = if width <= height { (width, height) } else { (height, width) };
    let new_long = (f64::from(shortest_edge) * f64::from(long) / f64::from(short)) as u32;
    if width <= height { (shortest_edge, new_long) } else { (new_long, shortest_edge) }
}

/// Preprocesses one frame into `out` (`3 × crop × crop` values, channels first).
pub fn preprocess_frame(frame: &RgbFrame, cfg: &PreprocessConfig, out: &mut [f32]) -> Result<(), VideoError> {
    cfg.validate()?;
    if out.len() != cfg.values_per_frame() {
        return Err(VideoError::OutputBuffer { crop: cfg.crop, expected: cfg.values_per_frame(), got: out.len() });
    }
    let (width, height) = resize_output_size(frame.width(), frame.height(), cfg.size);
    let resized = resize_rgb(frame, width, height, cfg.resample)?;
    crop_normalize(&resized, width, height, cfg, out);
    Ok(())
}

/// Preprocesses a video's frames into `[1, F, 3, crop, crop]`.
pub fn preprocess_video(frames: &[RgbFrame], cfg: &PreprocessConfig) -> Result<Array5<f32>, VideoError> {
    if frames.is_empty() {
        return Err(VideoError::NoFrames);
    }
    let crop = cfg.crop as usize;
    let mut out = Array5::<f32>::zeros((1, frames.len(), 3, crop, crop));
    let values = out.as_slice_mut().ok_or(VideoError::InvalidConfig("non-contiguous output"))?;
    for (frame, chunk) in frames.iter().zip(values.chunks_exact_mut(cfg.values_per_frame())) {
        preprocess_frame(frame, cfg, chunk)?;
    }
    Ok(out)
}

/// Preprocesses one image into `[1, 3, crop, crop]`.
pub fn preprocess_image(frame: &RgbFrame, cfg: &PreprocessConfig) -> Result<Array4<f32>, VideoError> {
    let crop = cfg.crop as usize;
    let mut out = Array4::<f32>::zeros((1, 3, crop, crop));
    let values = out.as_slice_mut().ok_or(VideoError::InvalidConfig("non-contiguous output"))?;
    preprocess_frame(frame, cfg, values)?;
    Ok(out)
}

/// Which implementation turns frames into pixel values; the manifest records it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PreprocessRecipe {
    /// The Hugging Face processors: Pillow-style resize of u8 pixels, center crop, rescale,
    /// normalize ([`preprocess_video`], [`preprocess_image`]).
    #[default]
    HfProcessor,
    /// The original Video-LLaVA (LanguageBind) transforms ([`preprocess_video_original`],
    /// [`preprocess_image_original`]). The original also flips video frames horizontally at
    /// random at inference; this recipe never flips.
    Original,
}

impl PreprocessRecipe {
    /// Preprocesses a video's frames into `[1, F, 3, crop, crop]` with this recipe.
    pub fn video(self, frames: &[RgbFrame], cfg: &PreprocessConfig) -> Result<Array5<f32>, VideoError> {
        match self {
            PreprocessRecipe::HfProcessor => preprocess_video(frames, cfg),
            PreprocessRecipe::Original => preprocess_video_original(frames, cfg),
        }
    }

    /// Preprocesses one image into `[1, 3, crop, crop]` with this recipe.
    pub fn image(self, frame: &RgbFrame, cfg: &PreprocessConfig) -> Result<Array4<f32>, VideoError> {
        match self {
            PreprocessRecipe::HfProcessor => preprocess_image(frame, cfg),
            PreprocessRecipe::Original => preprocess_image_original(frame, cfg),
        }
    }
}

/// Video frames as the original Video-LLaVA preprocesses them (LanguageBind's video transform):
/// scale to [0, 1] (`x / 255.0` in f32), normalize with the mean/std, resize so that the
/// shortest side is [`PreprocessConfig::size`] with bilinear interpolation without antialiasing
/// (torch `interpolate(mode="bilinear", align_corners=False)`, pytorchvideo's `ShortSideScale`),
/// then center crop [`PreprocessConfig::crop`] (offsets rounded half to even, as torchvision's
/// `CenterCropVideo`). The original's random horizontal flip is not applied.
///
/// [`PreprocessConfig::resample`] is not used: the original's resize is always bilinear.
pub fn preprocess_video_original(frames: &[RgbFrame], cfg: &PreprocessConfig) -> Result<Array5<f32>, VideoError> {
    if frames.is_empty() {
        return Err(VideoError::NoFrames);
    }
    cfg.validate()?;
    if cfg.size < cfg.crop {
        return Err(VideoError::InvalidConfig("the original video recipe needs size >= crop"));
    }
    let crop = cfg.crop as usize;
    let mut out = Array5::<f32>::zeros((1, frames.len(), 3, crop, crop));
    let values = out.as_slice_mut().ok_or(VideoError::InvalidConfig("non-contiguous output"))?;
    for (frame, chunk) in frames.iter().zip(values.chunks_exact_mut(cfg.values_per_frame())) {
        let (width, height) = short_side_scale_size(frame.width(), frame.height(), cfg.size);
        let planes = planar_f32(frame, cfg, true);
        let resized = resize_planes(&planes, frame.width(), frame.height(), width, height, Filter::Bilinear);
        crop_planes(&resized, width, height, cfg.crop, chunk);
    }
    Ok(out)
}

/// One image as the original Video-LLaVA preprocesses it (`image_aspect_ratio: pad` and
/// LanguageBind's image transform): pad to a square with the mean color (`int(mean × 255)`,
/// the image centered as `expand2square` pastes it), scale to [0, 1] (`x / 255.0`), resize the
/// shortest side to [`PreprocessConfig::size`] with antialiased bicubic on the float values
/// (torchvision `Resize` on a tensor), center crop, normalize.
pub fn preprocess_image_original(frame: &RgbFrame, cfg: &PreprocessConfig) -> Result<Array4<f32>, VideoError> {
    cfg.validate()?;
    let padded = expand_to_square(frame, cfg)?;
    let (width, height) = resize_output_size(padded.width(), padded.height(), cfg.size);
    if width < cfg.crop || height < cfg.crop {
        return Err(VideoError::InvalidConfig("the original image recipe needs size >= crop"));
    }
    let planes = planar_f32(&padded, cfg, false);
    let resized = resize_planes(&planes, padded.width(), padded.height(), width, height, Filter::Bicubic);
    let crop = cfg.crop as usize;
    let mut out = Array4::<f32>::zeros((1, 3, crop, crop));
    let values = out.as_slice_mut().ok_or(VideoError::InvalidConfig("non-contiguous output"))?;
    crop_planes(&resized, width, height, cfg.crop, values);
    let plane = crop * crop;
    for (c, chunk) in values.chunks_exact_mut(plane).enumerate() {
        chunk.iter_mut().for_each(|v| *v = (*v - cfg.mean[c]) / cfg.std[c]);
    }
    Ok(out)
}

/// Reads precomputed pixel values (`--pixel-values FILE.npy`) as `[1, F, 3, H, W]`.
///
/// Accepts float32 arrays of shape `[F, 3, H, W]` or `[1, F, 3, H, W]`, C or Fortran order.
pub fn load_pixel_values_npy(path: impl AsRef<Path>) -> Result<Array5<f32>, VideoError> {
    let path = path.as_ref();
    let array: ArrayD<f32> = ndarray_npy::read_npy(path).map_err(|source| match source {
        ndarray_npy::ReadNpyError::Io(e) if e.kind() == std::io::ErrorKind::NotFound => {
            VideoError::FileMissing { path: path.to_path_buf() }
        }
        source => VideoError::PixelValuesRead { path: path.to_path_buf(), source },
    })?;
    let shape = array.shape().to_vec();
    let shape_err = || VideoError::PixelValuesShape { path: path.to_path_buf(), shape: shape.clone() };
    let array = match shape.as_slice() {
        [f, 3, h, w] if *f > 0 && *h > 0 && *w > 0 => array.insert_axis(Axis(0)),
        [1, f, 3, h, w] if *f > 0 && *h > 0 && *w > 0 => array,
        _ => return Err(shape_err()),
    };
    if array.iter().any(|v| !v.is_finite()) {
        return Err(VideoError::PixelValuesNotFinite { path: path.to_path_buf() });
    }
    let array = array.into_dimensionality::<Ix5>().map_err(|_| shape_err())?;
    Ok(array.as_standard_layout().into_owned())
}

/// Resizes rgb24 to `width × height` like Pillow: a horizontal pass, then a vertical pass,
/// each rounding and clamping to u8.
///
/// `fast_image_resize` alone runs the vertical pass first for u8 images; the intermediate
/// clamping then differs from Pillow's by up to several levels at sharp edges, so the two
/// passes are run as two single-axis resizes in Pillow's order.
fn resize_rgb(frame: &RgbFrame, width: u32, height: u32, resample: Resample) -> Result<Vec<u8>, VideoError> {
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(resample.filter()));
    let mut resizer = Resizer::new();
    let (src_w, src_h) = (frame.width(), frame.height());
    let horizontal: Cow<'_, [u8]> = if width == src_w {
        Cow::Borrowed(frame.data())
    } else {
        let src = ImageRef::new(src_w, src_h, frame.data(), PixelType::U8x3)?;
        let mut dst = Image::new(width, src_h, PixelType::U8x3);
        resizer.resize(&src, &mut dst, &options)?;
        Cow::Owned(dst.into_vec())
    };
    if height == src_h {
        return Ok(horizontal.into_owned());
    }
    let src = ImageRef::new(width, src_h, &horizontal, PixelType::U8x3)?;
    let mut dst = Image::new(width, height, PixelType::U8x3);
    resizer.resize(&src, &mut dst, &options)?;
    Ok(dst.into_vec())
}

/// Per channel, the normalized value of each u8 level: `(f32(v × rescale) - mean) / std`,
/// with the product in float64 as transformers' `rescale` computes it.
fn level_table(cfg: &PreprocessConfig) -> [[f32; 256]; 3] {
    let mut table = [[0.0f32; 256]; 3];
    let scale = f64::from(cfg.rescale);
    for (c, row) in table.iter_mut().enumerate() {
        for (v, slot) in row.iter_mut().enumerate() {
            let rescaled = (v as f64 * scale) as f32;
            *slot = (rescaled - cfg.mean[c]) / cfg.std[c];
        }
    }
    table
}

/// First source row/column of a centered crop: transformers' `(size - crop) // 2`, which is
/// negative (zero padding) when the image is smaller than the crop.
fn crop_offset(size: u32, crop: u32) -> i64 {
    (i64::from(size) - i64::from(crop)).div_euclid(2)
}

/// Center crops `resized` (rgb24, `width × height`) and writes normalized CHW values.
///
/// Outside the image (crop larger than the resized frame) the u8 value is 0, as
/// transformers pads before rescaling.
fn crop_normalize(resized: &[u8], width: u32, height: u32, cfg: &PreprocessConfig, out: &mut [f32]) {
    let table = level_table(cfg);
    let crop = cfg.crop as usize;
    let (top, left) = (crop_offset(height, cfg.crop), crop_offset(width, cfg.crop));
    let plane = crop * crop;
    for y in 0..crop {
        let src_y = top + y as i64;
        for x in 0..crop {
            let src_x = left + x as i64;
            let inside = (0..i64::from(height)).contains(&src_y) && (0..i64::from(width)).contains(&src_x);
            let pixel = inside.then(|| (src_y * i64::from(width) + src_x) as usize * 3);
            for c in 0..3 {
                let level = pixel.map_or(0, |p| resized[p + c]);
                out[c * plane + y * crop + x] = table[c][usize::from(level)];
            }
        }
    }
}

/// Output size of pytorchvideo's `short_side_scale`: the short side becomes `size`, the long
/// side `floor(long / short × size)` computed in float64 (in that order).
fn short_side_scale_size(width: u32, height: u32, size: u32) -> (u32, u32) {
    let (w, h, s) = (f64::from(width), f64::from(height), f64::from(size));
    if width < height { (size, (h / w * s).floor() as u32) } else { ((w / h * s).floor() as u32, size) }
}

/// The divisor of the original transforms' `x / 255.0`: `1 / rescale`, rounded.
fn level_divisor(cfg: &PreprocessConfig) -> f32 {
    (1.0 / f64::from(cfg.rescale)).round() as f32
}

/// rgb24 as three f32 planes of `v / 255`, normalized with the mean/std when `normalize`.
fn planar_f32(frame: &RgbFrame, cfg: &PreprocessConfig, normalize: bool) -> Vec<f32> {
    let divisor = level_divisor(cfg);
    let plane = frame.width() as usize * frame.height() as usize;
    let mut out = vec![0.0f32; 3 * plane];
    for (i, px) in frame.data().chunks_exact(3).enumerate() {
        for c in 0..3 {
            let v = f32::from(px[c]) / divisor;
            out[c * plane + i] = if normalize { (v - cfg.mean[c]) / cfg.std[c] } else { v };
        }
    }
    out
}

/// `expand2square`: the frame centered on a square of the mean color (`int(mean × 255)`).
fn expand_to_square<'a>(frame: &'a RgbFrame, cfg: &PreprocessConfig) -> Result<Cow<'a, RgbFrame>, VideoError> {
    let (w, h) = (frame.width(), frame.height());
    if w == h {
        return Ok(Cow::Borrowed(frame));
    }
    let side = w.max(h);
    let fill: [u8; 3] = std::array::from_fn(|c| (f64::from(cfg.mean[c]) * 255.0) as u8);
    let mut data: Vec<u8> = fill.iter().copied().cycle().take(side as usize * side as usize * 3).collect();
    let (left, top) = ((side - w) / 2, (side - h) / 2);
    let row = w as usize * 3;
    for (y, src) in frame.data().chunks_exact(row).enumerate() {
        let start = ((top as usize + y) * side as usize + left as usize) * 3;
        data[start..start + row].copy_from_slice(src);
    }
    Ok(Cow::Owned(RgbFrame::new(side, side, data)?))
}

/// Interpolation of the original transforms' float resizes.
#[derive(Clone, Copy)]
enum Filter {
    /// torch bilinear, `align_corners=False`, no antialiasing.
    Bilinear,
    /// torch bicubic (a = -0.5), `align_corners=False`, antialiased (torchvision `Resize`).
    Bicubic,
}

/// For each output index along one axis: the input indices and their weights, in the order
/// ATen sums them (an index can repeat: bilinear at the last pixel reads it twice).
type AxisTaps = Vec<Vec<(usize, f32)>>;

fn bilinear_taps(input: usize, output: usize) -> AxisTaps {
    // ATen's `compute_source_index_and_lambda`, in f32 as its CPU kernel computes it.
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|dst| {
            if input == output {
                return vec![(dst, 1.0)];
            }
            let src = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(input - 1);
            let l1 = (src - i0 as f32).clamp(0.0, 1.0);
            let i1 = if i0 + 1 < input { i0 + 1 } else { i0 };
            vec![(i0, 1.0 - l1), (i1, l1)]
        })
        .collect()
}

fn cubic(x: f32) -> f32 {
    const A: f32 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn bicubic_aa_taps(input: usize, output: usize) -> AxisTaps {
    // ATen's `_compute_indices_min_size_weights_aa` (the filter widened when downscaling).
    let scale = input as f32 / output as f32;
    let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    (0..output)
        .map(|dst| {
            let center = scale * (dst as f32 + 0.5);
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).clamp(0, input as i64) as usize;
            let mut taps: Vec<(usize, f32)> =
                (xmin..xmax.max(xmin)).map(|j| (j, cubic((j as f32 - center + 0.5) * invscale))).collect();
            let total: f32 = taps.iter().map(|t| t.1).sum();
            if total != 0.0 {
                taps.iter_mut().for_each(|t| t.1 /= total);
            }
            taps
        })
        .collect()
}

fn taps(filter: Filter, input: usize, output: usize) -> AxisTaps {
    match filter {
        Filter::Bilinear => bilinear_taps(input, output),
        Filter::Bicubic => bicubic_aa_taps(input, output),
    }
}

/// `sum_j w_j × src[i_j × stride]`, accumulated in order as ATen does.
fn tap_sum(src: &[f32], stride: usize, taps: &[(usize, f32)]) -> f32 {
    let mut acc = 0.0f32;
    for &(i, w) in taps {
        acc += src[i * stride] * w;
    }
    acc
}

/// Separable resize of three planes (`[3][src_h][src_w]`): along the width, then the height.
fn resize_planes(src: &[f32], src_w: u32, src_h: u32, width: u32, height: u32, filter: Filter) -> Vec<f32> {
    let (sw, sh, w, h) = (src_w as usize, src_h as usize, width as usize, height as usize);
    let across = taps(filter, sw, w);
    let down = taps(filter, sh, h);
    let mut out = vec![0.0f32; 3 * w * h];
    let mut rows = vec![0.0f32; sh * w];
    for c in 0..3 {
        let plane = &src[c * sw * sh..(c + 1) * sw * sh];
        for y in 0..sh {
            let line = &plane[y * sw..(y + 1) * sw];
            for x in 0..w {
                rows[y * w + x] = tap_sum(line, 1, &across[x]);
            }
        }
        let dst = &mut out[c * w * h..(c + 1) * w * h];
        for y in 0..h {
            for x in 0..w {
                dst[y * w + x] = tap_sum(&rows[x..], w, &down[y]);
            }
        }
    }
    out
}

/// torchvision's center-crop offset: `int(round((size - crop) / 2.0))`, halves to even.
fn round_half_even_offset(size: u32, crop: u32) -> usize {
    (f64::from(size.saturating_sub(crop)) / 2.0).round_ties_even() as usize
}

/// Center crops three planes (`[3][height][width]`, each side at least `crop`) into `out`.
fn crop_planes(planes: &[f32], width: u32, height: u32, crop: u32, out: &mut [f32]) {
    let (w, h, k) = (width as usize, height as usize, crop as usize);
    let (top, left) = (round_half_even_offset(height, crop), round_half_even_offset(width, crop));
    for c in 0..3 {
        for y in 0..k {
            let src = &planes[c * w * h + (top + y) * w + left..][..k];
            out[c * k * k + y * k..][..k].copy_from_slice(src);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(width: u32, height: u32, f: impl Fn(u32, u32, usize) -> u8) -> RgbFrame {
        let mut data = Vec::with_capacity((width * height * 3) as usize);
        for y in 0..height {
            for x in 0..width {
                for c in 0..3 {
                    data.push(f(x, y, c));
                }
            }
        }
        RgbFrame::new(width, height, data).expect("valid test frame")
    }

    #[test]
    fn output_size_truncates_the_long_side_like_transformers() {
        // int(224 * 271 / 481) etc., computed in Python.
        assert_eq!(resize_output_size(481, 271, 224), (397, 224));
        assert_eq!(resize_output_size(136, 240, 224), (224, 395));
        assert_eq!(resize_output_size(1920, 1080, 224), (398, 224));
        assert_eq!(resize_output_size(3840, 2160, 224), (398, 224));
        assert_eq!(resize_output_size(100, 100, 224), (224, 224));
        assert_eq!(resize_output_size(1, 1000, 224), (224, 224_000));
    }

    #[test]
    fn crop_offset_floors_like_python() {
        assert_eq!(crop_offset(397, 224), 86);
        assert_eq!(crop_offset(224, 224), 0);
        assert_eq!(crop_offset(221, 224), -2); // (221 - 224) // 2 == -2 in Python
        assert_eq!(crop_offset(222, 224), -1);
    }

    #[test]
    fn constant_frame_normalizes_to_the_table_value() {
        let cfg = PreprocessConfig::video_llava();
        let f = frame(321, 179, |_, _, c| [10, 128, 250][c]);
        let out = preprocess_image(&f, &cfg).expect("preprocess");
        for c in 0..3 {
            let want = ([10.0f32, 128.0, 250.0][c] / 255.0 - cfg.mean[c]) / cfg.std[c];
            let plane = out.index_axis(Axis(1), c);
            assert!(plane.iter().all(|v| (v - want).abs() < 1e-6), "channel {c}");
        }
    }

    #[test]
    fn channels_come_out_first_and_crop_is_centered() {
        // No resize: a 224-high image with width 230 is cropped 3 columns from the left.
        let cfg = PreprocessConfig { rescale: 1.0, mean: [0.0; 3], std: [1.0; 3], ..PreprocessConfig::video_llava() };
        let f = frame(230, 224, |x, y, c| ((x + 2 * y) % 200) as u8 + c as u8);
        let out = preprocess_image(&f, &cfg).expect("preprocess");
        for (y, x) in [(0usize, 0usize), (5, 7), (223, 223)] {
            for c in 0..3 {
                let want = ((x as u32 + 3 + 2 * y as u32) % 200) as f32 + c as f32;
                assert_eq!(out[[0, c, y, x]], want, "c={c} y={y} x={x}");
            }
        }
    }

    #[test]
    fn small_crop_config_pads_with_zero_levels() {
        let cfg = PreprocessConfig {
            size: 4,
            crop: 6,
            rescale: 1.0,
            mean: [0.0; 3],
            std: [1.0; 3],
            ..PreprocessConfig::video_llava()
        };
        let f = frame(4, 4, |_, _, _| 200);
        let out = preprocess_image(&f, &cfg).expect("preprocess");
        assert_eq!(out[[0, 0, 0, 0]], 0.0);
        assert_eq!(out[[0, 0, 1, 1]], 200.0);
        assert_eq!(out[[0, 0, 4, 4]], 200.0);
        assert_eq!(out[[0, 0, 5, 5]], 0.0);
    }

    #[test]
    fn bicubic_keeps_constant_images_constant_when_downscaling() {
        let cfg = PreprocessConfig { rescale: 1.0, mean: [0.0; 3], std: [1.0; 3], ..PreprocessConfig::video_llava() };
        let f = frame(1280, 720, |_, _, _| 77);
        let out = preprocess_image(&f, &cfg).expect("preprocess");
        assert!(out.iter().all(|&v| v == 77.0));
    }

    #[test]
    fn bad_buffers_and_configs_are_errors() {
        let cfg = PreprocessConfig::video_llava();
        let f = frame(8, 8, |_, _, _| 0);
        let mut short = vec![0.0; 10];
        assert!(matches!(preprocess_frame(&f, &cfg, &mut short), Err(VideoError::OutputBuffer { .. })));
        let zero_std = PreprocessConfig { std: [1.0, 0.0, 1.0], ..cfg.clone() };
        assert!(matches!(preprocess_image(&f, &zero_std), Err(VideoError::InvalidConfig(_))));
        assert!(matches!(preprocess_video(&[], &cfg), Err(VideoError::NoFrames)));
    }

    #[test]
    fn video_stacks_frames_in_order() {
        let cfg = PreprocessConfig::video_llava();
        let frames = [frame(16, 9, |_, _, _| 0), frame(16, 9, |_, _, _| 255)];
        let out = preprocess_video(&frames, &cfg).expect("preprocess");
        assert_eq!(out.shape(), &[1, 2, 3, 224, 224]);
        assert!(out[[0, 0, 0, 0, 0]] < out[[0, 1, 0, 0, 0]]);
    }

    #[test]
    fn config_round_trips_through_json() {
        let cfg = PreprocessConfig::video_llava();
        let text = serde_json::to_string(&cfg).expect("serialize");
        assert!(text.contains("\"resample\":\"bicubic\""), "{text}");
        let back: PreprocessConfig = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, cfg);
    }

    #[test]
    fn original_video_sizes_and_crop_offsets_follow_pytorchvideo_and_torchvision() {
        // floor(w / h * 224) in float64, short side exact.
        assert_eq!(short_side_scale_size(1280, 720, 224), (398, 224));
        assert_eq!(short_side_scale_size(112, 66, 56), (95, 56));
        assert_eq!(short_side_scale_size(57, 120, 56), (56, 117));
        assert_eq!(short_side_scale_size(300, 300, 224), (224, 224));
        // int(round(x / 2.0)) rounds halves to even.
        assert_eq!(round_half_even_offset(95, 56), 20);
        assert_eq!(round_half_even_offset(117, 56), 30);
        assert_eq!(round_half_even_offset(398, 224), 87);
    }

    #[test]
    fn original_video_recipe_keeps_constant_frames_constant() {
        let cfg = PreprocessConfig::video_llava();
        let f = frame(320, 180, |_, _, c| [10, 128, 250][c]);
        let out = preprocess_video_original(&[f.clone(), f], &cfg).expect("preprocess");
        assert_eq!(out.shape(), &[1, 2, 3, 224, 224]);
        for c in 0..3 {
            let want = (f32::from([10u8, 128, 250][c]) / 255.0 - cfg.mean[c]) / cfg.std[c];
            let plane = out.index_axis(Axis(2), c);
            assert!(plane.iter().all(|v| (v - want).abs() < 1e-5), "channel {c}");
        }
        let small = PreprocessConfig { size: 200, ..cfg };
        assert!(matches!(
            preprocess_video_original(&[frame(8, 8, |_, _, _| 0)], &small),
            Err(VideoError::InvalidConfig(_))
        ));
    }

    #[test]
    fn original_image_recipe_pads_with_the_mean_color() {
        let cfg = PreprocessConfig { size: 4, crop: 4, ..PreprocessConfig::video_llava() };
        // A 4x2 white image: rows 0 and 3 of the 4x4 square are the mean color (122, 116, 104).
        let out = preprocess_image_original(&frame(4, 2, |_, _, _| 255), &cfg).expect("preprocess");
        for c in 0..3 {
            let fill = (f32::from([122u8, 116, 104][c]) / 255.0 - cfg.mean[c]) / cfg.std[c];
            let white = (1.0 - cfg.mean[c]) / cfg.std[c];
            assert!((out[[0, c, 0, 1]] - fill).abs() < 1e-5, "channel {c}: {}", out[[0, c, 0, 1]]);
            assert!((out[[0, c, 1, 1]] - white).abs() < 1e-5);
        }
    }

    #[test]
    fn pixel_values_npy_shapes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let four = dir.path().join("four.npy");
        ndarray_npy::write_npy(&four, &ndarray::Array4::<f32>::ones((2, 3, 4, 4))).expect("write");
        assert_eq!(load_pixel_values_npy(&four).expect("read").shape(), &[1, 2, 3, 4, 4]);

        let five = dir.path().join("five.npy");
        ndarray_npy::write_npy(&five, &Array5::<f32>::ones((1, 2, 3, 4, 4))).expect("write");
        assert_eq!(load_pixel_values_npy(&five).expect("read").shape(), &[1, 2, 3, 4, 4]);

        let bad_shape = dir.path().join("bad.npy");
        ndarray_npy::write_npy(&bad_shape, &ndarray::Array4::<f32>::ones((2, 4, 4, 3))).expect("write");
        assert!(matches!(load_pixel_values_npy(&bad_shape), Err(VideoError::PixelValuesShape { .. })));

        let f64_file = dir.path().join("f64.npy");
        ndarray_npy::write_npy(&f64_file, &ndarray::Array4::<f64>::ones((2, 3, 4, 4))).expect("write");
        let err = load_pixel_values_npy(&f64_file).expect_err("f64 must be refused");
        assert!(matches!(err, VideoError::PixelValuesRead { .. }), "{err}");

        let nan = dir.path().join("nan.npy");
        ndarray_npy::write_npy(&nan, &ndarray::Array4::<f32>::from_elem((1, 3, 2, 2), f32::NAN)).expect("write");
        assert!(matches!(load_pixel_values_npy(&nan), Err(VideoError::PixelValuesNotFinite { .. })));

        let missing = dir.path().join("missing.npy");
        assert!(matches!(load_pixel_values_npy(&missing), Err(VideoError::FileMissing { .. })));
    }
}
